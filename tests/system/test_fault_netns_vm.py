"""Process faults with the `netns` hypervisor (issue 7 item 5): a VM's processes killed
inside its namespace are noticed; the row goes to stopped, its DHCP entry and namespace are
removed; the next start brings it back with the same leased address.

The HKD runs in a test namespace (bridge, dnsmasq, 10.77.x, no route out) and reaches
PostgreSQL through the embedded server's unix socket.
"""
import os
import shutil
import signal
import sys
import time

import pytest
from helpers.hkd_env import add_host, add_vms, start_vm, vm_row, wait_vm_state
from helpers.nodes import wait_for
from helpers.netns import VM_NET, hkd_node_conf, pids_in, processes_mentioning, test_host, vma_status  # noqa: F401
from helpers.nodes import HkdProcess

from qvd_gevent.db import runtime

pytestmark = pytest.mark.root


def test_netns_vm_killed_is_noticed_and_cleaned(test_host, tmp_path, pg_server, fresh_db_name):  # noqa: F811
    if pg_server.embedded is None:
        print("SKIP: needs the embedded PostgreSQL (its unix socket reaches into the test namespace)", file=sys.stderr)
        pytest.skip("needs the embedded PostgreSQL (its unix socket reaches into the test namespace)")
    init = shutil.which("qvd-vm-init", path=os.path.dirname(sys.executable))
    if not init:
        print("SKIP: qvd-vm-init is not installed (pip install -e .)", file=sys.stderr)
        pytest.skip("qvd-vm-init is not installed (pip install -e .)")
    from qvd_gevent.config import Config
    from qvd_gevent.db import Database

    conf = hkd_node_conf(test_host, tmp_path, pg_server, fresh_db_name,
                         **{"internal.hkd.vmhandler.vma_monitor.delay.after.ok": 1})
    db = Database.from_config(Config.load(str(conf)))
    node = HkdProcess(conf, tmp_path / "hkd.log", host=test_host)
    try:
        host_id = add_host(db, "test-node", f"{VM_NET}.0.1")
        (vm_id,) = add_vms(db, di_path=init)
        address = f"{VM_NET}.0.152"
        db.execute("UPDATE vms SET ip = %s WHERE id = %s", (address, vm_id))
        node.start()

        start_vm(db, vm_id, host_id)
        wait_vm_state(db, vm_id, "running", timeout=40)
        (vm_ns,) = test_host.vm_namespaces()
        victims = pids_in(vm_ns)
        assert victims, f"no process in the VM namespace {vm_ns}"

        t0 = time.monotonic()
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        row = wait_for(lambda: vm_row(db, vm_id)["vm_state"] == "stopped" and vm_row(db, vm_id), 30,
                       what="the row stopped", interval=0.02)
        noticed = time.monotonic() - t0
        print(f"\nMEASURED: netns VM killed -> row stopped in {noticed:.2f} s")
        # the HKD sees its VM's processes exit; it does not wait for a VMA check to fail
        assert noticed < 0.5, f"the kill was noticed only after {noticed:.2f} s"
        assert row["host_id"] is None and row["vm_address"] is None
        wait_for(lambda: test_host.vm_namespaces() == [], 15, what="the VM namespace removed")
        assert address not in (tmp_path / "run" / "dhcp-hostsfile").read_text()
        assert node.proc.poll() is None, "the HKD died with its VM"

        # started again: same leased address, a new namespace
        start_vm(db, vm_id, host_id)
        row = wait_vm_state(db, vm_id, "running", timeout=40)
        assert row["vm_address"] == address
        assert vma_status(test_host.run, address, key=runtime.vm_agent_key(db, vm_id)) == 200

        assert node.terminate(60) == 0
        assert vm_row(db, vm_id)["vm_state"] == "stopped"
        assert test_host.vm_namespaces() == []
    finally:
        node.cleanup()
        db.close()
    assert processes_mentioning(str(tmp_path)) == []
