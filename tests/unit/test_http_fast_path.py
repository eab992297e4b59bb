"""The L7R's fast path for simple requests reads a head exactly as h11 (the parser of
record) does, or leaves it to h11; its answers are h11's answers byte for byte.

Heads are generated from the pieces that matter (methods, targets, header names h11 cares
about, odd whitespace, line ends, obs-text, duplicate Hosts) and each is given to both.
"""
import h11
from hypothesis import given, settings
from hypothesis import strategies as st

from qvd_gevent.l7r import http
from qvd_gevent.l7r.http import HttpConnection, check_head, simple_request

NAMES = st.one_of(st.sampled_from(["Host", "host", "HOST", "Authorization", "Content-Length", "Transfer-Encoding",
                                   "Connection", "Upgrade", "Expect", "TE", "Accept", "X-A", "Auth-61"]),
                  st.from_regex(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,12}", fullmatch=True),
                  st.text("ab:( @\x7f", min_size=1, max_size=4))
VALUES = st.one_of(st.from_regex(r"[ \t]{0,2}[!-~]{0,12}( [!-~]{1,5})?[ \t]{0,2}", fullmatch=True),
                   st.sampled_from(["Basic cXZkOnF2ZA==", "Bearer abc", "chunked", "5", "close", "Upgrade", ""]),
                   st.binary(max_size=6).map(lambda b: b.decode("latin-1")))
LINE_END = st.sampled_from(["\r\n"] * 8 + ["\n", "\r\r\n"])
METHODS = st.sampled_from(["GET"] * 6 + ["HEAD", "POST", "get", "CONNECT"])
TARGETS = st.one_of(st.from_regex(r"/qvd/[!-~]{0,20}", fullmatch=True), st.sampled_from(["*", "/a b", "/\x80"]))


@st.composite
def heads(draw):
    line = f"{draw(METHODS)} {draw(TARGETS)} HTTP/1.1"
    headers = draw(st.lists(st.tuples(NAMES, st.sampled_from([": ", ":", " : ", ":\t"]), VALUES), max_size=6))
    text = line + draw(LINE_END)
    for name, sep, value in headers:
        text += name + sep + value + draw(LINE_END)
    return (text + "\r\n").encode("latin-1")


def by_h11(head):
    """(target, raw headers) as h11 reads the head, or None when h11 refuses it or sees
    anything but a plain request without a body."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    try:
        event = conn.next_event()
        if not isinstance(event, h11.Request) or event.method != b"GET":
            return None
        after = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(after, h11.EndOfMessage) or conn.their_state is not h11.DONE:
        return None
    return event.target, list(event.headers.raw_items())


@settings(max_examples=600, deadline=None)
@given(head=heads())
def test_a_simple_request_is_read_as_h11_reads_it(head):
    try:
        checked = check_head(head, 8192, 65536)
    except Exception:
        return                                           # refused before any parser sees it
    fast = simple_request(checked)
    if fast is not None:
        assert by_h11(checked) == (fast[0], fast[1])


def test_the_fast_path_takes_the_requests_it_is_for():
    """It must also be taken, or it saves nothing: the original client's and qvd-client's
    plain requests."""
    for head in (b"GET /qvd/ping HTTP/1.1\r\n\r\n",
                 b"GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: Basic cXZkOnF2ZA==\r\nAccept: application/json\r\n\r\n",
                 b"GET /qvd/ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"):
        assert simple_request(check_head(head, 8192, 65536)) is not None
    for head in (b"GET /qvd/connect_to_vm?id=1 HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n",
                 b"GET /qvd/ping HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                 b"GET /qvd/ping HTTP/1.1\nHost: x\n\n"):
        assert simple_request(check_head(head, 8192, 65536)) is None


class Collect:
    def __init__(self, data):
        self.data, self.sent = [data], b""

    def recv(self, size):
        return self.data.pop(0) if self.data else b""

    def sendall(self, data):
        self.sent += data


def answer(head, respond, force_h11):
    sock = Collect(head)
    conn = HttpConnection(sock, 5, 5, 8192, 65536)
    if force_h11:                                        # the fast path off: h11 reads and writes
        saved, http.simple_request = http.simple_request, lambda head: None
        try:
            request = conn.read_request(first_deadline=5)
        finally:
            http.simple_request = saved
    else:
        request = conn.read_request(first_deadline=5)
    assert conn.simple is not force_h11
    respond(conn)
    assert conn.can_continue
    return request, sock.sent


@given(status=st.sampled_from([200, 401, 403, 404, 429, 503]), body=st.text(max_size=40),
       content_type=st.sampled_from(["text/plain", "application/json"]),
       headers=st.lists(st.tuples(st.sampled_from(["WWW-Authenticate", "Retry-After"]),
                                  st.from_regex(r"[!-~]{1,8}( [!-~]{1,8})?", fullmatch=True)), max_size=2),
       infos=st.lists(st.from_regex(r"[!-~]{1,10}( [!-~]{1,10})?", fullmatch=True), max_size=2))
def test_answers_to_a_simple_request_are_h11s_byte_for_byte(status, body, content_type, headers, infos):
    head = b"GET /qvd/stop_vm?id=3 HTTP/1.1\r\nAuthorization: Basic cXZkOnF2ZA==\r\n\r\n"

    def respond(conn):
        for info in infos:
            conn.send_info(info)
        conn.send_response(status, body, content_type, headers)
    fast_request, fast = answer(head, respond, False)
    slow_request, slow = answer(head, respond, True)
    assert fast == slow
    assert (fast_request.method, fast_request.target, fast_request.raw_headers) == \
        (slow_request.method, slow_request.target, slow_request.raw_headers)


# --- whole streams: pipelining, bodies, chunking -------------------------------------------------------
# A connection's bytes as a client sends them: several requests back to back (simple GETs,
# GETs with a body, Upgrade-less odd ones, HTTP/1.0, heads ended by a bare LF), cut into
# arbitrary pieces. With the fast path on or off, the server must read the same requests in
# the same order and write the same bytes: a pipelined request is served whichever parser
# read the one before it, and goes through the same head checks (505 for HTTP/1.0, the Host
# supplied when missing).
REQUESTS = st.one_of(
    heads(),
    st.sampled_from([b"GET /qvd/ping HTTP/1.1\r\n\r\n",
                     b"GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: Basic YTpi\r\n\r\n",
                     b"GET /qvd/ping HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
                     b"GET /qvd/ping HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                     b"GET /qvd/ping HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                     b"GET /qvd/ping HTTP/1.1\nHost: x\n\n",
                     b"GET /qvd/ping HTTP/1.1\r\nX-A: 1\n\r\n",
                     b"GET /qvd/ping HTTP/1.0\r\n\r\n",
                     b"GET /qvd/list_of_vm HTTP/1.1\r\nHost: a\r\nAuthorization: Basic c3RyYW5nZXI6eA==\r\n\r\n",
                     b"\r\n"]))


class Script:
    """A socket that hands out the client's bytes in the given pieces, then end of stream."""

    def __init__(self, pieces):
        self.pieces, self.sent = list(pieces), b""

    def recv(self, size):
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if len(piece) > size:
            self.pieces.insert(0, piece[size:])
            piece = piece[:size]
        return piece

    def sendall(self, data):
        self.sent += data


def serve(pieces, fast):
    """What a server loop reads off the stream (each request answered while the connection
    may continue) and what it writes."""
    sock = Script(pieces)
    conn = HttpConnection(sock, 5, 5, 8192, 65536)
    seen = []
    saved = http.simple_request
    if not fast:
        http.simple_request = lambda head: None
    try:
        for _ in range(20):
            try:
                request = conn.read_request(first_deadline=5)
            except http.HttpError as exc:
                seen.append(("refused", exc.status))
                break
            except http.ClientGone:
                seen.append("gone")
                break
            if request is None:
                seen.append("closed")
                break
            seen.append((request.method, request.target, request.raw_headers, request.header("authorization")))
            conn.send_response(404, "none here")   # (a 200 would accept a CONNECT's tunnel)
            if not conn.can_continue:
                seen.append("must close")
                break
    finally:
        http.simple_request = saved
    return seen, sock.sent


@settings(max_examples=400, deadline=None)
@given(requests=st.lists(REQUESTS, min_size=1, max_size=4), cuts=st.lists(st.integers(1, 200), max_size=6))
def test_a_stream_of_requests_is_read_alike_with_or_without_the_fast_path(requests, cuts):
    stream = b"".join(requests)
    pieces, at = [], 0
    for cut in cuts:
        if at >= len(stream):
            break
        pieces.append(stream[at:at + cut])
        at += cut
    pieces.append(stream[at:])
    assert serve(pieces, True) == serve(pieces, False)


def test_a_request_pipelined_behind_one_read_by_h11_is_answered_and_checked():
    """Two requests in one piece, the first with a body (read by h11): the second is answered
    at once (it used to wait in h11's buffer for the client's next bytes), and like any head
    it gets the version check and the supplied Host."""
    seen, _sent = serve([b"GET /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET /b HTTP/1.1\r\n\r\n"], True)
    assert [s[1] for s in seen[:2]] == ["/a", "/b"]
    assert dict(seen[1][2])["Host"] == "qvd"
    seen, _sent = serve([b"GET /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET /b HTTP/1.0\r\n\r\n"], True)
    assert seen[1] == ("refused", 505)
