"""qvd-client's side of the wire protocol, without I/O (docs/protocol.md#connect-to-vm).

Requests are built as the original Perl client sends them (plus a ``Host`` header,
which HTTP/1.1 asks for and the original L7R ignores). Responses are parsed by
``ResponseReader``: feed it bytes, get events:
``Progress(text)`` for each ``102 Processing`` with ``X-QVD-VM-Info``,
``Switched(headers, rest)`` for ``101`` (rest = bytes that came after it: they already
belong to the VM's stream), ``Final(status, reason, headers, body)`` for anything else.
"""
import base64
import json
import re
import urllib.parse
from collections import namedtuple

USER_AGENT = "QVD::HTTPC/0.01 (linux)"
MAX_HEAD = 65536

Progress = namedtuple("Progress", "text")
Switched = namedtuple("Switched", "headers rest")
Final = namedtuple("Final", "status reason headers body")

_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})(?: (.*))?$")


class ProtocolError(Exception):
    """The server's bytes are not a response we can read."""


def basic_auth(login, password):
    raw = f"{login}:{password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def bearer_auth(token):
    return "Bearer " + base64.b64encode(token.encode("utf-8")).decode("ascii")


def build_request(path, params, authorization, host=None, upgrade=False, accept_json=False):
    """``GET path?query HTTP/1.1`` with the original client's headers.

    params: a list of (key, value) pairs (order kept). ``list_of_vm`` is sent with a
    trailing ``?`` even without params, as the original does.
    """
    query = urllib.parse.urlencode(params, quote_via=urllib.parse.quote, safe="")
    lines = [f"GET {path}?{query} HTTP/1.1"]
    if host:
        lines.append(f"Host: {host}")
    lines.append(f"Authorization: {authorization}")
    if accept_json:
        lines.append("Accept: application/json")
    if upgrade:
        lines += ["Connection: Upgrade", "Upgrade: QVD/1.0"]
    lines.append(f"User-Agent: {USER_AGENT}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


class ResponseReader:
    """Incremental parser of the server's response sequence on one connection."""

    def __init__(self):
        self.buf = bytearray()
        self.pending = None  # (status, reason, headers, length) while a body is read
        self.switched = False

    def feed(self, data):
        if self.switched:
            raise ProtocolError("data fed after 101")
        self.buf += data
        return self._events()

    def feed_eof(self):
        """The server closed: a body without Content-Length ends here; else it is an error."""
        if self.pending is not None and self.pending[3] is None:
            status, reason, headers, _ = self.pending
            self.pending = None
            body, self.buf = bytes(self.buf), bytearray()
            return [Final(status, reason, headers, body)]
        if self.pending is not None or self.buf.strip():
            raise ProtocolError("connection closed in the middle of a response")
        raise ProtocolError("connection closed without a response")

    def _events(self):
        events = []
        while not self.switched:
            if self.pending is not None:
                status, reason, headers, length = self.pending
                if length is None or len(self.buf) < length:
                    break
                body = bytes(self.buf[:length])
                del self.buf[:length]
                self.pending = None
                events.append(Final(status, reason, headers, body))
                continue
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    raise ProtocolError("response head too long")
                break
            head = bytes(self.buf[:end])
            del self.buf[:end + 4]
            status, reason, headers = _parse_head(head)
            if status == 102 or (100 <= status < 200 and status != 101):
                if status == 102 and "x-qvd-vm-info" in headers:
                    events.append(Progress(headers["x-qvd-vm-info"]))
                continue
            if status == 101:
                self.switched = True
                rest, self.buf = bytes(self.buf), bytearray()
                events.append(Switched(headers, rest))
                break
            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    raise ProtocolError(f"bad Content-Length {length!r}")
                length = int(length)
            self.pending = (status, reason, headers, length)
        return events


def _parse_head(head):
    lines = head.split(b"\r\n")
    match = _STATUS_LINE.match(lines[0])
    if not match:
        raise ProtocolError(f"not an HTTP response: {lines[0][:80]!r}")
    status = int(match.group(1))
    reason = (match.group(2) or b"").decode("latin-1")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ProtocolError(f"malformed header line {line[:80]!r}")
        headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    return status, reason, headers


def body_text(body, limit=300):
    text = body.decode("utf-8", "replace").strip()
    first = text.splitlines()[0] if text else ""
    return first[:limit]


def error_message(final, action, vm_id=None):
    """One line for a user, per the original client's wording (docs/protocol.md#status-codes)."""
    status, body = final.status, body_text(final.body)
    if status == 401:
        return f"login rejected by the server (401){': ' + body if body else ''}"
    if status == 403:
        return f"access denied (403): {body or 'forbidden'}"
    if status == 404:
        if action == "connect":
            return f"the virtual machine {vm_id} does not exist (404)"
        return f"not found (404): {body}"
    if status == 426:
        return "the server requires a more up-to-date client (426)"
    if status == 503:
        return f"the server is not available (503): {body}"
    return f"the server answered {status} {final.reason}{': ' + body if body else ''}"


def parse_vm_list(body):
    """list_of_vm JSON -> list of dicts with id, name, state, blocked (bool)."""
    try:
        items = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("list_of_vm: the answer is not JSON") from None
    if not isinstance(items, list):
        raise ProtocolError("list_of_vm: the answer is not a list")
    out = []
    for item in items:
        if not isinstance(item, dict) or "id" not in item:
            raise ProtocolError("list_of_vm: an entry without id")
        out.append({"id": item["id"], "name": item.get("name", ""), "state": item.get("state", ""),
                    "blocked": bool(item.get("blocked"))})
    return out
