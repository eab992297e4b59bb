"""The browser's WebSocket: handshake checks, Origin, the token in the subprotocol list,
and the relay's framing, limits and backpressure (over socket pairs, wsproto as the browser)."""
import socket

import gevent
import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from qvd_gevent.l7r import websocket
from qvd_gevent.l7r.http import HttpError, Request
from qvd_gevent.l7r.ws_relay import CLOSE_CODE_SERVER, WsRelay

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
TOKEN = "A" * 43


def request(**headers):
    base = {"Host": "node.example:8443", "Upgrade": "websocket", "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": KEY,
            "Sec-WebSocket-Protocol": f"binary, qvd-token.{TOKEN}", "Origin": "https://node.example:8443"}
    base.update({k.replace("_", "-"): v for k, v in headers.items() if v is not None})
    for k in [k for k, v in headers.items() if v is None]:
        base.pop(k.replace("_", "-"), None)
    return Request("GET", "/qvd/web/desktop?id=10", list(base.items()))


def test_a_browser_handshake_is_accepted_with_the_rfc_accept_key():
    r = request()
    websocket.check_handshake(r)
    headers = dict(websocket.accept_headers(r))
    assert headers["Sec-WebSocket-Accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="    # RFC 6455's example
    assert headers["Sec-WebSocket-Protocol"] == "binary"                        # never the token
    assert websocket.token_from_protocols(r) == TOKEN
    assert websocket.offers_binary(r)


@pytest.mark.parametrize("change,status", [
    ({"Upgrade": None}, 426), ({"Upgrade": "QVD/1.0"}, 426), ({"Connection": "keep-alive"}, 426),
    ({"Sec-WebSocket-Version": "8"}, 426), ({"Sec-WebSocket-Key": None}, 400), ({"Sec-WebSocket-Key": "short"}, 400),
])
def test_malformed_handshakes_are_refused(change, status):
    with pytest.raises(HttpError) as info:
        websocket.check_handshake(request(**change))
    assert info.value.status == status


def test_firefox_style_connection_header_is_an_upgrade():
    websocket.check_handshake(request(Connection="keep-alive, Upgrade"))


@pytest.mark.parametrize("origin,host,tls,extra,ok", [
    ("https://node.example:8443", "node.example:8443", True, (), True),
    ("https://NODE.example:8443", "node.example:8443", True, (), True),
    ("https://node.example", "node.example:443", True, (), True),
    ("https://127.0.0.1:8443", "127.0.0.1:8443", True, (), True),
    ("https://[::1]:8443", "[::1]:8443", True, (), True),
    ("http://node.example:8443", "node.example:8443", True, (), False),      # scheme differs
    ("https://node.example:8444", "node.example:8443", True, (), False),     # port differs
    ("https://evil.example", "node.example:8443", True, (), False),
    ("https://node.example.evil.example:8443", "node.example:8443", True, (), False),
    ("null", "node.example:8443", True, (), False),                          # sandboxed frame, file://
    ("", "node.example:8443", True, (), False),
    (None, "node.example:8443", True, (), False),
    ("https://node.example:8443/path", "node.example:8443", True, (), False),
    ("https://user@node.example:8443", "node.example:8443", True, (), False),
    ("https://vdi.example", "10.0.0.5:8443", True, ("https://vdi.example",), True),   # behind a balancer
    ("http://node.example:8080", "node.example:8080", False, (), True),     # use_ssl = 0
    ("https://node.example:8443", "node.example:8443\r\nX: y", True, (), False),
    ("https://node.example:8443", "", True, (), False),
])
def test_origin_must_be_the_nodes_own(origin, host, tls, extra, ok):
    assert websocket.origin_allowed(origin, host, tls, extra) is ok


@pytest.mark.parametrize("protocols,token", [
    (f"binary, qvd-token.{TOKEN}", TOKEN), (f"qvd-token.{TOKEN},binary", TOKEN), ("binary", None),
    ("qvd-token.", None), ("qvd-token.abc", None), ("qvd-token." + "a/b=" * 11, None), (None, None),
])
def test_token_from_the_subprotocol_list(protocols, token):
    assert websocket.token_from_protocols(request(Sec_WebSocket_Protocol=protocols)) == token


# --- the relay -----------------------------------------------------------------------------
class Browser:
    """The browser's side of the relay: a socket and a client-side wsproto connection."""

    def __init__(self, sock):
        self.sock = sock
        self.ws = Connection(ConnectionType.CLIENT)
        self.events = []

    def send(self, event):
        self.sock.sendall(self.ws.send(event))

    def receive(self, until, timeout=5):
        with gevent.Timeout(timeout):
            while not until(self.events):
                data = self.sock.recv(65536)
                if not data:
                    self.events.append("eof")
                    break
                self.ws.receive_data(data)
                self.events.extend(self.ws.events())
        return self.events

    def payload(self):
        return b"".join(e.data for e in self.events if isinstance(e, BytesMessage))


@pytest.fixture
def relay_pair():
    made = []

    def make(max_message=1 << 20):
        browser_sock, client = socket.socketpair()
        vm, vm_peer = socket.socketpair()
        done = []
        relay = WsRelay(client, vm, max_message, on_done=done.append).start()
        made.append((relay, browser_sock, vm_peer))
        return Browser(browser_sock), vm_peer, relay, done
    yield make
    for relay, a, b in made:
        relay.close("test over")
        a.close()
        b.close()


def test_bytes_flow_both_ways_as_binary_frames(relay_pair):
    browser, vm, relay, done = relay_pair()
    vm.sendall(b"RFB 003.008\n")
    browser.receive(lambda ev: browser.payload() == b"RFB 003.008\n")
    browser.send(BytesMessage(data=b"RFB 003.008\n"))
    browser.send(BytesMessage(data=b"\x01" * 70000))        # masked, bigger than one read
    got = b""
    with gevent.Timeout(5):
        while len(got) < 12 + 70000:
            got += vm.recv(65536)
    assert got == b"RFB 003.008\n" + b"\x01" * 70000
    assert relay.bytes_to_vm == 70012 and relay.bytes_to_client == 12


def test_ping_is_answered_and_the_browser_close_is_returned(relay_pair):
    browser, vm, relay, done = relay_pair()
    browser.send(Ping(payload=b"hi"))
    browser.receive(lambda ev: any(isinstance(e, Pong) for e in ev))
    browser.send(CloseConnection(code=1000))
    browser.receive(lambda ev: any(isinstance(e, CloseConnection) for e in ev))
    with gevent.Timeout(5):
        while not done:
            gevent.sleep(0.01)
    assert "the browser closed the session (1000)" in done[0]
    assert vm.recv(10) == b""                                # the VM side is closed too


def test_text_frames_and_long_messages_end_the_session(relay_pair):
    browser, vm, relay, done = relay_pair()
    browser.send(TextMessage(data="hello"))
    events = browser.receive(lambda ev: any(isinstance(e, CloseConnection) for e in ev))
    assert [e.code for e in events if isinstance(e, CloseConnection)] == [1003]

    browser, vm, relay, done = relay_pair(max_message=1000)
    browser.send(BytesMessage(data=b"x" * 600, message_finished=False))
    browser.send(BytesMessage(data=b"x" * 600))              # one message of 1200 bytes in two frames
    events = browser.receive(lambda ev: any(isinstance(e, CloseConnection) for e in ev))
    assert [e.code for e in events if isinstance(e, CloseConnection)] == [1009]
    vm.settimeout(2)
    reached = b""
    while True:
        data = vm.recv(4096)
        if not data:
            break
        reached += data
    assert len(reached) <= 600                               # nothing past the limit reached the VM


def test_unmasked_frames_from_the_browser_are_a_protocol_error(relay_pair):
    browser, vm, relay, done = relay_pair()
    browser.sock.sendall(b"\x82\x03abc")                    # RFC 6455 5.1: a client must mask
    events = browser.receive(lambda ev: any(isinstance(e, CloseConnection) for e in ev))
    assert [e.code for e in events if isinstance(e, CloseConnection)] == [1002]


def test_close_from_the_node_tells_the_browser_why(relay_pair):
    browser, vm, relay, done = relay_pair()
    relay.close("Aborted by contending session VM_ID: 10")
    events = browser.receive(lambda ev: any(isinstance(e, CloseConnection) for e in ev) or "eof" in ev)
    closes = [e for e in events if isinstance(e, CloseConnection)]
    assert closes and closes[0].code == CLOSE_CODE_SERVER and "contending" in closes[0].reason
    assert done == ["Aborted by contending session VM_ID: 10"]


def test_desktop_end_closes_with_1000(relay_pair):
    browser, vm, relay, done = relay_pair()
    vm.shutdown(socket.SHUT_WR)
    events = browser.receive(lambda ev: any(isinstance(e, CloseConnection) for e in ev))
    assert [e.code for e in events if isinstance(e, CloseConnection)] == [1000]


def test_a_browser_that_does_not_read_stops_the_vm_reads(relay_pair):
    """Backpressure: the VM floods, the browser reads nothing; the relay keeps at most one
    pending frame, so the VM's writes stall instead of the node buffering without bound."""
    browser, vm, relay, done = relay_pair()
    vm.setblocking(False)
    sent = 0
    chunk = b"v" * 65536
    with gevent.Timeout(20):
        stalls = 0
        while stalls < 20:
            try:
                sent += vm.send(chunk)
                stalls = 0
            except BlockingIOError:
                stalls += 1
                gevent.sleep(0.02)
    # what left the VM sits in socket buffers and in at most one pending frame of the relay
    buffered = browser.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) + \
        relay.client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) + \
        relay.vm.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) + vm.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    assert sent < buffered + 2 * 65536 + 1024, (sent, buffered)
    pending = relay._to_client
    assert pending is not None and len(pending[0]) - pending[1] <= 65536 + 14
    # the browser reads: everything arrives, in order
    vm.setblocking(True)
    browser.receive(lambda ev: len(browser.payload()) >= sent, timeout=20)
    assert browser.payload() == b"v" * sent


def test_a_vm_that_does_not_read_stops_the_browser_reads(relay_pair):
    browser, vm, relay, done = relay_pair()
    browser.sock.setblocking(False)
    frames = 0
    frame = browser.ws.send(BytesMessage(data=b"b" * 16384))
    with gevent.Timeout(20):
        stalls, view = 0, memoryview(b"")
        while stalls < 20:
            try:
                if not view:
                    view = memoryview(frame)
                    frames += 1
                view = view[browser.sock.send(view):]
                stalls = 0
            except BlockingIOError:
                stalls += 1
                gevent.sleep(0.02)
    assert relay._to_vm is not None and len(relay._to_vm[0]) <= 65536
    assert relay.bytes_to_vm < frames * 16384
