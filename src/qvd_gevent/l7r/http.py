"""HTTP/1.1 for the L7R on top of h11.

Why h11: a small, well-kept, sans-I/O HTTP/1.1 parser (no sockets of its own, so it works
the same over gevent's TLS sockets, is easy to fuzz, and emits the original's interim 102
and 101 responses byte for byte). Two things are done here before h11 sees a request:

- the original QVD client sends no ``Host`` header; h11 (rightly, per RFC 9112) refuses
  such a request, so we inject ``Host: qvd`` into a head that lacks one;
- the whole head is collected by us first, so the limits (request line, header block),
  the exact ``HTTP/1.1`` version rule of the original (505 otherwise) and the
  whole-request deadline are checked without trusting the parser's buffers.

Responses keep the original's format: ``HTTP/1.1 <code> <msg>``, Content-Type and
Content-Length, no Date, no Connection header.

h11 is the parser of record, but most requests are too simple to need it: a GET whose
head is plain ASCII with CRLF line ends, one Host header and none of the headers that
change the framing or the connection (Content-Length, Transfer-Encoding, Connection,
Upgrade, Expect). ``simple_request`` reads such a head with one pattern per line taken
from h11's own grammar and gives exactly what h11 would (tests/unit/test_http_fast_path.py
checks that against h11 on generated heads); the answer is then written as h11 writes
it. Anything else (connect_to_vm's Upgrade among them) goes through h11, a fresh
h11.Connection per such request: bytes the client sent behind it come back to our buffer,
so a pipelined request is checked and read like any other, by either parser. The fast
path saves about 40 µs of CPU per request (an h11.Connection, its state machine and its
header checks), which is most of what a ping costs besides the TLS handshake.
"""
import re
import time
import urllib.parse

import gevent
import h11

REASONS = {
    101: "Switching Protocols", 102: "Processing", 200: "OK", 400: "Bad Request",
    304: "Not Modified", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 414: "URI Too Long", 422: "Unprocessable Entity",
    426: "Upgrade Required", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

# Long descriptions for error bodies without an explicit message (shortened forms of the
# original's Wikipedia-derived texts; clients show them to the user).
DESCRIPTIONS = {
    400: "The request contains bad syntax or cannot be fulfilled.",
    401: "Similar to 403 Forbidden, but specifically for use when authentication is possible "
         "but has failed or not yet been provided.",
    404: "The requested resource could not be found but may be available again in the future.",
    408: "The server timed out waiting for the request.",
    414: "The URI provided was too long for the server to process.",
    426: "The client should switch to a different protocol.",
    431: "The server is unwilling to process the request because its header fields are too large.",
    505: "The server does not support the HTTP protocol version used in the request.",
}

_REQUEST_LINE = re.compile(rb"^(\S+) (\S+) HTTP/(\d+\.\d+)$")
_HOST_LINE = re.compile(rb"(?im)^host[ \t]*:")

# h11's grammar (h11/_abnf.py), restricted to ASCII: a head these match is read by h11
# exactly as split here
_SIMPLE_REQUEST_LINE = re.compile(rb"GET ([\x21-\x7e]+) HTTP/1\.1")
_SIMPLE_HEADER = re.compile(rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*((?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?)[ \t]*")
# headers that change a request's framing, its connection or its protocol: h11's business
_NOT_SIMPLE = frozenset((b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect", b"te"))
_FIELD_VALUE = re.compile(r"(?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?")


class HttpError(Exception):
    """A request that gets an error answer; close says whether the connection ends after it."""

    def __init__(self, status, message=None, close=False, headers=()):
        super().__init__(message or REASONS.get(status, ""))
        self.status = status
        self.message = message
        self.close = close
        self.headers = list(headers)


class ClientGone(Exception):
    """The peer closed or reset the connection."""


class Request:
    __slots__ = ("method", "target", "path", "query", "headers", "raw_headers")

    def __init__(self, method, target, headers):
        self.method = method
        self.target = target
        parsed = urllib.parse.urlsplit(target)
        self.path = parsed.path
        self.query = parse_query(parsed.query)
        self.raw_headers = headers
        self.headers = {}
        for name, value in headers:
            # later duplicates win, as the original's hash does
            self.headers[name.lower()] = value

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)


def parse_query(query):
    """The original's uri_query_split: '&'-split, k=v or bare k, '+' is space, later wins."""
    out = {}
    if not query:
        return out
    for item in query.split("&"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        out[urllib.parse.unquote_plus(key)] = urllib.parse.unquote_plus(value) if sep else ""
    return out


def find_head_end(buf):
    """Index just past the blank line ending the head, or -1. Leading blank lines are skipped by the caller."""
    i = buf.find(b"\r\n\r\n")
    j = buf.find(b"\n\n")
    cands = [x + 4 for x in (i,) if x >= 0] + [x + 2 for x in (j,) if x >= 0]
    return min(cands) if cands else -1


def check_head(head, max_line, max_headers):
    """Validate a complete head (bytes up to and incl. the blank line). Returns the head to feed h11."""
    line_end = head.find(b"\n")
    line = head[:line_end].rstrip(b"\r")
    if len(line) > max_line:
        raise HttpError(414, close=True)
    if len(head) - line_end > max_headers:
        raise HttpError(431, close=True)
    m = _REQUEST_LINE.match(line)
    if not m:
        raise HttpError(400, close=True)
    if m.group(3) != b"1.1":
        raise HttpError(505, close=True)
    if not _HOST_LINE.search(head[line_end + 1:]):
        head = head[:line_end + 1] + b"Host: qvd\r\n" + head[line_end + 1:]
    return head


def simple_request(head):
    """(target, [(name, value), ...]) of a checked head (check_head's result, up to and
    including its blank line) that h11 would read the same way, or None for h11 to read.
    Names and values are as h11's ``raw_items()`` gives them (bytes)."""
    if b"\r" in head.replace(b"\r\n", b"") or head.count(b"\n") != head.count(b"\r\n") or not head.endswith(b"\r\n\r\n"):
        return None
    lines = head[:-4].split(b"\r\n")
    m = _SIMPLE_REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        return None
    headers, hosts = [], 0
    for line in lines[1:]:
        h = _SIMPLE_HEADER.fullmatch(line)
        if h is None:
            return None
        name = h.group(1).lower()
        if name in _NOT_SIMPLE:
            return None
        hosts += name == b"host"
        headers.append((h.group(1), h.group(2)))
    if hosts != 1:
        return None
    return m.group(1), headers


def _response_head(status, reason, headers):
    """A status line and headers as h11 writes them (its writer: name, ': ', value, CRLF)."""
    out = [f"HTTP/1.1 {status} {reason}\r\n"]
    for name, value in headers:
        if not _FIELD_VALUE.fullmatch(value) or "\n" in name or "\r" in name:
            raise ValueError(f"illegal header {name!r}: {value!r}")   # h11 would refuse it too
        out.append(f"{name}: {value}\r\n")
    out.append("\r\n")
    return "".join(out).encode("latin-1")


def check_partial(buf, max_line, max_headers):
    """Limits on an incomplete head, so a flood is refused before it is whole."""
    line_end = buf.find(b"\n")
    if line_end < 0:
        if len(buf) > max_line + 2:
            raise HttpError(414, close=True)
        return
    if line_end > max_line + 1:
        raise HttpError(414, close=True)
    if len(buf) - line_end > max_headers + 4:
        raise HttpError(431, close=True)


class HttpConnection:
    """Requests in, responses out, over one (TLS) socket.

    ``read_request()`` returns the next Request (or None when the client closed between
    requests), with the whole-request deadline and limits enforced. After a 101,
    ``leftover()`` gives any bytes the client sent behind the request.
    """

    def __init__(self, sock, request_timeout, idle_timeout, max_line, max_headers, recv_size=8192):
        self.sock = sock
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.max_line = max_line
        self.max_headers = max_headers
        self.recv_size = recv_size
        self.h11 = None              # made for the first request that needs it (see simple_request)
        self.simple = False          # this request was read without h11; its answer is written likewise
        self.answered = False        # (simple requests) the final answer went out
        self.method = None
        self.buf = b""
        self.requests = 0
        self._held = None           # output kept back by hold_output()
        # an answer must be taken within request_timeout too: a client that stops reading is
        # cut like one that stops sending. A TLS stream keeps that deadline itself (armed only
        # when a write would block; its other writers, error answers among them, get it too)
        self._send_timer = not hasattr(sock, "send_timeout")
        if not self._send_timer:
            sock.send_timeout = request_timeout

    # --- reading ---------------------------------------------------------------------
    def _recv(self):
        try:
            data = self.sock.recv(self.recv_size)
        except OSError as exc:
            raise ClientGone(str(exc)) from None
        return data

    def read_request(self, first_deadline=None, timed=True):
        """Wait for a request. first_deadline (seconds from now) bounds the whole of the very
        first one: the wait for its first byte and the reading of all of it, together.
        timed=False: the caller's own timer bounds it (no timer of ours)."""
        if self.h11 is not None:
            # what the client sent behind the last request (pipelined) sits in h11's buffer:
            # back into ours, so the next head is checked and read like any other (h11
            # would keep it for itself and this loop wait for bytes that already came)
            if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                self.buf = bytes(self.h11.trailing_data[0]) + self.buf
            self.h11 = None
        self.simple = self.answered = False
        if not timed:
            while not self.buf.lstrip(b"\r\n"):
                self.buf = b""
                data = self._recv()
                if not data:
                    return None
                self.buf += data
            self.buf = self.buf.lstrip(b"\r\n")
            return self._read_whole_request()
        first_end = time.monotonic() + first_deadline if (self.requests == 0 and first_deadline is not None) else None
        # idle wait for the first byte of the next request; blank lines do not restart it (a
        # CRLF every few seconds would hold a connection that never asks anything for ever)
        idle_end = first_end if first_end is not None else time.monotonic() + self.idle_timeout
        while not self.buf.lstrip(b"\r\n"):
            self.buf = b""
            wait = max(0.001, idle_end - time.monotonic())
            timeout = gevent.Timeout(wait)
            timeout.start()
            try:
                data = self._recv()
            except gevent.Timeout as t:
                if t is not timeout:
                    raise
                if self.requests == 0:
                    raise HttpError(408, close=True) from None
                return None
            finally:
                timeout.close()
            if not data:
                return None
            self.buf += data
        self.buf = self.buf.lstrip(b"\r\n")
        # the first request's deadline runs on from the accept; later ones get theirs from their first byte
        timeout = gevent.Timeout(max(0.001, first_end - time.monotonic()) if first_end is not None else self.request_timeout)
        timeout.start()
        try:
            return self._read_whole_request()
        except gevent.Timeout as t:
            if t is not timeout:
                raise
            raise HttpError(408, close=True) from None
        finally:
            timeout.close()

    def _read_whole_request(self):
        while True:
            end = find_head_end(self.buf)
            if end >= 0:
                break
            check_partial(self.buf, self.max_line, self.max_headers)
            data = self._recv()
            if not data:
                raise ClientGone("closed inside a request")
            self.buf += data
        head = check_head(self.buf[:end], self.max_line, self.max_headers)
        rest = self.buf[end:]
        self.requests += 1
        simple = simple_request(head)
        if simple is not None:
            # what follows stays in our buffer: a pipelined request is read next
            self.buf = rest
            self.simple = True
            self.method = b"GET"
            target, headers = simple
            return Request("GET", target.decode("latin-1"),
                           [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers])
        self.buf = b""
        # a fresh h11 per request it reads: it never holds bytes of a request behind this one
        self.h11 = h11.Connection(h11.SERVER)
        self.h11.receive_data(head + rest)
        request = None
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpError(getattr(exc, "error_status_hint", 400) or 400, close=True) from None
            if event is h11.NEED_DATA:
                if request is not None and self.h11.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                    return request
                if request is not None and self.h11.their_state is h11.SEND_BODY and len(self.h11.trailing_data[0]) > self.max_headers:
                    raise HttpError(431, close=True)
                data = self._recv()
                if not data:
                    raise ClientGone("closed inside a request body")
                self.h11.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                self.method = event.method
                request = Request(event.method.decode("latin-1"), event.target.decode("latin-1"),
                                  [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers.raw_items()])
                continue
            if isinstance(event, h11.Data):
                continue  # no endpoint takes a body; it is read and dropped
            if isinstance(event, h11.EndOfMessage):
                return request
            if event is h11.PAUSED:
                return request
            if isinstance(event, h11.ConnectionClosed):
                raise ClientGone("closed")

    def leftover(self):
        if self.simple:
            return bytes(self.buf)
        data, _closed = self.h11.trailing_data
        return bytes(data)

    # --- writing ---------------------------------------------------------------------
    def _send(self, data):
        if self._held is not None:
            self._held.append(data)
            return
        if not self._send_timer:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise ClientGone(str(exc)) from None
            return
        timer = gevent.Timeout(self.request_timeout)
        timer.start()
        try:
            self.sock.sendall(data)
        except gevent.Timeout as t:
            if t is not timer:
                raise
            raise ClientGone("the client took no data for l7r.timeout.request seconds") from None
        except OSError as exc:
            raise ClientGone(str(exc)) from None
        finally:
            timer.close()

    def hold_output(self):
        """Keep what is sent until flush(): lines sent between two waits go out in one
        TLS record and one system call instead of one each."""
        if self._held is None:
            self._held = []

    def flush(self):
        """Send what was held, and stop holding."""
        held, self._held = self._held, None
        if held:
            self._send(b"".join(held))

    def send_response(self, status, body=b"", content_type="text/plain", headers=()):
        if isinstance(body, str):
            body = body.encode("utf-8")
        hdrs = list(headers) + [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        if self.simple:
            if self.answered:
                raise ValueError("a second answer to one request")     # as h11 refuses it
            self.answered = True
            self._send(_response_head(status, REASONS.get(status, ""), hdrs) + body)
            return
        out = self.h11.send(h11.Response(status_code=status, headers=hdrs, reason=REASONS.get(status, "").encode()))
        # the answer to a HEAD carries the headers only (h11 refuses a body there)
        out += self.h11.send(h11.Data(data=body)) if body and self.method != b"HEAD" else b""
        out += self.h11.send(h11.EndOfMessage())
        self._send(out)

    def send_error(self, status, message=None, headers=()):
        body = message if message is not None else f"{status} {REASONS.get(status, '')}\n{DESCRIPTIONS.get(status, '')}\n"
        self.send_response(status, body, "text/plain", headers)

    def send_info(self, text):
        """An interim 102 with the X-QVD-VM-Info line."""
        if self.simple:
            self._send(_response_head(102, "Processing", [("X-QVD-VM-Info", text)]))
            return
        self._send(self.h11.send(h11.InformationalResponse(
            status_code=102, headers=[("X-QVD-VM-Info", text)], reason=b"Processing")))

    def send_switch(self, slave_key):
        self._send(self.h11.send(h11.InformationalResponse(
            status_code=101, headers=[("X-QVD-Slave-Key", slave_key)], reason=b"Switching Protocols")))

    def send_switch_headers(self, headers):
        """A 101 with these headers (a WebSocket's acceptance)."""
        self._send(self.h11.send(h11.InformationalResponse(
            status_code=101, headers=headers, reason=b"Switching Protocols")))

    @property
    def can_continue(self):
        if self.simple:
            return self.answered
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    @property
    def can_answer(self):
        """No final answer has gone out to this request yet (an error answer still may)."""
        if self.simple:
            return not self.answered
        return self.h11 is not None and self.h11.our_state is h11.SEND_RESPONSE


def raw_error_response(status, message=None):
    """Bytes of an error answer outside any h11 state (a request h11 never saw)."""
    body = (message if message is not None else f"{status} {REASONS.get(status, '')}\n{DESCRIPTIONS.get(status, '')}\n").encode()
    return (f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body
