"""Hostile clients against the L7R's front door as it is now: the fast path for simple
GETs beside h11, the thin TLS stream (tls.TlsStream), the splice calling the C TLS object
directly, the accept loop without a Pool and the cap per source address.

Real node (PostgreSQL, FakeVma echo desktop, TestHkd), real TLS over loopback only.
Every loop is bounded by count and time.
"""
import ctypes
import fcntl
import os
import resource
import socket
import ssl
import struct
import termios
import time

import gevent
import pytest

from helpers.hostile import HubErrors, live_greenlets, wait_until
from helpers.l7r_env import AUTH, UPGRADE, Reader, client_context, get, open_conn, read_to_close, session_row
from helpers.nodes import seeded_nodes
from helpers.web_client import open_desktop, web_login

LARGEST_PUBLIC_FILE = "/novnc/core/rfb.js"       # the browser client's files need no login (122 kB)
PIPELINED = 80


@pytest.fixture
def make_node(tmp_path, pg_server, fresh_db_name):
    with seeded_nodes(tmp_path, pg_server, fresh_db_name) as make:
        yield make


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def quiet_cpu(seconds=1.0):
    """CPU this process (the node) burns while the test only waits."""
    before = cpu_seconds()
    gevent.sleep(seconds)
    return cpu_seconds() - before


def settled(node, fds, greenlets, timeout=5):
    """No connection, no handler, no fd and no greenlet left beyond the baseline."""
    if wait_until(lambda: (node.svc.connections_open == 0 and not node.svc.server.handlers
                           and fds_but_database(node) <= fds and live_greenlets() <= greenlets), timeout, step=0.1):
        return True
    print(f"left: {node.svc.connections_open} connections, {len(node.svc.server.handlers)} handlers, "
          f"{fds_but_database(node)} fds (baseline {fds}), {live_greenlets()} greenlets (baseline {greenlets})")
    return False


def fds_but_database(node):
    """This process's open fds, its PostgreSQL connections aside: the node's pool opens one
    more when two statements overlap (on a busy machine) and keeps it, which is no leak."""
    port = int(node.cfg.get_str("database.port").split(",")[0])
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                count += 1
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue                         # (the fd of listdir itself, gone)
        try:
            peer = sock.getpeername()
        except OSError:
            peer = None
        finally:
            sock.close()
        if not (isinstance(peer, tuple) and peer[1] == port):
            count += 1
    return count


def small_window_conn(node, tls=True, rcvbuf=4096):
    """A connection whose receive buffer is tiny, so an answer it does not read stalls the node's write."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(10)
    raw.connect(("127.0.0.1", node.svc.port))
    return client_context(node.cert).wrap_socket(raw, server_hostname="localhost") if tls else raw


# --- slow read -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_a_client_that_stops_reading_its_answers_is_cut(make_node, tls):
    """Eighty pipelined requests for the largest public file (about 10 MB of answers, more
    than the kernel's largest send buffer, 4 MB), none of the answers read: the node's
    write stalls. It used to wait for ever (no login needed, no idle timer running
    while it writes); now the connection goes l7r.timeout.request after its write stalled."""
    node = make_node({"l7r.timeout.request": 2, "l7r.timeout.idle.unauthenticated": 1,
                      "l7r.use_ssl": int(tls)})
    sock = small_window_conn(node, tls)
    get(sock, "/qvd/ping")
    assert Reader(sock).response().status == 200
    fds, greenlets = fds_but_database(node), live_greenlets()
    request = f"GET {LARGEST_PUBLIC_FILE} HTTP/1.1\r\n\r\n".encode()
    with HubErrors() as hub:
        sock.sendall(request * PIPELINED)
        assert wait_until(lambda: node.svc.connections_open == 1, 2)
        t0 = time.monotonic()
        gone = wait_until(lambda: node.svc.connections_open == 0, 8, step=0.1)
        took = time.monotonic() - t0
        print(f"stalled writer cut after {took:.1f} s")
        assert gone, "the node still writes to a client that reads nothing"
        assert took < 2 + 3
        received = len(read_to_close(sock, timeout=5))
        assert received < PIPELINED * 122306        # cut before all the answers went out
        sock.close()
        assert settled(node, fds, greenlets)
    assert hub.errors == []


# --- idle keep-alive and blank lines ---------------------------------------------------------------------
def test_blank_lines_do_not_keep_an_idle_connection(make_node):
    """A connection that has not logged in and sends only CRLF after its request is idle:
    closed after l7r.timeout.idle.unauthenticated like a silent one (each CRLF restarted
    the idle timer, so a byte every few seconds held it for ever)."""
    node = make_node({"l7r.timeout.idle.unauthenticated": 1})
    sock = open_conn(node.svc.port, node.cert)
    get(sock, "/qvd/ping")
    assert Reader(sock).response().status == 200
    t0 = time.monotonic()
    closed_after = None
    for _ in range(40):                      # at most 4 s of blank lines
        try:
            sock.sendall(b"\r\n")
        except OSError:
            closed_after = time.monotonic() - t0
            break
        gevent.sleep(0.1)
        if node.svc.connections_open == 0:
            closed_after = time.monotonic() - t0
            break
    sock.close()
    print(f"closed after {closed_after} s of blank lines")
    assert closed_after is not None and closed_after < 2.5


# --- the connection limit without a Pool -----------------------------------------------------------------
def test_the_connection_limit_holds_under_a_burst_of_connects(make_node):
    """l7r.limits.connections = 5 and 60 TCP connects at once (one address, under its own
    cap): the node must hold no more than 5 at any moment; the rest wait in the listen
    queue. Once they go, the node accepts again: the next client is answered."""
    node = make_node({"l7r.limits.connections": 5, "l7r.timeout.request": 2})
    socks = []
    most = 0

    def sample(seconds):
        nonlocal most
        for _ in range(int(seconds * 100)):
            most = max(most, len(node.svc.server.handlers), node.svc.connections_open)
            gevent.sleep(0.01)
    try:
        for _ in range(60):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", node.svc.port))
            socks.append(s)
        sample(1.0)
    finally:
        for s in socks:
            s.close()
    sample(0.5)                              # the queued ones are accepted now, find EOF and go
    print(f"held at most {most} connections with l7r.limits.connections = 5")
    assert most <= 5
    sock = open_conn(node.svc.port, node.cert)
    get(sock, "/qvd/ping")
    assert Reader(sock).response().status == 200
    sock.close()


# --- TLS misbehaviour (TlsStream and the splice over the C TLS object) -----------------------------------
_LIBSSL = None


def ssl_handle(sock):
    """The OpenSSL SSL* under a client socket of the standard library's TLS, to do what the
    ssl module cannot (a renegotiation, a key update). CPython's _ssl object starts with its
    PyObject header, a reference to its socket, then the SSL*: checked against the version
    the socket reports before anything is called with it."""
    global _LIBSSL
    if _LIBSSL is None:
        _LIBSSL = ctypes.CDLL("libssl.so.3")
        for name, args, result in (("SSL_version", [ctypes.c_void_p], ctypes.c_int),
                                   ("SSL_renegotiate", [ctypes.c_void_p], ctypes.c_int),
                                   ("SSL_key_update", [ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
                                   ("SSL_do_handshake", [ctypes.c_void_p], ctypes.c_int)):
            fn = getattr(_LIBSSL, name)
            fn.argtypes, fn.restype = args, result
    handle = ctypes.c_void_p.from_address(id(sock._sslobj) + 3 * ctypes.sizeof(ctypes.c_void_p)).value
    expected = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}[sock.version()]
    assert _LIBSSL.SSL_version(handle) == expected, "not the SSL* of this socket: CPython's layout changed"
    return _LIBSSL, handle


def tls_client(node, tls12=False, rcvbuf=None):
    raw = socket.socket()
    if rcvbuf:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(10)
    raw.connect(("127.0.0.1", node.svc.port))
    ctx = client_context(node.cert)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx.wrap_socket(raw, server_hostname="localhost")


def open_session(node, **kw):
    """A connect_to_vm through to its 101 on a fresh TLS connection: (socket, reader, the L7R's splice)."""
    sock = tls_client(node, **kw)
    get(sock, f"/qvd/connect_to_vm?id={node.vm_id}", AUTH + UPGRADE)
    reader = Reader(sock)
    _infos, final = reader.final()
    assert final.status == 101, final
    splice = wait_until(lambda: getattr(node.svc.sessions.get(node.vm_id), "splice", None), 5)
    assert splice is not None
    return sock, reader, splice


def released(node):
    return wait_until(lambda: session_row(node)[0] == "disconnected" and node.svc.sessions_open == 0
                      and not node.svc.sessions, 5, step=0.1)


def baseline(node):
    """Warm the node (a first connect costs a login hash and fills caches), then count."""
    sock, reader, _splice = open_session(node)
    sock.sendall(b"warm")
    assert reader.recv_exact(4) == b"warm"
    sock.close()
    assert released(node)
    return fds_but_database(node), live_greenlets()


class SessionEnded(AssertionError):
    pass


class NativeSession:
    """A connect_to_vm spliced to the echo desktop, over a fresh TLS connection."""

    def __init__(self, node, **kw):
        self.sock, self.reader, self.pump = open_session(node, **kw)

    def send(self, data):
        self.sock.sendall(data)

    def recv_exact(self, n):
        try:
            return self.reader.recv_exact(n)
        except EOFError:
            raise SessionEnded(f"the session ended: {self.pump.reason} ({len(self.reader.buf)} of {n} bytes back)") from None

    def relay_holds_data(self):
        return self.pump.down.pending is not None


class BrowserSession(NativeSession):
    """The browser client's desktop WebSocket to the echo desktop (ws_relay), over a fresh TLS connection."""

    def __init__(self, node, **kw):
        port = node.svc.port
        status, _, answer = web_login(port, node.cert, "qvd", "qvd")
        assert status == 200, answer
        self.sock = tls_client(node, **kw)
        status, _, self.desktop = open_desktop(port, node.cert, node.vm_id, answer["vms"][0]["token"], sock=self.sock)
        assert status == 101, self.desktop
        self.pump = wait_until(lambda: getattr(node.svc.sessions.get(node.vm_id), "splice", None), 5)
        assert self.pump is not None

    def send(self, data):
        self.desktop.send(data)

    def recv_exact(self, n):
        self.desktop.recv_until(lambda d: len(d.buffer) >= n, timeout=30)
        if len(self.desktop.buffer) < n:
            raise SessionEnded(f"the session ended: {self.pump.reason} ({len(self.desktop.buffer)} of {n} bytes back)")
        data, self.desktop.buffer = self.desktop.buffer[:n], self.desktop.buffer[n:]
        return data

    def relay_holds_data(self):
        return self.pump._to_client is not None


CLIENTS = {"native": NativeSession, "browser": BrowserSession}


@pytest.mark.parametrize("client", CLIENTS)
def test_key_updates_while_the_client_reads_nothing_spin_nothing_and_lose_nothing(make_node, client):
    """TLS 1.3: the client stops reading until the node's writes to it stall (the relay
    holds its one pending chunk, half written into the TLS object), then asks for 100 key
    updates (each wants the node to update its own keys, a write it cannot make now) with
    a byte of data after each. The node must not read the client meanwhile (OpenSSL fails
    such a read: "bad length"), burns no CPU, and once the client reads, every byte comes
    back, in order."""
    node = make_node()
    fds, greenlets = baseline(node)
    with HubErrors() as hub:
        session = CLIENTS[client](node, rcvbuf=4096)
        libssl, handle = ssl_handle(session.sock)
        sent = bytearray()
        for i in range(640):              # at most 10 MB (the node's send buffer grows to 4 MB) until the writes stall
            if session.relay_holds_data():
                break
            chunk = bytes([i % 251]) * 16384
            session.send(chunk)
            sent += chunk
            gevent.sleep(0.002)
        assert session.relay_holds_data(), "the node's writes to the client never stalled"
        for _ in range(100):
            assert libssl.SSL_key_update(handle, 1) == 1      # SSL_KEY_UPDATE_REQUESTED
            session.send(b"k")
            sent += b"k"
        spent = quiet_cpu(1.0)
        print(f"CPU while stalled with 100 key updates pending: {spent:.3f} s in 1 s")
        assert spent < 0.15
        assert session.recv_exact(len(sent)) == bytes(sent)
        session.sock.close()
        assert released(node)
        assert settled(node, fds, greenlets)
    assert hub.errors == []


def unread(sock):
    """Bytes waiting in a socket's receive queue."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


@pytest.mark.parametrize("client", CLIENTS)
def test_key_updates_the_node_cannot_answer_spin_nothing_and_lose_nothing(make_node, client):
    """TLS 1.3: the client reads nothing and asks for key updates (no data) until the node
    stops reading it: the answers alone fill the node's socket (its send buffer made small,
    as on a slow link, so a few hundred do), with nothing pending in the relay. The node's
    read of the client then wants to write first: it must wait for the socket to take
    data, not read again at once (the socket stays readable: that loop burnt a core).
    Meanwhile the desktop sends a byte of its own, written into the TLS object while the
    key update's answer in it is half sent. Once the client reads, every byte comes through."""
    node = make_node()
    fds, greenlets = baseline(node)
    with HubErrors() as hub:
        session = CLIENTS[client](node, rcvbuf=4096)
        relay = session.pump
        node_side = relay.client.raw                              # the node's socket to the client
        node_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        libssl, handle = ssl_handle(session.sock)
        deadline, asked = time.monotonic() + 10, 0
        while asked < 20000 and time.monotonic() < deadline and not relay.closed:
            for _ in range(50):
                assert libssl.SSL_key_update(handle, 1) == 1      # SSL_KEY_UPDATE_REQUESTED
                assert libssl.SSL_do_handshake(handle) == 1       # sends it
                asked += 1
            gevent.sleep(0.01)
            if unread(node_side) and (gevent.sleep(0.3) or unread(node_side)):
                break                     # the node reads the client no more
        assert not relay.closed, f"the session ended: {relay.reason}"
        assert unread(node_side), f"the node answered all {asked} key updates: its socket never filled"
        assert not session.relay_holds_data(), "the relay holds data: not the case under test"
        spent = quiet_cpu(1.0)
        print(f"{asked} key updates; CPU while the node cannot answer: {spent:.3f} s in 1 s")
        assert spent < 0.15
        node.vma.gate._current.sendall(b"v")                      # the desktop speaks (a VNC bell is 1 byte)
        gevent.sleep(0.2)
        assert not relay.closed, f"the session ended: {relay.reason}"
        session.send(b"after")
        assert session.recv_exact(6) == b"vafter"
        session.sock.close()
        assert released(node)
        assert settled(node, fds, greenlets)
    assert hub.errors == []


def test_a_renegotiation_attempt_ends_the_connection_and_nothing_else(make_node):
    """TLS 1.2 client-initiated renegotiation, in the request phase, inside a spliced
    session and inside a browser's WebSocket session: the node does not renegotiate (OP_NO_RENEGOTIATION), the connection ends
    at once, the session's row is released, no CPU is burnt after, nothing leaks, and
    the next client connects as usual."""
    node = make_node()
    fds, greenlets = baseline(node)
    with HubErrors() as hub:
        # the request phase
        sock = tls_client(node, tls12=True)
        get(sock, "/qvd/ping")
        assert Reader(sock).response().status == 200
        libssl, handle = ssl_handle(sock)
        assert libssl.SSL_renegotiate(handle) == 1
        try:
            get(sock, "/qvd/ping")
            Reader(sock).response()
            raise AssertionError("the node answered over a renegotiated connection")
        except (OSError, EOFError):
            pass
        sock.close()
        assert wait_until(lambda: node.svc.connections_open == 0, 3)
        # a spliced session, and a browser's WebSocket
        for client in CLIENTS.values():
            session = client(node, tls12=True)
            session.send(b"before")
            assert session.recv_exact(6) == b"before"
            libssl, handle = ssl_handle(session.sock)
            assert libssl.SSL_renegotiate(handle) == 1
            try:
                session.send(b"after")
                session.recv_exact(5)
                raise AssertionError(f"the session went on over a renegotiation ({client.__name__})")
            except (OSError, SessionEnded):
                pass
            assert released(node)
            print(f"{client.__name__} renegotiating: ended with {session.pump.reason!r}")
            session.sock.close()
        spent = quiet_cpu(1.0)
        assert spent < 0.3, f"{spent:.2f} s of CPU in 1 s after the renegotiations"
        assert settled(node, fds, greenlets)
        sock, reader, _splice = open_session(node)
        sock.sendall(b"next")
        assert reader.recv_exact(4) == b"next"
        sock.close()
        assert released(node)
    assert hub.errors == []


def linger_reset(sock):
    """Close with a TCP reset (SO_LINGER 0) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


@pytest.mark.parametrize("ending", ["half-close", "close_notify", "reset", "vm-goes"])
def test_a_session_ended_by_either_side_in_any_way_is_released(make_node, ending):
    """A spliced session over TLS, ended by:
    - half-close: the client's TCP FIN without close_notify after its last bytes: the VM
      gets them and the end, and its answer still reaches the client (the echo desktop
      answers, then closes);
    - close_notify: the same with TLS's own close (SSL_shutdown, then still reading);
    - reset: the client resets the connection while the VM is still sending to it;
    - vm-goes: the VM's end closes while the client goes on sending.
    Each time the session ends, its row is released, the node burns no CPU after, and no
    fd or greenlet is left."""
    node = make_node()
    fds, greenlets = baseline(node)
    with HubErrors() as hub:
        # (a tiny receive window: on a reset, the echo of what the client sent is still on its way)
        sock, reader, splice = open_session(node, rcvbuf=4096 if ending == "reset" else None)
        payload = bytes(range(256)) * 512                       # 128 kB
        sock.sendall(payload)
        if ending == "half-close":
            raw = socket.socket(sock.family, sock.type, fileno=sock.fileno())
            raw.shutdown(socket.SHUT_WR)
            raw.detach()                                       # (the fd stays the TLS socket's)
            assert reader.recv_exact(len(payload)) == payload
            assert read_to_close(sock) == b""
        elif ending == "close_notify":
            libssl, handle = ssl_handle(sock)
            shutdown = libssl.SSL_shutdown
            shutdown.argtypes, shutdown.restype = [ctypes.c_void_p], ctypes.c_int
            for _ in range(100):                               # close_notify sent (0 or 1); reading goes on
                if shutdown(handle) >= 0:
                    break
                gevent.sleep(0.01)
            else:
                raise AssertionError("close_notify could not be sent")
            assert reader.recv_exact(len(payload)) == payload
            assert read_to_close(sock) == b""
        elif ending == "reset":
            linger_reset(sock)
        else:
            assert reader.recv_exact(len(payload)) == payload
            node.vma.gate.close_current()
            for _ in range(200):                               # at most 200 sends, until the end shows
                try:
                    sock.sendall(b"x" * 1024)
                    gevent.sleep(0.01)
                except OSError:
                    break
                if splice.closed:
                    break
        assert released(node)
        assert wait_until(lambda: splice.closed, 3)
        print(f"{ending}: splice ended with {splice.reason!r}")
        sock.close()
        spent = quiet_cpu(1.0)
        assert spent < 0.3, f"{spent:.2f} s of CPU in 1 s after the session ended"
        assert settled(node, fds, greenlets)
    assert hub.errors == []
