"""Pure parts of the L7R: HTTP head checks, query parsing, credentials, throttling,
claim/wait decisions, parameter merging, TLS version mapping and file permissions."""
import base64
import os
import ssl

import pytest

from qvd_gevent.db import runtime
from qvd_gevent.l7r import connect, vma_params
from qvd_gevent.l7r.auth import encode_token_for_client, parse_auth_headers, parse_authorization, split_tenant
from qvd_gevent.l7r.http import HttpError, check_head, check_partial, parse_query, raw_error_response
from qvd_gevent.l7r.throttle import Throttle
from qvd_gevent.l7r.tls import TlsError, check_permissions, minimum_version


# --- http --------------------------------------------------------------------------------
def test_host_injected_only_when_missing():
    head = b"GET /qvd/list_of_vm? HTTP/1.1\r\nAuthorization: x\r\n\r\n"
    assert check_head(head, 100, 1000) == b"GET /qvd/list_of_vm? HTTP/1.1\r\nHost: qvd\r\nAuthorization: x\r\n\r\n"
    with_host = b"GET / HTTP/1.1\r\nhOsT: a\r\n\r\n"
    assert check_head(with_host, 100, 1000) == with_host


@pytest.mark.parametrize("head,status", [
    (b"GET /" + b"x" * 200 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nA: " + b"y" * 2000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.0\r\n\r\n", 505),
    (b"GET /  HTTP/1.1\r\n\r\n", 400),
    (b"nonsense\r\n\r\n", 400),
])
def test_head_errors(head, status):
    with pytest.raises(HttpError) as err:
        check_head(head, 100, 1000)
    assert err.value.status == status and err.value.close


def test_partial_limits():
    check_partial(b"GET /abc", 100, 1000)
    with pytest.raises(HttpError):
        check_partial(b"G" * 200, 100, 1000)
    with pytest.raises(HttpError):
        check_partial(b"GET / HTTP/1.1\r\n" + b"a" * 2000, 100, 1000)


def test_query_like_the_original():
    assert parse_query("id=10&qvd.client.keyboard=pc105%2Fes&x=a+b&bare&id=11&") == {
        "id": "11", "qvd.client.keyboard": "pc105/es", "x": "a b", "bare": ""}
    assert parse_query("") == {}


def test_raw_error_format():
    assert raw_error_response(408, "slow").startswith(
        b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\nslow")


# --- auth --------------------------------------------------------------------------------
def b64(text):
    return base64.b64encode(text.encode()).decode()


def test_parse_authorization():
    assert parse_authorization("Basic " + b64("qvd:qvd")) == ("basic", "qvd", "qvd")
    assert parse_authorization("basic " + b64("a@t:p:w")) == ("basic", "a@t", "p:w")
    assert parse_authorization("Basic " + b64(":pw")) is None
    assert parse_authorization("Basic " + b64("nocolon")) is None
    assert parse_authorization("Basic %%%") is None
    assert parse_authorization("Bearer " + b64("tok")) == ("bearer", "tok")
    # create_auth_token's value carries a newline: accepted with and without it
    value = encode_token_for_client("tok")
    assert value.endswith("\n")
    assert parse_authorization("Bearer " + value) == ("bearer", "tok")
    assert parse_authorization("Bearer " + value.strip()) == ("bearer", "tok")
    assert parse_authorization("Digest x") is None and parse_authorization(None) is None


def test_auth_hex_headers():
    headers = [("Auth-" + "lang".encode().hex(), b64("es")), ("auth-zz", "x"), ("Other", "y")]
    assert parse_auth_headers(headers) == {"lang": "es"}


def test_split_tenant():
    assert split_tenant("bob@acme", "@#", "default") == ("bob", "acme")
    assert split_tenant("bob#acme", "@#", "default") == ("bob", "acme")
    assert split_tenant("bob", "@#", "default") == ("bob", "default")


# --- throttle ----------------------------------------------------------------------------
def fail(t, address, login, secret, now):
    """One failed attempt, as the authenticator runs it."""
    return t.begin(address, login, t.fingerprint("basic", login, secret), now)


def test_throttle_burst_counts_once_and_window_expires():
    t = Throttle(max_failures=3, window=100, burst=10, max_login_failures=4)
    for i in range(5):  # the original client's five retries, within seconds
        fail(t, "1.2.3.4", "bob@d", "wrong", i)
    assert t.blocked("1.2.3.4", "bob@d", 5) is None
    fail(t, "1.2.3.4", "bob@d", "w2", 6)
    fail(t, "1.2.3.4", "bob@d", "w3", 7)
    assert t.blocked("1.2.3.4", "other@d", 8) == "address"
    assert t.blocked("1.2.3.4", "bob@d", 8) == "address"
    assert t.blocked("9.9.9.9", "bob@d", 8) is None            # bob elsewhere: not locked out
    assert t.blocked("1.2.3.4", "bob@d", 200) is None          # the window passed
    # after the burst, the same wrong credentials count again
    assert fail(t, "1.2.3.4", "x", "wrong", 300).entries


def test_throttle_per_login_ceiling_spans_addresses():
    t = Throttle(max_failures=3, window=100, burst=10, max_login_failures=4)
    for i in range(4):
        fail(t, f"10.0.0.{i}", "bob@d", f"guess{i}", i)
    assert t.blocked("10.0.0.9", "bob@d", 5) == "login"       # spread guessing hits the ceiling
    assert t.blocked("10.0.0.9", "alice@d", 5) is None


def test_throttle_login_at_one_address():
    t = Throttle(max_failures=2, window=100, burst=0, max_login_failures=50)
    fail(t, "a", "bob", "x1", 0)
    t.forget(t.begin("a", "alice", "fp-alice", 0))             # another login's success from a
    fail(t, "a", "bob", "x2", 1)
    assert t.blocked("a", "bob", 2) == "address"
    assert t.blocked("b", "bob", 2) is None


def test_throttle_counts_before_the_outcome_and_success_takes_it_back():
    t = Throttle(max_failures=2, window=100, burst=0, max_login_failures=50)
    pending = [t.begin("a", "bob", f"fp{i}", 0) for i in range(2)]   # two attempts still hashing
    assert t.blocked("a", "carol", 0) == "address"                   # a third is refused at once
    t.succeeded(pending[0], "a", "bob")
    assert t.blocked("a", "carol", 0) is None
    t.forget(pending[1])                                             # not held against anyone
    assert t.blocked("a", "bob", 0) is None and not t._failures


# --- connect decisions -------------------------------------------------------------------
ME, PID = 7, 100


@pytest.mark.parametrize("row,live,expected", [
    (("disconnected", None, None, None), False, "claim"),
    (("connected", 8, 55, None), False, "abort"),
    (("connecting", 8, 55, None), False, "abort"),
    (("connected", 8, 55, "abort"), False, "wait"),
    (("connected", ME, PID, None), True, "abort"),       # our own live session: take over
    (("connected", ME, PID, None), False, "claim"),      # ours, but nobody here holds it: stale
    (("connected", ME, 999, None), False, "claim"),      # an earlier process of this node
    (("connected", None, None, None), False, "claim"),
])
def test_decide_claim(row, live, expected):
    assert runtime.decide_claim(row, ME, PID, live) == expected


def test_vm_start_progress():
    p = connect.vm_start_progress
    assert p("running", None, None, 0, 10, 5) == ("ready", None)
    assert p("starting", None, None, 0, 10, 5) == ("wait", None)
    assert p("stopped", "start", None, 0, 10, 5) == ("wait", None)
    assert p("stopped", None, None, 0, 10, 5) == ("fail", "Failed to start virtual machine 5")
    assert p("starting", None, None, 11, 10, 5) == ("fail", "VM didn't reach state 'running'. Timeout")
    assert p("running", None, "abort", 0, 10, 5)[0] == "aborted"


def test_x_state_progress():
    p = connect.x_state_progress
    assert p("listening", 0, 1, 2, 5) == ("ready", None)
    assert p(None, 0, 1, 2, 5) == ("wait", None)
    assert p("starting", 3, 1, 9, 5)[0] == "fail"
    assert p("provisioning", 3, 1, 9, 5) == ("wait", None)
    assert p("provisioning", 10, 1, 9, 5)[0] == "fail"
    assert p("weird", 0, 1, 2, 5) == ("fail", "Unable to start X session on VM 5, state went to weird")


def test_merge_precedence_and_slave_key():
    merged = vma_params.merge_vma_params({"qvd.client.geometry": "800x600", "a": "client"},
                                     {"a": "props", "qvd.vm.desktop": "nx"}, {"a": "auth", "qvd.vm.user.name": "u"},
                                     "K" * 64)
    assert merged == {"qvd.client.geometry": "800x600", "a": "auth", "qvd.vm.desktop": "nx",
                      "qvd.vm.user.name": "u", "qvd.slave.key": "K" * 64}
    key = vma_params.slave_key()
    assert len(key) == 64 and key.isalnum() and key != vma_params.slave_key()


# --- tls ---------------------------------------------------------------------------------
def test_minimum_version_never_below_1_2():
    assert minimum_version("TLSv1_2:!SSLv3:!SSLv2:!TLSv1") == ssl.TLSVersion.TLSv1_2
    assert minimum_version("TLSv1_1:!SSLv3:!SSLv2:!TLSv1") == ssl.TLSVersion.TLSv1_2
    assert minimum_version("SSLv3") == ssl.TLSVersion.TLSv1_2
    assert minimum_version("TLSv1_3") == ssl.TLSVersion.TLSv1_3
    assert minimum_version("!TLSv1_2:TLSv1_3") == ssl.TLSVersion.TLSv1_3
    assert minimum_version("") == ssl.TLSVersion.TLSv1_2


def test_check_permissions(tmp_path):
    key, cert = tmp_path / "k", tmp_path / "c"
    key.write_text("k")
    cert.write_text("c")
    os.chmod(key, 0o600)
    os.chmod(cert, 0o640)
    check_permissions(str(key), str(cert))
    os.chmod(key, 0o640)
    with pytest.raises(TlsError, match="insecure permissions 0640"):
        check_permissions(str(key), str(cert))
    os.chmod(key, 0o600)
    os.chmod(cert, 0o604)
    with pytest.raises(TlsError, match="certificate"):
        check_permissions(str(key), str(cert))
    with pytest.raises(TlsError, match="does not exist"):
        check_permissions(str(tmp_path / "nope"), str(cert))
