"""The HKD finds the programs it will run before it changes the host (bridge, iptables,
dnsmasq): a missing dnsmasq is one line before any network set-up, not after it."""
from types import SimpleNamespace

import pytest

from qvd_gevent.config import Config
from qvd_gevent.hkd import host_machine as H
from qvd_gevent.hkd.errors import HkdConfigError
from qvd_gevent.hkd.startup import check_tools


def _check(bridge, **values):
    fake_hkd = SimpleNamespace(cfg=Config(values), hypervisor=SimpleNamespace(uses_bridge=bridge))
    check_tools(fake_hkd)


def test_tools_are_checked_before_the_network_is_touched():
    assert H.CHECKS.index("check_tools") < H.CHECKS.index("check_network")


def test_missing_dnsmasq_is_a_configuration_error_naming_the_key():
    with pytest.raises(HkdConfigError, match=r"dnsmasq executable 'no-such-dnsmasq' \(command.dhcpd\) not found"):
        _check(True, **{"command.dhcpd": "no-such-dnsmasq --flag"})
    _check(False, **{"command.dhcpd": "no-such-dnsmasq"})                     # process VMs: no DHCP
    _check(True, **{"command.dhcpd": "no-such-dnsmasq", "vm.network.use_dhcp": "0"})


def test_iptables_is_needed_only_for_the_nat_rule():
    nat = {"command.iptables": "no-such-iptables", "vm.network.setup": "1", "command.dhcpd": "sh"}
    _check(True, **nat)
    with pytest.raises(HkdConfigError, match="command.iptables"):
        _check(True, **nat, **{"vm.network.firewall.nat.iface": "eth0"})
