"""SimpleRPC framing of the VMA (docs/protocol.md#simplerpc), without I/O.

Request: ``GET /vma/<method>?k=v&... HTTP/1.1``; later duplicate keys win, as the
original's hash does. Answer: always ``200`` with ``Content-Type:
application/json-simplerpc``; the body is ``JSON(result)\\r\\n`` or, for an error,
``"",JSON(message)\\r\\n`` (the client wraps it in ``[...]`` and looks at the length).

The parser is tolerant like the original's: no ``Host`` header needed (the Perl
SimpleRPC client sends none), header names compared case-insensitively.
"""
import hmac
import json
import re
import urllib.parse

CONTENT_TYPE = "application/json-simplerpc"
MAX_HEAD = 16384  # a request head longer than this is refused (x_start params fit easily)

_REQUEST_LINE = re.compile(r"^([A-Z]+) (\S+) HTTP/(1\.[01])$")
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large"}


class BadRequest(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Request:
    __slots__ = ("headers", "method", "params", "path", "version")

    def __init__(self, method, path, params, headers, version):
        self.method = method
        self.path = path
        self.params = params
        self.headers = headers
        self.version = version

    @property
    def rpc_method(self):
        """`ping` for /vma/ping; None when the path is not under /vma/."""
        if not self.path.startswith("/vma/"):
            return None
        name = self.path[len("/vma/"):]
        return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else None

    @property
    def keep_alive(self):
        conn = self.headers.get("connection", "").lower()
        if self.version == "1.0":
            return conn == "keep-alive"
        return conn != "close"


def parse_request_head(head):
    """head: bytes up to (excluding) the blank line. Returns a Request or raises BadRequest."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise BadRequest(400, "undecodable request") from None
    lines = text.split("\r\n") if "\r\n" in text else text.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)  # blank lines before a request are skipped (original HTTPD)
    if not lines:
        raise BadRequest(400, "empty request")
    match = _REQUEST_LINE.match(lines[0].strip())
    if not match:
        raise BadRequest(400, "malformed request line")
    method, target, version = match.groups()
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise BadRequest(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    split = urllib.parse.urlsplit(target)
    params = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
    return Request(method, urllib.parse.unquote(split.path), params, headers, version)


def encode_result(value):
    return (json.dumps(value, indent=3) + "\r\n").encode("ascii")


def encode_error(message):
    return ('"",' + json.dumps(str(message)) + "\r\n").encode("ascii")


def response(body, status=200, keep_alive=False, content_type=CONTENT_TYPE, headers=()):
    reason = _REASONS.get(status, "Error")
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}", *headers]
    if not keep_alive:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


_SECRET_KEY = re.compile(r"passw(or)?d|token|secret|\.key$", re.IGNORECASE)


def bearer_matches(headers, secret):
    """The request carries ``Authorization: Bearer <secret>`` (compared in constant time)."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), secret.encode())


def mask_params(params):
    """A copy fit for a log line: passwords (as the original) and also tokens and the
    slave key (qvd.slave.key, auth_token) hidden."""
    return {k: ("*****" if _SECRET_KEY.search(k) else v) for k, v in params.items()}
