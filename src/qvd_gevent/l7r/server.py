"""The L7R service: accept, TLS and the request loop.

    svc = L7RService(cfg, db, listener); svc.start(); ... svc.drain(grace); svc.stop()

One greenlet per client connection while it speaks HTTP; each request goes to
``endpoints.dispatch``; once a connect_to_vm is spliced the connection belongs to its
session (sessions.py) and holds no greenlet at all (splice.py). This module builds the
parts below it and holds their lifecycle; none of them calls back up here.
"""
import logging
import time

import gevent
import gevent.pool
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


class L7RError(Exception):
    """The L7R cannot start; one line for the operator."""


class L7RConfigError(L7RError):
    """The L7R cannot start until its configuration changes (certificate, key, TLS settings)."""


class L7RService:
    def __init__(self, cfg, db, listener):
        self.cfg = cfg
        self.db = db
        self.listener = listener
        self.port = None
        self.server = None
        self._address = None
        self.ssl_context = None
        self._unsubscribe = []
        self._draining = False
        self.host = NodeHost(cfg, db, listener)
        self.counters = Counters(db, self.host)
        self.registry = Sessions(cfg, db, listener, self.host, self.counters)
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
        legacy_unauthenticated(cfg, "L7R")
        try:
            runtime.install_functions(self.db)      # an older database gets this version's steps
        except psycopg2.Error as exc:
            raise L7RConfigError("cannot install the connect steps of db/functions.sql in the database "
                                 f"({str(exc).strip().splitlines()[0]}); run them as the database's owner") from None
        self.host.lookup()
        if cfg.get_bool("l7r.use_ssl"):
            try:
                self.ssl_context = tls.context_from_database(cfg, self.db)
            except (tls.TlsError, OSError) as exc:
                raise L7RConfigError(str(exc)) from None
        address = cfg.get_str("l7r.address")
        address = "0.0.0.0" if address in ("*", "") else address
        pool = gevent.pool.Pool(cfg.get_int("l7r.limits.connections"))
        try:
            self.server = StreamServer((address, cfg.get_int("l7r.port")), self._handle, spawn=pool,
                                       backlog=cfg.get_int("l7r.listen.backlog"))
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

    def stop(self):
        if not self._draining:
            self.drain(0)
        if self.server is not None:
            self.server.stop(timeout=1)
        for unsub in self._unsubscribe:
            unsub()
        self._unsubscribe = []
        self.registry.stop()
        self.counters.stop()
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
    def _handle(self, sock, address):
        peer_ip = address[0] if isinstance(address, tuple) else str(address)
        accepted = time.monotonic()
        self.counters.connections_open += 1
        handed_over = False
        request_timeout = self.cfg.get_float("l7r.timeout.request")
        try:
            # our own socket object: StreamServer closes the one it gave us when we return
            sock = gevent.socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
            tune_socket(sock, keepalive=True)
            ctx = self.ssl_context
            if ctx is not None:
                sock = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                timer = gevent.Timeout(request_timeout)
                timer.start()
                try:
                    handshake_began = time.monotonic()
                    sock.do_handshake()
                    metrics.observe("qvd_l7r_tls_handshake_seconds", time.monotonic() - handshake_began)
                except gevent.Timeout as t:
                    if t is not timer:
                        raise
                    log.info("TLS handshake from %s timed out", peer_ip)
                    return
                finally:
                    timer.close()
            conn = HttpConnection(sock, request_timeout, self.cfg.get_float("l7r.timeout.idle"),
                                  self.cfg.get_int("l7r.limits.request_line"), self.cfg.get_int("l7r.limits.headers"))
            cache = {}
            while not self._draining or conn.requests == 0:
                try:
                    # the first request must be whole l7r.timeout.request after the accept, handshake included
                    request = conn.read_request(first_deadline=accepted + request_timeout - time.monotonic())
                except HttpError as exc:
                    try:
                        sock.sendall(raw_error_response(exc.status, exc.message))
                    except OSError:
                        pass
                    return
                if request is None:
                    return
                handed_over = endpoints.dispatch(self.ctx, conn, request, peer_ip, cache)
                if handed_over or not conn.can_continue:
                    return
        except (ClientGone, SessionAborted):
            pass
        except (OSError, ValueError) as exc:
            log.debug("connection from %s ended: %s", peer_ip, exc)
        finally:
            if not handed_over:
                self.counters.connections_open -= 1
                try:
                    sock.close()
                except OSError:
                    pass
