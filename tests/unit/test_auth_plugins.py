"""The authentication plugins' pure parts: escaping of hostile logins, host parsing, the
RACF rule, RFC 6238 codes, the chain's configuration, and what reaches a VM."""
import base64
import re

import pyotp
import pytest

from qvd_gevent.config import Config, ConfigError
from qvd_gevent.l7r.auth_plugins import AuthUnavailable, PluginChain
from qvd_gevent.l7r.auth_plugins.ldap import LdapSettings, dn_value, filter_value, parse_host, racf_allows
from qvd_gevent.l7r.auth_plugins.totp import TotpSettings, matching_step
from qvd_gevent.l7r.vma_params import merge_vma_params

HOSTILE = ["*", "ali*", "alice)(uid=*", "*)(|(uid=*", "alice\\00", "alice\x00", ",cn=admin",
           "x,cn=admin,dc=example,dc=org", "cn=admin+uid=x", '"quoted"', "#hash", " lead", "trail ", "<a>;b="]


@pytest.mark.parametrize("login", HOSTILE)
def test_filter_value_leaves_no_filter_syntax(login):
    escaped = filter_value(login)
    # every *, (, ), NUL and backslash of the login is now a \XX escape
    assert not re.search(r"[*()\x00]", escaped)
    assert re.fullmatch(r"(?:[^\\]|\\[0-9a-fA-F]{2})*", escaped)
    assert (f"(uid={escaped})").count("(") == 1


@pytest.mark.parametrize("login", HOSTILE)
def test_dn_value_is_one_attribute_value(login):
    escaped = dn_value(login)
    # no unescaped separator or '=' can end the value and start another RDN
    unescaped = re.sub(r"\\.", "", escaped, flags=re.S)
    assert not re.search(r"[,+=;<>\"]", unescaped)
    assert not unescaped.startswith((" ", "#")) and not unescaped.endswith(" ")


def test_filter_and_dn_escapes_of_the_classic_attacks():
    assert filter_value("*") == "\\2a"
    assert filter_value(")(uid=*") == "\\29\\28uid=\\2a"
    assert filter_value("\\00") == "\\5c00"
    assert dn_value(",cn=admin") == "\\,cn\\=admin"


@pytest.mark.parametrize("text,expected", [
    ("ds.example.com", ("ds.example.com", 389, False)),
    ("ds.example.com:1389", ("ds.example.com", 1389, False)),
    ("ldap://ds.example.com", ("ds.example.com", 389, False)),
    ("ldaps://ds.theqvd.com:1636", ("ds.theqvd.com", 1636, True)),
    ("ldaps://127.0.0.1", ("127.0.0.1", 636, True)),
    ("ldap://[::1]:3890", ("::1", 3890, False)),
])
def test_host_forms_the_original_accepts(text, expected):
    assert parse_host(text) == expected


@pytest.mark.parametrize("text", ["", "ldapi://%2fvar%2frun", "http://ds", "ds:notaport"])
def test_bad_hosts_are_one_clear_error(text):
    with pytest.raises(ConfigError, match="auth.ldap.host"):
        parse_host(text)


def test_racf_rule():
    regex = re.compile("^R004109 ")
    assert racf_allows(regex, 49, "R004109 The password has expired (srv_authenticate_native_password))")
    assert not racf_allows(regex, 49, "R004111 The password is not correct.")
    assert not racf_allows(regex, 50, "R004109 The password has expired")
    assert not racf_allows(None, 49, "R004109 The password has expired")
    assert not racf_allows(regex, 49, "")


def test_ldap_settings_name_the_wrong_key():
    base = {"auth.ldap.host": "ds", "auth.ldap.base": "dc=x"}
    for key, value in (("auth.ldap.scope", "subtree"), ("auth.ldap.deref", "sometimes"),
                       ("auth.ldap.racf_allowregex", "(")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            LdapSettings(Config({**base, key: value}))
    with pytest.raises(ConfigError, match="auth.ldap.base"):
        LdapSettings(Config({"auth.ldap.host": "ds"}))
    settings = LdapSettings(Config({**base, "auth.ldap.normalize.name": "1"}))
    assert settings.normalize and settings.filter == "(uid=%u)"


RFC6238_SECRET = base64.b32encode(b"12345678901234567890").decode()   # RFC 6238 appendix B, SHA-1


@pytest.mark.parametrize("now,code", [(59, "94287082"), (1111111109, "07081804"), (1234567890, "89005924"),
                                      (2000000000, "69279037")])
def test_totp_matches_the_rfc_6238_vectors(now, code):
    settings = TotpSettings(Config({"l7r.auth.plugin.totp.token_size": "8"}))
    step = matching_step(RFC6238_SECRET, code, settings, now)
    assert step == now // 30


def test_totp_window_is_leeway_back_and_leeway_before_ahead():
    settings = TotpSettings(Config({}))
    hotp = pyotp.HOTP(RFC6238_SECRET)
    now = 30 * 1000 + 7
    assert matching_step(RFC6238_SECRET, hotp.at(1000), settings, now) == 1000
    assert matching_step(RFC6238_SECRET, hotp.at(999), settings, now) == 999        # leeway 1
    assert matching_step(RFC6238_SECRET, hotp.at(998), settings, now) is None       # too old
    assert matching_step(RFC6238_SECRET, hotp.at(1001), settings, now) is None      # leeway_before 0
    ahead = TotpSettings(Config({"l7r.auth.plugin.totp.leeway_before": "1", "l7r.auth.plugin.totp.t0": "30"}))
    assert matching_step(RFC6238_SECRET, hotp.at(1000), ahead, now) == 1000          # t0 shifts the steps
    with pytest.raises(ValueError):
        matching_step("not base32 !", "123456", settings, now)


def test_totp_properties_never_reach_the_vm():
    merged = merge_vma_params({"qvd.client.os": "linux"},
                              {"l7r.auth.plugin.totp.secret32": "JBSWY3DPEHPK3PXP",
                               "l7r.auth.plugin.totp.last_counter": "5", "custom.x": "1"},
                              {"qvd.vm.user.name": "carol", "qvd.vm.user.uid": "2003"}, "slave")
    assert merged == {"qvd.client.os": "linux", "custom.x": "1", "qvd.vm.user.name": "carol",
                      "qvd.vm.user.uid": "2003", "qvd.slave.key": "slave"}


class _Default:
    name = "default"

    def close(self):
        pass


@pytest.mark.parametrize("plugins,error", [
    ("TOPT", "not available"),                       # a misspelt second factor must not switch it off
    ("auto", "auth.auto.osf_id"),
    ("ldap", "auth.ldap.host"),
])
def test_unusable_chain_refuses_logins_with_503_and_says_why(plugins, error, caplog):
    chain = PluginChain(Config({"l7r.auth.plugins": plugins}), db=None, default_plugin=_Default())
    with pytest.raises(AuthUnavailable) as exc:
        chain.plugins()
    assert exc.value.status == 503 and "retry later" in exc.value.message
    assert error in caplog.text


def test_chain_order_and_names_ignore_case():
    cfg = Config({"l7r.auth.plugins.head": "totp", "l7r.auth.plugins": "LDAP", "auth.ldap.host": "ds",
                  "auth.ldap.base": "dc=x"})
    default = _Default()
    chain = PluginChain(cfg, db=None, default_plugin=default)
    assert [p.name for p in chain.plugins()] == ["TOTP", "ldap", "default"]
    ldap_before = chain.plugins()[1]
    cfg.set_db_overrides({"auth.ldap.filter": "(cn=%u)"})        # a live change rebuilds the chain
    assert chain.plugins()[1] is not ldap_before and chain.plugins()[1].settings.filter == "(cn=%u)"
    chain.close()
