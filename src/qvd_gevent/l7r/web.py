"""The browser client's endpoints (docs/protocol.md#browser-access): its files, the web
login, and the WebSocket that carries a desktop.

Plain functions ``fn(ctx, conn, request, peer_ip, cache)`` like the other endpoints;
``ctx`` gives cfg, db, auth, counters, host and sessions. A desktop's WebSocket runs the
same connect sequence as connect_to_vm (claim and takeover, VM start, x_start, display),
through ``open_session`` with a front that speaks WebSocket instead of 102 lines and a
503 (see ``BrowserFront``), and the session's bytes go through ``ws_relay.WsRelay``.
"""
import json
import logging

from ..common import metrics
from ..db import runtime
from . import static, websocket
from .auth_plugins import AuthFailed
from .http import HttpError
from .ws_relay import WsRelay

log = logging.getLogger("qvd.l7r.web")

LOGIN_PATH = "/qvd/web/login"
DESKTOP_PATH = "/qvd/web/desktop"
CLOSE_CODE_SETUP_FAILED = 4503

_FILES = static.StaticFiles()


def enabled(cfg):
    return cfg.get_bool("l7r.web.enable")


def origins(cfg):
    return [o.strip() for o in cfg.get_str("l7r.web.origins").split(",") if o.strip()]


def origin_ok(ctx, request):
    return websocket.origin_allowed(request.header("origin"), request.header("host"),
                                    ctx.cfg.get_bool("l7r.use_ssl"), origins(ctx.cfg))


# --- files -----------------------------------------------------------------------------------
def find_file(cfg, request):
    """The packaged file a GET or HEAD asks for, or None."""
    if request.method not in ("GET", "HEAD") or not enabled(cfg):
        return None
    return _FILES.lookup(request.path)


def serve_file(conn, request, found):
    status, body, ctype, headers = static.answer(found, request.header("if-none-match"))
    conn.send_response(status, body, ctype, headers)


# --- login -----------------------------------------------------------------------------------
def login(ctx, conn, request, peer_ip, cache, registered, check_host):
    """POST /qvd/web/login: a password for the user's desktops and one single-use token each."""
    if request.method != "POST":
        raise HttpError(405, "Log in with POST", headers=[("Allow", "POST")])
    host = registered(ctx)
    ctx.counters.count("http_requests")
    if request.header("origin") is not None and not origin_ok(ctx, request):
        raise HttpError(403, "Origin not allowed")
    try:
        auth = ctx.auth.authenticate(request, peer_ip, cache)
    except AuthFailed as exc:
        # no WWW-Authenticate: the page says "wrong password", not a browser dialog
        log.info("web login failed (%s) for %s from %s", exc.reason, exc.login or "-", peer_ip)
        raise HttpError(401, "Wrong user or password") from None
    if auth.by_token:
        raise HttpError(401, "Log in with a password")
    check_host(host, True)
    lifetime = ctx.cfg.get_int("l7r.web.token.lifetime")

    def tx(cur):
        cur.execute("SELECT v.id, vr.vm_state, v.name, vr.blocked FROM vms v "
                    "JOIN vm_runtimes vr ON vr.vm_id = v.id JOIN osfs o ON o.id = v.osf_id "
                    "WHERE v.user_id = %s AND NOT o.is_application ORDER BY v.id", (auth.user_id,))
        vms = []
        for vm_id, state, name, blocked in cur.fetchall():
            token = None
            if not blocked:
                token, _ = runtime.issue_token(cur, auth.user_id, auth.params, lifetime, vm_id=vm_id,
                                               multi_use=False)
            vms.append({"id": vm_id, "name": name, "state": state, "blocked": bool(blocked), "token": token})
        return vms
    vms = ctx.db.transaction(tx)
    log.info("web login: user %s from %s, %d desktops", auth.login, peer_ip, len(vms))
    body = json.dumps({"login": auth.login, "token_lifetime": lifetime, "vms": vms})
    conn.send_response(200, body, "application/json", [("Cache-Control", "no-store"), *static.SECURITY_HEADERS])


# --- the desktop's WebSocket -------------------------------------------------------------------
class TokenRequest:
    """The WebSocket's token as an Authorization: Bearer header, so that it is checked,
    counted and throttled exactly as a bearer token of any other endpoint."""

    def __init__(self, request, token):
        self._request = request
        self._authorization = "Bearer " + runtime_token_for_header(token)

    def header(self, name, default=None):
        if name.lower() == "authorization":
            return self._authorization
        return self._request.header(name, default)

    def __getattr__(self, name):
        return getattr(self._request, name)


def runtime_token_for_header(token):
    import base64
    return base64.b64encode(token.encode("ascii")).decode("ascii")


def desktop_prechecks(ctx, request, peer_ip, cache, registered, check_host, vm_id_param, check_token_vm):
    """The checks before the 101 (docs/protocol.md#the-websocket), in order. Returns
    (auth, vm_id, client params)."""
    host = registered(ctx)
    ctx.counters.count("http_requests")
    if not origin_ok(ctx, request):
        log.info("web desktop refused from %s: Origin %r is not this node's", peer_ip, request.header("origin"))
        raise HttpError(403, "Origin not allowed")
    websocket.check_handshake(request)
    token = websocket.token_from_protocols(request)
    if token is None:
        metrics.inc("qvd_l7r_auth_failures_total", reason="no_credentials")
        raise AuthFailed("no_credentials")
    auth = ctx.auth.authenticate(TokenRequest(request, token), peer_ip, {})
    check_host(host, False)
    vm_id = vm_id_param(request)
    check_token_vm(auth, vm_id)
    foreign = [k for k in request.query if k != "id" and not (k.startswith("qvd.client.") or k.startswith("custom."))]
    if foreign:
        raise HttpError(403, "Invalid parameters " + " ".join(foreign))
    denied = runtime.check_vm_access(ctx.db, vm_id, auth.user_id, True)
    if denied:
        metrics.inc("qvd_l7r_connects_total", result="denied")
        raise HttpError(*denied)
    client_params = {k: v for k, v in request.query.items() if k != "id"}
    return auth, vm_id, client_params


class BrowserFront:
    """What a connect sequence says to its client, for a browser: the 101 went out before
    the sequence began, progress lines have no place in a WebSocket, a failure is a close
    frame with code 4503, and the session's bytes go through a WsRelay."""

    def __init__(self, conn, max_message):
        self.conn = conn
        self.max_message = max_message

    def info(self, text):
        log.debug("browser session: %s", text)

    def switch(self, slave_key):
        pass

    def fail(self, message):
        import wsproto.connection
        import wsproto.events
        ws = wsproto.connection.Connection(wsproto.connection.ConnectionType.SERVER)
        try:
            self.conn.sock.sendall(ws.send(wsproto.events.CloseConnection(code=CLOSE_CODE_SETUP_FAILED,
                                                                          reason=message[:120])))
        except OSError:
            pass

    def relay(self, vm_sock, on_done):
        return WsRelay(self.conn.sock, vm_sock, self.max_message, on_done=on_done)


def accept(conn, request):
    """Send the 101 that opens the WebSocket."""
    conn.send_upgrade(websocket.accept_headers(request))
