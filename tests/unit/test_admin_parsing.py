"""qvd-admin's pure parts: permuted options, per-verb syntax, filters to SQL, sizes, dates, TLS checks."""
import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qvd_gevent.admin.cli import check_syntax, parse_argv
from qvd_gevent.admin.context import AdminError
from qvd_gevent.admin.dates import parse_when
from qvd_gevent.admin.objects import DI, HOST, VM, like_pattern, where_clause
from qvd_gevent.admin.osf import parse_size
from qvd_gevent.admin.registry import VERBS
from qvd_gevent.admin.sslcheck import check_pair


def test_options_may_appear_anywhere():
    inv = parse_argv(["vm", "-f", "name=a*,state=running", "list", "--config=/x.conf", "-q", "-t", "3",
                      "--force", "k=v", "bare"])
    assert (inv.obj, inv.verb, inv.config, inv.quiet, inv.force, inv.tenant) == ("vm", "list", "/x.conf", True,
                                                                                 True, 3)
    assert inv.filters == [("name", "a*"), ("state", "running")]
    assert inv.args == [("k", "v"), ("bare", None)]


def test_values_keep_everything_after_the_first_equals_sign():
    inv = parse_argv(["config", "set", "l7r.options.x=a=b,c", "--filter", "ip=10.0.0.1"])
    assert inv.args == [("l7r.options.x", "a=b,c")] and inv.filters == [("ip", "10.0.0.1")]


@pytest.mark.parametrize("argv, message", [
    (["vm", "list", "-f"], "option -f needs a value"),
    (["vm", "list", "-f", "name"], "filter 'name' is not key=value"),
    (["vm", "list", "-t", "one"], "tenant must be a numeric id"),
    (["vm", "list", "--frobnicate"], "unknown option --frobnicate"),
])
def test_malformed_options_are_one_clear_error(argv, message):
    with pytest.raises(AdminError, match=message):
        parse_argv(argv)


def _checked(*argv):
    inv = parse_argv(list(argv))
    check_syntax(VERBS[(inv.obj, inv.verb)], inv)
    return inv


def test_bare_keys_where_the_reference_meant_them():
    assert _checked("config", "get", "vm.network.bridge").args == [("vm.network.bridge", None)]
    assert _checked("host", "propdel", "priority").args == [("priority", None)]
    assert _checked("user", "passwd", "guest").args == [("user", "guest")]


@pytest.mark.parametrize("argv, message", [
    (["host", "add", "name=x"], "parameter 'address' is mandatory"),
    (["vm", "add", "name=x", "user=u"], "either parameter 'osf' or 'osf_id' is mandatory"),
    (["host", "add", "name=x", "address=1.2.3.4", "colour=red"], "too many arguments: 'colour'"),
    (["host", "add", "name", "address=1.2.3.4"], "undefined value for key: 'name'"),
    (["config", "ssl", "key=a"], "parameter 'cert' is mandatory"),
])
def test_syntax_errors_name_the_key(argv, message):
    with pytest.raises(AdminError, match=message):
        _checked(*argv)


def test_wildcards_become_like_with_literal_metacharacters_escaped():
    assert like_pattern("al*") == "al%"
    assert like_pattern("a?c") == "a_c"
    assert like_pattern("50%_off*") == "50\\%\\_off%"
    assert like_pattern("back\\slash?") == "back\\\\slash_"


def test_filters_become_parameters_never_sql_text():
    sql, params = where_clause(VM, [("name", "x'); DROP TABLE vms;--"), ("user", "al*"), ("blocked", "0")], 1)
    assert "DROP" not in sql
    assert params == ["x'); DROP TABLE vms;--", "al%", False, 1]
    assert "users.login LIKE %s" in sql and "osfs.tenant_id = %s" in sql


def test_property_and_tag_filters_are_subqueries():
    sql, params = where_clause(DI, [("tag", "head"), ("property.os", "linux*")], None)
    assert "di_tags" in sql and "di_properties" in sql and params == ["head", "os", "linux%"]


def test_hosts_ignore_the_tenant_and_reject_unknown_filter_keys():
    _, params = where_clause(HOST, [("id", "10000")], 7)
    assert params == [10000]
    with pytest.raises(AdminError, match="unknown filter key 'colour' for host"):
        where_clause(HOST, [("colour", "red")], None)
    with pytest.raises(AdminError, match="not a number"):
        where_clause(HOST, [("id", "ten")], None)


def test_storage_sizes():
    assert parse_size("2048") == 2048
    assert parse_size("2k") == 2048
    assert parse_size("1g") == 1073741824
    assert parse_size("") is None
    with pytest.raises(AdminError, match="malformed size"):
        parse_size("12x")
    with pytest.raises(AdminError, match="too large"):
        parse_size("4g")


def test_dates_are_local_time_turned_to_utc():
    now = datetime.datetime(2030, 5, 1, 10, 0, 0)
    local_to_utc = now.astimezone(datetime.UTC).replace(tzinfo=None) - now
    assert parse_when("now + 2 hours", now) == now + datetime.timedelta(hours=2) + local_to_utc
    assert parse_when("2030-06-01 12:30", now) == datetime.datetime(2030, 6, 1, 12, 30) + local_to_utc
    assert parse_when("09:00", now) == datetime.datetime(2030, 5, 2, 9, 0) + local_to_utc
    with pytest.raises(AdminError, match="invalid datetime specification 'next blue moon'"):
        parse_when("next blue moon", now)


def _cert(key, days=30, start=None):
    start = start or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def test_tls_pair_checks():
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    check_pair(_key_pem(key), _cert(key))
    with pytest.raises(AdminError, match="does not match"):
        check_pair(_key_pem(other), _cert(key))
    old = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    with pytest.raises(AdminError, match="expired on 2020-01-31"):
        check_pair(_key_pem(key), _cert(key, start=old))
    with pytest.raises(AdminError, match="not a PEM certificate"):
        check_pair(_key_pem(key), "hello")
    with pytest.raises(AdminError, match="not a PEM private key"):
        check_pair("hello", _cert(key))
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"pw")).decode()
    with pytest.raises(AdminError, match="encrypted"):
        check_pair(encrypted, _cert(key))
