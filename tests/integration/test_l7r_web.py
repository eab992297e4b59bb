"""The browser client's endpoints on a whole node (HKD + L7R over TLS, process VM with the
echo desktop, so the WebSocket's bytes come back): files, web login, the desktop's
WebSocket with its Origin and token checks, and takeovers between a browser session and a
native one. The real browser is in tests/system/test_browser_client.py."""
import base64

import gevent
import pytest
from helpers.full_node import start_full_node
from helpers.nodes import wait_for
from helpers.web_client import native_connect, open_desktop, read_response, tls_connect, web_login

from qvd_gevent.db import runtime
from qvd_gevent.node.demo import DEMO_PASSWORD, DEMO_USER


@pytest.fixture
def node(tmp_path, pg_server, fresh_db_name):
    node, vm_id, cert = start_full_node(tmp_path, pg_server, fresh_db_name)
    yield node, vm_id, cert
    node.stop(0)


def get(port, cert, path, method="GET", headers=()):
    sock = tls_connect(port, cert)
    try:
        head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *[f"{k}: {v}" for k, v in headers]]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        if method == "HEAD":
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            status = int(data.split(b" ", 2)[1])
            return status, data.partition(b"\r\n\r\n")[0].decode(), data.partition(b"\r\n\r\n")[2]
        status, answer, body, _ = read_response(sock)
        return status, answer, body
    finally:
        sock.close()


def session_row(node, vm_id):
    return runtime.session_row(node.db, vm_id)


def test_the_page_and_novnc_are_served_with_their_headers(node):
    node, vm_id, cert = node
    port = node.l7r.port
    status, headers, body = get(port, cert, "/")
    assert status == 200 and b'<script type="module" src="app.js">' in body
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    status, headers, body = get(port, cert, "/novnc/core/rfb.js")
    assert status == 200 and headers["content-type"] == "text/javascript; charset=utf-8"
    assert b"export default class RFB" in body
    assert get(port, cert, "/novnc/core/rfb.js", headers=[("If-None-Match", headers["etag"])])[0] == 304
    status, head, rest = get(port, cert, "/app.js", method="HEAD")
    assert status == 200 and "content-length: " in head.lower() and rest == b""
    for hostile in ("/../setup.py", "/%2e%2e/%2e%2e/etc/passwd", "/novnc/../../l7r/server.py", "/static.py",
                    "//etc/passwd", "/novnc/core/", "/app.js%00"):
        assert get(port, cert, hostile)[0] == 404, hostile
    # the native endpoints answer as before
    assert get(port, cert, "/qvd/ping")[0] == 200
    assert get(port, cert, "/qvd/ping", method="HEAD")[0] == 404


def test_web_login_gives_single_use_tokens_bound_to_each_vm_stored_hashed(node):
    node, vm_id, cert = node
    port = node.l7r.port
    status, headers, answer = web_login(port, cert, DEMO_USER, "wrong")
    assert status == 401 and "www-authenticate" not in headers       # no browser dialog
    status, headers, answer = web_login(port, cert, DEMO_USER, DEMO_PASSWORD, origin="https://evil.example")
    assert status == 403
    status, headers, answer = web_login(port, cert, DEMO_USER, DEMO_PASSWORD, method="GET")
    assert status == 405
    status, headers, answer = web_login(port, cert, DEMO_USER, DEMO_PASSWORD)
    assert status == 200, answer
    assert headers["cache-control"] == "no-store"
    assert answer["login"] == DEMO_USER
    [vm] = answer["vms"]
    assert (vm["id"], vm["name"], vm["blocked"]) == (vm_id, "demo", False)
    token = vm["token"]
    rows = node.db.query("SELECT token, vm_id, multi_use, expiration - extract(epoch from now())::bigint "
                         "FROM user_tokens")
    assert [r[1:3] for r in rows] == [(vm_id, False)]
    assert rows[0][0] != token and token not in str(rows)            # only its digest is stored
    assert 100 <= rows[0][3] <= 121


def login_token(port, cert):
    status, _, answer = web_login(port, cert, DEMO_USER, DEMO_PASSWORD)
    assert status == 200, answer
    return answer["vms"][0]["token"]


def test_websocket_refused_without_credentials_or_from_another_origin_and_nothing_changes(node):
    node, vm_id, cert = node
    port = node.l7r.port
    token = login_token(port, cert)
    before = session_row(node, vm_id)
    for origin in ("https://evil.example", None, "null", f"http://127.0.0.1:{port}", f"https://127.0.0.1:{port + 1}"):
        status, _, body = open_desktop(port, cert, vm_id, token, origin=origin)
        assert status == 403 and "Origin not allowed" in body, (origin, status, body)
    assert open_desktop(port, cert, vm_id, None)[0] == 401
    assert open_desktop(port, cert, vm_id, "B" * 43)[0] == 401
    assert open_desktop(port, cert, vm_id, token, protocols=["binary"])[0] == 401
    # a token in a header a page cannot set is no way in either
    basic = base64.b64encode(f"{DEMO_USER}:{DEMO_PASSWORD}".encode()).decode()
    assert open_desktop(port, cert, vm_id, None, headers=[("Authorization", f"Basic {basic}")])[0] == 401
    assert session_row(node, vm_id) == before                        # no row changed, VM not started
    # the refused attempts did not spend the token: the page's own request still gets in
    status, headers, desktop = open_desktop(port, cert, vm_id, token)
    assert status == 101, desktop
    assert headers["sec-websocket-protocol"] == "binary"
    desktop.close()
    # single use: the same token again is refused
    assert open_desktop(port, cert, vm_id, token)[0] == 401
    # parameters a client may not set: refused after the token was spent
    status, _, body = open_desktop(port, cert, vm_id, login_token(port, cert), extra_query="&qvd.vm.user.name=root")
    assert status == 403 and "Invalid parameters qvd.vm.user.name" in body


def test_websocket_carries_the_desktop_stream_both_ways(node):
    node, vm_id, cert = node
    port = node.l7r.port
    status, _, desktop = open_desktop(port, cert, vm_id, login_token(port, cert))
    assert status == 101
    try:
        desktop.send(b"hello from a browser\n")
        desktop.recv_until(lambda d: b"hello from a browser\n" in d.buffer, timeout=60)
        assert desktop.buffer == b"hello from a browser\n"
        wait_for(lambda: session_row(node, vm_id)[2] == "connected", 10, "session row connected")
        big = bytes(range(256)) * 1024
        desktop.buffer = b""
        desktop.send(big)
        desktop.recv_until(lambda d: len(d.buffer) >= len(big), timeout=30)
        assert desktop.buffer == big
    finally:
        desktop.close()
    wait_for(lambda: session_row(node, vm_id)[2] == "disconnected", 10, "session row released")


def test_a_native_client_takes_a_browser_session_over_and_the_other_way_round(node):
    node, vm_id, cert = node
    port = node.l7r.port
    status, _, desktop = open_desktop(port, cert, vm_id, login_token(port, cert))
    assert status == 101
    desktop.send(b"browser\n")
    desktop.recv_until(lambda d: b"browser\n" in d.buffer, timeout=60)

    native = native_connect(port, cert, vm_id)       # takes the VM over
    desktop.recv_until(lambda d: False, timeout=15)
    assert desktop.closed[0] == 4000 and "contending session" in desktop.closed[1], desktop.closed
    native.sendall(b"native\n")
    with gevent.Timeout(10):
        assert native.recv(100) == b"native\n"

    status, _, desktop = open_desktop(port, cert, vm_id, login_token(port, cert))    # and back
    assert status == 101
    with gevent.Timeout(15):
        while native.recv(4096):
            pass                                      # the native session is closed
    desktop.send(b"browser again\n")
    desktop.recv_until(lambda d: b"browser again\n" in d.buffer, timeout=30)
    assert session_row(node, vm_id)[2] == "connected"
    desktop.close()
    native.close()


def test_a_failed_setup_closes_the_websocket_with_4503_and_the_reason(tmp_path, pg_server, fresh_db_name):
    """The desktop's WebSocket is open before the connect begins (a page sees nothing of an
    HTTP error on a handshake), so the connect's failure comes as a close frame with 4503 and
    the 503's message. Here: a VM whose desktop is nx, which a browser cannot show."""
    node, vm_id, cert = start_full_node(tmp_path, pg_server, fresh_db_name, desktop="nx")
    try:
        port = node.l7r.port
        status, _, desktop = open_desktop(port, cert, vm_id, login_token(port, cert))
        assert status == 101
        desktop.recv_until(lambda d: False, timeout=90)
        code, reason = desktop.closed
        assert code == 4503 and "The nx desktop cannot be shown in a browser" in reason, desktop.closed
        assert desktop.buffer == b""
        wait_for(lambda: session_row(node, vm_id)[2] == "disconnected", 10, "session row released")
    finally:
        node.stop(0)
