"""The supervised dnsmasq, inside a test namespace: restart after SIGKILL, hosts file, port checks."""
import pytest
from helpers.netns import run_driver, test_host, write_http_di  # noqa: F401

pytestmark = pytest.mark.root


def test_dnsmasq_killed_is_restarted_and_leases_still_work(test_host, tmp_path):  # noqa: F811
    di = write_http_di(tmp_path)
    result, _ = run_driver(test_host, tmp_path, """
        import signal
        boot()
        first = start_vm(1, "10.77.0.101")
        first_pid = dns.pid
        os.kill(first_pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while (dns.pid in (None, first_pid) or not dns.wait_started(0)) and time.monotonic() < deadline:
            gevent.sleep(0.05)
        second_pid = dns.pid
        # a VM registered after the restart still gets its lease, and the old one still answers
        second = start_vm(2, "10.77.0.102")
        status2, _ = wait_http(second.address)
        status1, _ = wait_http(first.address)
        restarts = dns.restarts
        for h in (first, second):
            hv.kill(h); hv.cleanup(h)
        dns.stop()
        stopped_pid = dns.pid
        alive = os.path.exists(f"/proc/{second_pid}") and open(f"/proc/{second_pid}/stat").read().split()[2] != "Z"
        setup.remove()
        report(dict(first_pid=first_pid, second_pid=second_pid, restarts=restarts, addr2=second.address,
                    status1=status1, status2=status2, stopped_pid=stopped_pid, alive=alive))
    """, di=di)
    assert result["second_pid"] not in (None, result["first_pid"])
    assert result["restarts"] == 1
    assert result["addr2"] == "10.77.0.102"
    assert result["status1"] == result["status2"] == 200
    assert result["stopped_pid"] is None and not result["alive"]


def test_hosts_file_sorted_atomic_and_reloaded(test_host, tmp_path):  # noqa: F811
    """add/remove rewrite the file (MAC order, temp + rename: new inode) and SIGHUP the same dnsmasq."""
    result, _ = run_driver(test_host, tmp_path, """
        boot()
        path = cfg.get_str("internal.vm.network.dhcp-hostsfile")
        pid = dns.pid
        inodes = [os.stat(path).st_ino]
        dns.add_host("54:52:00:4d:00:c8", "10.77.0.200")
        inodes.append(os.stat(path).st_ino)
        dns.add_host("54:52:00:4D:00:65", "10.77.0.101")      # upper case is normalised
        dns.add_host("54:52:00:4d:01:02", "10.77.1.2")
        text_three = open(path).read()
        dns.remove_host("54:52:00:4d:00:c8")
        text_two = open(path).read()
        # several greenlets at once: one coalesced write, every entry there
        gs = [gevent.spawn(dns.add_host, "54:52:00:4d:02:%02x" % i, "10.77.2.%d" % i) for i in range(1, 31)]
        gevent.joinall(gs, raise_error=True)
        many = open(path).read().splitlines()
        leftovers = [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".dhcp-hosts.")]
        gevent.sleep(0.3)
        same_pid = dns.pid == pid
        dns.stop()
        setup.remove()
        report(dict(inodes=inodes, text_three=text_three, text_two=text_two, many=many, leftovers=leftovers,
                    same_pid=same_pid, restarts=dns.restarts))
    """)
    assert result["inodes"][0] != result["inodes"][1]
    assert result["text_three"] == ("54:52:00:4d:00:65,10.77.0.101\n54:52:00:4d:00:c8,10.77.0.200\n"
                                    "54:52:00:4d:01:02,10.77.1.2\n")
    assert result["text_two"] == "54:52:00:4d:00:65,10.77.0.101\n54:52:00:4d:01:02,10.77.1.2\n"
    assert len(result["many"]) == 32 and result["many"] == sorted(result["many"])
    assert result["leftovers"] == []
    assert result["same_pid"] and result["restarts"] == 0


def test_check_dhcp_ports_sees_a_listener_on_udp_67(test_host, tmp_path):  # noqa: F811
    """A dummy 'system dnsmasq' on UDP 67 (inside the test namespace) makes the check refuse."""
    result, _ = run_driver(test_host, tmp_path, """
        import socket
        from qvd_gevent.hkd.dnsmasq import DnsmasqError
        before = None
        try:
            check_dhcp_ports(cfg)
        except DnsmasqError as exc:
            before = str(exc)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 67))
        try:
            check_dhcp_ports(cfg)
            error = None
        except DnsmasqError as exc:
            error = str(exc)
        s.close()
        # port 53 matters only when our dnsmasq serves DNS (vm.network.dns_server = gateway)
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.bind(("0.0.0.0", 53)); t.listen(1)
        check_dhcp_ports(cfg)                          # --port=0: not ours, no refusal
        cfg.file_values["vm.network.dns_server"] = cfg.get_str("vm.network.gateway")
        try:
            check_dhcp_ports(cfg)
            error53 = None
        except DnsmasqError as exc:
            error53 = str(exc)
        report(dict(before=before, error=error, error53=error53))
    """)
    assert result["before"] is None
    assert result["error"].startswith("UDP port 67 is already in use on 0.0.0.0")
    assert "\n" not in result["error"]
    assert result["error53"].startswith(("UDP port 53", "TCP port 53"))


def test_dnsmasq_serves_dns_when_asked(test_host, tmp_path):  # noqa: F811
    """vm.network.dns_server = gateway: dnsmasq runs with DNS on the bridge (the original's way)."""
    from helpers.netns import node_settings
    settings = node_settings(test_host, tmp_path, **{"vm.network.dns_server": "10.77.0.1",
                                                     "vm.network.domain": "qvd.test"})
    result, _ = run_driver(test_host, tmp_path, """
        boot()
        dns.add_host("54:52:00:4d:00:70", "10.77.0.112")
        cmdline = open(f"/proc/{dns.pid}/cmdline").read().split("\\0")
        from qvd_gevent.system.procfs import listening_sockets
        listening53 = sorted({(p, a) for p, a, port in listening_sockets() if port == 53})
        dns.stop()
        setup.remove()
        report(dict(cmdline=cmdline, listening53=listening53))
    """, settings=settings)
    assert "--port=0" not in result["cmdline"]
    assert "--domain=qvd.test" in result["cmdline"]
    assert ["udp", "10.77.0.1"] in result["listening53"]


def test_unprivileged_dnsmasq_rereads_a_world_readable_hosts_file(test_host, tmp_path):  # noqa: F811
    """The production layout: hosts file in a world-searchable folder, dnsmasq drops to its user
    and still reads the file after SIGHUP (a VM registered late gets its lease)."""
    import shutil
    from pathlib import Path

    from helpers.netns import node_settings
    folder = Path(f"/run/{test_host.name}")
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    try:
        settings = node_settings(test_host, tmp_path, **{"internal.vm.network.dhcp-hostsfile":
                                                         str(folder / "dhcp-hostsfile")})
        result, _ = run_driver(test_host, tmp_path, """
            boot()
            as_root = dns.run_as_root
            user = os.popen(f"ps -o user= -p {dns.pid}").read().strip()
            gevent.sleep(0.5)                       # dnsmasq runs; the VM is registered afterwards
            h = start_vm(4, "10.77.0.104")
            status, _ = wait_http(h.address)
            hv.kill(h); hv.cleanup(h)
            dns.stop(); setup.remove()
            report(dict(as_root=as_root, user=user, status=status, address=h.address))
        """, settings=settings, di=write_http_di(tmp_path))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert result["as_root"] is False and result["user"] != "root"
    assert result["address"] == "10.77.0.104" and result["status"] == 200
