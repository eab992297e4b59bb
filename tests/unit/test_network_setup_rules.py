"""Pure parts of hkd/network.py: the NAT rules of the seed and the check_network warnings."""
import pytest

from qvd_gevent.config import Config
from qvd_gevent.hkd.network import NetworkSetupError, nat_rules, network_warnings


def make_cfg(**values):
    base = {"vm.network.bridge": "qvdnet0", "vm.network.ip.start": "10.3.15.50", "vm.network.netmask": "24",
            "vm.network.gateway": "10.3.15.1"}
    base.update(values)
    return Config(base)


def test_no_public_address_no_iface_no_rules():
    assert nat_rules(make_cfg()) == []


def test_seed_mononode_rules_and_masquerade():
    rules = nat_rules(make_cfg(**{"vm.network.nat.public_address": "192.168.0.2",
                                  "vm.network.firewall.nat.iface": "eth0"}))
    assert rules == [
        ("nat", "POSTROUTING", ["-o", "qvdnet0", "-j", "SNAT", "--to-source", "192.168.0.2"]),
        ("nat", "PREROUTING", ["-d", "192.168.0.2", "-p", "tcp", "--dport", "8443", "-j", "DNAT",
                               "--to-destination", "10.3.15.1"]),
        ("nat", "POSTROUTING", ["-m", "iprange", "--src-range", "10.3.15.50-10.3.15.254", "-o", "eth0",
                                "-j", "MASQUERADE"]),
    ]


def test_dnat_follows_l7r_port_and_needs_gateway():
    rules = nat_rules(make_cfg(**{"vm.network.nat.public_address": "192.168.0.2", "l7r.port": "9443"}))
    assert "9443" in rules[1][2]
    with pytest.raises(NetworkSetupError, match="needs the gateway"):
        nat_rules(make_cfg(**{"vm.network.nat.public_address": "192.168.0.2", "vm.network.gateway": ""}))


def good_bridge(**over):
    link = {"index": 3, "kind": "bridge", "up": True, "addresses": [("10.3.15.1", 24)]}
    link.update(over)
    return link


def test_all_well_no_warnings():
    assert network_warnings(make_cfg(), "1\n", good_bridge()) == []


def test_each_warning_is_precise():
    cfg = make_cfg()
    assert network_warnings(cfg, "0\n", good_bridge()) == [
        ("net.ipv4.ip_forward is off: VMs cannot be reached through this node from other networks; "
         "set net.ipv4.ip_forward=1 in /etc/sysctl.conf (or vm.network.setup=1)")]
    assert network_warnings(cfg, "1", None) == [
        ("bridge qvdnet0 (vm.network.bridge) does not exist: create it as the QVD manual's "
         "'Configure a Network Bridge' says, or set vm.network.setup=1")]
    assert network_warnings(cfg, "1", good_bridge(up=False)) == ["bridge qvdnet0 is down"]
    assert network_warnings(cfg, "1", good_bridge(addresses=[("10.3.15.1", 16), ("10.9.9.9", 8)])) == [
        ("bridge qvdnet0 does not carry the gateway address 10.3.15.1/24 (vm.network.gateway; it has "
         "10.3.15.1/16, 10.9.9.9/8)")]
    assert network_warnings(cfg, "1", good_bridge(kind="veth")) == [
        "interface qvdnet0 (vm.network.bridge) is not a bridge (kind veth)"]
    assert network_warnings(make_cfg(**{"vm.network.gateway": "10.3.15.60"}), "1",
                            good_bridge(addresses=[("10.3.15.60", 24)])) == [
        "vm.network.gateway 10.3.15.60 is not in the node range 10.3.15.1-10.3.15.49 of 10.3.15.0/24"]
    assert network_warnings(make_cfg(**{"vm.network.gateway": ""}), "1", good_bridge()) == [
        "vm.network.gateway is empty: VMs get no router by DHCP"]
