"""connect_to_vm end to end: 102 lines, 101, byte-exact splice, half-close, takeover,
VM started on request by a test HKD, error answers and the session row at every end."""
import base64
import os
import socket
import time

import gevent
import pytest
from qvd_gevent.db import runtime
from qvd_gevent.db.runtime import token_digest
from qvd_gevent.vma import display_gate

from helpers.l7r_env import AUTH, UPGRADE, Reader, connect, get, open_conn, original_connect, read_to_close, session_row
from helpers.nodes import seeded_node, wait_for

STARTED_SEQUENCE = [
    "Session acquired for VM_ID: {id}",
    "Assigning VM {id} to host",
    "Starting virtual machine",
]
X_SEQUENCE = [
    "Starting X session at VM {id}",
    "Waiting for X session to come up on VM {id}",
    "Connecting X session for VM_ID: {id}",
    "Connection established",
]


@pytest.fixture
def env(tmp_path, pg_server, fresh_db_name):
    node = seeded_node(tmp_path, pg_server, fresh_db_name)
    yield node
    node.close()


def test_original_client_bytes_start_vm_and_splice(env):
    sock = open_conn(env.svc.port, env.cert)
    sock.sendall(original_connect(env.vm_id))
    reader = Reader(sock)
    infos, final = reader.final()
    expected = [s.format(id=env.vm_id) for s in STARTED_SEQUENCE]
    assert infos[:3] == expected
    assert all(i == "Waiting for VM to reach state 'running'" for i in infos[3:-4])
    assert infos[-4:] == [s.format(id=env.vm_id) for s in X_SEQUENCE]
    assert final.status == 101 and final.reason == "Switching Protocols"
    assert len(final.raw_headers) == 1 and final.raw_headers[0].startswith("X-QVD-Slave-Key: ")
    key = final.headers["x-qvd-slave-key"]
    assert len(key) == 64 and key.isalnum()
    assert env.hkd.started == [env.vm_id]
    params = env.vma.x_start_calls[-1]
    assert params["qvd.client.keyboard"] == "pc105/es" and params["qvd.slave.key"] == key
    # every call carried the VM's agent key (the stand-in answers 401 otherwise), and the
    # display connection presented the one-time key this x_start armed
    assert env.vma.refused_calls == 0 and env.vma.calls_with_authorization >= 2
    assert len(params["qvd.display.key"]) == 43 and env.vma.gate.admitted == 1
    assert params["qvd.vm.user.name"] == "qvd" and params["host_address"] == "127.0.0.1"
    r = session_row(env)
    assert r[0] == "connected" and r[1] == env.host_id and r[2] == os.getpid() and r[5] == env.user
    assert wait_for(lambda: env.svc.sessions_open == 1)
    # byte-exact echo, both directions, binary and large
    payload = bytes(range(256)) * 4096
    gevent.spawn(sock.sendall, payload)
    assert reader.recv_exact(len(payload)) == payload
    # client half-close: the VM sees EOF, finishes, closes; the client sees EOF; the row is released
    sock.sendall(b"last words")
    assert reader.recv_exact(10) == b"last words"
    sock._sock.shutdown(socket.SHUT_WR) if hasattr(sock, "_sock") else sock.shutdown(socket.SHUT_WR)
    assert sock.recv(10) == b""
    sock.close()
    assert wait_for(lambda: session_row(env)[0] == "disconnected")
    assert session_row(env)[1:4] == (None, None, None)
    assert wait_for(lambda: env.svc.sessions_open == 0 and env.svc.connections_open == 0)
    env.svc.flush_counters()
    c = env.db.query_one("SELECT nx_attempts, nx_ok, short_sessions FROM host_counters WHERE host_id = %s", (env.host_id,))
    assert c == (1, 1, 1)


def test_running_vm_sequence_and_early_bytes(env):
    env.seed.running_at(env.vm_id, env.host_id, env.vma)
    sock = open_conn(env.svc.port, env.cert)
    # bytes sent right behind the request, before the 101, reach the VM
    sock.sendall(f"GET /qvd/connect_to_vm?id={env.vm_id} HTTP/1.1\r\nAuthorization: {AUTH[0][1]}\r\n"
                 f"Connection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\nEARLY".encode())
    reader = Reader(sock)
    infos, final = reader.final()
    assert infos == [f"Session acquired for VM_ID: {env.vm_id}"] + [s.format(id=env.vm_id) for s in X_SEQUENCE]
    assert final.status == 101
    assert reader.recv_exact(5) == b"EARLY"
    sock.close()
    assert wait_for(lambda: session_row(env)[0] == "disconnected")


def test_vm_side_close_ends_session(env):
    env.seed.running_at(env.vm_id, env.host_id, env.vma)
    sock, reader, infos, final = connect(env)
    assert final.status == 101
    assert wait_for(lambda: env.svc.sessions_open == 1)
    # the VM going away (drain closes every session) must release the row
    env.svc.drain(0)
    assert wait_for(lambda: session_row(env)[0] == "disconnected")
    assert reader.buf + read_to_close(sock, 5) == b""   # the client's connection is closed too
    sock.close()


@pytest.mark.parametrize("headers,status", [
    (AUTH, 426),
    (AUTH + [("Connection", "upgrade"), ("Upgrade", "QVD/1.0")], 426),
    ([], 401),
])
def test_connect_prechecks(env, headers, status):
    sock, reader, infos, final = connect(env, headers=headers)
    assert (infos, final.status) == ([], status)
    assert session_row(env)[0] == "disconnected"
    sock.close()


def test_connect_errors(env):
    other = env.seed.user("eve", "eve")
    others_vm = env.seed.vm("eve-vm", other, env.osf)
    blocked_vm = env.seed.vm("blocked", env.user, env.osf, blocked=True)
    sock = open_conn(env.svc.port, env.cert)
    reader = Reader(sock)
    cases = [
        ("", 422, "parameter id is missing"),
        ("?id=999999", 404, "The requested virtual machine does not exist"),
        ("?id=abc", 404, "The requested virtual machine does not exist"),
        (f"?id={others_vm}", 403, "You are not allowed to access requested virtual machine"),
        (f"?id={blocked_vm}", 403, "The requested virtual machine is offline for maintenance"),
        (f"?id={env.vm_id}&foo=1&qvd.client.x=1", 403, "Invalid parameters foo"),
    ]
    for query, status, text in cases:
        get(sock, "/qvd/connect_to_vm" + query, AUTH + UPGRADE)
        infos, final = reader.final()
        assert (infos, final.status, final.text) == ([], status, text)
    sock.close()
    # someone else's VM: no session row change at all
    assert env.db.query_one("SELECT user_state, real_user_id, l7r_host_id FROM vm_runtimes WHERE vm_id = %s",
                            (others_vm,)) == ("disconnected", None, None)


def test_token_bound_to_vm(env):
    second = env.seed.vm("second", env.user, env.osf)
    env.seed.running_at(second, env.host_id, env.vma)
    env.db.execute("INSERT INTO user_tokens (token, user_id, vm_id, expiration, multi_use) VALUES "
                   "(%s, %s, %s, extract(epoch from now())::int + 100, true)", (token_digest("bound"), env.user, env.vm_id))
    bearer = [("Authorization", "Bearer " + base64.b64encode(b"bound").decode())]
    sock, reader, infos, final = connect(env, vm_id=second, headers=bearer + UPGRADE)
    assert (final.status, final.text) == (403, "vm_id does not match with provided token")
    sock.close()
    env.seed.running_at(env.vm_id, env.host_id, env.vma)
    sock, reader, infos, final = connect(env, headers=bearer + UPGRADE)
    assert final.status == 101
    sock.close()


def test_vm_fails_to_start_releases_row(tmp_path, pg_server, fresh_db_name):
    node = seeded_node(tmp_path, pg_server, fresh_db_name, users=False, start=False)
    try:
        osf = node.seed.osf()
        user = node.seed.user("qvd", "qvd")
        vm = node.seed.vm("v", user, osf)
        node.start()
        node.hkd.fail_start = True
        sock, reader, infos, final = connect(node, vm_id=vm)
        assert final.status == 503
        assert final.text == f"The requested virtual machine is not available: Failed to start virtual machine {vm}, retry later."
        assert session_row(node, vm)[0:4] == ("disconnected", None, None, None)
        # the same connection can try again at once (no contention with itself: docs/differences.md#release-after-setup-failure)
        node.hkd.fail_start = False
        get(sock, f"/qvd/connect_to_vm?id={vm}", AUTH + UPGRADE)
        infos, final = reader.final()
        assert final.status == 101
        sock.close()
    finally:
        node.close()


def test_x_start_retries_then_fails(tmp_path, pg_server, fresh_db_name):
    node = seeded_node(tmp_path, pg_server, fresh_db_name, x_start_failures=100, users=False, start=False)
    try:
        osf = node.seed.osf()
        user = node.seed.user("qvd", "qvd")
        vm = node.seed.vm("v", user, osf)
        node.start()
        node.seed.running_at(vm, node.host_id, node.vma)
        sock, reader, infos, final = connect(node, vm_id=vm)
        assert final.status == 503 and "Unable to start X session on VM" in final.text
        assert len(node.vma.x_start_calls) == 4  # internal.l7r.retry.x_start = 3 in these tests
        assert session_row(node, vm)[0] == "disconnected"
        sock.close()
    finally:
        node.close()


def test_takeover_between_two_l7rs(tmp_path, pg_server, fresh_db_name):
    a = seeded_node(tmp_path, pg_server, fresh_db_name, "node-a", users=False, start=False)
    b = seeded_node(tmp_path, pg_server, fresh_db_name, "node-b", address="127.0.0.2", users=False, start=False)
    try:
        osf = a.seed.osf()
        user = a.seed.user("qvd", "qvd")
        vm = a.seed.vm("v", user, osf)
        a.start()
        b.start()
        a.seed.running_at(vm, a.host_id, a.vma)
        sock1, reader1, infos1, final1 = connect(a, vm_id=vm)
        assert final1.status == 101
        assert session_row(a, vm)[1] == a.host_id
        sock1.sendall(b"ping1")
        assert reader1.recv_exact(5) == b"ping1"
        t0 = time.monotonic()
        sock2, reader2, infos2, final2 = connect(b, vm_id=vm)
        took = time.monotonic() - t0
        assert final2.status == 101
        assert infos2[0] == f"Aborting contending session for VM_ID: {vm}"
        assert f"Session acquired for VM_ID: {vm}" in infos2
        print(f"takeover: the newcomer's 101 came {took:.2f} s after its request")
        assert took < 3, took  # by NOTIFY, not by the 30 s poll
        # the first client's connection was closed promptly
        assert reader1.buf + read_to_close(sock1, 3) == b""
        r = session_row(a, vm)
        assert r[0] == "connected" and r[1] == b.host_id and r[3] is None
        sock2.sendall(b"ping2")
        assert reader2.recv_exact(5) == b"ping2"
        assert a.svc.sessions_open == 0 and b.svc.sessions_open == 1
        sock1.close()
        sock2.close()
        assert wait_for(lambda: session_row(a, vm)[0] == "disconnected")
    finally:
        b.close()
        a.close()


def test_admin_disconnect_closes_session(env):
    env.seed.running_at(env.vm_id, env.host_id, env.vma)
    sock, reader, infos, final = connect(env)
    assert final.status == 101
    # qvd-admin's "disconnect user" only sets user_cmd (no host NOTIFY): qvd_vm_runtime carries it
    env.db.execute("UPDATE vm_runtimes SET user_cmd = 'abort' WHERE vm_id = %s", (env.vm_id,))
    assert wait_for(lambda: session_row(env)[0] == "disconnected", timeout=5)
    sock.close()


def test_stop_vm(env):
    sock = open_conn(env.svc.port, env.cert)
    reader = Reader(sock)
    get(sock, f"/qvd/stop_vm?id={env.vm_id}", AUTH)
    infos, final = reader.final()
    assert (infos, final.status, final.body) == ([], 200, b"Machine stopped\r\n")
    env.seed.running_at(env.vm_id, env.host_id, env.vma)
    get(sock, f"/qvd/stop_vm?id={env.vm_id}", AUTH)
    infos, final = reader.final()
    assert infos[0] == "Stopping virtual machine"
    assert (final.status, final.body) == (200, b"Machine stopped\r\n")
    assert session_row(env)[4] == "stopped"
    get(sock, "/qvd/stop_vm?id=424242", AUTH)
    assert reader.final()[1].status == 404
    get(sock, "/qvd/stop_vm", AUTH)
    assert reader.final()[1].status == 422
    sock.close()


def test_vma_params_precedence(env):
    env.seed.prop("osf", env.osf, "qvd.client.geometry", "osf")
    env.seed.prop("osf", env.osf, "p.osf", "osf")
    env.seed.prop("user", env.user, "p.user", "user")
    env.seed.prop("user", env.user, "p.osf", "user")
    env.seed.prop("vm", env.vm_id, "p.user", "vm")
    env.seed.prop("vm", env.vm_id, "qvd.vm.user.name", "not-from-vm")
    env.seed.running_at(env.vm_id, env.host_id, env.vma)
    sock, reader, infos, final = connect(env, extra="&qvd.client.geometry=1024x768&custom.x=1")
    assert final.status == 101
    p = env.vma.x_start_calls[-1]
    assert p["qvd.client.geometry"] == "osf"      # properties override the client
    assert p["p.osf"] == "user" and p["p.user"] == "vm"
    assert p["qvd.vm.user.name"] == "qvd"         # auth params override properties
    assert p["custom.x"] == "1" and len(p["auth_token"]) >= 40
    sock.close()


def test_silent_tls_client_dropped_at_deadline(tmp_path, pg_server, fresh_db_name):
    node = seeded_node(tmp_path, pg_server, fresh_db_name, extra={"l7r.timeout.request": 1}, users=False, start=False)
    try:
        node.start()
        raw = socket.create_connection(("127.0.0.1", node.svc.port), timeout=5)
        t0 = time.monotonic()
        assert raw.recv(10) == b""  # no handshake ever started: closed after the deadline
        assert time.monotonic() - t0 < 3
        raw.close()
        assert wait_for(lambda: node.svc.connections_open == 0)
    finally:
        node.close()


def test_stop_vm_unstoppable_and_timeout(env):
    env.hkd.stop()
    env.seed.running_at(env.vm_id, env.host_id, env.vma)
    env.db.execute("UPDATE vm_runtimes SET vm_state = 'zombie' WHERE vm_id = %s", (env.vm_id,))
    sock = open_conn(env.svc.port, env.cert)
    reader = Reader(sock)
    get(sock, f"/qvd/stop_vm?id={env.vm_id}", AUTH)
    infos, final = reader.final()
    assert (final.status, final.text) == (503, "The requested virtual machine is in an unstoppable state (zombie)")
    env.db.execute("UPDATE vm_runtimes SET vm_state = 'running' WHERE vm_id = %s", (env.vm_id,))
    get(sock, f"/qvd/stop_vm?id={env.vm_id}", AUTH)
    infos, final = reader.final()  # nobody stops it: 408 after internal.l7r.timeout.vm_stop (5 s here)
    assert infos[0] == "Stopping virtual machine"
    assert (final.status, final.text) == (408, "VM didn't reach state 'stopped'. Timeout")
    assert env.db.query_one("SELECT vm_cmd FROM vm_runtimes WHERE vm_id = %s", (env.vm_id,))[0] == "stop"
    sock.close()


def test_a_vm_without_its_agent_key_or_with_a_wrong_one_is_not_connected(env):
    """The L7R calls a VMA only with the key the VM's node stored for this start."""
    env.seed.running_at(env.vm_id, env.host_id, env.vma)
    env.db.transaction(runtime.set_vm_agent_key, env.vm_id, display_gate.new_key())     # not the VMA's
    _, _, _, final = connect(env)
    assert final.status == 503 and "refused: wrong agent key (401)" in final.text, final.text
    assert env.vma.x_start_calls == [] and env.vma.refused_calls == 4     # internal.l7r.retry.x_start = 3 here
    env.db.transaction(runtime.set_vm_agent_key, env.vm_id, None)
    _, _, _, final = connect(env)
    assert final.status == 503 and f"VM {env.vm_id} runs without an agent key" in final.text, final.text
    assert env.vma.refused_calls == 4 and env.vma.gate.admitted == 0
    assert wait_for(lambda: session_row(env)[0] == "disconnected")
    env.db.transaction(runtime.set_vm_agent_key, env.vm_id, env.vma.key)
    sock, _, _, final = connect(env)
    assert final.status == 101
    sock.close()


def test_legacy_setting_talks_to_a_vma_without_a_key_and_warns(tmp_path, pg_server, fresh_db_name, caplog):
    """vm.vma.legacy_unauthenticated: a VMA that knows no key (as the original's) works, no
    key or display preamble is sent, and the L7R says at start that it runs this way."""
    node = seeded_node(tmp_path, pg_server, fresh_db_name, extra={"vm.vma.legacy_unauthenticated": 1}, legacy=True,
                       users=False, start=False)
    try:
        node.vm_id = node.seed.vm("qvd-vm1", node.seed.user("qvd", "qvd"), node.seed.osf())
        with caplog.at_level("WARNING", logger="qvd.vma"):
            node.start()
        assert any("L7R: vm.vma.legacy_unauthenticated is on" in r.getMessage() for r in caplog.records)
        sock, reader, _, final = connect(node)
        assert final.status == 101
        assert "qvd.display.key" not in node.vma.x_start_calls[-1]
        assert node.vma.calls_with_authorization == 0
        sock.sendall(b"no preamble before me\n")
        assert reader.recv_exact(22) == b"no preamble before me\n"
        sock.close()
    finally:
        node.close()
