"""qvd-vm-init as the process/netns hypervisors run it: a child process with QVD_VM_* env."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from qvd_gevent.vma.client import VmaClient, VmaError


def start_init(address, **env):
    full = dict(os.environ, QVD_VM_ID="7", QVD_VM_NAME="vm7", QVD_VM_ADDRESS=address, **env)
    full.pop("QVD_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-c", "from qvd_gevent.vma.init import main; main()"],
                            env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = VmaClient(address, 3030, timeout=2)
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


def echo_once(address, payload):
    with socket.create_connection((address, 4100), timeout=5) as s:
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
    assert client.x_start(**{"qvd.vm.user.name": "qvd", "qvd.client.geometry": "1024x768"}) == "starting"
    assert client.x_state() == "listening"
    assert echo_once(address, b"hello vm 7\n") == b"hello vm 7\n"
    assert echo_once(address, b"second line\n") == b"second line\n"
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
    assert proc.stderr == b"qvd-vm-init: QVD_VM_DESKTOP must be echo or nx, not 'kde'\n"


def test_env_chooses_desktop_and_ports():
    from qvd_gevent.vma.init import vma_args_from_env
    assert vma_args_from_env({}) == ["--address", "0.0.0.0", "--desktop", "auto", "--poweroff-exits"]
    args = vma_args_from_env({"QVD_VM_ADDRESS": "127.0.0.9", "QVD_PROP_QVD_VM_DESKTOP": "NX",
                              "QVD_X_PORT": "4200", "QVD_VMA_PORT": "3031"})
    assert args == ["--address", "127.0.0.9", "--desktop", "nx", "--poweroff-exits", "--x-port", "4200",
                    "--port", "3031"]
    assert vma_args_from_env({"QVD_VM_DESKTOP": "echo", "QVD_PROP_QVD_VM_DESKTOP": "nx"})[3] == "echo"


def test_ports_from_the_hypervisors_env(init_address):
    address, procs = init_address
    full = dict(os.environ, QVD_VM_ID="8", QVD_VM_NAME="vm8", QVD_VM_ADDRESS=address,
                QVD_VMA_PORT="3039", QVD_X_PORT="4139")
    proc = subprocess.Popen([sys.executable, "-c", "from qvd_gevent.vma.init import main; main()"],
                            env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(proc)
    client = VmaClient(address, 3039, timeout=2)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except VmaError:
            assert time.monotonic() < deadline and proc.poll() is None, "qvd-vm-init did not come up"
            time.sleep(0.05)
    assert client.x_start() == "starting"
    with socket.create_connection((address, 4139), timeout=5) as s:
        s.sendall(b"port 4139\n")
        assert s.recv(100) == b"port 4139\n"


def test_qvd_vma_command_line_errors_are_one_line():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        run = [sys.executable, "-c", "from qvd_gevent.vma.server import main; main()", "--address", "127.0.0.1"]
        taken = subprocess.run(check=False, args=run + ["--port", str(port)], capture_output=True, timeout=20)
        assert taken.returncode == 1
        assert taken.stderr.decode().strip().endswith(f"cannot listen on 127.0.0.1:{port}: Address already in use")
        bad = subprocess.run(check=False, args=run + ["--x-port", "80"], capture_output=True, timeout=20)
        assert bad.returncode == 2 and b"--x-port 80: must be above 4000" in bad.stderr
        missing = subprocess.run(check=False, args=run + ["--config", "/nonexistent/vma.conf"],
                                 capture_output=True, timeout=20)
        assert missing.returncode == 2 and b"does not exist" in missing.stderr
        assert b"Traceback" not in taken.stderr + bad.stderr + missing.stderr
    finally:
        busy.close()
