"""10,000 Hypothesis-generated requests against a running L7R over TLS (real PostgreSQL, a
stand-in VM): structured requests to every endpoint with valid, wrong and hostile
credentials, ids and parameters, pipelined, then mutated and truncated. Whatever arrives,
every answer is a well-formed HTTP/1.1 response and never a 500, no exception escapes a
greenlet, and afterwards no greenlet, file descriptor, connection or session is left. A
trigger records every change of a session row while the fuzzer runs: no VM is ever claimed
by anyone but its owner, not only in the rows left at the end."""
import base64
import logging
import re
import socket
import ssl
import time
import urllib.parse

import pytest
from qvd_gevent.db.runtime import token_digest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from helpers.hostile import HubErrors, live_greenlets, open_fds, raise_nofile, tls_node, wait_until
from helpers.l7r_env import Reader, basic, client_context, get

REQUESTS_WANTED = 10_000
EXAMPLES = 5_000              # 1..4 pipelined requests each; the total is counted and asserted


def b64(text):
    return base64.b64encode(text.encode("utf-8", "surrogateescape")).decode()


@pytest.fixture
def fuzz_node(tmp_path, pg_server, fresh_db_name):
    from qvd_gevent.db import now_epoch
    node = tls_node(tmp_path, pg_server, fresh_db_name, {
        "l7r.timeout.request": 3, "l7r.timeout.idle": 3,
        # the fuzzer sends thousands of wrong passwords from one address: throttling is tested elsewhere
        "l7r.auth.throttle.max_failures": 10_000_000,
        "l7r.limits.request_line": 2048, "l7r.limits.headers": 4096})
    seed = node.seed
    node.osf = seed.osf()
    node.app_osf = seed.osf("apps", is_application=True)
    node.alice = seed.user("alice", "alice-pw")
    node.bob = seed.user("bob", "bob-pw")
    node.vm_id = seed.vm("alice-vm", node.alice, node.osf)
    node.app_id = seed.vm("alice-app", node.alice, node.app_osf)
    node.bob_vm = seed.vm("bob-vm", node.bob, node.osf)
    node.blocked_vm = seed.vm("alice-blocked", node.alice, node.osf, blocked=True)
    seed.running_at(node.vm_id, node.host_id, node.vma)
    record_session_rows(node.db)
    for token, vm_id, expiration, multi in (("multi-token", None, now_epoch() + 3600, True),
                                            ("bound-token", node.vm_id, now_epoch() + 3600, True),
                                            ("expired-token", None, now_epoch() - 10, True)):
        node.db.execute("INSERT INTO user_tokens (token, user_id, vm_id, expiration, multi_use) VALUES (%s, %s, %s, %s, %s)",
                        (token_digest(token), node.alice, vm_id, expiration, multi))
    yield node
    node.close()


def record_session_rows(db):
    """Every change of a vm_runtimes row, as it happens, into session_row_changes (a table of
    this test's own database): a claim that a later one overwrites is still seen."""
    db.execute("CREATE TABLE session_row_changes (vm_id int, real_user_id int, user_state text, "
               "l7r_host_id int)")
    db.execute("CREATE FUNCTION record_session_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
               "INSERT INTO session_row_changes VALUES (NEW.vm_id, NEW.real_user_id, NEW.user_state, NEW.l7r_host_id); "
               "RETURN NEW; END $$")
    db.execute("CREATE TRIGGER record_session_row AFTER UPDATE ON vm_runtimes FOR EACH ROW "
               "EXECUTE FUNCTION record_session_row()")


def tls_exchange(port, ctx, payload, timeout=15):
    """Everything the server answers to payload, sent over TLS and followed by the client's
    close_notify and a TCP half-close (so the server answers what it got, then closes)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    data = b""
    try:
        for _ in range(100):
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionResetError("closed during the handshake") from None
                incoming.write(chunk)
        tls.write(payload)
        try:
            tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        sock.sendall(outgoing.read())
        sock.shutdown(socket.SHUT_WR)
        for _ in range(10_000):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if chunk:
                incoming.write(chunk)
            else:
                incoming.write_eof()
            for _ in range(10_000):
                try:
                    piece = tls.read(65536)
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    break
                if not piece:       # the server's close_notify
                    break
                data += piece
            if not chunk:
                break
    finally:
        sock.close()
    return data


def request_strategy(vm_ids):
    method = st.sampled_from([b"GET"] * 20 + [b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"CONNECT", b"get", b"G\x00T"])
    path = st.sampled_from([b"/qvd/ping", b"/qvd/list_of_vm", b"/qvd/list_of_applications", b"/qvd/authenticate_user",
                            b"/qvd/create_auth_token", b"/qvd/connect_to_vm", b"/qvd/stop_vm", b"/", b"*", b"/qvd/",
                            b"http://qvd/qvd/list_of_vm", b"/qvd/../qvd/ping", b"/qvd/ping/", b"/QVD/PING",
                            b"/qvd/list_of_vm%00", b"//qvd//ping"])
    id_value = st.one_of(st.sampled_from([str(v).encode() for v in vm_ids] + [
        b"0", b"-1", b"+1", b"1.0", b"0x10", b"99999999999999999999", b"", b"abc", b"%00", b"%zz", b"1%20",
        b"'%20OR%201=1--", b"1;DROP%20TABLE%20vms", b"%D9%A5", b"1e3"]),
        st.integers(-2**40, 2**40).map(lambda i: str(i).encode()))
    key = st.sampled_from([b"id", b"id", b"qvd.client.keyboard", b"custom.x", b"store_auth", b"file_name",
                           b"qvd.vm.user.name", b"evil", b"", b"%69d", b"id[]"])
    printable = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e, blacklist_characters="#&"),
                        max_size=20)
    value = st.one_of(id_value, printable.map(str.encode),
                      st.text(max_size=10).map(lambda t: urllib.parse.quote_plus(t).encode()))
    query = st.lists(st.tuples(key, value), max_size=5).map(
        lambda items: (b"?" + b"&".join(k + b"=" + v for k, v in items)) if items else b"")
    version = st.sampled_from([b"HTTP/1.1"] * 30 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.10", b"HTTP/9", b"", b"http/1.1"])
    auth_value = st.sampled_from([
        basic("alice", "alice-pw"), basic("alice", "wrong"), basic("bob", "bob-pw"), basic("alice@default", "alice-pw"),
        basic("alice#nope", "x"), basic("", "x"), basic("alice", ""), "Basic " + b64("no-colon"), "Basic !!!",
        "Basic", "Bearer " + b64("multi-token"), "Bearer " + b64("multi-token\n"), "Bearer " + b64("bound-token"),
        "Bearer " + b64("expired-token"), "Bearer " + b64("nope"), "Bearer !!", "Digest x", "basic " + b64("alice:alice-pw"),
        basic("alice'--", "' OR '1'='1"), basic("%", "_"),
    ]).map(str.encode)
    header = st.one_of(
        st.tuples(st.just(b"Authorization"), auth_value),
        st.tuples(st.sampled_from([b"Connection", b"connection", b"Upgrade", b"UPGRADE"]),
                  st.sampled_from([b"Upgrade", b"QVD/1.0", b"upgrade", b"keep-alive", b"close", b"QVD/2.0", b""])),
        st.tuples(st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Host", b"Expect"]),
                  st.sampled_from([b"0", b"5", b"-1", b"chunked", b"gzip, chunked", b"100-continue", b"x", b"",
                                   b"99999999999999999999", b"1, 2"])),
        st.tuples(st.sampled_from([b"Auth-6c6f67696e", b"Auth-zz", b"Auth-", b"X-Forwarded-For"]),
                  st.one_of(printable.map(str.encode), st.binary(max_size=30).map(
                      lambda v: v.replace(b"\r", b"").replace(b"\n", b"")))),
    )
    noise = st.tuples(st.binary(min_size=0, max_size=12), st.binary(max_size=40))
    header = st.one_of(header, header, header, header, header, header, header, header, header, noise)
    eol = st.sampled_from([b"\r\n"] * 20 + [b"\n", b"\r", b"\r\r\n"])

    @st.composite
    def one(draw):
        e = draw(eol)
        line = draw(method) + b" " + draw(path) + draw(query) + b" " + draw(version)
        headers = draw(st.lists(header, max_size=6))
        raw = line + e + b"".join(k + b": " + v + e for k, v in headers) + e
        body = draw(st.sampled_from([b""] * 8 + [b"x" * 5, b"5\r\nhello\r\n0\r\n\r\n"]))
        raw += body
        mutate = draw(st.sampled_from(["none"] * 16 + ["truncate", "flip", "insert", "repeat"]))
        if mutate == "truncate" and raw:
            raw = raw[:draw(st.integers(0, len(raw) - 1))]
        elif mutate == "flip" and raw:
            i = draw(st.integers(0, len(raw) - 1))
            raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1:]
        elif mutate == "insert":
            i = draw(st.integers(0, len(raw)))
            raw = raw[:i] + draw(st.binary(min_size=1, max_size=10)) + raw[i:]
        elif mutate == "repeat" and raw:
            i = draw(st.integers(0, len(raw) - 1))
            raw = raw[:i] + raw[i:i + 1] * draw(st.integers(2, 300)) + raw[i + 1:]
        return raw
    endpoint = st.sampled_from([b"/qvd/ping", b"/qvd/list_of_vm", b"/qvd/list_of_applications",
                                b"/qvd/authenticate_user", b"/qvd/create_auth_token", b"/qvd/connect_to_vm",
                                b"/qvd/connect_to_vm", b"/qvd/connect_to_vm", b"/qvd/stop_vm"])
    good_auth = st.sampled_from([basic("alice", "alice-pw"), basic("alice@default", "alice-pw"), basic("bob", "bob-pw"),
                                 "Bearer " + b64("multi-token"), "Bearer " + b64("bound-token")]).map(str.encode)
    client_param = st.tuples(st.sampled_from([b"qvd.client.keyboard", b"qvd.client.geometry", b"custom.note",
                                              b"qvd.client.os", b"qvd.vm.user.name", b"x"]), value)

    @st.composite
    def realistic(draw):
        """Framed like the real client; only the values are hostile."""
        params = [(b"id", draw(id_value))] if draw(st.integers(0, 9)) else []
        params += draw(st.lists(client_param, max_size=3))
        query = b"?" + b"&".join(k + b"=" + v for k, v in params) if params else b""
        headers = [(b"Authorization", draw(st.one_of(good_auth, good_auth, auth_value)))]
        if draw(st.integers(0, 9)):
            headers += [(b"Connection", b"Upgrade"), (b"Upgrade", b"QVD/1.0")]
        if not draw(st.integers(0, 4)):
            headers.append((b"Auth-" + draw(st.text(max_size=8)).encode().hex().encode(),
                            base64.b64encode(draw(st.binary(max_size=20)))))
        return (b"GET " + draw(endpoint) + query + b" HTTP/1.1\r\n"
                + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n")
    return st.lists(st.one_of(realistic(), one()), min_size=1, max_size=4)


def split_responses(data, head_sent=False):
    """Status codes of the HTTP/1.1 responses in data, up to a 101 (bytes after it are the VM's).

    The answer to a HEAD has a Content-Length and no body (RFC 9110 9.3.2). Which answers
    are to a HEAD is the server's reading of mutated bytes, so when a HEAD was sent an
    answer followed at once by the next status line (or by nothing) is taken to have no
    body: no body the node writes starts with a status line."""
    codes = []
    while data:
        assert data.startswith(b"HTTP/1.1 "), data[:120]
        head_end = data.find(b"\r\n\r\n")
        assert head_end > 0, data[:200]
        head = data[:head_end].decode("latin-1")
        status_line = head.split("\r\n", 1)[0]
        assert re.fullmatch(r"HTTP/1\.1 \d{3} \S.*", status_line), f"malformed status line {status_line!r}"
        code = int(head[9:12])
        codes.append(code)
        if code == 101:
            break
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, v = line.partition(":")
            if name.lower() == "content-length":
                length = int(v)
        if code < 200:
            length = 0
        rest = data[head_end + 4:]
        if head_sent and (not rest or rest.startswith(b"HTTP/1.1 ")):
            length = 0
        data = rest[length:]
    return codes


ALLOWED = {101, 102, 200, 400, 401, 403, 404, 408, 414, 422, 426, 429, 431, 501, 503, 505}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_10000_generated_requests_no_crash_no_leak(fuzz_node, caplog):
    node = fuzz_node
    raise_nofile(65536)
    port = node.svc.port
    ctx = client_context(node.cert)

    def ping_ok():
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="localhost")
        get(s, "/qvd/list_of_vm", [("Authorization", basic("alice", "alice-pw"))])
        ok = Reader(s).response().status == 200
        s.close()
        return ok
    assert ping_ok()
    assert wait_until(lambda: node.svc.connections_open == 0, 5) is True
    base_fds, base_greenlets = open_fds(), live_greenlets()
    sent = {"requests": 0, "examples": 0}
    seen = {}
    t0 = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
              phases=(Phase.explicit, Phase.generate, Phase.shrink), suppress_health_check=list(HealthCheck))
    @given(request_strategy([node.vm_id, node.app_id, node.bob_vm, node.blocked_vm, 999999]))
    # a HEAD's answer (headers only) followed by the 400 of the bytes behind it (a CI failure)
    @example([b"GET /qvd/ping HTTP/1.1\r\nAuthorization: Basic YWxpY2U6YWxpY2UtcHc=\r\nAuth-: \r\n\r\n",
              b"HEAD /qvd/ping HTTP/1.1\r\n\r\n5\r\nhello\r\n0\r\n\r\n"])
    def exchange(raws):
        sent["examples"] += 1
        sent["requests"] += len(raws)
        data = tls_exchange(port, ctx, b"".join(raws))
        for code in split_responses(data, head_sent=any(b"HEAD" in raw for raw in raws)):
            seen[code] = seen.get(code, 0) + 1
            assert code in ALLOWED, (code, data[:300], raws)
    with caplog.at_level(logging.ERROR, logger="qvd"), HubErrors() as hub:
        exchange()
        # bounded extra rounds in case Hypothesis stopped early (it may, for a small search space)
        for _ in range(3):
            if sent["requests"] >= REQUESTS_WANTED:
                break
            exchange()
    took = time.monotonic() - t0
    print(f"fuzz: {sent['requests']} requests in {sent['examples']} connections, {took:.1f} s; answers {sorted(seen.items())}")
    assert sent["requests"] >= REQUESTS_WANTED
    assert hub.errors == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors[:5]]
    # the server keeps serving, and gives everything back
    assert ping_ok()
    assert wait_until(lambda: node.svc.connections_open == 0 and node.svc.sessions_open == 0, 15) is True
    row = node.db.query_one("SELECT user_state, l7r_host_id FROM vm_runtimes WHERE vm_id = %s", (node.vm_id,))
    assert wait_until(lambda: node.db.query_one(
        "SELECT count(*) FROM vm_runtimes WHERE user_state <> 'disconnected' OR l7r_host_id IS NOT NULL")[0] == 0, 10), row
    assert wait_until(lambda: open_fds() <= base_fds + 3, 15), (open_fds(), base_fds)
    assert wait_until(lambda: live_greenlets() <= base_greenlets + 3, 10), (live_greenlets(), base_greenlets)
    # no VM was ever claimed by anyone but its owner, and the blocked one not at all: every
    # change the trigger saw while the fuzzer ran, not only the rows left at the end
    changes = node.db.query("SELECT c.vm_id, c.real_user_id, c.user_state, v.user_id FROM session_row_changes c "
                            "JOIN vms v ON v.id = c.vm_id")
    claims = [c for c in changes if c[2] != "disconnected"]
    print(f"fuzz: {len(changes)} session row changes seen, {len(claims)} of them claims, "
          f"on VMs {sorted({c[0] for c in claims})}")
    assert [c for c in changes if c[1] is not None and c[1] != c[3]] == []
    assert [c for c in claims if c[1] != c[3]] == []
    assert [c for c in changes if c[0] == node.blocked_vm and (c[1] is not None or c[2] != "disconnected")] == []
    # and the record does see claims: the owner's own session, after the fuzzer
    node.db.execute("DELETE FROM session_row_changes")
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")
    get(s, f"/qvd/connect_to_vm?id={node.vm_id}", [("Authorization", basic("alice", "alice-pw")),
                                                   ("Connection", "Upgrade"), ("Upgrade", "QVD/1.0")])
    assert Reader(s).final()[1].status == 101
    s.close()
    assert (node.vm_id, node.alice, "connecting", node.alice) in node.db.query(
        "SELECT c.vm_id, c.real_user_id, c.user_state, v.user_id FROM session_row_changes c JOIN vms v ON v.id = c.vm_id")
