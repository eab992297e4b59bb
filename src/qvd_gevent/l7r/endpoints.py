"""The L7R's endpoints (docs/protocol.md#endpoints): plain functions over a small context.

``dispatch(ctx, conn, request, peer_ip, cache)`` answers one request; it returns True when
the connection was handed over to a session (after a 101), else False. With
``l7r.web.enable`` it also serves the browser client: its files, the web login and the
desktop's WebSocket (docs/protocol.md#browser-access), whose session is set up by the same
``connect.open_session`` as connect_to_vm's, with the browser's front. Every endpoint is
``fn(ctx, conn, request, peer_ip, cache)``; ``cache`` is the connection's own dict (the
authenticator remembers a login there). An endpoint raises HttpError for a final error
answer; authentication, throttling and database failures are answered here too, so an
endpoint reads as its checks in the protocol's order.
"""
import json
import logging
import time
from dataclasses import dataclass


from ..common import metrics
from ..db import DatabaseUnavailable, runtime
from . import web, websocket
from .auth import AuthFailed, LoginsBusy, Throttled, encode_token_for_client, parse_auth_headers
from .connect import NativeFront, open_session
from .http import ClientGone, HttpError
from .sessions import Session

log = logging.getLogger("qvd.l7r")


@dataclass
class Context:
    """What an endpoint may use. No way back to the server: endpoints sit below it."""
    cfg: object
    db: object
    auth: object          # auth.Authenticator
    sessions: object      # sessions.Sessions
    counters: object      # counters.Counters
    host: object          # host.NodeHost


def dispatch(ctx, conn, request, peer_ip, cache):
    path = request.path
    handler = None
    if web.enabled(ctx.cfg):
        found = web.find_file(request)
        if found is not None:       # the browser client's page and noVNC: no login, not counted
            metrics.inc("qvd_l7r_http_requests_total", path="web file")
            web.serve_file(conn, request, found)
            return False
        handler = WEB_ENDPOINTS.get(path)
    if handler is None:
        handler = ENDPOINTS.get(path) if request.method == "GET" else None
    metrics.inc("qvd_l7r_http_requests_total", path=path if handler else "other")
    if handler is None:
        conn.send_error(404)
        return False
    try:
        return handler(ctx, conn, request, peer_ip, cache) or False
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
        if conn.can_answer:
            conn.send_error(500, f"Internal error: {type(exc).__name__}")
        else:
            raise ClientGone("internal error after the response started") from None
    return False


# --- common pre-checks ---------------------------------------------------------------------
def registered(ctx):
    host = ctx.host.state()
    if host is None:
        raise HttpError(503, "Host is not registered in the database")
    return host


def check_host(host, require_running):
    if host[2]:
        raise HttpError(503, "Server is blocked")
    if require_running and host[1] != "running":
        raise HttpError(503, f"Server is {host[1]}")


def vm_id_param(request):
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


def check_token_vm(auth, vm_id):
    if auth.token_vm_id is not None and auth.token_vm_id != vm_id:
        raise HttpError(403, "vm_id does not match with provided token")


def session_params(ctx, request, auth, vm_id, check_access=True):
    """A connect's last pre-checks (its query's names, the user's access to the VM): the
    client's x_start parameters. check_access=False where the claim checks the access (its
    first answer, before any 102 line): connect_to_vm; the browser's must answer before it
    switches to the WebSocket."""
    foreign = [k for k in request.query if k != "id" and not (k.startswith("qvd.client.") or k.startswith("custom."))]
    if foreign:
        raise HttpError(403, "Invalid parameters " + " ".join(foreign))
    if check_access:
        denied = runtime.check_vm_access(ctx.db, vm_id, auth.user_id, True)
        if denied:
            metrics.inc("qvd_l7r_connects_total", result="denied")
            raise HttpError(*denied)
    return {k: v for k, v in request.query.items() if k != "id"}


# --- endpoints -----------------------------------------------------------------------------
def ping(ctx, conn, request, peer_ip, cache):
    host = registered(ctx)
    check_host(host, True)
    conn.send_response(200, "I am alive!\r\n")


def _list(ctx, conn, request, peer_ip, cache, applications):
    host = registered(ctx)
    ctx.counters.count("http_requests")
    auth = ctx.auth.authenticate(request, peer_ip, cache)
    check_host(host, True)
    rows = ctx.db.query(
        "SELECT v.id, vr.vm_state, v.name, vr.blocked, o.is_application FROM vms v "
        "JOIN vm_runtimes vr ON vr.vm_id = v.id JOIN osfs o ON o.id = v.osf_id "
        "WHERE v.user_id = %s AND o.is_application = %s ORDER BY v.id", (auth.user_id, applications))
    items = [{"id": r[0], "state": r[1], "name": r[2], "blocked": bool(r[3]), "is_application": bool(r[4])}
             for r in rows]
    conn.send_response(200, vm_list_json(items), "application/json")


def vm_list_json(items):
    """The list as the original pretty-prints it (docs/protocol.md#list-of-vms)."""
    return json.dumps(items, indent=3, separators=(",", " : ")) + "\n"


def list_of_vm(ctx, conn, request, peer_ip, cache):
    began = time.monotonic()
    try:
        _list(ctx, conn, request, peer_ip, cache, False)
    finally:
        metrics.observe("qvd_l7r_list_of_vm_seconds", time.monotonic() - began)


def list_of_applications(ctx, conn, request, peer_ip, cache):
    _list(ctx, conn, request, peer_ip, cache, True)


def authenticate_user(ctx, conn, request, peer_ip, cache):
    ctx.host.lookup()
    auth = ctx.auth.authenticate(request, peer_ip, cache)
    body = {}
    if request.query.get("store_auth", "") not in ("", "0"):
        body["auth_params_id"] = ctx.db.transaction(runtime.store_auth_params, auth.params)
    conn.send_response(200, json.dumps(body), "application/json")


def create_auth_token(ctx, conn, request, peer_ip, cache):
    ctx.host.lookup()
    auth = ctx.auth.authenticate(request, peer_ip, cache)
    if auth.by_token:
        # a stolen token must not renew itself: only a password login mints tokens
        raise HttpError(401, "A token cannot create another token; log in with a password",
                        headers=[("WWW-Authenticate", 'Basic realm="QVD"')])
    token, params_id = ctx.db.transaction(runtime.issue_token, auth.user_id, auth.params,
                                          ctx.cfg.get_int("l7r.token.lifetime"))
    conn.send_response(200, json.dumps({"auth_params_id": params_id, "auth_token": encode_token_for_client(token)}),
                       "application/json")


def connect_to_vm(ctx, conn, request, peer_ip, cache):
    began = time.monotonic()
    host = registered(ctx)
    ctx.counters.count("http_requests")
    auth = ctx.auth.authenticate(request, peer_ip, cache)
    check_host(host, False)
    if request.header("connection") != "Upgrade" or request.header("upgrade") != "QVD/1.0":
        raise HttpError(426)
    vm_id = vm_id_param(request)
    check_token_vm(auth, vm_id)
    client_params = session_params(ctx, request, auth, vm_id, check_access=False)
    auth_vars = parse_auth_headers(request.raw_headers)
    return open_session(ctx, NativeFront(conn), Session(vm_id, auth.login, peer_ip), auth, client_params, auth_vars,
                        began)


def stop_vm(ctx, conn, request, peer_ip, cache):
    host = registered(ctx)
    ctx.counters.count("http_requests")
    auth = ctx.auth.authenticate(request, peer_ip, cache)
    check_host(host, False)
    vm_id = vm_id_param(request)
    check_token_vm(auth, vm_id)
    denied = runtime.check_vm_access(ctx.db, vm_id, auth.user_id, False)
    if denied:
        raise HttpError(*denied)
    status, body = stop_and_wait(ctx, vm_id, conn.send_info)
    if status == 200:
        conn.send_response(200, body)
    else:
        conn.send_error(status, body)


def stop_and_wait(ctx, vm_id, info):
    """stop_vm after its pre-checks (docs/protocol.md#stop-vm): command the stop, then wait
    for 'stopped' by LISTEN. Returns (status, body) of the final answer."""
    outcome = ctx.db.transaction(runtime.request_stop, vm_id)
    if outcome in ("stopped", "cancelled", "gone"):
        return 200, "Machine stopped\r\n"
    if outcome not in ("commanded", "stopping"):
        return 503, f"The requested virtual machine is in an unstoppable state ({outcome})"
    info("Stopping virtual machine")
    poll = ctx.cfg.get_float("internal.l7r.poll_time.vm")
    deadline = time.monotonic() + ctx.cfg.get_float("internal.l7r.timeout.vm_stop")
    for _ in range(100000):
        if runtime.vm_state(ctx.db, vm_id) in (None, "stopped"):
            return 200, "Machine stopped\r\n"
        if time.monotonic() > deadline:
            return 408, "VM didn't reach state 'stopped'. Timeout"
        info("Waiting for VM to reach state 'stopped'")
        ctx.sessions.wait_vm_event(vm_id, max(0.05, min(poll * 5, deadline - time.monotonic() + 0.05)))
    return 408, "VM didn't reach state 'stopped'. Timeout"


# --- the browser client (docs/protocol.md#browser-access) ------------------------------------
def web_login(ctx, conn, request, peer_ip, cache):
    """A password for the user's desktops and one single-use token each."""
    host = registered(ctx)
    ctx.counters.count("http_requests")
    if request.method != "POST":
        raise HttpError(405, "Log in with POST", headers=[("Allow", "POST")])
    if request.header("origin") is not None and not web.origin_ok(ctx.cfg, request):
        raise HttpError(403, "Origin not allowed")
    try:
        auth = ctx.auth.authenticate(request, peer_ip, cache)
    except AuthFailed as exc:
        # no WWW-Authenticate: the page says "wrong password", not a dialog of the browser's
        log.info("web login failed (%s) for %s from %s", exc.reason, exc.login or "-", peer_ip)
        raise HttpError(401, "Wrong user or password") from None
    if auth.by_token:
        raise HttpError(401, "Log in with a password")
    check_host(host, True)
    lifetime = ctx.cfg.get_int("l7r.web.token.lifetime")
    vms = ctx.db.transaction(web.issue_desktop_tokens, auth, lifetime)
    log.info("web login: user %s from %s, %d desktops", auth.login, peer_ip, len(vms))
    web.send_desktops(conn, auth.login, lifetime, vms)


def web_desktop(ctx, conn, request, peer_ip, cache):
    """A desktop's WebSocket (docs/protocol.md#the-websocket): the Origin before anything
    else, then connect_to_vm's checks with the token of the subprotocol list, then the
    WebSocket's 101 and the same connect as connect_to_vm's."""
    began = time.monotonic()
    host = registered(ctx)
    ctx.counters.count("http_requests")
    if not web.origin_ok(ctx.cfg, request):
        log.info("web desktop refused from %s: Origin %r is not this node's", peer_ip, request.header("origin"))
        raise HttpError(403, "Origin not allowed")
    websocket.check_handshake(request)
    token = websocket.token_from_protocols(request)
    if token is None:
        metrics.inc("qvd_l7r_auth_failures_total", reason="no_credentials")
        raise AuthFailed("no_credentials")
    auth = ctx.auth.authenticate(web.TokenRequest(request, token), peer_ip, {})
    check_host(host, False)
    vm_id = vm_id_param(request)
    check_token_vm(auth, vm_id)
    client_params = session_params(ctx, request, auth, vm_id)
    front = web.BrowserFront(conn, ctx.cfg.get_int("l7r.web.max_message"))
    front.accept(request)
    return open_session(ctx, front, Session(vm_id, auth.login, peer_ip), auth, client_params, {}, began)


WEB_ENDPOINTS = {
    web.LOGIN_PATH: web_login,
    web.DESKTOP_PATH: web_desktop,
}

ENDPOINTS = {
    "/qvd/ping": ping,
    "/qvd/list_of_vm": list_of_vm,
    "/qvd/list_of_applications": list_of_applications,
    "/qvd/authenticate_user": authenticate_user,
    "/qvd/create_auth_token": create_auth_token,
    "/qvd/connect_to_vm": connect_to_vm,
    "/qvd/stop_vm": stop_vm,
}
