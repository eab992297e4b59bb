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
