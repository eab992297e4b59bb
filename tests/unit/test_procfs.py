"""system/procfs.py against real processes of this machine, and the dnsmasq clean-up built on it."""
import os
import secrets
import subprocess
import sys

from qvd_gevent.hkd.dnsmasq import kill_leftover_dnsmasq
from qvd_gevent.system import procfs


def _child(*args, env=None):
    """A sleeping process whose command line ends with args."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", *args],
                            env=dict(os.environ, **(env or {})))


def test_a_live_process_is_seen_with_its_arguments_environment_and_namespace():
    marker = f"qvd-procfs-{secrets.token_hex(4)}"
    child = _child(f"--mark={marker}", env={"QVD_PROCFS_TEST": marker})
    try:
        assert child.pid in procfs.pids()
        assert procfs.pids_with_argument(marker) == [child.pid]
        assert procfs.read_cmdline(child.pid)[1:4] == ["-c", "import time; time.sleep(30)", f"--mark={marker}"]
        assert procfs.read_environ(child.pid)["QVD_PROCFS_TEST"] == marker
        assert procfs.process_state(child.pid) in ("S", "R") and procfs.is_alive(child.pid)
        assert procfs.network_namespace(child.pid) == procfs.network_namespace(os.getpid()) is not None
        assert child.pid in procfs.pids_in_network_namespace(procfs.network_namespace(os.getpid()))
    finally:
        child.kill()
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)      # exited, not yet reaped
    assert procfs.process_state(child.pid) == "Z" and not procfs.is_alive(child.pid)
    child.wait()
    assert procfs.process_state(child.pid) is None and not procfs.is_alive(child.pid)
    assert procfs.read_environ(child.pid) == {} and procfs.read_cmdline(child.pid) == []
    assert procfs.network_namespace(child.pid) is None
    assert procfs.pids_with_argument(marker) == []


def test_mount_tags_of_the_root_and_of_a_folder_that_is_no_mount_point(tmp_path):
    assert procfs.mount_tags("/") is not None
    assert procfs.mount_tags(str(tmp_path / "nowhere")) is None


def test_listening_sockets_include_a_socket_this_test_listens_on():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert ("tcp", "127.0.0.1", port) in procfs.listening_sockets()


def test_a_dnsmasq_left_by_a_killed_node_is_ended_by_its_hosts_file_argument(tmp_path):
    hosts_file = tmp_path / "dhcp-hostsfile"
    leftover = _child(f"--dhcp-hostsfile={hosts_file}")
    other = _child(f"--dhcp-hostsfile={tmp_path / 'another-node'}")
    try:
        assert kill_leftover_dnsmasq(str(hosts_file), wait=5) == []     # nothing left to SIGKILL
        assert leftover.wait(5) == -15                                  # ended by SIGTERM
        assert other.poll() is None                                     # another node's is left alone
    finally:
        for proc in (leftover, other):
            proc.kill()
            proc.wait()
