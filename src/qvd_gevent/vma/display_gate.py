"""The VM's display port (4000 + display): only the connection armed for the current
session reaches the desktop (docs/protocol.md#display-gate).

Every connect of the L7R makes a one-time key and sends it with ``x_start``
(``qvd.display.key``); the VMA arms its gate with it. The L7R then opens the display port
and first sends ``PREAMBLE_PREFIX + key + "\\n"`` (a fixed 60 bytes). The gate compares
the key with the armed one in constant time; on a match it spends the key, answers ``ACK``
once the desktop behind it is reachable, and relays. Anything else (no key, a wrong key,
a spent key, a connection before any x_start, silence for
``internal.vma.display.key_timeout`` seconds) is closed at once and never reaches the
desktop. Arming a new key (the next x_start: a new session, a takeover) closes the
connection of the previous one, so the display holds at most one armed connection.

An unauthenticated VMA (the original's behaviour) has an open gate: no preamble, no ACK,
connections served one after another as they arrive.
"""
import _socket
import hmac
import logging
import os
import re
import secrets
import socket

from gevent.pool import Pool
from gevent.server import StreamServer

log = logging.getLogger("qvd.vma.display")

PARAM = "qvd.display.key"               # the x_start parameter that carries the key
GENERATION_PARAM = "qvd.display.generation"   # ... and the claim's place in the VM's order of sessions
PREAMBLE_PREFIX = b"QVD-DISPLAY-KEY "
KEY_LENGTH = 43                         # secrets.token_urlsafe(32): 256 bits
PREAMBLE_LENGTH = len(PREAMBLE_PREFIX) + KEY_LENGTH + 1
ACK = b"QVD-DISPLAY-OK\n"
HANDSHAKES = 32                         # connections waiting for their key at once; more wait in the backlog
_KEY = re.compile(rf"[A-Za-z0-9_-]{{{KEY_LENGTH}}}")


class DisplayKeyError(ValueError):
    """A display key that is not one (x_start fails with this message)."""


class StaleSession(ValueError):
    """x_start of a session older than the one the display serves (an aborted contender's
    late call): refused, the display stays with the newer session."""


def check_generation(value):
    """The generation x_start carries: None (an L7R that sends none) or a non-negative int."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.isdigit() or len(value) > 20:
        raise DisplayKeyError(f"{GENERATION_PARAM} must be a non-negative integer")
    return int(value)


def new_key():
    return secrets.token_urlsafe(32)


def check_key(key):
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise DisplayKeyError(f"{PARAM} must be {KEY_LENGTH} characters of [A-Za-z0-9_-]")
    return key


def preamble(key):
    """What the L7R sends first on a new display connection."""
    return PREAMBLE_PREFIX + check_key(key).encode("ascii") + b"\n"


def key_of_preamble(data):
    """The key a preamble carries, or None when it is not a preamble."""
    if len(data) != PREAMBLE_LENGTH or not data.startswith(PREAMBLE_PREFIX) or not data.endswith(b"\n"):
        return None
    key = data[len(PREAMBLE_PREFIX):-1].decode("ascii", "replace")
    return key if _KEY.fullmatch(key) else None


def peer_closed(sock):
    """True when the peer has closed its side (an end of stream is waiting to be read), or
    the connection is gone; False while it is open. Looks through a duplicate of the
    descriptor with the plain C socket: the serving greenlet is reading this one."""
    try:
        probe = _socket.socket(fileno=os.dup(sock.fileno()))
    except OSError:
        return True
    try:
        probe.setblocking(False)
        return probe.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        probe.close()


def recv_exactly(sock, count):
    """count bytes, or fewer when the peer closed first."""
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


class DisplayGate:
    """Listens on (address, port); ``serve(conn, ack)`` runs the desktop side of an admitted
    connection until it ends and calls ``ack()`` once the desktop is reachable.

    keyed False: the open gate of an unauthenticated VMA."""

    def __init__(self, address, port, serve, keyed=True, key_timeout=5.0):
        self.address = address
        self.port = port
        self.serve = serve
        self.keyed = keyed
        self.key_timeout = key_timeout
        self.server = None
        self._armed = None
        self._current = None
        self.generation = None          # of the newest session armed
        self.admitted = 0
        self.refused = 0
        self.taken_while_open = 0       # connections a newer session took over before their L7R closed them

    # --- the RPC side ----------------------------------------------------------------------
    def start(self):
        """Listen (idempotent). Raises OSError when the port cannot be bound."""
        if self.server is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.address, self.port))
            listener.listen(16)
        except OSError:
            listener.close()
            raise
        # open gate: one connection at a time (the accept loop waits for the served one);
        # keyed: handshakes in parallel, so a silent stranger cannot hold up the armed client
        self.server = StreamServer(listener, self._handle, spawn=Pool(HANDSHAKES) if self.keyed else 1)
        self.server.start()
        self.port = listener.getsockname()[1]
        return self

    def arm(self, key, generation=None):
        """The next connection presenting key is admitted; the current one is closed. With a
        generation (the claim's), an arming older than the newest so far raises StaleSession
        and changes nothing."""
        key = check_key(key)
        if generation is not None and self.generation is not None and generation < self.generation:
            raise StaleSession(f"a newer session (claim {self.generation}) holds the display; "
                               f"this x_start is of claim {generation}")
        if generation is not None:
            self.generation = generation
        self._armed = key
        self._take_current()

    def disarm(self):
        """No connection is admitted until the next arm; the current one is closed."""
        self._armed = None
        self.close_current()

    def _take_current(self):
        """Close the current connection for a newer session. Its L7R closes it before it
        releases the session row, so one still open here means two sessions overlapped:
        counted and logged (docs/protocol.md#display-gate)."""
        conn = self._current
        if conn is not None and not peer_closed(conn):
            self.taken_while_open += 1
            log.warning("display: a newer session took the display from a connection its L7R had not closed")
        self.close_current()

    def close_current(self):
        conn, self._current = self._current, None
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)   # its serving greenlet sees EOF and closes it
            except OSError:
                pass

    def stop(self):
        self._armed = None
        self.close_current()
        server, self.server = self.server, None
        if server is not None:
            server.stop(timeout=1)

    # --- a connection ----------------------------------------------------------------------
    def _handle(self, conn, peer):
        try:
            if self.keyed and not self._admit(conn, peer):
                return
            self._current = conn
            self.admitted += 1
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.serve(conn, (lambda: conn.sendall(ACK)) if self.keyed else (lambda: None))
        except OSError:
            pass
        finally:
            if self._current is conn:
                self._current = None
            conn.close()

    def _admit(self, conn, peer):
        conn.settimeout(self.key_timeout)
        try:
            key = key_of_preamble(recv_exactly(conn, PREAMBLE_LENGTH))
        except OSError:             # silent past the timeout, or reset
            key = None
        armed = self._armed
        # nothing yields between this comparison and spending the key: two connections
        # presenting the same key cannot both pass
        if key is None or armed is None or not hmac.compare_digest(key.encode(), armed.encode()):
            self.refused += 1
            log.warning("display: refused a connection from %s (%s)", peer[0],
                        "no key" if key is None else "not the armed key")
            return False
        self._armed = None
        self._take_current()
        conn.settimeout(None)
        return True
