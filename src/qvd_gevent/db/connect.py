"""Opening a connection: libpq's multi-host form, the read-write server, a deadline per server.

Under ``qvd-node`` psycopg2 waits on the gevent hub through a wait callback
(``make_green``: psycogreen's loop, plus the deadline below). In that non-blocking mode libpq
ignores ``connect_timeout`` (it applies it only in its own blocking connect), so a server
that never answers (a dead machine, a dropped route) would hold every attempt for the
kernel's SYN retries, about two minutes, before libpq went on to the next host of
``database.host``. The callback keeps libpq's rule, connect_timeout per server: a server
silent that long is left out and the connect goes on with the others.

The server that last took a connection is tried first next time, so after a failover to a
standby behind a silent primary only the first connection waits out the deadline.
"""
import re
import socket
import time
import weakref

import gevent
import psycopg2
import psycopg2.extensions
from gevent.socket import wait_read, wait_write

from ..config.db_servers import Server, libpq_host_port, split_servers
from ..config.db_servers import describe as describe_server

_green = False


def make_green():
    """Make psycopg2 wait on the gevent hub. Idempotent."""
    global _green
    if not _green:
        psycopg2.extensions.set_wait_callback(_wait_on_hub)
        _green = True


class _ServerSilent(Exception):
    def __init__(self, host, port):
        super().__init__(f"{host}:{port}")
        self.host, self.port = host, port


class _Deadline:
    """connect_timeout for each server libpq tries in one connect."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.server = None
        self.started = None

    def left(self, conn):
        try:
            server = (conn.info.host, conn.info.port)
        except psycopg2.Error:
            server = None
        now = time.monotonic()
        if server != self.server:
            self.server, self.started = server, now
        left = self.started + self.seconds - now
        if left <= 0:
            raise _ServerSilent(*(server or ("?", "?")))
        return left


_deadlines = weakref.WeakKeyDictionary()        # greenlet -> _Deadline while it connects


def _wait_on_hub(conn, timeout=None):
    deadline = _deadlines.get(gevent.getcurrent())
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        if state == psycopg2.extensions.POLL_READ:
            wait = wait_read
        elif state == psycopg2.extensions.POLL_WRITE:
            wait = wait_write
        else:
            raise psycopg2.OperationalError(f"Bad result from poll: {state!r}")
        if deadline is None:
            wait(conn.fileno(), timeout=timeout)
            continue
        try:
            wait(conn.fileno(), timeout=deadline.left(conn))
        except socket.timeout:
            pass            # the next turn polls again, and left() says whether time is up


class ConnectFailed(Exception):
    """No server took the connection: libpq's error for the last attempt, the silent servers."""

    def __init__(self, libpq_error, tried, silent, timeout):
        super().__init__(str(libpq_error) if libpq_error is not None else "no server answered")
        self.libpq_error = libpq_error
        self.tried = tried
        self.silent = silent
        self.timeout = timeout

    @property
    def password_refused(self):
        return self.libpq_error is not None and "password authentication failed" in str(self.libpq_error)

    def describe(self, kw):
        silent = [(describe_server(s), f"no answer within {self.timeout:g} s") for s in self.silent]
        return describe_connect_error(self.libpq_error, kw, tried=self.tried, earlier=silent)


def _matching(servers, host, port):
    for server in servers:
        if server.host == host and (server.port or "5432") == str(port):
            return server
    return servers[0]


def open_connection(kw, servers, timeout=None):
    """psycopg2.connect(**kw) to the first read-write server of `servers`, in that order, each
    given `timeout` seconds (None: libpq's own rule); no servers: kw's own host, if any.
    Raises ConnectFailed."""
    remaining, silent = list(servers), []
    me = gevent.getcurrent()
    while True:
        attempt = dict(kw)
        if remaining:
            attempt["host"], port = libpq_host_port(remaining)
            attempt.pop("port", None)
            if port:
                attempt["port"] = port
        if timeout and _green:
            _deadlines[me] = _Deadline(timeout)
        try:
            return psycopg2.connect(**attempt)
        except _ServerSilent as exc:
            gone = _matching(remaining, exc.host, exc.port) if remaining else Server(exc.host, str(exc.port))
            silent.append(gone)
            if gone in remaining:
                remaining.remove(gone)
            if not remaining:
                raise ConnectFailed(None, [], silent, timeout) from None
        except psycopg2.OperationalError as exc:
            raise ConnectFailed(exc, remaining or None, silent, timeout) from None
        finally:
            _deadlines.pop(me, None)


# --- one line for the operator ------------------------------------------------------------------
# one line per server libpq tried: 'connection to server at "h" (10.0.0.5), port 5432 failed: why'
# or 'connection to server on socket "/run/postgresql/.s.PGSQL.5432" failed: why'; its hints
# follow on lines that start with a tab
_LIBPQ_SERVER_LINE = re.compile(
    r'connection to server (?:at "(?P<host>[^"]*)"(?: \([^)]*\))?, port (?P<port>\d+)'
    r'|on socket "(?P<socket>[^"]*)") failed: (?P<reason>.*)')


def _reasons_by_server(text, servers):
    """[(server tried, why it failed)] from libpq's message, in the order it tried them."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("\t"):
            continue
        line = " ".join(line.split())        # libpq writes "FATAL:  the database system is ..."
        match = _LIBPQ_SERVER_LINE.fullmatch(line)
        if match is None:
            # libpq's non-blocking connect drops the prefix of the first server it tried
            first = describe_server(servers[0]) if servers and not out else None
            out.append((first, line))
        elif match["socket"]:
            out.append((match["socket"], match["reason"]))
        else:
            out.append((f"{match['host']}:{match['port']}", match["reason"]))
    return out


def servers_of(kw):
    try:
        return split_servers(kw.get("host") or "localhost", kw.get("port"))
    except ValueError:
        return [Server(str(kw.get("host")), str(kw.get("port") or ""))]


def describe_connect_error(exc, kw, tried=None, earlier=()):
    """One line naming every server of kw and why each refused: `earlier` (server, why)
    pairs first, then what libpq said of the servers of its last attempt (`tried`)."""
    servers = servers_of(kw)
    where = ", ".join(describe_server(s) for s in servers)
    reasons = list(earlier)
    if exc is not None:
        reasons += _reasons_by_server(str(exc), servers if tried is None else tried)
        if not reasons:
            text = str(exc).strip()
            reasons = [(None, text.splitlines()[0] if text else type(exc).__name__)]
    if len(servers) == 1 and len(reasons) == 1:
        why = reasons[0][1]
    else:
        why = "; ".join(f"{server}: {reason}" if server else reason for server, reason in reasons)
    return f"cannot connect to database {kw.get('dbname')!r} at {where} as {kw.get('user')!r}: {why}"
