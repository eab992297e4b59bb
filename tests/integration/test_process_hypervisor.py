"""The `process` hypervisor on its own: launch, environment, signals, exit watch, adoption."""
import os
import random
import shutil
import subprocess
import sys

import gevent
import pytest
from helpers.hkd_env import TINY_VM, pid_alive, proc_cmdline, proc_environ, write_di_script
from helpers.nodes import wait_for

from qvd_gevent.config import Config
from qvd_gevent.hypervisors import HypervisorError, VmSpec, get_hypervisor
from qvd_gevent.hypervisors.process import ProcessHypervisor, vm_loopback_address
from qvd_gevent.vma.client import VmaClient, VmaError


@pytest.fixture
def hv(tmp_path):
    conf = tmp_path / "node.conf"
    base = f"127.{random.randint(101, 250)}.{random.randint(0, 255)}.0/24"
    conf.write_text(f"nodename = hv-test-{os.getpid()}\npath.run = {tmp_path}/run\nvm.process.address.base = {base}\n"
                    "vm.environment.pass = PYTHONPATH\n")
    hypervisor = get_hypervisor("process", Config.load(str(conf)))
    hypervisor.check()
    started = []
    original_start = hypervisor.start

    def tracking_start(spec):
        handle = original_start(spec)
        started.append(handle)
        return handle
    hypervisor.start = tracking_start
    yield hypervisor
    for handle in started:
        try:
            os.killpg(handle.pid, 9)
        except OSError:
            pass
        hypervisor.cleanup(handle)
    hypervisor.close()


KEY = "k" * 43


def spec(vm_id, path=TINY_VM, **kw):
    return VmSpec(vm_id=vm_id, name=f"vm{vm_id}", ip=None, mac=None, memory=256, di_id=1, di_path=path, **kw)


def test_address_is_stable_per_vm_and_inside_the_range():
    assert vm_loopback_address("127.100.0.0/16", 10000) == vm_loopback_address("127.100.0.0/16", 10000)
    assert vm_loopback_address("127.100.0.0/16", 10000) != vm_loopback_address("127.100.0.0/16", 10001)
    assert vm_loopback_address("127.100.0.0/16", 10000).startswith("127.100.")
    with pytest.raises(HypervisorError):
        vm_loopback_address("10.1.0.0/16", 1)


def test_start_sets_environment_and_vma_answers(hv):
    handle = hv.start(spec(10001, properties={"qvd.vm.desktop": "echo"}, agent_key=KEY))
    assert handle.address == hv.address_for(10001) and hv.is_running(handle)
    env = proc_environ(handle.pid)
    assert env["QVD_VM_ID"] == "10001" and env["QVD_VM_NAME"] == "vm10001"
    assert env["QVD_VM_ADDRESS"] == handle.address and env["QVD_NODE"] == hv.nodename
    assert env["QVD_PROP_QVD_VM_DESKTOP"] == "echo"
    # the agent key in the environment (readable by its own user only), never on the command line
    assert env["QVD_VMA_SECRET"] == KEY and "QVD_VMA_UNAUTHENTICATED" not in env
    assert KEY not in proc_cmdline(handle.pid) and KEY not in repr(spec(1, agent_key=KEY))
    assert os.getpgid(handle.pid) == handle.pid          # its own process group
    wait_for(lambda: _pings(handle.address, KEY), 10, what="VMA up")
    assert not _pings(handle.address)                    # tiny_vm requires the key it was given
    hv.shutdown(handle)
    assert hv.wait_exit(handle, timeout=5)
    assert not hv.is_running(handle)
    assert os.path.exists(handle.extra["log"])


def _pings(address, key=None):
    try:
        return VmaClient(address, 3030, timeout=1, key=key).ping()
    except VmaError:
        return False


def test_kill_ends_a_vm_that_ignores_sigterm(hv, tmp_path):
    handle = hv.start(spec(10002, write_di_script(tmp_path / "stubborn", {"TINY_VM_IGNORE_TERM": "1"})))
    wait_for(lambda: _pings(handle.address), 10, what="VMA up")
    hv.shutdown(handle)
    assert not hv.wait_exit(handle, timeout=1)
    hv.kill(handle)
    assert hv.wait_exit(handle, timeout=5)


def test_not_executable_di_is_refused(hv, tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("not a program")
    with pytest.raises(HypervisorError, match="not an executable"):
        hv.start(spec(10003, str(path)))


def test_list_running_finds_vms_of_a_previous_node_process(hv, tmp_path):
    """Adoption: a VM started by another process with our nodename is found and controllable."""
    env = dict(os.environ, QVD_NODE=hv.nodename, QVD_NODE_RUN=hv.run_dir, QVD_VM_ID="10004", QVD_VM_NAME="vm10004",
               QVD_VM_ADDRESS=hv.address_for(10004), QVD_VMA_PORT="3030", QVD_X_PORT="4100")
    # a detached grandchild, like a VM left behind by a node killed with SIGKILL
    launcher = subprocess.run([sys.executable, "-c",
                               ("import subprocess,sys,os;p=subprocess.Popen([sys.argv[1]],start_new_session=True,"
                                "stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL);print(p.pid)"), TINY_VM],
                              env=env, capture_output=True, text=True, check=True)
    pid = int(launcher.stdout.strip())
    try:
        found = wait_for(lambda: hv.list_running().get(10004), 5, what="adoptable VM")
        assert found.pid == pid and found.address == hv.address_for(10004)
        assert hv.is_running(found)
        waiter = gevent.spawn(hv.wait_exit, found, 10)
        gevent.sleep(0.3)
        assert not waiter.ready()
        hv.shutdown(found)
        assert waiter.get(timeout=10) is True
        wait_for(lambda: not pid_alive(pid), 5, what="adopted VM gone")
        assert 10004 not in hv.list_running()
    finally:
        if pid_alive(pid):
            os.killpg(pid, 9)


def test_real_qvd_vm_init_as_di(hv):
    init = os.path.join(os.path.dirname(sys.executable), "qvd-vm-init")
    if not os.access(init, os.X_OK):
        init = shutil.which("qvd-vm-init")
    if not init:
        pytest.skip("qvd-vm-init is not installed (pip install -e .)")
    handle = hv.start(spec(10005, init, agent_key=KEY))
    try:
        wait_for(lambda: _pings(handle.address, KEY), 20, what="qvd-vm-init's VMA up")
        with pytest.raises(VmaError, match="401"):
            VmaClient(handle.address, 3030, timeout=2).call("poweroff")
        VmaClient(handle.address, 3030, timeout=2, key=KEY).call("poweroff")
        assert hv.wait_exit(handle, timeout=10)
    finally:
        hv.kill(handle)


def test_class_is_registered():
    assert ProcessHypervisor.name == "process" and not ProcessHypervisor.needs_root
    assert not ProcessHypervisor.uses_bridge


def test_a_namesake_node_with_another_run_dir_does_not_see_our_vms(hv, tmp_path):
    """Two nodes with one name on one machine (parallel test suites) must not adopt each other's VMs."""
    handle = hv.start(spec(10006))
    conf = tmp_path / "other.conf"
    conf.write_text(f"nodename = {hv.nodename}\npath.run = {tmp_path}/other-run\nvm.process.address.base = {hv.address_range}\n")
    other = ProcessHypervisor(Config.load(str(conf)))
    assert 10006 in hv.list_running() and 10006 not in other.list_running()
    assert not other.is_running(handle)


def test_refuses_an_address_someone_else_answers_on(hv):
    import socket
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind((hv.address_for(10007), 3030))
    squatter.listen(1)
    try:
        with pytest.raises(HypervisorError, match="already in use"):
            hv.start(spec(10007))
    finally:
        squatter.close()


def _process_hypervisor(tmp_path, run, base="auto"):
    conf = tmp_path / f"{run}.conf"
    conf.write_text(f"nodename = same-name\npath.run = {tmp_path}/{run}\nvm.process.address.base = {base}\n")
    hypervisor = ProcessHypervisor(Config.load(str(conf)))
    hypervisor.check()
    return hypervisor


def test_nodes_on_one_machine_get_ranges_of_their_own_and_keep_them_across_restarts(tmp_path):
    """Two nodes (two demos) on one machine: their VM 1 must not get the same address."""
    first, second = _process_hypervisor(tmp_path, "a"), _process_hypervisor(tmp_path, "b")
    try:
        assert first.address_range != second.address_range
        assert first.address_for(1) != second.address_for(1)
        range_of_first = first.address_range
        first.close()                                   # a restart of the first node
        again = _process_hypervisor(tmp_path, "a")
        assert again.address_range == range_of_first    # the VMs it adopts keep their addresses
        with pytest.raises(HypervisorError, match="taken by another node"):
            _process_hypervisor(tmp_path, "c", base=again.address_range)
        again.close()
    finally:
        first.close()
        second.close()


def test_vm_runs_as_its_own_uid_and_cannot_read_the_node_nor_other_vms(tmp_path, monkeypatch):
    """Tried from inside a VM: node.conf (world-readable, as operators leave it), the L7R's key,
    the run folder, a file named in vm.hidden_paths, another VM's home and processes."""
    from helpers.vm_probe import DONE, pids_in_group, probe_report, process_uids, write_probe_di
    if os.geteuid() != 0:
        pytest.skip("VMs get uids of their own only under a node running as root (CI runs as root)")
    conf = tmp_path / "node.conf"
    extra = tmp_path / "more-secrets"
    conf.write_text(f"nodename = hv-test-{os.getpid()}\npath.run = {tmp_path}/run\n"
                    f"database.password = canary-db-password\nvm.hidden_paths = {extra}\n")
    for path in (conf, extra):
        path.write_text(path.read_text() if path.exists() else "canary\n")
        path.chmod(0o644)
    monkeypatch.setenv("QVD_CONFIG", str(conf))             # the node's environment must not reach a VM
    monkeypatch.setenv("PGPASSWORD", "canary-db-password")
    cfg = Config.load(str(conf))
    key = tmp_path / "run" / "l7r" / "ssl" / "key.pem"
    key.parent.mkdir(parents=True)
    key.write_text("canary key\n")
    key.chmod(0o644)
    hv = ProcessHypervisor(cfg)
    hv.check()
    first = second = None
    try:
        first = hv.start(spec(20001, TINY_VM))
        wait_for(lambda: _pings(first.address), 10, what="the first VM's agent")
        first_home = hv.sandbox.home_for(20001)
        secret_of_first = os.path.join(first_home, "its-own-file")
        with open(secret_of_first, "w") as fh:
            fh.write("the first VM's\n")
        os.chmod(secret_of_first, 0o644)
        probe = write_probe_di(tmp_path, files=[conf, key, extra, secret_of_first],
                               folders=[tmp_path / "run", first_home, "/tmp"], pids=[os.getpid(), first.pid])
        second = hv.start(spec(20002, probe))
        log_path = second.extra["log"]
        wait_for(lambda: DONE in open(log_path).read(), 15, what="the probe's report")
        report = probe_report(open(log_path).read())
        base = cfg.get_int("vm.uid.base")
        assert report["ME"] == [str(base + 20002)] * 3, report["ME"]      # uid, gid, groups: its own only
        assert report["DENIED"] == {str(conf), str(key), str(extra), secret_of_first} and not report["READ"]
        assert report["LIST"][str(tmp_path / "run")] == ["vms"]          # nothing of the node's run folder
        assert report["LIST"][first_home] == []
        # a private /tmp: X's and ICE's socket folders, and the folder of its DI (tmp_path) only
        assert sorted(report["LIST"]["/tmp"]) == [".ICE-unix", ".X11-unix", tmp_path.parts[2]]
        assert report["UNREACHED"] == {str(os.getpid()), str(first.pid)} and not report["SIGNALLED"]
        assert int(report["PROCS"]) < 10              # its own pid namespace (the machine runs hundreds)
        assert not {"QVD_CONFIG", "PGPASSWORD", "PYTHONPATH"} & set(report["ENV"])
        assert {"QVD_VM_ID", "HOME", "PATH"} <= set(report["ENV"])
        assert report["HOME"] == f"{hv.sandbox.home_for(20002)} writable"
        # seen from the node: everything the VM runs has the VM's uid (the launcher that waits
        # for it, in the node's pid namespace, is the node's)
        vm_processes = [pid for pid in pids_in_group(second.pid) if pid != second.pid]
        assert vm_processes and {process_uids(pid) for pid in vm_processes} == {(base + 20002,) * 4}
        home = os.stat(hv.sandbox.home_for(20002))
        assert (home.st_uid, home.st_gid, oct(home.st_mode & 0o777)) == (base + 20002, base + 20002, "0o700")
        assert oct(os.stat(log_path).st_mode & 0o777) == "0o600"
    finally:
        for handle in (first, second):
            if handle is not None:
                hv.kill(handle)
                hv.wait_exit(handle, timeout=5)
                hv.cleanup(handle)
        hv.close()
    assert not os.path.exists(hv.sandbox.home_for(20002))
