"""Properties of the wire parsers (Hypothesis), each side against the other where the
project has both: what qvd-client writes the L7R reads back, what the L7R writes qvd-client
reads back, what the VMA client writes the VMA reads back. Besides, every parser answers
any input with a result or its own error, never another exception."""
import base64
import json
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qvd_gevent.client import protocol as client
from qvd_gevent.l7r import auth, endpoints
from qvd_gevent.l7r.http import HttpConnection, HttpError, Request, check_head, find_head_end, parse_query
from qvd_gevent.vma import rpc
from qvd_gevent.vma.client import VmaClient

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
LINE_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=60)   # a header value
KEY = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)


class FakeSocket:
    """Hands out the bytes it was given in the chunks it was given; collects what is sent."""

    def __init__(self, chunks=()):
        self.chunks = list(chunks)
        self.sent = b""

    def recv(self, size):
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if len(chunk) > size:
            self.chunks.insert(0, chunk[size:])
            chunk = chunk[:size]
        return chunk

    def sendall(self, data):
        self.sent += data


def chunked(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0] + points + [len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]


def l7r_connection(chunks=()):
    return HttpConnection(FakeSocket(chunks), request_timeout=5, idle_timeout=5, max_line=8192, max_headers=65536)


# --- qvd-client -> L7R ---------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(params=st.lists(st.tuples(KEY, TEXT), max_size=8), login=KEY.filter(lambda s: ":" not in s), password=TEXT,
       upgrade=st.booleans(), cuts=st.lists(st.integers(0, 10**6), max_size=6))
def test_the_l7r_reads_what_qvd_client_sends(params, login, password, upgrade, cuts):
    raw = client.build_request("/qvd/connect_to_vm", params, client.basic_auth(login, password), upgrade=upgrade)
    conn = l7r_connection(chunked(raw, cuts))
    request = conn.read_request(first_deadline=5)
    assert request.method == "GET" and request.path == "/qvd/connect_to_vm"
    assert request.query == dict(params)                                     # a later duplicate wins
    assert auth.parse_authorization(request.header("authorization")) == ("basic", login, password)
    assert (request.header("connection"), request.header("upgrade")) == (("Upgrade", "QVD/1.0") if upgrade else (None, None))
    assert request.header("host") == "qvd"                                  # supplied: the client sends none


@given(token=TEXT)
def test_a_bearer_token_comes_back_as_sent_without_its_surrounding_blanks(token):
    expected = ("bearer", token.strip()) if token.strip() else None
    assert auth.parse_authorization(client.bearer_auth(token)) == expected
    if token.isascii():
        # create_auth_token's form, with Perl's trailing newline, sent back as it came
        assert auth.parse_authorization("Bearer " + auth.encode_token_for_client(token)) == expected


@given(value=st.one_of(TEXT, st.binary(max_size=60).map(lambda b: b.decode("latin-1"))))
def test_parse_authorization_answers_anything_with_none_or_credentials(value):
    creds = auth.parse_authorization(value)
    assert creds is None or creds[0] == "basic" and len(creds) == 3 and creds[1] and ":" not in creds[1] \
        or creds[0] == "bearer" and len(creds) == 2 and creds[1] == creds[1].strip() and creds[1]


@given(variables=st.dictionaries(KEY, TEXT, max_size=5),
       others=st.lists(st.tuples(st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True), LINE_TEXT), max_size=4),
       upper=st.booleans())
def test_auth_headers_round_trip(variables, others, upper):
    headers = [(("AUTH-" if upper else "Auth-") + (name.encode().hex().upper() if upper else name.encode().hex()),
                base64.b64encode(value.encode()).decode()) for name, value in variables.items()]
    headers += [(n, v) for n, v in others if not n.lower().startswith("auth-")]
    assert auth.parse_auth_headers(headers) == variables


@given(login=TEXT, separators=st.text("@#%!", min_size=1, max_size=3), default=KEY)
def test_split_tenant_splits_at_the_first_separator(login, separators, default):
    user, tenant = auth.split_tenant(login, separators, default)
    if any(ch in separators for ch in login):
        assert login[len(user)] in separators and user + login[len(user)] + tenant == login
        assert not any(ch in separators for ch in user)
    else:
        assert (user, tenant) == (login, default)


@given(pairs=st.lists(st.tuples(KEY, TEXT), max_size=8), plus=st.booleans())
def test_parse_query_reads_what_urlencode_writes(pairs, plus):
    query = urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote_plus if plus else urllib.parse.quote, safe="")
    assert parse_query(query) == dict(pairs)
    assert parse_query(query + "&" + "&") == dict(pairs)                       # empty items are skipped


@given(text=st.text(max_size=80))
def test_parse_query_never_fails(text):
    assert isinstance(parse_query(text), dict)


REQUEST_LINE = st.builds("GET {} HTTP/1.1".format, st.from_regex(r"/[!-~]{0,30}", fullmatch=True))
HEADER = st.tuples(st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True), LINE_TEXT).map(lambda t: f"{t[0]}: {t[1]}")


@given(line=REQUEST_LINE, headers=st.lists(HEADER, max_size=6))
def test_check_head_supplies_exactly_one_host_and_is_idempotent(line, headers):
    head = ("\r\n".join([line] + headers) + "\r\n\r\n").encode()
    checked = check_head(head, 8192, 65536)
    had_host = any(h.lower().startswith("host:") for h in headers)
    assert checked == head if had_host else checked == (line + "\r\nHost: qvd\r\n").encode() + head[len(line) + 2:]
    assert check_head(checked, 8192, 65536) == checked
    assert find_head_end(checked + b"body\r\n\r\n") == len(checked)


@given(data=st.binary(max_size=200))
def test_check_head_answers_any_bytes_with_a_head_or_an_http_error(data):
    try:
        checked = check_head(data + b"\r\n\r\n", 100, 1000)
    except HttpError as exc:
        assert exc.status in (400, 414, 431, 505) and exc.close
    else:
        assert checked.endswith(b"\r\n\r\n")


@given(headers=st.lists(st.tuples(st.sampled_from(["Upgrade", "upgrade", "UPGRADE", "X-A"]), LINE_TEXT), max_size=6))
def test_header_names_match_in_any_case_and_the_last_one_wins(headers):
    request = Request("GET", "/", headers)
    for name in {n.lower() for n, _ in headers}:
        assert request.header(name.upper()) == [v for n, v in headers if n.lower() == name][-1]


# --- L7R -> qvd-client ---------------------------------------------------------------------
INFO = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=50)
BODY = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)


@settings(max_examples=150, deadline=None)
@given(infos=st.lists(INFO, max_size=6), final=st.one_of(
    st.tuples(st.just(101), st.from_regex(r"[A-Za-z0-9]{64}", fullmatch=True), st.binary(max_size=40)),
    st.tuples(st.sampled_from([200, 401, 403, 404, 408, 422, 426, 429, 503]), BODY, st.just(b""))),
    cuts=st.lists(st.integers(0, 10**6), max_size=8))
def test_qvd_client_reads_what_the_l7r_writes(infos, final, cuts):
    status, text, after = final
    conn = l7r_connection([b"GET /qvd/connect_to_vm?id=1 HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n"])
    conn.read_request(first_deadline=5)
    for info in infos:
        conn.send_info(info)
    if status == 101:
        conn.send_switch(text)
    elif status == 200:
        conn.send_response(200, text)
    else:
        conn.send_error(status, text)
    reader = client.ResponseReader()
    events = []
    beyond = b""                        # after the 101 the client's bytes go to the VM unread
    for chunk in chunked(conn.sock.sent + after, cuts):
        if reader.switched:
            beyond += chunk
        else:
            events += reader.feed(chunk)
    assert events[:-1] == [client.Progress(i) for i in infos]
    last = events[-1]
    if status == 101:
        assert isinstance(last, client.Switched) and last.headers == {"x-qvd-slave-key": text}
        assert last.rest + beyond == after
    else:
        assert isinstance(last, client.Final) and last.status == status and last.body == text.encode()


@given(vms=st.lists(st.fixed_dictionaries({
    "id": st.integers(1, 2**31 - 1), "state": st.sampled_from(["stopped", "running", "starting"]), "name": TEXT,
    "blocked": st.booleans(), "is_application": st.booleans()}), max_size=5))
def test_qvd_client_reads_the_l7r_vm_list(vms):
    body = endpoints.vm_list_json(vms).encode()
    assert client.parse_vm_list(body) == [{k: vm[k] for k in ("id", "name", "state", "blocked")} for vm in vms]
    assert json.loads(body) == vms


@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 10**6), max_size=5))
def test_the_client_reader_answers_any_bytes_with_events_or_a_protocol_error(data, cuts):
    reader = client.ResponseReader()
    try:
        for chunk in chunked(data, cuts):
            if reader.switched:
                break
            for event in reader.feed(chunk):
                assert isinstance(event, (client.Progress, client.Switched, client.Final))
    except client.ProtocolError:
        pass


# --- VMA client -> VMA ---------------------------------------------------------------------
@given(method=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True),
       params=st.dictionaries(KEY, TEXT, max_size=8), version=st.sampled_from(["1.0", "1.1"]),
       connection=st.sampled_from([None, "close", "Close", "keep-alive", "Keep-Alive"]))
def test_the_vma_reads_what_its_client_sends(method, params, version, connection):
    head = f"GET {VmaClient('127.0.0.1').url(method, params)} HTTP/{version}"
    if connection:
        head += f"\r\nConnection: {connection}"
    request = rpc.parse_request_head(head.encode())
    assert request.rpc_method == method and request.params == params
    expected = (connection or "").lower() == "keep-alive" if version == "1.0" else (connection or "").lower() != "close"
    assert request.keep_alive is expected


@given(data=st.binary(max_size=300))
def test_the_vma_answers_any_head_with_a_request_or_a_bad_request(data):
    try:
        request = rpc.parse_request_head(data)
    except rpc.BadRequest as exc:
        assert exc.status == 400
    else:
        assert request.method and request.version in ("1.0", "1.1")


JSON = st.recursive(st.none() | st.booleans() | st.integers() | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)


@given(value=JSON, message=TEXT)
def test_a_vma_result_and_an_error_are_told_apart_as_the_client_reads_them(value, message):
    def read(body):     # what VmaClient.call does with a body
        return json.loads("[" + body.decode("utf-8").strip() + "]")
    assert read(rpc.encode_result(value)) == [value]
    assert read(rpc.encode_error(message)) == ["", message]


@pytest.mark.parametrize("method", ["ping", "x_start"])
def test_url_and_parse_agree_on_a_known_call(method):
    request = rpc.parse_request_head(f"GET {VmaClient('h').url(method, {'a b': 'c&d'})} HTTP/1.1".encode())
    assert (request.rpc_method, request.params) == (method, {"a b": "c&d"})
