"""The whole HKD with the `netns` hypervisor inside a test namespace (docs/testing.md#network-safety).

The node runs in a namespace the test made (bridge, 10.77.x addresses, dnsmasq, VM
namespaces all inside it, no route out); it reaches PostgreSQL through the embedded
server's unix socket, which crosses network namespaces. A VM is started the way the L7R
starts it (vm_cmd + NOTIFY), gets its address by DHCP from our dnsmasq, answers the VMA
ping, and is stopped with nothing left behind.
"""
import json
import os
import shutil
import sys

import pytest
from helpers.hkd_env import add_host, add_vms, start_vm, stop_vm, vm_row, wait_vm_state
from helpers.netns import VM_NET, hkd_node_conf, processes_mentioning, test_host  # noqa: F401
from helpers.nodes import HkdProcess

pytestmark = pytest.mark.root


def test_netns_vm_started_by_command_gets_dhcp_address_and_stops_clean(test_host, tmp_path, pg_server,  # noqa: F811
                                                                        fresh_db_name):
    if pg_server.embedded is None:
        pytest.skip("needs the embedded PostgreSQL (its unix socket reaches into the test namespace)")
    init = shutil.which("qvd-vm-init", path=os.path.dirname(sys.executable))
    if not init:
        pytest.skip("qvd-vm-init is not installed (pip install -e .)")
    from qvd_gevent.config import Config
    from qvd_gevent.db import Database

    conf = hkd_node_conf(test_host, tmp_path, pg_server, fresh_db_name,
                         **{"internal.hkd.stopping.vms.timeout": 10})
    db = Database.from_config(Config.load(str(conf)))
    node = HkdProcess(conf, tmp_path / "hkd.log", host=test_host)
    try:
        host_id = add_host(db, "test-node", f"{VM_NET}.0.1")      # the gateway address on the bridge
        (vm_id,) = add_vms(db, di_path=init)
        db.execute("UPDATE vms SET ip = %s WHERE id = %s", (f"{VM_NET}.0.150", vm_id))
        node.start()
        assert db.query_one("SELECT state FROM host_runtimes WHERE host_id = %s", (host_id,))[0] == "running"

        start_vm(db, vm_id, host_id)
        row = wait_vm_state(db, vm_id, "running", timeout=40)
        assert row["vm_address"] == f"{VM_NET}.0.150"          # leased from our dnsmasq
        hosts_file = (tmp_path / "run" / "dhcp-hostsfile").read_text()
        assert f"{VM_NET}.0.150" in hosts_file
        # the VMA answers inside the namespace (the HKD only calls it running after a ping)
        url = f"http://{VM_NET}.0.150:3030/vma/ping"
        ping = test_host.run([sys.executable, "-c", f"import urllib.request; urllib.request.urlopen({url!r}, timeout=3)"])
        assert ping.returncode == 0, ping.stderr

        stop_vm(db, vm_id)
        row = wait_vm_state(db, vm_id, "stopped", timeout=30)
        assert row["host_id"] is None and row["vm_address"] is None
        assert f"{VM_NET}.0.150" not in (tmp_path / "run" / "dhcp-hostsfile").read_text()
        assert test_host.vm_namespaces() == []
        assert node.terminate(60) == 0
        assert "qvdbr0" not in test_host.links()                # vm.network.setup removed what it made
        assert db.query_one("SELECT state FROM host_runtimes WHERE host_id = %s", (host_id,))[0] == "stopped"
        assert vm_row(db, vm_id)["vm_state"] == "stopped"
    finally:
        node.cleanup()
        db.close()
    assert processes_mentioning(json.dumps(str(tmp_path)).strip('"')) == []


def test_netns_node_killed_and_restarted_adopts_its_vm(test_host, tmp_path, pg_server, fresh_db_name):  # noqa: F811
    if pg_server.embedded is None:
        pytest.skip("needs the embedded PostgreSQL (its unix socket reaches into the test namespace)")
    init = shutil.which("qvd-vm-init", path=os.path.dirname(sys.executable))
    if not init:
        pytest.skip("qvd-vm-init is not installed (pip install -e .)")
    from qvd_gevent.config import Config
    from qvd_gevent.db import Database
    conf = hkd_node_conf(test_host, tmp_path, pg_server, fresh_db_name)
    db = Database.from_config(Config.load(str(conf)))
    node = HkdProcess(conf, tmp_path / "hkd.log", host=test_host)
    try:
        host_id = add_host(db, "test-node", f"{VM_NET}.0.1")
        (vm_id,) = add_vms(db, di_path=init)
        db.execute("UPDATE vms SET ip = %s WHERE id = %s", (f"{VM_NET}.0.151", vm_id))
        node.start()
        start_vm(db, vm_id, host_id)
        before = wait_vm_state(db, vm_id, "running", timeout=40)
        node.kill9()

        node.start()                                    # a crashed node's dnsmasq must not block this
        row = vm_row(db, vm_id)
        assert row["vm_state"] == "running" and row["vm_pid"] == before["vm_pid"]
        assert f"{VM_NET}.0.151" in (tmp_path / "run" / "dhcp-hostsfile").read_text()   # re-registered
        url = f"http://{VM_NET}.0.151:3030/vma/ping"
        ping = test_host.run([sys.executable, "-c", f"import urllib.request; urllib.request.urlopen({url!r}, timeout=3)"])
        assert ping.returncode == 0, ping.stderr
        stop_vm(db, vm_id)
        wait_vm_state(db, vm_id, "stopped", timeout=30)
        assert test_host.vm_namespaces() == []
        assert node.terminate(30) == 0
    finally:
        node.cleanup()
        db.close()
