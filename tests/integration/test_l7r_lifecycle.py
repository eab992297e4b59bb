"""Takeover of a session still being set up, drain with grace, logs without secrets, metrics."""
import base64
import logging
import time

import gevent
import pytest

from helpers.l7r_env import UPGRADE, Reader, connect, get, open_conn, session_row
from qvd_gevent.common import metrics
from qvd_gevent.db.runtime import token_digest
from helpers.nodes import seeded_node, wait_for


def test_takeover_of_a_connecting_session(tmp_path, pg_server, fresh_db_name):
    a = seeded_node(tmp_path, pg_server, fresh_db_name, "node-a", users=False, start=False)
    b = seeded_node(tmp_path, pg_server, fresh_db_name, "node-b", address="127.0.0.2", users=False, start=False)
    try:
        osf = a.seed.osf()
        user = a.seed.user("qvd", "qvd")
        vm = a.seed.vm("v", user, osf, host_id=a.host_id)
        a.start()
        b.start()
        # node-a's HKD starts VMs slowly: the first client is still 'connecting' when the second comes
        a.hkd.start_delay = 2
        b.hkd.stop()
        first = {}

        def first_client():
            first["result"] = connect(a, vm_id=vm)
        g = gevent.spawn(first_client)
        wait_for(lambda: session_row(a, vm)[0] == "connecting" and session_row(a, vm)[1] == a.host_id)
        t0 = time.monotonic()
        sock2, reader2, infos2, final2 = connect(b, vm_id=vm)
        g.join(timeout=10)
        sock1, reader1, infos1, final1 = first["result"]
        assert final1.status == 503
        assert "Aborted by contending session" in final1.text
        assert final2.status == 101, final2
        assert time.monotonic() - t0 < 6
        r = session_row(a, vm)
        assert (r[0], r[1]) == ("connected", b.host_id)
        sock2.sendall(b"x")
        assert reader2.recv_exact(1) == b"x"
        sock1.close()
        sock2.close()
        assert wait_for(lambda: session_row(a, vm)[0] == "disconnected")
    finally:
        b.close()
        a.close()


def test_drain_waits_for_sessions_within_grace(tmp_path, pg_server, fresh_db_name):
    node = seeded_node(tmp_path, pg_server, fresh_db_name, users=False, start=False)
    try:
        osf = node.seed.osf()
        user = node.seed.user("qvd", "qvd")
        vm = node.seed.vm("v", user, osf)
        node.start()
        node.seed.running_at(vm, node.host_id, node.vma)
        sock, reader, infos, final = connect(node, vm_id=vm)
        assert final.status == 101
        gevent.spawn_later(0.5, sock.close)  # the user leaves during the grace period
        t0 = time.monotonic()
        node.svc.drain(5)
        assert time.monotonic() - t0 < 3
        assert session_row(node, vm)[0] == "disconnected"
        # no longer accepting: the port is closed (a connection left hanging is not a refusal)
        with pytest.raises(ConnectionRefusedError):
            s = open_conn(node.svc.port, node.cert, timeout=2)
            get(s, "/qvd/ping")
            Reader(s).response()
    finally:
        node.close()


def _rendered_splice_bytes(direction):
    return metrics.get("qvd_l7r_splice_bytes_total", direction=direction)


def test_logs_name_user_and_vm_but_no_secrets(tmp_path, pg_server, fresh_db_name, caplog):
    node = seeded_node(tmp_path, pg_server, fresh_db_name, users=False, start=False)
    try:
        osf = node.seed.osf()
        user = node.seed.user("qvd", "qvd")
        vm = node.seed.vm("v", user, osf)
        node.start()
        node.seed.running_at(vm, node.host_id, node.vma)
        node.db.execute("INSERT INTO user_tokens (token, user_id, expiration, multi_use) VALUES "
                        "(%s, %s, extract(epoch from now())::int + 100, true)", (token_digest("SeCrEtToKeN"), user))
        caplog.set_level(logging.DEBUG)
        before = metrics.get("qvd_l7r_connects_total", result="ok")
        s = open_conn(node.svc.port, node.cert)
        get(s, "/qvd/list_of_vm", [("Authorization", "Basic " + base64.b64encode(b"qvd:TopSecretPw").decode())])
        assert Reader(s).response().status == 401
        s.close()
        bearer = [("Authorization", "Bearer " + base64.b64encode(b"SeCrEtToKeN").decode())]
        before_bytes = _rendered_splice_bytes("to_vm")
        sock, reader, infos, final = connect(node, vm_id=vm, headers=bearer + UPGRADE)
        assert final.status == 101
        sock.sendall(b"12345\n")
        assert sock.recv(6) == b"12345\n"
        assert _rendered_splice_bytes("to_vm") == before_bytes + 6  # counted while the session is live
        sock.close()
        wait_for(lambda: session_row(node, vm)[0] == "disconnected")
        text = caplog.text
        assert "TopSecretPw" not in text and "SeCrEtToKeN" not in text
        assert base64.b64encode(b"SeCrEtToKeN").decode() not in text
        assert f"session open: user qvd VM {vm}" in text
        assert f"session closed: user qvd VM {vm}" in text
        assert "authentication failed (bad_password) for qvd" in text
        assert metrics.get("qvd_l7r_connects_total", result="ok") == before + 1
        assert _rendered_splice_bytes("to_vm") == before_bytes + 6  # and still after it ended
        rendered = metrics.render()
        assert "qvd_l7r_http_requests_total" in rendered and "qvd_l7r_auth_failures_total" in rendered
    finally:
        node.close()


def test_reconcile_releases_rows_without_session(tmp_path, pg_server, fresh_db_name):
    node = seeded_node(tmp_path, pg_server, fresh_db_name, users=False, start=False)
    try:
        osf = node.seed.osf()
        user = node.seed.user("qvd", "qvd")
        old = node.seed.vm("old", user, osf)
        fresh = node.seed.vm("fresh", user, osf)
        node.start()
        pid = node.svc.pid
        # a row this process holds with no live session (its release was lost), and a fresh claim
        node.db.execute("UPDATE vm_runtimes SET user_state = 'connected', l7r_host_id = %s, l7r_pid = %s, "
                        "user_state_ts = extract(epoch from now())::int - 60 WHERE vm_id = %s", (node.host_id, pid, old))
        node.db.execute("UPDATE vm_runtimes SET user_state = 'connecting', l7r_host_id = %s, l7r_pid = %s, "
                        "user_state_ts = extract(epoch from now())::int WHERE vm_id = %s", (node.host_id, pid, fresh))
        node.svc.reconcile()
        assert session_row(node, old)[0] == "disconnected"
        assert session_row(node, fresh)[0] == "connecting"
    finally:
        node.close()
