"""qvd-admin config set / get / del / ssl against a real QVD-DB."""
import datetime

import gevent
import gevent.event
import pytest
from helpers.admin import Admin, self_signed

from qvd_gevent.db.listen import Listener


@pytest.fixture
def admin(node_conf, db):
    return Admin(node_conf, db)


def configs(db, tenant=-1):
    return dict(db.query("SELECT key, value FROM configs WHERE tenant_id = %s", (tenant,)))


def test_set_get_del_round_trip(admin, db):
    admin.ok("config", "set", "vm.network.ip.start=10.3.15.50", "vm.network.netmask=24", "l7r.port=9443",
             "vm.hypervisor=process")
    assert configs(db)["vm.network.ip.start"] == "10.3.15.50"
    assert admin.ok("config", "get", "l7r.port", "vm.network.netmask").out == "l7r.port=9443\nvm.network.netmask=24\n"
    admin.ok("config", "set", "l7r.port=9444")
    assert admin.ok("config", "get", "l7r.port").out == "l7r.port=9444\n"
    assert admin.ok("config", "del", "l7r.port", "not.there.key").out == "1 config entries deleted.\n"
    # back to the built-in default once the DB row is gone
    assert admin.ok("config", "get", "l7r.port").out == "l7r.port=8443\n"


def test_get_without_keys_lists_effective_values_but_no_internal_keys_or_passwords(admin):
    admin.ok("config", "set", "vm.network.bridge=qvdnet0")
    out = admin.ok("config", "get").out.splitlines()
    keys = [line.split("=", 1)[0] for line in out]
    assert keys == sorted(keys)
    assert "vm.network.bridge=qvdnet0" in out
    assert "l7r.port=8443" in out and "l7r.use_ssl=1" in out
    assert not any(line.startswith("internal.") for line in out)
    assert "database.password=********" in out
    assert "qvd test pass" not in "\n".join(out)


def test_free_form_families_are_accepted_and_typos_refused(admin, db):
    admin.ok("config", "set", "wat.admin.login=admin", "l7r.auth.plugin.ldap.host=ldap.example",
             "admin.ssh.opt.StrictHostKeyChecking=no", "vm.lxc.unionfs.type=unionfs-fuse")
    assert configs(db)["l7r.auth.plugin.ldap.host"] == "ldap.example"
    assert admin.ok("config", "get", "wat.admin.login").out == "wat.admin.login=admin\n"
    admin.fails("config", "set", "vm.network.ip.strat=10.0.0.1", contains="unknown configuration key vm.network.ip.strat")


def test_bad_config_set_changes_nothing(admin):
    admin.ok("config", "set", "vm.network.netmask=24")
    admin.fails("config", "set", "l7r.port=9443", "vm.network.netmask=33", contains="vm.network.netmask")
    admin.fails("config", "set", "vm.network.ip.start=10.3.15.300", contains="vm.network.ip.start")
    admin.fails("config", "set", "l7r.port=many", contains="l7r.port")
    admin.fails("config", "set", "l7r.use_ssl=perhaps", contains="l7r.use_ssl")
    admin.fails("config", "set", "vm.network.gateway=10.3.15", contains="vm.network.gateway")
    admin.fails("config", "set", "vm.hypervisor=vmware", contains="unknown hypervisor 'vmware'")
    admin.fails("config", "set", "database.host=elsewhere", contains="only from node.conf")
    admin.fails("config", "set", "nodename=other", contains="only from node.conf")
    for key in ("command.dhcpd=/bin/sh", "command.nft=/bin/sh", "path.storage.root=/tmp",
                "vm.network.netns.udhcpc=/bin/sh -c id", "path.l7r.ssl.key=/tmp/k"):
        admin.fails("config", "set", key, contains="only from node.conf")
    admin.fails("config", "set", "l7r.ssl.key=x", contains="config ssl")
    admin.fails("config", "set", contains="nothing to set")
    admin.fails("config", "set", "vm.network.bridge", contains="undefined value for key: 'vm.network.bridge'")
    # ip.start on the broadcast address of the /24 already set leaves no VM range
    admin.fails("config", "set", "vm.network.ip.start=10.3.15.255", contains="no VM range")
    admin.fails("config", "get", "no.such.key", contains="unknown configuration key no.such.key")
    admin.fails("config", "set", "-t", "999", "l7r.port=1", contains="tenant 999 does not exist")


def test_per_tenant_rows(admin, db):
    admin.ok("config", "set", "-t", "1", "l7r.auth.plugins=ldap")
    assert configs(db, 1) == {"l7r.auth.plugins": "ldap"}
    assert "l7r.auth.plugins" not in configs(db)
    assert admin.ok("config", "get", "l7r.auth.plugins", "-t", "1").out == "l7r.auth.plugins=ldap\n"


def test_del_all_needs_confirmation(admin, db):
    admin.ok("config", "set", "l7r.port=9443")
    before = configs(db)
    res = admin.ok("config", "del")  # stdin is not a terminal: treated as "no"
    assert "Are you sure you want to delete all configuration variables? [y/N]" in res.out
    assert configs(db) == before
    res = admin.ok("config", "del", stdin="n\n", tty=True)
    assert configs(db) == before
    res = admin.ok("config", "del", stdin="y\n", tty=True)
    assert res.out.endswith(f"{len(before)} config entries deleted.\n")
    assert configs(db) == {}
    admin.ok("config", "set", "l7r.port=9443")
    assert admin.ok("config", "del", "--force").out == "1 config entries deleted.\n"


def test_ssl_stores_checked_material_and_notifies(admin, db, tmp_path):
    listener = Listener(db).start()
    try:
        got = gevent.event.AsyncResult()
        listener.subscribe("qvd_config_changed", lambda channel, payload: got.set(payload))
        assert listener.wait_connected(10)
        gevent.sleep(0.2)
        key, cert = self_signed(tmp_path)
        _, ca = self_signed(tmp_path, cn="ca", name="ca")
        admin.ok("config", "ssl", f"key={key}", f"cert={cert}", f"ca={ca}")
        got.get(timeout=5)
    finally:
        listener.stop()
    rows = dict(db.query("SELECT key, value FROM ssl_configs"))
    assert rows["l7r.ssl.key"] == key.read_text() and rows["l7r.ssl.cert"] == cert.read_text()
    assert rows["l7r.ssl.ca"] == ca.read_text()
    # ca and crl omitted: their rows go, as the original does
    admin.ok("config", "ssl", f"key={key}", f"cert={cert}")
    assert sorted(dict(db.query("SELECT key, value FROM ssl_configs"))) == ["l7r.ssl.cert", "l7r.ssl.key"]
    assert "BEGIN" not in admin.ok("config", "get").out  # PEMs are never printed


def test_ssl_refuses_bad_material(admin, tmp_path):
    key, cert = self_signed(tmp_path)
    other_key, _ = self_signed(tmp_path, name="other")
    expired_key, expired_cert = self_signed(tmp_path, name="old", days=1,
                                            not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
    missing = tmp_path / "nope.pem"
    admin.fails("config", "ssl", f"key={missing}", f"cert={cert}", contains=f"{missing}: Unable to read key file")
    admin.fails("config", "ssl", f"key={key}", f"cert={missing}", contains=f"{missing}: Unable to read cert file")
    admin.fails("config", "ssl", f"key={other_key}", f"cert={cert}", contains="does not match the certificate")
    admin.fails("config", "ssl", f"key={expired_key}", f"cert={expired_cert}", contains="expired on 2020-01-02")
    admin.fails("config", "ssl", f"key={key}", f"cert={cert}", f"crl={cert}", contains="not a PEM certificate revocation list")
    admin.fails("config", "ssl", f"key={key}", contains="parameter 'cert' is mandatory")
    admin.fails("config", "ssl", f"key={key}", f"cert={cert}", "pass=x", contains="too many arguments: 'pass'")
