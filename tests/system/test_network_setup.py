"""check_network and NetworkSetup inside a test namespace (iptables and sysctls are per namespace)."""
import textwrap

import pytest
from helpers.netns import node_settings, run_driver, test_host  # noqa: F401

pytestmark = pytest.mark.root

STATE = """
def state():
    return dict(iptables=os.popen("iptables-save -t nat").read(),
                links=os.popen("ip -o link show").read(),
                addrs=os.popen("ip -o -4 addr show").read(),
                forward=open("/proc/sys/net/ipv4/ip_forward").read().strip())

def rules(text):
    return sorted(l for l in text.splitlines() if l.startswith("-A"))
"""


def test_apply_then_remove_restores_exactly(test_host, tmp_path):  # noqa: F811
    settings = node_settings(test_host, tmp_path, **{"vm.network.nat.public_address": "192.0.2.10",
                                                     "vm.network.firewall.nat.iface": "lo"})
    result, _ = run_driver(test_host, tmp_path, STATE + textwrap.dedent("""
        before = state()
        warnings_before = check_network(cfg)
        s = NetworkSetup(cfg)
        changes = s.apply()
        during = state()
        warnings_during = check_network(cfg)
        s.remove()
        after = state()
        report(dict(before=before, during=during, after=after, changes=[list(map(str, c)) for c in changes],
                    rules_during=rules(during["iptables"]), rules_after=rules(after["iptables"]),
                    rules_before=rules(before["iptables"]),
                    warnings_before=warnings_before, warnings_during=warnings_during))
    """), settings=settings)
    assert result["rules_during"] == sorted([
        "-A POSTROUTING -o qvdbr0 -j SNAT --to-source 192.0.2.10",
        "-A PREROUTING -d 192.0.2.10/32 -p tcp -m tcp --dport 8443 -j DNAT --to-destination 10.77.0.1",
        "-A POSTROUTING -o lo -m iprange --src-range 10.77.0.100-10.77.255.254 -j MASQUERADE",
    ])
    assert "qvdbr0" in result["during"]["links"] and "10.77.0.1/16" in result["during"]["addrs"]
    assert result["during"]["forward"] == "1"
    assert result["warnings_during"] == []
    assert any("ip_forward" in w for w in result["warnings_before"])
    assert any("bridge qvdbr0 (vm.network.bridge) does not exist" in w for w in result["warnings_before"])
    # exactly back to where it was
    assert result["rules_after"] == result["rules_before"] == []
    assert result["after"]["links"] == result["before"]["links"]
    assert result["after"]["addrs"] == result["before"]["addrs"]
    assert result["after"]["forward"] == result["before"]["forward"] == "0"


def test_remove_leaves_what_was_there_before(test_host, tmp_path):  # noqa: F811
    """An existing bridge, a rule the operator added and forwarding already on are not touched."""
    settings = node_settings(test_host, tmp_path, **{"vm.network.nat.public_address": "192.0.2.10"})
    result, _ = run_driver(test_host, tmp_path, STATE + textwrap.dedent("""
        os.system("ip link add qvdbr0 type bridge && ip link set qvdbr0 up")
        os.system("iptables -w -t nat -A POSTROUTING -o qvdbr0 -j SNAT --to-source 192.0.2.10")
        os.system("iptables -w -t nat -A POSTROUTING -o lo -j ACCEPT")      # someone else's rule
        open("/proc/sys/net/ipv4/ip_forward", "w").write("1")
        before = state()
        warnings_before = check_network(cfg)
        s = NetworkSetup(cfg)
        changes = s.apply()
        s.remove()
        after = state()
        report(dict(before=rules(before["iptables"]), after=rules(after["iptables"]),
                    kinds=[c[0] for c in changes], links_after=after["links"], addrs_after=after["addrs"],
                    forward_after=after["forward"], warnings_before=warnings_before))
    """), settings=settings)
    assert result["kinds"] == ["addr", "rule"]          # only the address and the DNAT rule were ours
    assert result["after"] == result["before"]
    assert "qvdbr0" in result["links_after"] and "10.77.0.1" not in result["addrs_after"]
    assert result["forward_after"] == "1"
    assert result["warnings_before"] == [
        "bridge qvdbr0 does not carry the gateway address 10.77.0.1/16 (vm.network.gateway; it has no IPv4 address)"]


def test_apply_refuses_a_non_bridge_and_undoes_partial_work(test_host, tmp_path):  # noqa: F811
    result, _ = run_driver(test_host, tmp_path, """
        from qvd_gevent.hkd.network import NetworkSetupError
        os.system("ip link add qvdbr0 type veth peer name qvdbr0p")
        s = NetworkSetup(cfg)
        try:
            s.apply()
            error = None
        except NetworkSetupError as exc:
            error = str(exc)
        report(dict(error=error, changes=s.changes, warnings=check_network(cfg),
                    forward=open("/proc/sys/net/ipv4/ip_forward").read().strip()))
    """)
    assert result["error"] == "interface qvdbr0 (vm.network.bridge) exists and is not a bridge"
    assert result["changes"] == [] and result["forward"] == "0"
    assert "interface qvdbr0 (vm.network.bridge) is not a bridge (kind veth)" in result["warnings"]
