"""qvd-vm-init as the process/netns hypervisors run it: a child process with QVD_VM_* env."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from qvd_gevent.vma import display_gate
from qvd_gevent.vma.client import VmaClient, VmaError, open_display

SECRET = display_gate.new_key()


def start_init(address, key=SECRET, **env):
    full = dict(os.environ, QVD_VM_ID="7", QVD_VM_NAME="vm7", QVD_VM_ADDRESS=address, **env)
    full.pop("QVD_CONFIG", None)
    full.pop("QVD_VMA_SECRET", None)
    if key is not None:
        full["QVD_VMA_SECRET"] = key
    proc = subprocess.Popen([sys.executable, "-c", "from qvd_gevent.vma.init import main; main()"],
                            env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = VmaClient(address, 3030, timeout=2, key=key)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            return proc, client
        except VmaError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out = proc.communicate()[0].decode(errors="replace")
                raise AssertionError(f"qvd-vm-init did not come up: {out}")
            time.sleep(0.05)


@pytest.fixture
def init_address():
    procs = []
    yield f"127.102.{os.getpid() % 250 + 1}.{len(procs) + 1}", procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def arm(client, **params):
    """x_start as the L7R calls it; returns the one-time key of the display connection."""
    display_key = display_gate.new_key()
    assert client.x_start(**params, **{display_gate.PARAM: display_key}) == "starting"
    return display_key


def echo_once(address, payload, display_key, port=4100):
    with open_display(address, port, display_key, timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return got
            got += chunk


def test_answers_ping_and_echo_and_exits_cleanly_on_sigterm(init_address):
    address, procs = init_address
    proc, client = start_init(address)
    procs.append(proc)
    assert client.x_state() == "stopped"
    display_key = arm(client, **{"qvd.vm.user.name": "qvd", "qvd.client.geometry": "1024x768"})
    assert client.x_state() == "listening"
    assert echo_once(address, b"hello vm 7\n", display_key) == b"hello vm 7\n"
    assert echo_once(address, b"second line\n", arm(client)) == b"second line\n"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert b"init of VM 7 (vm7)" in out
    with pytest.raises(OSError):
        socket.create_connection((address, 3030), timeout=1)


def test_poweroff_makes_the_init_exit(init_address):
    address, procs = init_address
    proc, client = start_init(address)
    procs.append(proc)
    assert client.call("poweroff") == 1
    proc.communicate(timeout=10)
    assert proc.returncode == 0


def test_bad_desktop_env_is_a_clear_error(init_address):
    address, _ = init_address
    env = dict(os.environ, QVD_VM_ADDRESS=address, QVD_VM_DESKTOP="kde")
    proc = subprocess.run(check=False, args=[sys.executable, "-c", "from qvd_gevent.vma.init import main; main()"],
                          env=env, capture_output=True, timeout=20)
    assert proc.returncode == 2
    assert proc.stderr == b"qvd-vm-init: QVD_VM_DESKTOP must be echo, nx or x, not 'kde'\n"


def test_env_chooses_desktop_and_ports():
    from qvd_gevent.vma.init import vma_args_from_env
    assert vma_args_from_env({}) == ["--address", "0.0.0.0", "--desktop", "auto", "--poweroff-exits"]
    assert vma_args_from_env({"QVD_VMA_UNAUTHENTICATED": "1"})[-1] == "--unauthenticated"
    assert "--unauthenticated" not in vma_args_from_env({"QVD_VMA_UNAUTHENTICATED": "1", "QVD_VMA_SECRET": "k"})
    args = vma_args_from_env({"QVD_VM_ADDRESS": "127.0.0.9", "QVD_PROP_QVD_VM_DESKTOP": "NX",
                              "QVD_X_PORT": "4200", "QVD_VMA_PORT": "3031"})
    assert args == ["--address", "127.0.0.9", "--desktop", "nx", "--poweroff-exits", "--x-port", "4200",
                    "--port", "3031"]
    assert vma_args_from_env({"QVD_VM_DESKTOP": "echo", "QVD_PROP_QVD_VM_DESKTOP": "nx"})[3] == "echo"


def test_ports_from_the_hypervisors_env(init_address):
    address, procs = init_address
    full = dict(os.environ, QVD_VM_ID="8", QVD_VM_NAME="vm8", QVD_VM_ADDRESS=address,
                QVD_VMA_PORT="3039", QVD_X_PORT="4139", QVD_VMA_SECRET=SECRET)
    proc = subprocess.Popen([sys.executable, "-c", "from qvd_gevent.vma.init import main; main()"],
                            env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(proc)
    client = VmaClient(address, 3039, timeout=2, key=SECRET)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except VmaError:
            assert time.monotonic() < deadline and proc.poll() is None, "qvd-vm-init did not come up"
            time.sleep(0.05)
    assert echo_once(address, b"port 4139\n", arm(client), port=4139) == b"port 4139\n"


def test_qvd_vma_command_line_errors_are_one_line():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        run = [sys.executable, "-c", "from qvd_gevent.vma.server import main; main()", "--address", "127.0.0.1",
               "--unauthenticated"]
        taken = subprocess.run(check=False, args=run + ["--port", str(port)], capture_output=True, timeout=20)
        assert taken.returncode == 1
        assert taken.stderr.decode().strip().endswith(f"cannot listen on 127.0.0.1:{port}: Address already in use")
        bad = subprocess.run(check=False, args=run + ["--x-port", "80"], capture_output=True, timeout=20)
        assert bad.returncode == 2 and b"--x-port 80: must be above 4000" in bad.stderr
        missing = subprocess.run(check=False, args=run + ["--config", "/nonexistent/vma.conf"],
                                 capture_output=True, timeout=20)
        assert missing.returncode == 2 and b"does not exist" in missing.stderr
        key_file = f"/proc/{os.getpid()}/nonexistent"
        unreadable = subprocess.run(check=False, args=run[:-1] + ["--key-file", key_file], capture_output=True,
                                    timeout=20)
        assert unreadable.returncode == 2
        assert unreadable.stderr.decode().endswith(f"cannot read the agent key from {key_file}: "
                                                   "No such file or directory\n")
        short = subprocess.run(check=False, args=run[:-1], capture_output=True, timeout=20,
                               env=dict(os.environ, QVD_VMA_SECRET="short"))
        assert short.returncode == 2 and b"the agent key must be at least 32" in short.stderr
        assert b"Traceback" not in taken.stderr + bad.stderr + missing.stderr + unreadable.stderr + short.stderr
    finally:
        busy.close()


def test_a_call_without_the_agent_key_or_with_a_wrong_one_gets_401_and_starts_nothing(init_address):
    """The real qvd-vm-init process: every method refused without the key of this start."""
    address, procs = init_address
    proc, client = start_init(address)
    procs.append(proc)
    strangers = (VmaClient(address, 3030, timeout=2), VmaClient(address, 3030, timeout=2, key=display_gate.new_key()),
                 VmaClient(address, 3030, timeout=2, key=SECRET[:-1] + ("A" if SECRET[-1] != "A" else "B")))
    for stranger in strangers:
        for method in ("x_start", "x_stop", "x_suspend", "poweroff", "expire", "ping", "x_state"):
            with pytest.raises(VmaError, match="agent key \\(401\\)"):
                stranger.call(method, **{display_gate.PARAM: display_gate.new_key()})
    time.sleep(0.3)                       # a poweroff that got through would have ended the init
    assert proc.poll() is None
    assert client.x_state() == "stopped"  # no x_start got through
    with pytest.raises(OSError):
        socket.create_connection((address, 4100), timeout=1)
    assert echo_once(address, b"owner\n", arm(client)) == b"owner\n"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    assert out.count(b"refused GET /vma/") == 21
    assert SECRET.encode() not in out     # never logged


def test_nothing_the_vma_starts_inherits_the_agent_key(init_address, tmp_path):
    """nxagent (here a script standing in for it) and the X session get no QVD_VMA_SECRET."""
    address, procs = init_address
    dumped = tmp_path / "nxagent.env"
    fake_nxagent = tmp_path / "nxagent"
    fake_nxagent.write_text(f"#!/bin/sh\nenv > {dumped}\nexec sleep 30\n")
    fake_nxagent.chmod(0o755)
    conf = tmp_path / "vma.conf"
    conf.write_text(f"command.nxagent = {fake_nxagent}\n")
    proc, client = start_init(address, QVD_VM_DESKTOP="nx", QVD_VMA_CONFIG=str(conf))
    procs.append(proc)
    arm(client)
    deadline = time.monotonic() + 10
    while not (dumped.exists() and "PATH=" in dumped.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    env = dumped.read_text()
    assert "QVD_VM_ID=7" in env           # it did inherit the VM's environment...
    assert "QVD_VMA_SECRET" not in env and SECRET not in env    # ...but not the key
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)


def test_without_a_key_the_init_refuses_to_serve_unless_told_to(init_address):
    address, procs = init_address
    env = dict(os.environ, QVD_VM_ADDRESS=address)
    env.pop("QVD_VMA_SECRET", None)
    refused = subprocess.run([sys.executable, "-c", "from qvd_gevent.vma.init import main; main()"],
                             env=env, capture_output=True, timeout=20, check=False)
    assert refused.returncode == 2
    assert refused.stderr == (b"qvd-vm-init: no agent key: QVD_VMA_SECRET is not set (QVD_VMA_UNAUTHENTICATED=1 "
                              b"serves without one, as the original VMA)\n")
    proc, client = start_init(address, key=None, QVD_VMA_UNAUTHENTICATED="1")
    procs.append(proc)
    assert client.x_start() == "starting"
    with socket.create_connection((address, 4100), timeout=5) as s:
        s.sendall(b"as the original\n")
        assert s.recv(100) == b"as the original\n"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    assert b"WARNING no agent key: anyone who reaches" in out
