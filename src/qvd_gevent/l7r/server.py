"""The L7R service: accept, TLS, HTTP requests, endpoints, sessions.

    svc = L7RService(cfg, db, listener); svc.start(); ... svc.drain(grace); svc.stop()

One greenlet per client connection while it speaks HTTP; once spliced, a session holds no
greenlet at all (see splice.py). This L7R also does what the original's HKD did for its
L7R children: it LISTENs on ``qvd_cmd_for_user_on_host<own host id>`` and on
``qvd_vm_runtime`` and closes a session of its own at once when another client takes the
VM over (or an admin disconnects the user), then releases the row.
"""
import json
import logging
import os
import time

import gevent
import gevent.event
import gevent.pool
import gevent.socket
import h11
from gevent.server import StreamServer

from ..db import DatabaseUnavailable, runtime
from ..common import metrics
from ..vma.client import legacy_unauthenticated
from . import tls
from .auth import AuthFailed, Authenticator, LoginsBusy, Throttled, encode_token_for_client, parse_auth_headers
from .broker import ConnectRunner, SessionAborted, SetupFailed, StopRunner, slave_key
from .http import ClientGone, HttpConnection, HttpError, raw_error_response
from .splice import Splice, tune_socket
from .throttle import Throttle

log = logging.getLogger("qvd.l7r")

COUNTERS = ("http_requests", "auth_attempts", "auth_ok", "nx_attempts", "nx_ok", "short_sessions")


class L7RError(Exception):
    """The L7R cannot start; one line for the operator."""


class L7RConfigError(L7RError):
    """The L7R cannot start until its configuration changes (certificate, key, TLS settings)."""


class Session:
    """One connect_to_vm, from claim to the end of its splice."""

    __slots__ = ("vm_id", "login", "greenlet", "splice", "claimed", "started", "ended", "peer", "__weakref__")

    def __init__(self, vm_id, login, peer):
        self.vm_id = vm_id
        self.login = login
        self.peer = peer
        self.greenlet = gevent.getcurrent()
        self.splice = None
        self.claimed = False
        self.started = None
        self.ended = False

    def abort(self, reason):
        if self.splice is not None:
            self.splice.close(reason)
        elif self.greenlet is not None and not self.greenlet.dead:
            self.greenlet.kill(SessionAborted(reason), block=False)


def shielded(fn, *args):
    """Run fn to its end even if a SessionAborted lands late: an abort's kill can be
    scheduled just before the setup failed by itself, and cleanup must still release the row."""
    for _ in range(5):
        try:
            return fn(*args)
        except SessionAborted:
            continue
    return None


class L7RService:
    def __init__(self, cfg, db, listener):
        self.cfg = cfg
        self.db = db
        self.listener = listener
        self.pid = os.getpid()
        self.host_id = None
        self.port = None
        self.server = None
        self.ssl_context = None
        self.sessions = {}            # vm_id -> Session (claimed or being set up)
        self.spliced = 0
        self.connections_open = 0
        self._waiters = {}            # vm_id -> set of Events
        self._unsubscribe = []
        self._pending_counts = {}
        self._flusher = None
        self._cleanups = gevent.pool.Group()
        self._draining = False
        self._abort_check_wanted = gevent.event.Event()
        self._abort_greenlet = None
        self.throttle = Throttle(cfg.get_int("l7r.auth.throttle.max_failures"),
                                 cfg.get_int("l7r.auth.throttle.window"),
                                 cfg.get_int("l7r.auth.throttle.burst"),
                                 cfg.get_int("l7r.auth.throttle.max_failures_per_login"))
        self.auth = Authenticator(cfg, db, self.throttle, lambda: self.host_id, self.count)

    # --- public API ---------------------------------------------------------------------
    @property
    def sessions_open(self):
        return self.spliced

    def prepare(self):
        """Load the certificate and key and bind the port, without serving yet: the node does
        this before the HKD touches the host, so a missing certificate or a taken port stops
        it with nothing to undo."""
        cfg = self.cfg
        legacy_unauthenticated(cfg, "L7R")
        self._lookup_host()
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
        self._unsubscribe.append(self.listener.subscribe("qvd_vm_runtime", self._on_vm_runtime))
        self.listener.on_reconnect(self._on_listen_reconnect)
        self._flusher = gevent.spawn(self._flush_loop)
        self._abort_greenlet = gevent.spawn(self._abort_checker)
        metrics.register_gauge_function("qvd_l7r_sessions_open", lambda: {(): self.sessions_open})
        metrics.register_gauge_function("qvd_l7r_connections_open", lambda: {(): self.connections_open})
        log.info("L7R listening on %s:%s (%s)", address, self.port, "TLS" if self.ssl_context else "plain HTTP")
        return self

    def drain(self, grace_seconds):
        """Stop accepting; let live sessions run up to grace, then close them; rows end disconnected."""
        self._draining = True
        if self.server is not None:
            self.server.close()
        deadline = time.monotonic() + max(0, grace_seconds)
        while self.sessions and time.monotonic() < deadline:
            gevent.sleep(0.1)
        for session in list(self.sessions.values()):
            session.abort("node draining")
        end = time.monotonic() + 10
        while (self.sessions or len(self._cleanups)) and time.monotonic() < end:
            gevent.sleep(0.05)
        self._cleanups.join(timeout=5)

    def stop(self):
        if not self._draining:
            self.drain(0)
        if self.server is not None:
            self.server.stop(timeout=1)
        for unsub in self._unsubscribe:
            unsub()
        self._unsubscribe = []
        for g in (self._flusher, self._abort_greenlet):
            if g is not None:
                g.kill()
        self._flusher = self._abort_greenlet = None
        self.flush_counters()
        self.auth.close()

    # --- host and counters ------------------------------------------------------------------
    def _lookup_host(self):
        if self.host_id is None:
            row = self.db.query_one("SELECT id FROM hosts WHERE name = %s", (self.cfg.get_str("nodename"),))
            if row is not None:
                self.host_id = row[0]
                self._unsubscribe.append(self.listener.subscribe(
                    f"qvd_cmd_for_user_on_host{self.host_id}", self._on_user_cmd))
                # rows this host held from an earlier run of the node are stale
                swept = runtime.release_host_sessions(self.db, self.host_id, except_pid=self.pid)
                if swept:
                    log.info("released %d session rows left by an earlier run of this node", swept)
        return self.host_id

    def host_state(self):
        """(host_id, state, blocked) or None when this node is not in hosts."""
        host_id = self._lookup_host()
        if host_id is None:
            return None
        row = runtime.host_state(self.db, host_id)
        return (host_id, row[0], row[1]) if row else (host_id, "stopped", False)

    def count(self, name, amount=1):
        self._pending_counts[name] = self._pending_counts.get(name, 0) + amount

    def flush_counters(self):
        """host_counters are bumped in batches: one hot row must not serialize every request."""
        if not self._pending_counts or self.host_id is None:
            return
        counts, self._pending_counts = self._pending_counts, {}
        cols = [c for c in COUNTERS if c in counts]
        values = [counts[c] for c in cols]

        def tx(cur):
            runtime.read_committed(cur)
            cur.execute("INSERT INTO host_counters (host_id) VALUES (%s) ON CONFLICT (host_id) DO NOTHING", (self.host_id,))
            cur.execute("UPDATE host_counters SET " + ", ".join(f"{c} = {c} + %s" for c in cols) + " WHERE host_id = %s",
                        values + [self.host_id])
        try:
            self.db.transaction(tx)
        except Exception as exc:
            log.warning("host_counters not updated (%s); will retry", exc)
            for c, v in zip(cols, values):
                self.count(c, v)

    def _flush_loop(self):
        ticks = 0
        while True:
            gevent.sleep(1.0)
            ticks += 1
            self.flush_counters()
            if ticks % 10 == 0:
                self.reconcile()

    def reconcile(self):
        """Safety net: release rows this process holds without a live session (a release lost to an error)."""
        if self.host_id is None:
            return 0
        try:
            held = runtime.sessions_held(self.db, self.host_id, self.pid)
            stale = [vm_id for vm_id in held if vm_id not in self.sessions]
            for vm_id in stale:
                if vm_id not in self.sessions:
                    runtime.release_session(self.db, vm_id, self.host_id, self.pid, older_than=runtime.now_epoch() - 5)
            if stale:
                log.warning("released %d session rows without a live session", len(stale))
            return len(stale)
        except Exception as exc:
            log.warning("session row reconcile failed: %s", exc)
            return 0

    # --- notifications -----------------------------------------------------------------------
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

    def _on_vm_runtime(self, channel, payload):
        try:
            vm_id = int(payload)
        except ValueError:
            return
        for event in self._waiters.get(vm_id, ()):
            event.set()
        if vm_id in self.sessions:
            self._abort_check_wanted.set()

    def _on_user_cmd(self, channel, payload):
        self._abort_check_wanted.set()

    def _on_listen_reconnect(self):
        for events in list(self._waiters.values()):
            for event in events:
                event.set()
        self._abort_check_wanted.set()

    def _abort_checker(self):
        """One greenlet, one query per burst of notifications (not one per notification)."""
        while True:
            self._abort_check_wanted.wait()
            self._abort_check_wanted.clear()
            self._check_abort()
            gevent.sleep(0.02)

    def _check_abort(self):
        if self.host_id is None:
            return
        # The row names this process, not one session of it: an abort read here may be for a
        # session already gone and replaced by a new claimer of ours, which must not be
        # closed for it. Only sessions registered before the read are eligible.
        before = dict(self.sessions)
        try:
            aborted = runtime.sessions_to_abort(self.db, self.host_id, self.pid)
        except Exception as exc:
            log.warning("cannot check for session aborts: %s", exc)
            return
        for vm_id in aborted:
            session = self.sessions.get(vm_id)
            if session is not None and before.get(vm_id) is session:
                log.info("takeover: closing session of user %s on VM %s", session.login, vm_id)
                session.abort(f"Aborted by contending session VM_ID: {vm_id}")
            elif session is None and before.get(vm_id) is None:
                # nobody of ours holds it: release, unless a claim of ours since the read
                # cleared user_cmd (the guard keeps that claim)
                runtime.release_aborted_session(self.db, vm_id, self.host_id, self.pid)

    def wait_vm_event(self, vm_id, timeout):
        event = gevent.event.Event()
        waiters = self._waiters.setdefault(vm_id, set())
        waiters.add(event)
        try:
            return event.wait(timeout)
        finally:
            waiters.discard(event)
            if not waiters:
                self._waiters.pop(vm_id, None)

    def has_live_session(self, vm_id, exclude=None):
        session = self.sessions.get(vm_id)
        return session is not None and session is not exclude

    # --- connections ------------------------------------------------------------------------
    def _handle(self, sock, address):
        peer_ip = address[0] if isinstance(address, tuple) else str(address)
        accepted = time.monotonic()
        self.connections_open += 1
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
                handed_over = self._dispatch(conn, request, peer_ip, cache)
                if handed_over or not conn.can_continue:
                    return
        except (ClientGone, SessionAborted):
            pass
        except (OSError, ValueError) as exc:
            log.debug("connection from %s ended: %s", peer_ip, exc)
        finally:
            if not handed_over:
                self.connections_open -= 1
                try:
                    sock.close()
                except OSError:
                    pass

    def _dispatch(self, conn, request, peer_ip, cache):
        path = request.path
        handler = ENDPOINTS.get(path) if request.method == "GET" else None
        metrics.inc("qvd_l7r_http_requests_total", path=path if handler else "other")
        if handler is None:
            conn.send_error(404)
            return False
        try:
            return handler(self, conn, request, peer_ip, cache) or False
        except HttpError as exc:
            conn.send_error(exc.status, exc.message, exc.headers)
        except AuthFailed as exc:
            conn.send_error(401, headers=[("WWW-Authenticate", 'Basic realm="QVD"')])
            log.info("authentication failed (%s) for %s from %s", exc.reason, exc.login or "-", peer_ip)
        except Throttled as exc:
            if exc.what == "concurrent":
                conn.send_error(429, "Too many logins at once from this address; try again later\n")
            else:
                conn.send_error(429, f"Too many failed logins from this {exc.what}; try again later\n")
            log.info("login throttled by %s from %s", exc.what, peer_ip)
        except LoginsBusy:
            conn.send_error(503, "Too many logins in progress, retry later", [("Retry-After", "2")])
            log.warning("login from %s refused: the password-hashing queue is full", peer_ip)
        except DatabaseUnavailable as exc:
            log.error("database unavailable: %s", exc)
            conn.send_error(503, "The database is not available, retry later")
        except ClientGone:
            raise
        except Exception as exc:  # never a traceback to the client, never a dead connection greenlet
            log.exception("%s failed for %s", path, peer_ip)
            if conn.h11.our_state is h11.SEND_RESPONSE:
                conn.send_error(500, f"Internal error: {type(exc).__name__}")
            else:
                raise ClientGone("internal error after the response started") from None
        return False

    # --- common pre-checks -------------------------------------------------------------------
    def _registered(self):
        host = self.host_state()
        if host is None:
            raise HttpError(503, "Host is not registered in the database")
        return host

    def _check_host(self, host, require_running):
        if host[2]:
            raise HttpError(503, "Server is blocked")
        if require_running and host[1] != "running":
            raise HttpError(503, f"Server is {host[1]}")

    # --- endpoints -------------------------------------------------------------------------
    def ep_ping(self, conn, request, peer_ip, cache):
        host = self._registered()
        self._check_host(host, True)
        conn.send_response(200, "I am alive!\r\n")

    def _list(self, conn, request, peer_ip, cache, applications):
        host = self._registered()
        self.count("http_requests")
        auth = self.auth.authenticate(request, peer_ip, cache)
        self._check_host(host, True)
        rows = self.db.query(
            "SELECT v.id, vr.vm_state, v.name, vr.blocked, o.is_application FROM vms v "
            "JOIN vm_runtimes vr ON vr.vm_id = v.id JOIN osfs o ON o.id = v.osf_id "
            "WHERE v.user_id = %s AND o.is_application = %s ORDER BY v.id", (auth.user_id, applications))
        items = [{"id": r[0], "state": r[1], "name": r[2], "blocked": bool(r[3]), "is_application": bool(r[4])}
                 for r in rows]
        conn.send_response(200, json.dumps(items, indent=3, separators=(",", " : ")) + "\n", "application/json")

    def ep_list_of_vm(self, conn, request, peer_ip, cache):
        began = time.monotonic()
        try:
            self._list(conn, request, peer_ip, cache, False)
        finally:
            metrics.observe("qvd_l7r_list_of_vm_seconds", time.monotonic() - began)

    def ep_list_of_applications(self, conn, request, peer_ip, cache):
        self._list(conn, request, peer_ip, cache, True)

    def _store_auth(self, auth):
        return self.db.transaction(runtime.store_auth_params, auth.params)

    def ep_authenticate_user(self, conn, request, peer_ip, cache):
        self._lookup_host()
        auth = self.auth.authenticate(request, peer_ip, cache)
        body = {}
        if request.query.get("store_auth", "") not in ("", "0"):
            body["auth_params_id"] = self._store_auth(auth)
        conn.send_response(200, json.dumps(body), "application/json")

    def ep_create_auth_token(self, conn, request, peer_ip, cache):
        self._lookup_host()
        auth = self.auth.authenticate(request, peer_ip, cache)
        if auth.by_token:
            # a stolen token must not renew itself: only a password login mints tokens
            raise HttpError(401, "A token cannot create another token; log in with a password",
                            headers=[("WWW-Authenticate", 'Basic realm="QVD"')])
        token, params_id = self.db.transaction(runtime.issue_token, auth.user_id, auth.params,
                                               self.cfg.get_int("l7r.token.lifetime"))
        conn.send_response(200, json.dumps({"auth_params_id": params_id, "auth_token": encode_token_for_client(token)}),
                           "application/json")

    def _vm_id_param(self, request):
        raw = request.query.get("id")
        if raw is None or raw == "":
            raise HttpError(422, "parameter id is missing")
        try:
            vm_id = int(raw)
        except ValueError:
            raise HttpError(404, "The requested virtual machine does not exist") from None
        if not (0 < vm_id < 2 ** 31):
            raise HttpError(404, "The requested virtual machine does not exist")
        return vm_id

    def ep_connect_to_vm(self, conn, request, peer_ip, cache):
        began = time.monotonic()
        host = self._registered()
        self.count("http_requests")
        auth = self.auth.authenticate(request, peer_ip, cache)
        self._check_host(host, False)
        if request.header("connection") != "Upgrade" or request.header("upgrade") != "QVD/1.0":
            raise HttpError(426)
        vm_id = self._vm_id_param(request)
        if auth.token_vm_id is not None and auth.token_vm_id != vm_id:
            raise HttpError(403, "vm_id does not match with provided token")
        foreign = [k for k in request.query if k != "id" and not (k.startswith("qvd.client.") or k.startswith("custom."))]
        if foreign:
            raise HttpError(403, "Invalid parameters " + " ".join(foreign))
        denied = runtime.check_vm_access(self.db, vm_id, auth.user_id, True)
        if denied:
            metrics.inc("qvd_l7r_connects_total", result="denied")
            raise HttpError(*denied)
        client_params = {k: v for k, v in request.query.items() if k != "id"}
        auth_vars = parse_auth_headers(request.raw_headers)
        return self._run_session(conn, vm_id, auth, client_params, auth_vars, peer_ip, began)

    def _run_session(self, conn, vm_id, auth, client_params, auth_vars, peer_ip, began):
        session = Session(vm_id, auth.login, peer_ip)
        key = slave_key()
        runner = ConnectRunner(self, session, auth, client_params, conn.send_info, auth_vars)
        vm_sock = None
        try:
            vm_sock = runner.run(key)
            conn.send_info("Connection established")
            conn.send_switch(key)
            metrics.observe("qvd_l7r_connect_to_vm_seconds", time.monotonic() - began)
            session.greenlet = None  # from here on an abort closes the splice instead
        except (SetupFailed, SessionAborted) as exc:
            session.greenlet = None
            message = str(exc) or f"Aborted by contending session VM_ID: {vm_id}"
            metrics.inc("qvd_l7r_connects_total", result="failed")
            log.info("connect_to_vm failed: user %s VM %s from %s: %s", auth.login, vm_id, peer_ip, message)
            shielded(self._fail_setup, conn, session, vm_sock,
                     f"The requested virtual machine is not available: {message}, retry later.")
            return False
        except BaseException:
            session.greenlet = None
            metrics.inc("qvd_l7r_connects_total", result="error")
            shielded(self._fail_setup, None, session, vm_sock, None)
            raise
        leftover = conn.leftover()
        session.started = time.monotonic()
        self.spliced += 1
        metrics.inc("qvd_l7r_connects_total", result="ok")
        log.info("session open: user %s VM %s from %s", auth.login, vm_id, peer_ip)
        session.splice = Splice(conn.sock, vm_sock, on_done=lambda reason: self._on_splice_done(session, reason))
        session.splice.start(leftover)
        return True

    def _fail_setup(self, conn, session, vm_sock, answer):
        if vm_sock is not None:
            vm_sock.close()
        self._end_setup(session)
        if conn is not None and answer is not None and conn.h11.our_state is h11.SEND_RESPONSE:
            conn.send_error(503, answer)

    def _end_setup(self, session):
        if session.claimed:
            try:
                runtime.release_session(self.db, session.vm_id, self.host_id, self.pid)
            except Exception as exc:
                log.error("VM %s: session row not released (%s)", session.vm_id, exc)
        # only after the release: until then a new claimer here must see the VM as held
        if self.sessions.get(session.vm_id) is session:
            del self.sessions[session.vm_id]

    def _on_splice_done(self, session, reason):
        # on the hub: database work goes to a greenlet
        self._cleanups.spawn(self._finish_session, session, reason)

    def _finish_session(self, session, reason):
        if session.ended:
            return
        session.ended = True
        lasted = time.monotonic() - (session.started or time.monotonic())
        up, down = session.splice.bytes_to_vm, session.splice.bytes_to_client
        log.info("session closed: user %s VM %s after %.1f s (%s; %d bytes to VM, %d to client)",
                 session.login, session.vm_id, lasted, reason, up, down)
        if lasted < self.cfg.get_float("internal.l7r.short_session"):
            self.count("short_sessions")
        for attempt in range(10):
            try:
                runtime.release_session(self.db, session.vm_id, self.host_id, self.pid)
                break
            except Exception as exc:
                log.warning("VM %s: session row not released yet (%s)", session.vm_id, exc)
                gevent.sleep(min(0.2 * (attempt + 1), 2))
        if self.sessions.get(session.vm_id) is session:
            del self.sessions[session.vm_id]
        # counted down only now: "no open session" means every row is released
        self.spliced -= 1
        self.connections_open -= 1

    def ep_stop_vm(self, conn, request, peer_ip, cache):
        host = self._registered()
        self.count("http_requests")
        auth = self.auth.authenticate(request, peer_ip, cache)
        self._check_host(host, False)
        vm_id = self._vm_id_param(request)
        if auth.token_vm_id is not None and auth.token_vm_id != vm_id:
            raise HttpError(403, "vm_id does not match with provided token")
        denied = runtime.check_vm_access(self.db, vm_id, auth.user_id, False)
        if denied:
            raise HttpError(*denied)
        status, body = StopRunner(self, vm_id, conn.send_info).run()
        if status == 200:
            conn.send_response(200, body)
        else:
            conn.send_error(status, body)

ENDPOINTS = {
    "/qvd/ping": L7RService.ep_ping,
    "/qvd/list_of_vm": L7RService.ep_list_of_vm,
    "/qvd/list_of_applications": L7RService.ep_list_of_applications,
    "/qvd/authenticate_user": L7RService.ep_authenticate_user,
    "/qvd/create_auth_token": L7RService.ep_create_auth_token,
    "/qvd/connect_to_vm": L7RService.ep_connect_to_vm,
    "/qvd/stop_vm": L7RService.ep_stop_vm,
}
