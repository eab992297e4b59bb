"""Pure parts of hkd/vm_filter.py: configuration + VMs -> nftables text (docs/hkd.md#firewall)."""
import logging
import xml.etree.ElementTree as ET

import pytest

from qvd_gevent.config import Config
from qvd_gevent.hkd import vm_filter as F
from qvd_gevent.hypervisors import get_hypervisor
from qvd_gevent.hypervisors.base import HypervisorError, VmSpec
from qvd_gevent.hypervisors.kvm import KvmDomainSettings, kvm_domain_xml
from qvd_gevent.hypervisors.lxc import lxc_domain_xml


def ruleset(**values):
    base = {"vm.network.ip.start": "10.3.15.50", "vm.network.netmask": "24", "vm.network.gateway": "10.3.15.1"}
    base.update(values)
    return F.bridge_ruleset(F.bridge_filter_settings(Config(base), "qvdv*"))


def chain(text, family, name):
    """The rule lines of one chain of the generated text."""
    table = text[text.index(f"table {family} qvd {{"):]
    body = table[table.index(f"\tchain {name} {{\n") + len(f"\tchain {name} {{\n"):]
    return [line.strip() for line in body[:body.index("\t}")].splitlines()]


def test_defaults_are_the_originals():
    cfg = Config({})
    assert cfg.get_bool("internal.vm.network.firewall.enable") is True
    assert cfg.get_bool("internal.vm.network.firewall.protect_host") is True
    assert cfg.get_bool("internal.vm.network.firewall.protect_vms") is True
    assert cfg.get_bool("internal.vm.network.firewall.allow_login_from_vm") is False
    assert cfg.get_str("command.nft") == "nft"


def test_default_rules_vms_reach_only_dhcp_on_the_node_and_not_each_other():
    text = ruleset()
    assert chain(text, "inet", "input") == ["type filter hook input priority filter; policy accept;",
                                            "ip saddr 10.3.15.50-10.3.15.254 jump vm_to_node"]
    assert chain(text, "inet", "vm_to_node") == ["ct state established,related accept",     # replies to the node
                                                 "udp dport 67 accept", "counter drop"]
    assert chain(text, "inet", "vm_through_node") == ["ct state established,related accept",
                                                      "ip daddr 10.3.15.1-10.3.15.49 counter drop",
                                                      "ip daddr 10.3.15.50-10.3.15.254 counter drop"]
    assert chain(text, "bridge", "prerouting")[1] == 'iifname "qvdv*" jump from_vm_port'
    assert chain(text, "bridge", "from_vm_port") == [
        "iifname . ether saddr != @vm_macs counter drop",
        "ether type arp iifname . arp saddr ether . arp saddr ip @vm_addresses accept",
        "ether type arp arp saddr ip 0.0.0.0 iifname . arp saddr ether @vm_macs accept",
        "ether type ip iifname . ether saddr . ip saddr @vm_addresses accept",
        "ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept",
        "counter drop"]
    bridged = chain(text, "bridge", "vm_port_bridged")
    assert 'oifname "qvdv*" counter drop' in bridged
    assert not any("8443" in line for line in text.splitlines())


def test_allow_login_from_vm_opens_the_l7r_port_of_the_node_range():
    text = ruleset(**{"internal.vm.network.firewall.allow_login_from_vm": 1, "l7r.port": 9443})
    assert chain(text, "inet", "vm_to_node")[2:] == ["ip daddr 10.3.15.1-10.3.15.49 tcp dport 9443 accept",
                                                     "ip daddr 10.3.15.1-10.3.15.49 icmp type echo-request accept",
                                                     "counter drop"]
    assert "ether type ip ip daddr 10.3.15.1-10.3.15.49 tcp dport 9443 accept" in chain(text, "bridge",
                                                                                          "vm_port_bridged")


def test_switches_off_remove_their_drops():
    text = ruleset(**{"internal.vm.network.firewall.protect_host": 0, "internal.vm.network.firewall.protect_vms": 0})
    assert chain(text, "inet", "vm_to_node") == ["ct state established,related accept", "udp dport 67 accept"]
    assert chain(text, "inet", "vm_through_node") == ["ct state established,related accept"]
    assert chain(text, "bridge", "vm_port_bridged") == ["ether type ip udp dport 67 counter drop"]
    # anti-spoofing does not depend on the switches
    assert chain(text, "bridge", "from_vm_port")[-1] == "counter drop"


def test_without_dhcp_a_vm_may_not_send_from_0_0_0_0_and_dns_only_when_dnsmasq_serves_it():
    text = ruleset(**{"vm.network.use_dhcp": 0})
    assert not any("0.0.0.0 udp" in line for line in chain(text, "bridge", "from_vm_port"))
    assert "udp dport 67 accept" not in chain(text, "inet", "vm_to_node")
    assert "udp dport 53 accept" in chain(ruleset(**{"vm.network.dns_server": "self"}), "inet", "vm_to_node")
    assert "udp dport 53 accept" not in chain(ruleset(), "inet", "vm_to_node")


def test_replace_script_deletes_leftovers_in_the_same_batch():
    script = F.replace_script(F.BridgeFilter.tables, "table inet qvd {\n}\n")
    assert script.splitlines()[:4] == ["table inet qvd", "delete table inet qvd", "table bridge qvd",
                                       "delete table bridge qvd"]
    assert F.delete_script(F.BridgeFilter.tables) == ("table inet qvd\ndelete table inet qvd\n"
                                                      "table bridge qvd\ndelete table bridge qvd\n")


def test_vm_elements_key_port_mac_and_address():
    assert F.vm_element_script("add", "qvdv42", "54:52:00:00:01:64", "10.0.1.100") == (
        'add element bridge qvd vm_macs { "qvdv42" . 54:52:00:00:01:64 }; '
        'add element bridge qvd vm_addresses { "qvdv42" . 54:52:00:00:01:64 . 10.0.1.100 }')
    assert F.vm_element_script("delete", "qvdv42", "54:52:00:00:01:64", "10.0.1.100").startswith("delete element")
    with pytest.raises(F.VmFilterError):
        F.vm_element_script("add", 'x" }; flush ruleset; #', "54:52:00:00:01:64", "10.0.1.100")
    with pytest.raises(F.VmFilterError):
        F.vm_element_script("add", "qvdv42", "54:52:00:00:01", "10.0.1.100")
    with pytest.raises(ValueError):
        F.vm_element_script("add", "qvdv42", "54:52:00:00:01:64", "10.0.1.100; flush ruleset")


def test_loopback_rule_lets_only_the_node_uid_open_vm_ports():
    text = F.loopback_ruleset("qvd_lo_1234abcd", "127.100.0.0/16", (4100, 3030), 0)
    assert ("ip daddr 127.100.0.0/16 tcp dport { 3030, 4100 } tcp flags & (syn | ack) == syn "
            "meta skuid != 0 counter reject with tcp reset") in text
    assert text.startswith("table inet qvd_lo_1234abcd {")
    assert F.loopback_table("/var/run/qvd") != F.loopback_table("/var/run/qvd2")
    assert F.loopback_table("/var/run/qvd").startswith("qvd_lo_")


def test_nft_error_is_one_line():
    out = ("/run/qvd/vm-filter.nft:17:1-16: Error: Could not process rule: Operation not supported\n"
           "table bridge qvd {\n^^^^^^^^^^^^^^^^\n")
    assert F.nft_error_line(out) == "Could not process rule: Operation not supported"
    assert F.nft_error_line("something else\n") == "something else"


def test_firewall_off_is_a_warning_and_no_filter(caplog):
    cfg = Config({"internal.vm.network.firewall.enable": 0, "vm.network.netns.prefix": "qvd"})
    with caplog.at_level(logging.WARNING, logger="qvd.hkd.vm_filter"):
        assert F.vm_filter_for(cfg, get_hypervisor("netns", cfg)) is None
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["internal.vm.network.firewall.enable is off"]


def test_bridge_port_names_come_from_the_vm_id():
    for name in ("netns", "kvm", "lxc"):
        hv = get_hypervisor(name, Config({"vm.network.netns.prefix": "qvd"}))
        assert hv.port_name(42) == "qvdv42" and hv.port_pattern() == "qvdv*"
    assert get_hypervisor("process", Config({"nodename": "n"})).port_name(42) is None
    with pytest.raises(HypervisorError, match="too long"):
        get_hypervisor("kvm", Config({"vm.network.netns.prefix": "abcdefgh"})).port_name(1234567)


def test_libvirt_domains_name_their_bridge_port():
    spec = VmSpec(vm_id=42, name="d", ip="10.0.1.100", mac="54:52:00:00:01:64", memory=256, di_id=1,
                  di_path="/i.qcow2", port="qvdv42")
    kvm = ET.fromstring(kvm_domain_xml(spec, KvmDomainSettings(disk_path="/i.qcow2")))
    lxc = ET.fromstring(lxc_domain_xml(spec, rootfs="/r", bridge="qvdnet"))
    assert kvm.find("devices/interface/target").get("dev") == "qvdv42"
    assert lxc.find("devices/interface/target").get("dev") == "qvdv42"
