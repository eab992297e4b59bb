"""qvd-client (the real command) against this project's L7R (L7RService over TLS, a real
PostgreSQL from the fixtures) with this project's qvd-vma as the VM (echo desktop).

The VM is seeded as running at the VMA's address and ports, so no HKD is involved.
"""
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import gevent
import pytest
from helpers.nodes import seeded_node

from qvd_gevent.config import Config
from qvd_gevent.vma.client import VmaClient
from qvd_gevent.vma.display_gate import new_key
from qvd_gevent.vma.server import VmaService

CLIENT = [sys.executable, "-c", "from qvd_gevent.client.cli import main; main()"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def node(tmp_path, pg_server, fresh_db_name):
    n = seeded_node(tmp_path, pg_server, fresh_db_name, start=False, with_hkd=False)
    n.cert = str(n.cert)
    seed, osf = n.seed, n.osf
    other = seed.user("other", "other")
    n.other_vm = seed.vm("not-yours", other, osf)
    n.blocked_vm = seed.vm("blocked-vm", n.user, osf, blocked=True)
    n.real_vma = VmaService(Config({}, None), "127.0.0.1", port=0, x_port=free_port(), key=new_key()).start()
    seed.running_at(n.vm_id, n.host_id, SimpleNamespace(vma_port=n.real_vma.port, key=n.real_vma.key,
                                                         x_port=n.real_vma.display + 4000))
    n.start()
    yield n
    n.close()
    n.real_vma.stop()


def qvd_client(node, *args, password="qvd", timeout=60):
    argv = CLIENT + ["--host", "127.0.0.1", "--port", str(node.svc.port), "--user", "qvd",
                     "--password", password, "--ca", node.cert]
    return subprocess.run(check=False, args=argv + list(args), capture_output=True, timeout=timeout)


def test_list_against_the_l7r(node):
    result = qvd_client(node, "list")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[1]: line.split() for line in result.stdout.decode().splitlines()[1:]}
    assert rows["qvd-vm1"] == [str(node.vm_id), "qvd-vm1", "running", "no"]
    assert rows["blocked-vm"][3] == "yes"
    assert "not-yours" not in rows


def test_connect_exec_through_the_l7r_to_the_vma_echo(node, tmp_path):
    out = tmp_path / "out"
    script = f'printf "hello through the real L7R\\n"; read a; printf "%s" "$a" > {out}'
    result = qvd_client(node, "connect", "--vm", str(node.vm_id), "--keyboard", "pc105/es", "--exec", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "hello through the real L7R"
    err = result.stderr.decode()
    assert f"qvd-client: Session acquired for VM_ID: {node.vm_id}" in err
    assert f"qvd-client: Starting X session at VM {node.vm_id}" in err
    assert "qvd-client: Connection established" in err
    vma = VmaClient("127.0.0.1", node.real_vma.port, key=node.real_vma.key)
    deadline = gevent.get_hub().loop.now() + 10
    while vma.x_state() != "suspended":  # the client left: the desktop suspends
        assert gevent.get_hub().loop.now() < deadline, vma.x_state()
        gevent.sleep(0.05)


def test_connect_listen_sequential_sessions_through_the_l7r(node):
    proc = subprocess.Popen(CLIENT + ["--host", "127.0.0.1", "--port", str(node.svc.port), "--user", "qvd",
                                      "--password", "qvd", "--ca", node.cert, "connect", "--vm", str(node.vm_id),
                                      "--listen", "127.0.0.1:0", "--count", "2"], stderr=subprocess.PIPE)
    try:
        line = b""
        with gevent.Timeout(15):
            while b"listening on" not in line:
                line = proc.stderr.readline()
                assert line, "qvd-client exited before listening"
        port = int(line.decode().strip().split(":")[-1].split()[0])
        for n in range(2):
            payload = os.urandom(128 * 1024) + b"session %d" % n
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                sender = gevent.spawn(s.sendall, payload)
                got = bytearray()
                while len(got) < len(payload):
                    chunk = s.recv(65536)
                    assert chunk, "session closed early"
                    got += chunk
                sender.get()
                assert bytes(got) == payload
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert node.real_vma.desktop.sessions == 2


@pytest.mark.parametrize("case,expected", [
    ("wrong-password", "qvd-client: login rejected by the server (401)"),
    ("unknown-vm", "does not exist (404)"),
    ("other-users-vm", "(403)"),
    ("blocked-vm", "(403)"),
])
def test_error_answers_of_the_l7r(node, case, expected):
    vm = {"unknown-vm": 999999, "other-users-vm": node.other_vm, "blocked-vm": node.blocked_vm}.get(case, node.vm_id)
    result = qvd_client(node, "connect", "--vm", str(vm), "--exec", "true",
                        password="nope" if case == "wrong-password" else "qvd")
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert expected in err
    assert "Traceback" not in err


def test_token_login(node):
    """--token T sends `Bearer base64(T)` like the original client; T is the raw token,
    the L7R hands it out base64-encoded from /qvd/create_auth_token."""
    import base64
    import http.client
    import json
    import ssl
    context = ssl.create_default_context(cafile=node.cert)
    conn = http.client.HTTPSConnection("127.0.0.1", node.svc.port, context=context, timeout=10)
    conn.request("GET", "/qvd/create_auth_token", headers={"Authorization": "Basic " +
                                                           base64.b64encode(b"qvd:qvd").decode()})
    answer = conn.getresponse()
    assert answer.status == 200
    raw_token = base64.b64decode(json.loads(answer.read())["auth_token"]).decode()
    conn.close()
    argv = CLIENT + ["--host", "127.0.0.1", "--port", str(node.svc.port), "--ca", node.cert,
                     "--token", raw_token, "list"]
    result = subprocess.run(check=False, args=argv, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert b"qvd-vm1" in result.stdout
    bad = subprocess.run(check=False, args=argv[:-3] + ["--token", raw_token + "x", "list"],
                         capture_output=True, timeout=60)
    assert bad.returncode == 1 and b"login rejected" in bad.stderr


def test_second_client_takes_the_desktop_over(node):
    """One session per VM: a second connect ends the first one (the L7R aborts it and the
    VMA's desktop suspends and resumes for the newcomer)."""
    first = subprocess.Popen(CLIENT + ["--host", "127.0.0.1", "--port", str(node.svc.port), "--user", "qvd",
                                       "--password", "qvd", "--ca", node.cert, "connect", "--vm", str(node.vm_id),
                                       "--listen", "127.0.0.1:0", "--count", "1"], stderr=subprocess.PIPE)
    try:
        line = b""
        with gevent.Timeout(15):
            while b"listening on" not in line:
                line = first.stderr.readline()
                assert line, "qvd-client exited before listening"
        port = int(line.decode().strip().split(":")[-1].split()[0])
        held = socket.create_connection(("127.0.0.1", port), timeout=20)
        held.sendall(b"first\n")
        assert held.recv(100) == b"first\n"
        second = qvd_client(node, "connect", "--vm", str(node.vm_id), "--exec", "sh", "-c",
                            "printf 'second\\n'; read a; test \"$a\" = second")
        assert second.returncode == 0, second.stderr
        assert held.recv(100) == b""  # the first session was ended by the takeover
        held.close()
        assert first.wait(timeout=20) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert node.real_vma.desktop.sessions == 2
