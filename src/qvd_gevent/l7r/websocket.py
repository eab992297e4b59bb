"""The browser's WebSocket handshake (RFC 6455), checked before any session work
(docs/protocol.md#the-websocket).

Pure functions over a parsed request (``http.Request``): whether it is a WebSocket
upgrade at all, whether its Origin is this node's own, which token it presents, and the
headers of the 101 that accepts it. The accept key comes from wsproto, the sans-I/O
WebSocket library that also frames the session's bytes (``ws_relay.py``).

**Where the token travels.** Browsers let a page set no header on a WebSocket but the
subprotocol list, so the page offers ``binary`` (what noVNC speaks) and
``qvd-token.<token>``; the answer names ``binary`` only. A query parameter would do too,
but URLs end up in access logs, proxies and the browser's history; the subprotocol header
does not. A cookie would be sent by the browser on a cross-site page's WebSocket too
(the Origin check would be the only defence), and the token is spent at first use anyway.

**Origin.** A page of another site can open a WebSocket to this node in the user's
browser; the browser always says which site in ``Origin``. It must be the node's own:
``https://<Host>`` (``http://`` when the L7R runs without TLS behind a balancer), or one
listed in ``l7r.web.origins``. Anything else, or none, is refused with 403 before the
token is looked at, so a foreign page cannot even spend a token.
"""
import re
import urllib.parse

from wsproto.utilities import generate_accept_token

from .http import HttpError

SUBPROTOCOL = "binary"
TOKEN_PREFIX = "qvd-token."
_TOKEN = re.compile(r"^[A-Za-z0-9]{20,128}$")
_KEY = re.compile(r"^[A-Za-z0-9+/]{22}==$")     # base64 of 16 bytes (RFC 6455 4.1)


def _tokens(value):
    return [part.strip().lower() for part in (value or "").split(",") if part.strip()]


def is_upgrade(request):
    """The request asks for a WebSocket (it may still be a malformed one)."""
    return "websocket" in _tokens(request.header("upgrade"))


def check_handshake(request):
    """Raise HttpError unless request is a well-formed WebSocket opening handshake."""
    if request.method != "GET":
        raise HttpError(405, "A WebSocket opens with GET")
    if not is_upgrade(request) or "upgrade" not in _tokens(request.header("connection")):
        raise HttpError(426, "This endpoint speaks WebSocket only", headers=[("Upgrade", "websocket")])
    if (request.header("sec-websocket-version") or "").strip() != "13":
        raise HttpError(426, "WebSocket version 13 only", headers=[("Sec-WebSocket-Version", "13")])
    if not _KEY.match((request.header("sec-websocket-key") or "").strip()):
        raise HttpError(400, "Bad Sec-WebSocket-Key")


def normalise_origin(origin):
    """scheme://host[:port] in lower case with default ports dropped, or None."""
    try:
        parts = urllib.parse.urlsplit(origin.strip())
        port = parts.port
    except (ValueError, AttributeError):
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username or parts.password:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + ("" if port in (None, default) else f":{port}")


def origin_allowed(origin, host, tls, extra=()):
    """Origin is this node's own page: the scheme it is served on and the Host the browser
    connected to, or one of extra (l7r.web.origins)."""
    seen = normalise_origin(origin or "")
    if seen is None:
        return False
    allowed = {normalise_origin(o) for o in extra}
    if host and re.fullmatch(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?", host.strip()):
        allowed.add(normalise_origin(("https://" if tls else "http://") + host.strip()))
    allowed.discard(None)
    return seen in allowed


def token_from_protocols(request):
    """The token offered as ``qvd-token.<token>`` in Sec-WebSocket-Protocol, or None."""
    for value in (request.header("sec-websocket-protocol") or "").split(","):
        value = value.strip()
        if value.startswith(TOKEN_PREFIX) and _TOKEN.match(value[len(TOKEN_PREFIX):]):
            return value[len(TOKEN_PREFIX):]
    return None


def offers_binary(request):
    return SUBPROTOCOL in [v.strip() for v in (request.header("sec-websocket-protocol") or "").split(",")]


def accept_headers(request):
    """Headers of the 101 that accepts request (already checked)."""
    return [("Upgrade", "websocket"), ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept",
             generate_accept_token(request.header("sec-websocket-key").strip().encode("ascii")).decode("ascii")),
            ("Sec-WebSocket-Protocol", SUBPROTOCOL)]
