"""qvd-client (the real command, as a subprocess) against a scripted L7R over real TLS.

The L7R of this project was not committed when this test was written, so the server
here is a script on 127.0.0.1 that answers with the original L7R's bytes from
docs/protocol.md#the-original-client (list, 102 progress lines, 101 with X-QVD-Slave-Key,
the 401) and, after the 101, splices to a real qvd-vma echo desktop. It also checks
the requests the client sends. A test against the real L7R belongs next to it once that
exists (see the report).
"""
import os
import socket
import subprocess
import sys

import gevent
import pytest
from helpers.scripted_l7r import PROGRESS, ScriptedL7R, make_cert

from qvd_gevent.config import Config
from qvd_gevent.vma.display_gate import new_key
from qvd_gevent.vma.server import VmaService


@pytest.fixture
def l7r(tmp_path):
    vma = VmaService(Config({}, None), f"127.103.{os.getpid() % 250 + 1}.1", key=new_key()).start()
    cert, key = make_cert(str(tmp_path))
    server = ScriptedL7R(cert, key, vma)
    server.cert = cert
    yield server
    server.stop()
    vma.stop()


def qvd_client(l7r, *args, password="qvd", ca=True, extra_env=None, timeout=30):
    argv = [sys.executable, "-c", "from qvd_gevent.client.cli import main; main()",
            "--host", "127.0.0.1", "--port", str(l7r.port), "--user", "qvd"]
    if password is not None:
        argv += ["--password", password]
    if ca:
        argv += ["--ca", l7r.cert]
    env = dict(os.environ, **(extra_env or {}))
    return subprocess.run(check=False, args=argv + list(args), capture_output=True, timeout=timeout, env=env)


def test_list_prints_the_users_vms_and_sends_the_original_request(l7r):
    result = qvd_client(l7r, "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATE", "BLOCKED"]
    assert lines[1].split() == ["10", "qvd-vm1", "running", "no"]
    head = l7r.requests[0][1]
    assert head.split(b"\r\n")[0] == b"GET /qvd/list_of_vm? HTTP/1.1"
    assert b"Authorization: Basic cXZkOnF2ZA==" in head and b"Accept: application/json" in head
    assert b"User-Agent: QVD::HTTPC/0.01 (linux)" in head


def test_connect_exec_splices_a_command_and_passes_early_bytes(l7r, tmp_path):
    l7r.early_bytes = b"early\n"
    out = tmp_path / "out"
    script = f'read a; printf "hello through the L7R\\n"; read b; printf "%s|%s" "$a" "$b" > {out}'
    result = qvd_client(l7r, "connect", "--vm", "10", "--keyboard", "pc105/es", "--geometry", "800x600",
                        "--exec", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "early|hello through the L7R"
    progress = [line for line in result.stderr.decode().splitlines() if line.startswith("qvd-client: ")]
    assert progress[:5] == ["qvd-client: " + text.decode() for text in PROGRESS]
    head = l7r.requests[-1][1]
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"GET /qvd/connect_to_vm?id=10&")
    for needle in (b"qvd.client.keyboard=pc105%2Fes", b"qvd.client.geometry=800x600", b"qvd.client.os=linux",
                   b"qvd.client.link=adsl"):
        assert needle in lines[0]
    assert b"Connection: Upgrade" in lines and b"Upgrade: QVD/1.0" in lines


def test_connect_listen_serves_connections_in_sequence(l7r):
    proc = subprocess.Popen([sys.executable, "-c", "from qvd_gevent.client.cli import main; main()",
                             "--host", "127.0.0.1", "--port", str(l7r.port), "--user", "qvd", "--ca", l7r.cert,
                             "connect", "--vm", "10", "--listen", "127.0.0.1:0", "--count", "2"],
                            env=dict(os.environ, QVD_PASSWORD="qvd"), stderr=subprocess.PIPE)
    try:
        line = b""
        with gevent.Timeout(15):
            while b"listening on" not in line:
                line = proc.stderr.readline()
                assert line, "qvd-client exited before listening"
        port = int(line.decode().strip().split(":")[-1].split()[0])
        payload = os.urandom(256 * 1024)
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                sender = gevent.spawn(s.sendall, payload)
                got = bytearray()
                while len(got) < len(payload):
                    chunk = s.recv(65536)
                    assert chunk
                    got += chunk
                sender.get()
                assert bytes(got) == payload
        proc.wait(timeout=15)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    connects = [number for number, head in l7r.requests if b"/qvd/connect_to_vm" in head]
    assert len(connects) == 2 and len(set(connects)) == 2  # each on its own TLS connection


@pytest.mark.parametrize("args,password,message", [
    (("list",), "wrong", "qvd-client: login rejected by the server (401): 401 Unauthorized"),
    (("connect", "--vm", "99", "--exec", "true"), "qvd", "qvd-client: the virtual machine 99 does not exist (404)"),
    (("connect", "--vm", "12", "--exec", "true"), "qvd", "qvd-client: the server requires a more up-to-date client (426)"),
    (("connect", "--vm", "11", "--exec", "true"), "qvd",
     "qvd-client: the server is not available (503): The requested virtual machine is not available"),
])
def test_error_statuses_give_one_clear_line(l7r, args, password, message):
    result = qvd_client(l7r, *args, password=password)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert message in err
    assert "Traceback" not in err


def test_tls_is_verified_by_default(l7r):
    result = qvd_client(l7r, "list", ca=False)
    assert result.returncode == 1
    assert "certificate is not trusted" in result.stderr.decode()
    insecure = qvd_client(l7r, "--insecure", "list", ca=False)
    assert insecure.returncode == 0
    assert "warning: --insecure" in insecure.stderr.decode()


def test_password_sources_and_usage_errors(l7r, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("qvd\n")
    assert qvd_client(l7r, "--password-file", str(pw), "list", password=None).returncode == 0
    assert qvd_client(l7r, "list", password=None, extra_env={"QVD_PASSWORD": "qvd"}).returncode == 0
    missing = qvd_client(l7r, "list", password=None, extra_env={"QVD_PASSWORD": ""})
    # an empty QVD_PASSWORD is a password (empty): the server rejects it
    assert missing.returncode == 1
    env = {k: v for k, v in os.environ.items() if k != "QVD_PASSWORD"}
    none = subprocess.run(check=False, args=[sys.executable, "-c", "from qvd_gevent.client.cli import main; main()",
                           "--host", "127.0.0.1", "--user", "qvd", "list"], capture_output=True, env=env, timeout=20)
    assert none.returncode == 2 and b"no password" in none.stderr
    closed = subprocess.run(check=False, args=[sys.executable, "-c", "from qvd_gevent.client.cli import main; main()",
                             "--host", "127.0.0.1", "--port", "1", "--user", "qvd", "--password", "x", "list"],
                            capture_output=True, env=env, timeout=20)
    assert closed.returncode == 1 and b"cannot connect to 127.0.0.1:1" in closed.stderr
