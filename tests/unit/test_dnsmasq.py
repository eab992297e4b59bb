"""Pure parts of the dnsmasq supervisor: command line, hosts file, back-off, port checks."""
import os

import pytest

from qvd_gevent.config import Config
from qvd_gevent.hkd.dnsmasq import (
    MAX_RESTART_DELAY,
    DnsmasqError,
    _others_can_reach,
    check_dhcp_ports,
    dnsmasq_argv,
    hosts_file_text,
    next_delay,
)
from qvd_gevent.system.procfs import parse_proc_net


def make_cfg(**values):
    base = {"path.run": "/run/qvdt", "vm.network.bridge": "qvdnet0", "vm.network.ip.start": "10.3.15.50",
            "vm.network.netmask": "24", "vm.network.gateway": "10.3.15.1"}
    base.update(values)
    return Config(base)


def test_argv_is_qvds_command_line_plus_ours():
    argv = dnsmasq_argv(make_cfg())
    assert argv[:20] == [
        "dnsmasq", "-k", "--log-dhcp", "--bind-interfaces", "--interface", "qvdnet0", "--except-interface", "lo",
        "--dhcp-range", "interface:qvdnet0,10.3.15.50,static", "--dhcp-option", "option:router,10.3.15.1",
        "--dhcp-hostsfile", "/run/qvdt/dhcp-hostsfile", "-X", "50000", "--port=0", "--log-facility=-",
        "--pid-file=/run/qvdt/dnsmasq.pid", "--dhcp-leasefile=/run/qvdt/dnsmasq.leases"]
    assert argv[20:] == ["--conf-file=/dev/null"]


def test_argv_dns_modes_domain_and_extra():
    served = dnsmasq_argv(make_cfg(**{"vm.network.dns_server": "10.3.15.1", "vm.network.domain": "qvd.lan",
                                      "command.dhcpd.args.extra": "--dhcp-authoritative --log-async=5"}))
    assert "--port=0" not in served and "--domain=qvd.lan" in served
    assert served[-2:] == ["--dhcp-authoritative", "--log-async=5"]
    assert "--port=0" not in dnsmasq_argv(make_cfg(**{"vm.network.dns_server": "self"}))
    other = dnsmasq_argv(make_cfg(**{"vm.network.dns_server": "10.3.15.254"}))
    assert "--port=0" in other
    assert other[other.index("option:dns-server,10.3.15.254") - 1] == "--dhcp-option"
    assert dnsmasq_argv(make_cfg(), run_as_root=True)[-1] == "--user=root"


def test_hosts_file_sorted_by_mac():
    assert hosts_file_text({"54:52:00:0f:00:64": "10.3.15.100", "54:52:00:0f:00:33": "10.3.15.51"}) == (
        "54:52:00:0f:00:33,10.3.15.51\n54:52:00:0f:00:64,10.3.15.100\n")
    assert hosts_file_text({}) == ""


def test_back_off_doubles_up_to_sixty_seconds():
    delays, d = [], None
    for _ in range(9):
        d = next_delay(d, 2)
        delays.append(d)
    assert delays == [2, 4, 8, 16, 32, 60, 60, 60, 60]
    assert MAX_RESTART_DELAY == 60


PROC_UDP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1: 00000000:0043 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0
  2: 010F030A:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0
  3: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0
  4: 0100007F:A000 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0
"""
PROC_TCP6 = """\
  sl  local_address                         remote_address                        st
  0: 00000000000000000000000000000000:0035 00000000000000000000000000000000:0000 0A 0
  1: 0000000000000000FFFF00000100007F:0035 00000000000000000000000000000000:0000 0A 0
"""


def test_parse_proc_net():
    assert parse_proc_net(PROC_UDP, 4, "udp") == [("udp", "0.0.0.0", 67), ("udp", "10.3.15.1", 53),
                                                  ("udp", "127.0.0.1", 53)]
    assert parse_proc_net(PROC_TCP6, 6, "tcp") == [("tcp", "::", 53), ("tcp", "127.0.0.1", 53)]


def test_check_dhcp_ports_rules():
    cfg = make_cfg()
    check_dhcp_ports(cfg, listeners=[("udp", "127.0.0.1", 67), ("udp", "0.0.0.0", 68), ("tcp", "0.0.0.0", 53)])
    with pytest.raises(DnsmasqError, match=r"^UDP port 67 is already in use on 0.0.0.0 \(a system dnsmasq"):
        check_dhcp_ports(cfg, listeners=[("udp", "0.0.0.0", 67)])
    with pytest.raises(DnsmasqError, match="on 10.3.15.7"):
        check_dhcp_ports(cfg, listeners=[("udp", "10.3.15.7", 67)])
    with pytest.raises(DnsmasqError, match="on ::"):
        check_dhcp_ports(cfg, listeners=[("udp", "::", 67)])
    dns_cfg = make_cfg(**{"vm.network.dns_server": "10.3.15.1"})
    check_dhcp_ports(dns_cfg, listeners=[("udp", "127.0.0.53", 53)])       # systemd-resolved is fine
    with pytest.raises(DnsmasqError, match="^TCP port 53 is already in use on 10.3.15.1"):
        check_dhcp_ports(dns_cfg, listeners=[("tcp", "10.3.15.1", 53)])


def test_others_can_reach(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    assert not _others_can_reach(str(private / "hosts"))
    os.chmod(private, 0o755)
    expected = all(os.stat(p).st_mode & 0o001 for p in [str(tmp_path)] + [str(a) for a in tmp_path.parents])
    assert _others_can_reach(str(private / "hosts")) == bool(expected)
