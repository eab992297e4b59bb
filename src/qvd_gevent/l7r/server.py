"""The L7R service: accept, TLS and the request loop.

    svc = L7RService(cfg, db, listener); svc.start(); ... svc.drain(grace); svc.stop()

One greenlet per client connection while it speaks HTTP; each request goes to
``endpoints.dispatch``; once a connect_to_vm is spliced the connection belongs to its
session (sessions.py) and holds no greenlet at all (splice.py). This module builds the
parts below it and holds their lifecycle; none of them calls back up here.
"""
import logging
import socket
import time

import gevent
import gevent.socket
import psycopg2
from gevent.server import StreamServer

from ..common import metrics
from ..db import DatabaseUnavailable, runtime
from ..vma.client import legacy_unauthenticated
from . import endpoints, tls
from .auth import Authenticator
from .counters import Counters
from .host import NodeHost
from .http import ClientGone, HttpConnection, HttpError, raw_error_response
from .sessions import SessionAborted, Sessions
from .splice import tune_socket
from .throttle import Throttle

log = logging.getLogger("qvd.l7r")


class _Acceptor(StreamServer):
    """gevent's StreamServer, lighter per connection:

    - the handler gets the accepted ``_socket.socket`` itself and builds the one object
      it talks through (a TLS stream, or a gevent socket for plain HTTP), closing what it
      does not hand over to a session: no gevent socket made, detached and thrown away;
    - each connection runs in a raw greenlet, counted here against ``limit`` (accepting
      pauses while that many are open), instead of a gevent Pool's Greenlet, semaphore
      and links. It is counted when it is accepted, not when its greenlet first runs:
      gevent accepts up to ``max_accept`` connections per wake-up, checking ``full()``
      before each, and none of their greenlets has run by then."""

    def __init__(self, address, handle, limit, backlog):
        super().__init__(address, handle, backlog=backlog)
        self.limit = limit
        self.handlers = set()

    def full(self):
        return len(self.handlers) >= self.limit

    def do_read(self):
        listener = self.socket
        try:
            fd, address = listener._accept()
        except BlockingIOError:
            return None
        return tls.AcceptedSocket(listener.family, socket.SOCK_STREAM, 0, fd), address

    def do_handle(self, sock, address):
        self.handlers.add(gevent.spawn_raw(self._run, sock, address))

    def _run(self, sock, address):
        me = gevent.getcurrent()
        try:
            self.handle(sock, address)
        except gevent.GreenletExit:
            pass
        except BaseException:        # a raw greenlet's exception would land in the hub
            log.exception("connection handler from %s failed", address)
        finally:
            self.handlers.discard(me)
            if self._watcher is None and len(self.handlers) < self.limit:
                self._start_accepting_if_started()

    def stop(self, timeout=None):
        """Stop accepting; give running handlers timeout seconds, then end them."""
        self.close()
        deadline = time.monotonic() + (self.stop_timeout if timeout is None else timeout)
        while self.handlers and time.monotonic() < deadline:
            gevent.sleep(0.02)
        for handler in list(self.handlers):
            gevent.kill(handler)
        gevent.sleep(0)
        # one killed before it first ran never reached its finally (its socket goes with it)
        self.handlers = {handler for handler in self.handlers if not handler.dead}


class L7RError(Exception):
    """The L7R cannot start; one line for the operator."""


class L7RConfigError(L7RError):
    """The L7R cannot start until its configuration changes (certificate, key, TLS settings)."""


def check_material(cfg, db):
    """What an L7R needs from the database before it serves, checked (L7RConfigError: one
    line): this version's connect steps installed, the TLS context (None for plain HTTP)."""
    legacy_unauthenticated(cfg, "L7R")
    try:
        runtime.install_functions(db)      # an older database gets this version's steps
    except psycopg2.Error as exc:
        raise L7RConfigError("cannot install the connect steps of db/functions.sql in the database "
                             f"({str(exc).strip().splitlines()[0]}); run them as the database's owner") from None
    if not cfg.get_bool("l7r.use_ssl"):
        return None
    try:
        return tls.context_from_database(cfg, db)
    except (tls.TlsError, OSError) as exc:
        raise L7RConfigError(str(exc)) from None


def reuse_port_listener(address, port, backlog):
    """A listening socket that other processes of this user may bind too (SO_REUSEPORT): the
    kernel spreads new connections over the L7R workers of one node, each accepting on its
    own socket (no worker woken for a connection another takes)."""
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class L7RService:
    """node_pids() -> the pids of this node's other live L7R processes (l7r.workers; empty for
    a node of one process): a session row one of them holds is live, not a dead run's.
    reuse_port: listen on a socket of its own beside the node's other workers."""

    def __init__(self, cfg, db, listener, node_pids=None, reuse_port=False):
        self.cfg = cfg
        self.db = db
        self.listener = listener
        self.reuse_port = reuse_port
        self.port = None
        self.server = None
        self._address = None
        self.ssl_context = None
        self._unsubscribe = []
        self._draining = False
        self._limits_cache = None
        self._pending = {}          # source address -> its connections that are not sessions (yet)
        self._capped = set()        # addresses at the cap (one warning each)
        self.host = NodeHost(cfg, db, listener)
        self.counters = Counters(db, self.host)
        self.registry = Sessions(cfg, db, listener, self.host, self.counters, node_pids)
        throttle = Throttle(cfg.get_int("l7r.auth.throttle.max_failures"), cfg.get_int("l7r.auth.throttle.window"),
                            cfg.get_int("l7r.auth.throttle.burst"),
                            cfg.get_int("l7r.auth.throttle.max_failures_per_login"))
        self.auth = Authenticator(cfg, db, throttle, lambda: self.host.id, self.counters.count)
        self.ctx = endpoints.Context(cfg, db, self.auth, self.registry, self.counters, self.host)

    # --- what the node and the tests look at ------------------------------------------------
    @property
    def host_id(self):
        return self.host.id

    @property
    def pid(self):
        return self.registry.pid

    @property
    def sessions(self):
        """vm_id -> Session of the sessions this L7R holds (claimed or being set up)."""
        return self.registry.live

    @property
    def sessions_open(self):
        return self.counters.sessions_open

    @property
    def connections_open(self):
        return self.counters.connections_open

    def flush_counters(self):
        self.counters.flush()

    def reconcile(self):
        return self.registry.reconcile()

    # --- lifecycle ------------------------------------------------------------------------
    def prepare(self):
        """Load the certificate and key and bind the port, without serving yet: the node does
        this before the HKD touches the host, so a missing certificate or a taken port stops
        it with nothing to undo."""
        cfg = self.cfg
        self.ssl_context = check_material(cfg, self.db)
        self.host.lookup()
        address = cfg.get_str("l7r.address")
        address = "0.0.0.0" if address in ("*", "") else address
        try:
            if self.reuse_port:
                listening = reuse_port_listener(address, cfg.get_int("l7r.port"), cfg.get_int("l7r.listen.backlog"))
                self.server = _Acceptor(listening, self._handle, cfg.get_int("l7r.limits.connections"), None)
            else:
                self.server = _Acceptor((address, cfg.get_int("l7r.port")), self._handle,
                                        cfg.get_int("l7r.limits.connections"), cfg.get_int("l7r.listen.backlog"))
            self.server.init_socket()
        except OSError as exc:
            raise L7RError(f"cannot listen on {address}:{cfg.get_int('l7r.port')}: {exc.strerror or exc}") from None
        self._address = address
        return self

    def start(self):
        if self.server is None:
            self.prepare()
        address = self._address
        self.server.start()
        self.port = self.server.server_port
        self._unsubscribe.append(self.listener.subscribe("qvd_config_changed", self._on_config_changed))
        self.registry.start()
        self.counters.start()
        log.info("L7R listening on %s:%s (%s)", address, self.port, "TLS" if self.ssl_context else "plain HTTP")
        return self

    def drain(self, grace_seconds):
        """Stop accepting; let live sessions run up to grace, then close them; rows end disconnected."""
        self._draining = True
        if self.server is not None:
            self.server.close()
        self.registry.drain(grace_seconds)

    def stop(self, flush_counters=True):
        if not self._draining:
            self.drain(0)
        if self.server is not None:
            self.server.stop(timeout=1)
        for unsub in self._unsubscribe:
            unsub()
        self._unsubscribe = []
        self.registry.stop()
        self.counters.stop(flush=flush_counters)
        self.auth.close()
        self.host.close()

    # --- TLS material ------------------------------------------------------------------------
    def _on_config_changed(self, channel, payload):
        if self.ssl_context is not None:
            gevent.spawn(self._reload_tls)

    def _reload_tls(self):
        gevent.sleep(0.1)  # after the ConfigWatcher's own reload of configs
        try:
            self.ssl_context = tls.context_from_database(self.cfg, self.db)
            log.info("L7R TLS material reloaded")
        except (tls.TlsError, OSError, DatabaseUnavailable) as exc:
            log.error("L7R TLS material not reloaded, keeping the old one: %s", exc)

    # --- connections ------------------------------------------------------------------------
    def _limits(self):
        """(request timeout, idle timeout, request-line limit, header limit, idle timeout before
        login, connections per address), read once per
        configuration generation rather than four lookups per connection."""
        cfg = self.cfg
        cached = self._limits_cache
        if cached is None or cached[0] != cfg.generation:
            cached = self._limits_cache = (cfg.generation, (
                cfg.get_float("l7r.timeout.request"), cfg.get_float("l7r.timeout.idle"),
                cfg.get_int("l7r.limits.request_line"), cfg.get_int("l7r.limits.headers"),
                cfg.get_float("l7r.timeout.idle.unauthenticated"),
                cfg.get_int("l7r.limits.connections_per_address")))
        return cached[1]

    def _handle(self, raw, address):
        peer_ip = address[0] if isinstance(address, tuple) else str(address)
        request_timeout, idle_timeout, max_line, max_headers, short_idle, per_address = self._limits()
        # a cap per source address on connections that are not sessions yet: one address
        # cannot hold the node's connection slots with idle or half-open connections
        pending = self._pending.get(peer_ip, 0)
        if pending >= per_address:
            if peer_ip not in self._capped:
                self._capped.add(peer_ip)
                log.warning("connections from %s refused: l7r.limits.connections_per_address (%d) reached",
                            peer_ip, pending)
            raw.close()
            return
        self._pending[peer_ip] = pending + 1
        self.counters.connections_open += 1
        handed_over = False
        sock = raw
        try:
            tune_socket(raw, keepalive=True)
            ctx = self.ssl_context
            if ctx is not None:
                sock = tls.TlsStream(raw, ctx)
            else:
                sock = gevent.socket.socket(raw.family, raw.type, raw.proto, fileno=raw.detach())
            # until the connection has logged in it waits only the short idle between requests
            conn = HttpConnection(sock, request_timeout, short_idle, max_line, max_headers)
            # one timer from the accept bounds the handshake and the whole first request
            timer = gevent.Timeout(request_timeout)
            timer.start()
            handshaken = ctx is None
            try:
                if not handshaken:
                    handshake_began = time.monotonic()
                    sock.do_handshake()
                    metrics.observe("qvd_l7r_tls_handshake_seconds", time.monotonic() - handshake_began)
                    handshaken = True
                request = conn.read_request(timed=False)
            except gevent.Timeout as t:
                if t is not timer:
                    raise
                if not handshaken:
                    log.info("TLS handshake from %s timed out", peer_ip)
                    return
                request = HttpError(408, close=True)
            except HttpError as exc:
                request = exc
            finally:
                timer.close()
            cache = {}
            while True:
                if isinstance(request, HttpError):
                    try:
                        sock.sendall(raw_error_response(request.status, request.message))
                    except OSError:
                        pass
                    return
                if request is None:
                    return
                handed_over = endpoints.dispatch(self.ctx, conn, request, peer_ip, cache)
                if handed_over or not conn.can_continue or (self._draining and conn.requests):
                    return
                if "auth" in cache:
                    conn.idle_timeout = idle_timeout
                try:
                    request = conn.read_request()
                except HttpError as exc:
                    request = exc
        except (ClientGone, SessionAborted):
            pass
        except (OSError, ValueError) as exc:
            log.debug("connection from %s ended: %s", peer_ip, exc)
        finally:
            left = self._pending.get(peer_ip, 1) - 1
            if left > 0:
                self._pending[peer_ip] = left
            else:
                self._pending.pop(peer_ip, None)
                self._capped.discard(peer_ip)
            if not handed_over:
                self.counters.connections_open -= 1
                try:
                    sock.close()
                except OSError:
                    pass
