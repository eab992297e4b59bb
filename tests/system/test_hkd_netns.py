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
from helpers.netns import VM_NET, hkd_node_conf, in_netns, processes_mentioning, test_host, vma_status  # noqa: F401
from helpers.nodes import HkdProcess

from qvd_gevent.config.defaults import DEFAULTS
from qvd_gevent.db import runtime
from qvd_gevent.vma import display_gate

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
        # the VMA answers inside the namespace (the HKD only calls it running after a ping
        # with the key it made for this start), and only with that key
        key = runtime.vm_agent_key(db, vm_id)
        assert vma_status(test_host.run, f"{VM_NET}.0.150", key=key) == 200
        assert vma_status(test_host.run, f"{VM_NET}.0.150") == 401

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
        assert vma_status(test_host.run, f"{VM_NET}.0.151", key=runtime.vm_agent_key(db, vm_id)) == 200
        stop_vm(db, vm_id)
        wait_vm_state(db, vm_id, "stopped", timeout=30)
        assert test_host.vm_namespaces() == []
        assert node.terminate(30) == 0
    finally:
        node.cleanup()
        db.close()


def test_from_inside_one_netns_vm_the_other_vmas_answer_only_their_own_key(test_host, tmp_path, pg_server,  # noqa: F811
                                                                            fresh_db_name):
    """The agent key on its own, with the VM network filter off (were it on, VM B would not
    even be reachable from VM A): a desktop user of VM A who reaches VM B's VMA and display
    can neither drive the VMA nor get through the display without B's key of this start."""
    if pg_server.embedded is None:
        pytest.skip("needs the embedded PostgreSQL (its unix socket reaches into the test namespace)")
    init = shutil.which("qvd-vm-init", path=os.path.dirname(sys.executable))
    if not init:
        pytest.skip("qvd-vm-init is not installed (pip install -e .)")
    from qvd_gevent.config import Config
    from qvd_gevent.db import Database
    no_filter = {"internal.vm.network.firewall.enable": 0} if "internal.vm.network.firewall.enable" in DEFAULTS else {}
    conf = hkd_node_conf(test_host, tmp_path, pg_server, fresh_db_name, **no_filter)
    db = Database.from_config(Config.load(str(conf)))
    node = HkdProcess(conf, tmp_path / "hkd.log", host=test_host)
    try:
        host_id = add_host(db, "test-node", f"{VM_NET}.0.1")
        vm_a, vm_b = add_vms(db, count=2, di_path=init)
        address = {vm_a: f"{VM_NET}.0.160", vm_b: f"{VM_NET}.0.161"}
        for vm_id, ip in address.items():
            db.execute("UPDATE vms SET ip = %s WHERE id = %s", (ip, vm_id))
        node.start()
        for vm_id in (vm_a, vm_b):
            start_vm(db, vm_id, host_id)
        for vm_id in (vm_a, vm_b):
            wait_vm_state(db, vm_id, "running", timeout=40)
        key_a, key_b = runtime.vm_agent_key(db, vm_a), runtime.vm_agent_key(db, vm_b)
        assert key_a != key_b
        inside_a = in_netns(f"{test_host.vm_prefix}-vm{vm_a}")
        b = address[vm_b]
        for method in ("ping", "x_state", "x_start", "x_stop", "x_suspend", "poweroff", "expire"):
            assert vma_status(inside_a, b, method) == 401, method
            assert vma_status(inside_a, b, method, key=key_a) == 401, method       # A's own key opens only A
        assert vma_status(inside_a, b, "x_state", key=key_b) == 200                # B is reachable: the key decides
        assert vm_row(db, vm_b)["vm_state"] == "running"                          # the poweroff did nothing
        # B's display, armed by the node for B's session: A gets nothing through it, with
        # no key or a key of its own making; the armed connection still gets in afterwards
        armed = display_gate.new_key()
        assert vma_status(test_host.run, b, f"x_start?{display_gate.PARAM}={armed}", key=key_b) == 200
        probe = ("import socket, sys\ns = socket.create_connection((sys.argv[1], 4100), timeout=8)\n"
                 "s.sendall(sys.argv[2].encode() + b'\\n')\ntry:\n    print(repr(s.recv(100)))\n"
                 "except ConnectionResetError:\n    print(repr(b''))    # closed with our bytes unread\n")
        for opening in ("GET /" + "x" * 80, display_gate.preamble(display_gate.new_key()).decode().strip()):
            refused = inside_a([sys.executable, "-c", probe, b, opening])
            assert refused.returncode == 0 and refused.stdout.strip() == "b''", refused
        admitted = test_host.run([sys.executable, "-c", probe, b, display_gate.preamble(armed).decode().strip()])
        assert admitted.stdout.strip() == repr(display_gate.ACK), admitted
        log_b = (tmp_path / "run" / "netns" / f"{test_host.vm_prefix}-vm{vm_b}.log").read_text()
        assert log_b.count("refused GET /vma/") == 14 and log_b.count("display: refused a connection") == 2
        assert key_b not in log_b
        for vm_id in (vm_a, vm_b):
            stop_vm(db, vm_id)
        for vm_id in (vm_a, vm_b):
            wait_vm_state(db, vm_id, "stopped", timeout=30)
        assert node.terminate(30) == 0
    finally:
        node.cleanup()
        db.close()
