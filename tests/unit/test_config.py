import pytest

from qvd_gevent.config import Config, ConfigError
from qvd_gevent.config.network import NetworkError, VmNetwork, mac_for_ip
from qvd_gevent.config.properties import parse_properties


def test_properties_syntax():
    text = "\n".join([
        "# comment", "! also a comment", "nodename = node1", "a.b:c", "spaced   value here",
        "long = one \\", "   two", "esc = tab\\there\\u0041", "empty =", "dup = 1", "dup = 2",
    ])
    values = parse_properties(text)
    assert values["nodename"] == "node1"
    assert values["a.b"] == "c"
    assert values["spaced"] == "value here"
    assert values["long"] == "one two"
    assert values["esc"] == "tab\thereA"
    assert values["empty"] == ""
    assert values["dup"] == "2"


def test_expansion_and_precedence(tmp_path):
    conf = tmp_path / "node.conf"
    conf.write_text("path.run = /srv/run\nl7r.port = 9443\nnodename = n1\ndatabase.name = fromfile\n")
    cfg = Config.load(str(conf))
    assert cfg.get("path.l7r.ssl.key") == "/srv/run/l7r/ssl/key.pem"
    assert cfg.get("l7r.port") == 9443
    assert cfg.get("l7r.use_ssl") is True
    cfg.set_db_overrides({"l7r.port": "10443", "database.name": "fromdb", "nodename": "x"})
    assert cfg.get("l7r.port") == 10443          # DB beats file
    assert cfg.get("database.name") == "fromfile"  # bootstrap keys only from the file
    assert cfg.get("nodename") == "n1"


def test_command_and_path_keys_in_the_database_are_ignored_with_a_warning(tmp_path, caplog):
    """Whoever can write the configs table must not choose what the node runs as root."""
    conf = tmp_path / "node.conf"
    conf.write_text("nodename = n1\ncommand.dhcpd = /usr/sbin/dnsmasq\n")
    cfg = Config.load(str(conf))
    with caplog.at_level("WARNING", logger="qvd.config"):
        cfg.set_db_overrides({"command.dhcpd": "/tmp/evil", "command.nxagent": "/tmp/evil",
                              "path.storage.root": "/tmp/evil", "path.l7r.ssl.key": "/tmp/evil",
                              "vm.network.netns.udhcpc": "/tmp/evil", "vma.poweroff.command": "/tmp/evil",
                              "l7r.port": "10443"})
    assert cfg.get("command.dhcpd") == "/usr/sbin/dnsmasq"
    assert cfg.get("command.nxagent") == "nxagent"
    assert cfg.get("path.storage.root") == "/var/lib/qvd/storage"
    assert "/tmp/evil" not in cfg.get("path.l7r.ssl.key")
    assert cfg.get("vm.network.netns.udhcpc") == "busybox udhcpc"
    assert cfg.get("vma.poweroff.command") == "poweroff"
    assert cfg.get("l7r.port") == 10443                     # other keys still come from the table
    warned = " ".join(r.getMessage() for r in caplog.records)
    for key in ("command.dhcpd", "path.storage.root", "vm.network.netns.udhcpc"):
        assert key in warned


def test_malformed_value_names_the_key(tmp_path):
    conf = tmp_path / "node.conf"
    conf.write_text("l7r.port = eighty\nvm.network.netmask = 255.0.255.0\n")
    cfg = Config.load(str(conf))
    with pytest.raises(ConfigError, match="l7r.port"):
        cfg.get("l7r.port")
    with pytest.raises(ConfigError, match="vm.network.netmask"):
        cfg.get("vm.network.netmask")


def test_unknown_key_and_missing_file(tmp_path):
    cfg = Config({})
    with pytest.raises(ConfigError, match="unknown configuration key no.such.key"):
        cfg.get("no.such.key")
    with pytest.raises(ConfigError, match="nodename"):
        cfg.get("nodename")
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(str(tmp_path / "missing.conf"))


def test_self_reference_is_an_error():
    cfg = Config({"path.run": "${path.run}/x"})
    with pytest.raises(ConfigError, match="refers to itself"):
        cfg.get("path.run")


def test_vm_network_ranges():
    net = VmNetwork("10.3.15.50", "24")
    assert net.is_node_address("10.3.15.1")
    assert not net.is_node_address("10.3.15.50")
    assert net.is_vm_address("10.3.15.50") and net.is_vm_address("10.3.15.254")
    assert not net.is_vm_address("10.3.15.255")
    assert net.free_vm_address([]) == "10.3.15.254"
    assert net.free_vm_address(["10.3.15.254"]) == "10.3.15.253"
    assert VmNetwork("10.3.15.50", "255.255.255.0").prefixlen == 24
    with pytest.raises(NetworkError):
        VmNetwork("10.3.15.50", "33")
    full = VmNetwork("10.3.15.253", "24")
    with pytest.raises(NetworkError, match="No free IP"):
        full.free_vm_address(["10.3.15.254", "10.3.15.253"])


def test_mac_from_ip():
    assert mac_for_ip("10.0.1.100") == "54:52:00:00:01:64"
    assert mac_for_ip("10.3.15.254", "AA:BB:CC") == "aa:bb:cc:03:0f:fe"
