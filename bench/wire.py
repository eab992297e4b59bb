"""A benchmark client's side of the QVD wire protocol, on plain blocking sockets.

Works under gevent's monkey patching (the workers, locust) and without it. The requests
and the response parsing are qvd-client's own (qvd_gevent.client.protocol), so the bench
speaks exactly what the shipped client speaks.
"""
import socket
import ssl

from qvd_gevent.client import protocol


class WireError(Exception):
    """The server refused or the connection failed; the message is one line."""


def client_context(cafile):
    """A TLS client context that trusts the bench's certificate (no session resumption:
    every new connection is a full handshake)."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def open_connection(host, port, context=None, timeout=30.0, source=None):
    """source: the local address to connect from (the cluster bench gives each user a loopback
    address of its own, as users come from their own addresses)."""
    raw = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0) if source else None)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if context is None:
        return raw
    try:
        return context.wrap_socket(raw, server_hostname=host)
    except BaseException:
        raw.close()
        raise


def exchange(sock, request, on_progress=None):
    """Send one request; return the first non-102 event (Final or Switched)."""
    reader = protocol.ResponseReader()
    sock.sendall(request)
    for _ in range(100000):
        data = sock.recv(65536)
        events = reader.feed(data) if data else reader.feed_eof()
        for event in events:
            if isinstance(event, protocol.Progress):
                if on_progress is not None:
                    on_progress(event.text)
            else:
                return event
    raise WireError("too many progress lines")


def list_of_vm(sock, authorization, host="localhost"):
    event = exchange(sock, protocol.build_request("/qvd/list_of_vm", [], authorization, host=host,
                                                  accept_json=True))
    if isinstance(event, protocol.Switched) or event.status != 200:
        raise WireError(f"list_of_vm: {getattr(event, 'status', 101)}")
    return protocol.parse_vm_list(event.body)


def connect_to_vm(sock, vm_id, authorization, host="localhost", on_progress=None):
    """connect_to_vm on sock; returns the bytes that followed the 101 (already the VM's)."""
    request = protocol.build_request("/qvd/connect_to_vm", [("id", str(vm_id))], authorization,
                                     host=host, upgrade=True)
    event = exchange(sock, request, on_progress)
    if isinstance(event, protocol.Final):
        raise WireError(f"connect_to_vm {vm_id}: {event.status} {protocol.body_text(event.body)}")
    return event.rest


def ping(sock, host="localhost"):
    event = exchange(sock, b"GET /qvd/ping HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")
    if isinstance(event, protocol.Switched) or event.status != 200:
        raise WireError(f"ping: {getattr(event, 'status', 101)}")


def open_desktop(sock, vm_id, token, host, port):
    """The browser client's WebSocket for vm_id (docs/protocol.md#the-websocket) on sock,
    as the page opens it (Origin of the node's page, the token in the subprotocol list).
    Returns (wsproto connection, events that came with the 101)."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, RejectConnection, Request

    ws = WSConnection(ConnectionType.CLIENT)
    authority = f"{host}:{port}"
    sock.sendall(ws.send(Request(host=authority, target=f"/qvd/web/desktop?id={vm_id}",
                                 subprotocols=["binary", f"qvd-token.{token}"],
                                 extra_headers=[(b"Origin", f"https://{authority}".encode())])))
    for _ in range(1000):
        data = sock.recv(65536)
        ws.receive_data(data or None)
        events = list(ws.events())
        for i, event in enumerate(events):
            if isinstance(event, AcceptConnection):
                return ws, events[i + 1:]
            if isinstance(event, RejectConnection):
                raise WireError(f"web desktop {vm_id}: {event.status_code}")
        if not data:
            raise WireError(f"web desktop {vm_id}: closed during the handshake")
    raise WireError(f"web desktop {vm_id}: no answer to the handshake")


def desktop_bytes(sock, ws, events, want):
    """Payload from the desktop's WebSocket until want bytes came (a close is an error)."""
    from wsproto.events import BytesMessage, CloseConnection

    got = b""
    for _ in range(10000):
        for event in events:
            if isinstance(event, BytesMessage):
                got += event.data
            elif isinstance(event, CloseConnection):
                raise WireError(f"web desktop closed: {event.code} {event.reason}")
        if len(got) >= want:
            return got
        data = sock.recv(65536)
        if not data:
            raise WireError("web desktop: connection closed")
        ws.receive_data(data)
        events = list(ws.events())
    raise WireError("web desktop: too many frames")


def recv_exact(sock, n, already=b""):
    buf = bytearray(already)
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise WireError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class Target:
    """Where a bench client goes: the L7R (TLS + connect_to_vm), the L7R's browser
    WebSocket (TLS + /qvd/web/desktop), HAProxy (TLS) or direct (plain)."""

    def __init__(self, spec):
        self.kind = spec["kind"]            # l7r | web | tls | plain
        self.host = spec["host"]
        self.port = int(spec["port"])
        # the cluster bench spreads sessions over many L7Rs: session i goes to ports[i % len]
        self.ports = [int(port) for port in spec.get("ports") or [self.port]]
        self.sources = spec.get("sources") or [None]           # session i from sources[i % len]
        self.auth = spec.get("auth")
        self.vm_ids = spec.get("vm_ids", [])
        self.tokens = spec.get("tokens", [])         # web: a single-use token per VM of vm_ids
        # bytes the session waits for from the VM before it counts as open (the desktop's
        # first message: the whole path, relay included, is up)
        self.expect = spec.get("expect", "").encode()
        self.context = client_context(spec["ca"]) if self.kind in ("l7r", "web", "tls") else None

    def session(self, index=0, timeout=30.0):
        """An open stream to the backend; returns (socket, early bytes). For web, the socket
        carries WebSocket frames and the early bytes are the desktop's payload."""
        port = self.ports[index % len(self.ports)]
        sock = open_connection(self.host, port, self.context, timeout, self.sources[index % len(self.sources)])
        try:
            rest = b""
            if self.kind == "l7r":
                rest = connect_to_vm(sock, self.vm_ids[index % len(self.vm_ids)], self.auth, self.host)
                if self.expect:
                    rest = recv_exact(sock, len(self.expect), rest)
            elif self.kind == "web":
                if index >= len(self.tokens):
                    raise WireError(f"session {index}: no token left (one per desktop, single-use)")
                ws, events = open_desktop(sock, self.vm_ids[index], self.tokens[index], self.host, port)
                if self.expect:
                    rest = desktop_bytes(sock, ws, events, len(self.expect))
            if self.expect and not rest.startswith(self.expect):
                raise WireError(f"session {index}: the desktop sent {rest[:20]!r}")
            return sock, rest
        except BaseException:
            sock.close()
            raise
