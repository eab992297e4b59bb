"""netns VMs on a bridge inside a test namespace: DHCP lease from our dnsmasq, reachable, cleaned up.

Everything (bridge, 10.77.x addresses, dnsmasq, VM namespaces) lives in a namespace the test
made, with no route out; the driver runs inside it (helpers/netns.py).
"""
import pytest
from helpers.netns import processes_mentioning, run_driver, test_host, write_http_di  # noqa: F401

pytestmark = pytest.mark.root


def test_vm_gets_lease_answers_http_and_leaves_nothing(test_host, tmp_path):  # noqa: F811
    di = write_http_di(tmp_path, echo=True)
    result, _ = run_driver(test_host, tmp_path, """
        import socket
        from qvd_gevent.vma.client import VmaClient
        boot()
        h = start_vm(7, "10.77.0.107")
        status, body = wait_http(h.address)
        pinged = VmaClient(h.address, 3030, timeout=2).ping()
        for attempt in range(100):           # nc starts next to httpd; give it a moment
            try:
                s = socket.create_connection((h.address, 4100), timeout=5)
                break
            except ConnectionRefusedError:
                gevent.sleep(0.05)
        with s:
            s.sendall(b"hello vm\\n")
            echoed = s.recv(100).decode()
        running = hv.is_running(h)
        listed = {k: v.address for k, v in hv.list_running().items()}
        in_ns = sorted(pids_in_netns(h.name))
        hv.shutdown(h)
        exited = hv.wait_exit(h, timeout=10)
        hv.cleanup(h)
        hv.cleanup(h)                    # idempotent
        links = os.popen("ip -o link show").read()
        dns.remove_host(vm_spec(7, "10.77.0.107").mac)
        hosts_after = open(cfg.get_str("internal.vm.network.dhcp-hostsfile")).read()
        dns.stop()
        setup.remove()
        report(dict(address=h.address, pid=h.pid, name=h.name, status=status, body=body, running=running,
                    pinged=pinged, echoed=echoed,
                    listed=listed, in_ns=in_ns, exited=exited, links=links, hosts_after=hosts_after,
                    still_running=hv.is_running(h)))
    """, di=di)
    assert result["address"] == "10.77.0.107"
    assert result["name"] == f"{test_host.vm_prefix}-vm7"
    assert (result["status"], result["body"]) == (200, "1\n")
    assert result["pinged"] is True and result["echoed"] == "hello vm\n"
    assert result["running"] and result["listed"] == {"7": "10.77.0.107"}
    assert result["pid"] in result["in_ns"]
    assert result["exited"] and not result["still_running"]
    assert f"{test_host.vm_prefix}v7" not in result["links"]
    assert result["hosts_after"] == ""
    # nothing left: no VM namespace, no bridge, no process of ours
    assert test_host.vm_namespaces() == []
    assert "qvdbr0" not in test_host.links()
    assert processes_mentioning(str(tmp_path)) == []


def test_vm_is_unreachable_from_outside_the_test_namespace(test_host, tmp_path):  # noqa: F811
    """The safety rule itself: the VM address exists only inside the test namespace."""
    import subprocess
    di = write_http_di(tmp_path)
    result, _ = run_driver(test_host, tmp_path, """
        boot()
        h = start_vm(3, "10.77.0.103")
        wait_http(h.address)
        route = os.popen("ip netns exec %s ip -4 route show" % h.name).read()
        report(dict(address=h.address, route=route))
        # leave it running: the fixture must clean a crashed node's leftovers
    """, di=di)
    assert result["route"].startswith("default via 10.77.0.1 dev eth0")
    root_routes = subprocess.run(["ip", "-4", "route", "get", "10.77.0.103"], capture_output=True, text=True, check=False)
    assert "qvdbr0" not in root_routes.stdout


@pytest.mark.parametrize("mode", ["nsenter", "exec"])
def test_adopt_after_node_restart_then_kill(test_host, tmp_path, mode):  # noqa: F811
    """A node dies leaving its VM running; a new node process lists it, and kill+cleanup remove all.

    mode "exec": the node runs under ``ip netns exec`` (a private mount namespace), so the
    restarted node must re-attach the VM's namespace from its init.
    """
    di = write_http_di(tmp_path)
    first, _ = run_driver(test_host, tmp_path, """
        boot()
        h = start_vm(12, "10.77.0.112")
        wait_http(h.address)
        report(dict(pid=h.pid, address=h.address))
        os._exit(0)                      # a crash: no cleanup, dnsmasq orphaned
    """, di=di, mode=mode)
    second, _ = run_driver(test_host, tmp_path, """
        boot(network=False, dhcp=False)
        found = hv.list_running()
        h = found[12]
        status, _ = wait_http(h.address)
        hv.kill(h)
        exited = hv.wait_exit(h, timeout=10)
        leftovers_before = hv.list_leftovers()
        removed = hv.cleanup_leftovers()
        from qvd_gevent.hypervisors.netns import netns_dir_is_private
        report(dict(private=netns_dir_is_private(), removed=removed, ids=sorted(found), pid=h.pid, address=h.address, status=status, exited=exited,
                    leftovers_before=leftovers_before, leftovers_after=hv.list_leftovers(),
                    running=hv.list_running()))
    """, di=di, mode=mode)
    assert second["private"] == (mode == "exec")
    assert second["ids"] == [12]
    assert (second["pid"], second["address"]) == (first["pid"], first["address"])
    assert second["status"] == 200 and second["exited"]
    assert second["leftovers_before"] == second["removed"] == [f"{test_host.vm_prefix}-vm12"]
    assert second["leftovers_after"] == [] and second["running"] == {}
    assert test_host.vm_namespaces() == []


def test_start_without_lease_fails_cleanly(test_host, tmp_path):  # noqa: F811
    """No hosts entry -> no lease -> HypervisorError and nothing left of the half-made VM."""
    di = write_http_di(tmp_path)
    settings_extra = {"vm.network.netns.dhcp_timeout": "2"}
    from helpers.netns import node_settings
    result, _ = run_driver(test_host, tmp_path, """
        from qvd_gevent.hypervisors.base import HypervisorError
        boot()
        spec = vm_spec(5, "10.77.0.105")          # not registered with dnsmasq
        try:
            hv.start(spec)
            error = None
        except HypervisorError as exc:
            error = str(exc)
        links = os.popen("ip -o link show").read()
        dns.stop()
        setup.remove()
        report(dict(error=error, links=links))
    """, settings=node_settings(test_host, tmp_path, **settings_extra), di=di)
    assert result["error"] and "no DHCP lease" in result["error"]
    assert f"{test_host.vm_prefix}v5" not in result["links"]
    assert test_host.vm_namespaces() == []


def test_qvd_vm_init_vma_answers_ping_and_stops_on_sigterm(test_host, tmp_path):  # noqa: F811
    """The project's own init (qvd-vm-init: the VMA) as a netns VM's DI: VmaClient ping works."""
    import sysconfig
    from pathlib import Path
    init = Path(sysconfig.get_path("scripts")) / "qvd-vm-init"
    if not init.exists():
        pytest.skip(f"qvd-vm-init is not installed at {init} (pip install -e .)")
    result, _ = run_driver(test_host, tmp_path, """
        from qvd_gevent.vma.client import VmaClient
        boot()
        h = start_vm(21, "10.77.0.121")
        deadline = time.monotonic() + 20
        while True:
            try:
                pong = VmaClient(h.address, 3030, timeout=2).ping()
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise
                gevent.sleep(0.2)
        hv.shutdown(h)
        exited = hv.wait_exit(h, timeout=15)
        code = hv._children[21].returncode
        hv.cleanup(h)
        dns.stop()
        setup.remove()
        report(dict(pong=repr(pong), exited=exited, code=code))
    """, di=str(init))
    assert result["exited"] and result["code"] == 0
    assert test_host.vm_namespaces() == []


def test_static_address_when_dhcp_is_off(test_host, tmp_path):  # noqa: F811
    """vm.network.use_dhcp=0: no dnsmasq; the VM gets vms.ip directly and answers on it."""
    from helpers.netns import node_settings
    di = write_http_di(tmp_path)
    result, _ = run_driver(test_host, tmp_path, """
        boot(dhcp=False)
        h = hv.start(vm_spec(9, "10.77.0.109"))
        status, _ = wait_http(h.address)
        route = os.popen("ip netns exec %s ip -4 route show" % h.name).read()
        hv.kill(h); hv.cleanup(h)
        setup.remove()
        report(dict(address=h.address, status=status, route=route))
    """, settings=node_settings(test_host, tmp_path, **{"vm.network.use_dhcp": "0"}), di=di)
    assert result["address"] == "10.77.0.109" and result["status"] == 200
    assert "default via 10.77.0.1 dev eth0" in result["route"]
    assert test_host.vm_namespaces() == []


def test_vm_runs_as_its_own_uid_and_cannot_read_the_node_nor_other_vms(test_host, tmp_path):  # noqa: F811
    """Tried from inside a netns VM: node.conf (world-readable, as operators leave it), the L7R's
    key, the run folder, another VM's home and processes; seen from the node, every process
    of the VM runs as the VM's uid, in mount and pid namespaces of its own."""
    from helpers.netns import node_settings
    from helpers.vm_probe import DONE, probe_report, write_probe_di
    settings = node_settings(test_host, tmp_path)
    settings.pop("vm.environment.pass")          # nothing of the node's environment, not even that
    conf = tmp_path / "node.conf"
    conf.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()) + "database.password = canary\n")
    conf.chmod(0o644)
    key = tmp_path / "run" / "l7r" / "ssl" / "key.pem"
    key.parent.mkdir(parents=True)
    key.write_text("canary key\n")
    key.chmod(0o644)
    first_di = write_http_di(tmp_path)
    first_home = tmp_path / "run" / "vms" / "1"
    secret_of_first = first_home / "its-own-file"
    probe = write_probe_di(tmp_path, files=[conf, key, secret_of_first], folders=[tmp_path / "run", first_home, "/tmp"],
                           pids=["$NODE_PID", "$FIRST_PID"])
    result, _ = run_driver(test_host, tmp_path, f"""
        from helpers.vm_probe import process_uids
        from qvd_gevent.config import Config
        boot()
        cfg = Config.load({str(conf)!r})         # the node's file, so that the sandbox hides it
        hv = NetnsHypervisor(cfg)
        hv.check()
        first = start_vm(1, "10.77.0.101", {first_di!r})
        wait_http(first.address)
        with open({str(secret_of_first)!r}, "w") as fh:
            fh.write("the first VM's\\n")
        os.chmod({str(secret_of_first)!r}, 0o644)
        text = open({probe!r}).read().replace("$NODE_PID", str(os.getpid())).replace("$FIRST_PID", str(first.pid))
        open({probe!r}, "w").write(text)
        second = start_vm(2, "10.77.0.102", {probe!r})
        log_path = os.path.join(hv.state_dir, second.name + ".log")
        deadline = time.monotonic() + 20
        while {DONE!r} not in open(log_path).read() and time.monotonic() < deadline:
            gevent.sleep(0.1)
        vm_processes = [pid for pid in pids_in_netns(second.name) if pid != second.pid]
        uids = sorted({{process_uids(pid) for pid in vm_processes}})
        home = os.stat(hv.sandbox.home_for(2))
        for h in (first, second):
            hv.kill(h)
            hv.wait_exit(h, timeout=10)
            hv.cleanup(h)
        dns.stop()
        setup.remove()
        report(dict(log=open(log_path).read() if os.path.exists(log_path) else "", uids=uids,
                    node_pid=os.getpid(), first_pid=first.pid, base=cfg.get_int("vm.uid.base"),
                    home=[home.st_uid, home.st_gid, home.st_mode & 0o777],
                    homes_left=os.listdir(hv.sandbox.homes)))
    """)
    report = probe_report(result["log"])
    me = result["base"] + 2
    assert report["ME"] == [str(me)] * 3, result["log"]
    assert report["DENIED"] == {str(conf), str(key), str(secret_of_first)} and not report["READ"]
    assert report["LIST"][str(tmp_path / "run")] == ["vms"]
    assert report["LIST"][str(first_home)] == []
    assert sorted(report["LIST"]["/tmp"]) == [".ICE-unix", ".X11-unix", tmp_path.parts[2]]     # a private /tmp
    assert report["UNREACHED"] == {str(result["node_pid"]), str(result["first_pid"])} and not report["SIGNALLED"]
    assert int(report["PROCS"]) < 10                    # its own pid namespace (the machine runs hundreds)
    assert not {"QVD_TEST_SETTINGS", "PYTHONPATH", "QVD_TEST_DI"} & set(report["ENV"])
    assert result["uids"] == [[me] * 4]
    assert result["home"] == [me, me, 0o700] and result["homes_left"] == []
    assert test_host.vm_namespaces() == []
