"""What the browser client needs beside connect_to_vm's machinery
(docs/protocol.md#browser-access): its files, the desktops and single-use tokens a web
login hands out, the WebSocket token as a bearer credential, and ``BrowserFront``, the
client end of a connect that speaks WebSocket.

The endpoints themselves (``endpoints.web_login``, ``endpoints.web_desktop``) read as
their checks in order and call these; a desktop's WebSocket then goes through the very
connect of connect_to_vm (``connect.open_session``: claim and takeover, VM start, x_start,
the display gate) with a ``BrowserFront`` in place of the native client's front.
"""
import base64
import json
import logging
from functools import partial

from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection

from ..db import runtime
from . import static, websocket
from .ws_relay import WsRelay

log = logging.getLogger("qvd.l7r.web")

LOGIN_PATH = "/qvd/web/login"
DESKTOP_PATH = "/qvd/web/desktop"
CLOSE_CODE_SETUP_FAILED = 4503
DISPLAY_PROTOCOL_PARAM = "qvd.display.protocol"   # the VMA's x_start: a browser session needs RFB

_FILES = static.StaticFiles()


def enabled(cfg):
    return cfg.get_bool("l7r.web.enable")


def origins(cfg):
    return [o.strip() for o in cfg.get_str("l7r.web.origins").split(",") if o.strip()]


def origin_ok(cfg, request):
    return websocket.origin_allowed(request.header("origin"), request.header("host"),
                                    cfg.get_bool("l7r.use_ssl"), origins(cfg))


# --- files -----------------------------------------------------------------------------------
def find_file(request):
    """The packaged file a GET or HEAD asks for, or None."""
    if request.method not in ("GET", "HEAD"):
        return None
    return _FILES.lookup(request.path)


def serve_file(conn, request, found):
    status, body, ctype, headers = static.answer(found, request.header("if-none-match"))
    conn.send_response(status, body, ctype, headers)


# --- login -----------------------------------------------------------------------------------
def issue_desktop_tokens(cur, auth, lifetime):
    """Transaction: the user's desktops (applications aside), each with one single-use token
    bound to it, valid lifetime seconds (none for a blocked desktop)."""
    cur.execute("SELECT v.id, vr.vm_state, v.name, vr.blocked FROM vms v "
                "JOIN vm_runtimes vr ON vr.vm_id = v.id JOIN osfs o ON o.id = v.osf_id "
                "WHERE v.user_id = %s AND NOT o.is_application ORDER BY v.id", (auth.user_id,))
    vms = []
    for vm_id, state, name, blocked in cur.fetchall():
        token = None
        if not blocked:
            token, _ = runtime.issue_token(cur, auth.user_id, auth.params, lifetime, vm_id=vm_id, multi_use=False)
        vms.append({"id": vm_id, "name": name, "state": state, "blocked": bool(blocked), "token": token})
    return vms


def send_desktops(conn, login, lifetime, vms):
    body = json.dumps({"login": login, "token_lifetime": lifetime, "vms": vms})
    conn.send_response(200, body, "application/json", [("Cache-Control", "no-store"), *static.SECURITY_HEADERS])


# --- the desktop's WebSocket -------------------------------------------------------------------
class TokenRequest:
    """The request with its WebSocket token as ``Authorization: Bearer``, so that the token
    is checked, counted and throttled exactly as a bearer token of any other endpoint."""

    def __init__(self, request, token):
        self._request = request
        self._authorization = "Bearer " + base64.b64encode(token.encode("ascii")).decode("ascii")

    def header(self, name, default=None):
        if name.lower() == "authorization":
            return self._authorization
        return self._request.header(name, default)


def close_reason(text):
    """text cut to what a close frame carries (123 bytes of UTF-8)."""
    return text.encode("utf-8")[:123].decode("utf-8", "ignore")


class BrowserFront:
    """The client end of a connect (connect.py's front) for a browser's WebSocket.

    The 101 that accepts the WebSocket (``accept``) goes out before the connect begins: a
    page sees nothing of an HTTP answer to a refused handshake (the browser reports 1006
    and no reason), so a failure of the connect must come over an open WebSocket, as a
    close frame with code 4503 and the connect's failure (the 503's cause). Progress lines have no place in the
    RFB stream: they are logged only. The session's bytes go through a ``WsRelay``."""

    name = "web desktop"

    def __init__(self, conn, max_message):
        self.conn = conn
        self.vma_params = {DISPLAY_PROTOCOL_PARAM: "rfb"}
        self.pump = partial(WsRelay, max_message=max_message)

    def accept(self, request):
        """The 101 that opens the WebSocket (request already checked)."""
        self.conn.send_switch_headers(websocket.accept_headers(request))

    def info(self, text):
        log.debug("browser session: %s", text)

    def switch(self, slave_key):
        """The WebSocket is open already; the slave key has no use in a browser."""

    def fail(self, message):
        ws = Connection(ConnectionType.SERVER)
        try:
            self.conn.sock.sendall(ws.send(CloseConnection(code=CLOSE_CODE_SETUP_FAILED, reason=close_reason(message))))
        except OSError:
            pass
