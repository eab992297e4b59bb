"""A whole `qvd-node` (HKD + L7R, `netns` hypervisor, qvd-vm-init VMs) inside a test
namespace, killed with SIGKILL under a live session and restarted (issue 7 item 5):
the session row is released, the VM still running is adopted (same namespace, same
process), the VM that died meanwhile is cleaned (its namespace removed), and after a
graceful stop no VM namespace, process or `connected` row is left.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers.cluster import NodeProcess, make_cert, node_values, seed_host, seed_ssl, seed_users_and_vms
from helpers.nodes import wait_for
from helpers.netns import VM_NET, node_settings, pids_in, test_host  # noqa: F401

from qvd_gevent.config import Config
from qvd_gevent.db import Database

pytestmark = [pytest.mark.root, pytest.mark.slow]
CLIENT = [sys.executable, "-c", "from qvd_gevent.client.cli import main; main()"]


def _skip(reason):
    print(f"SKIP: {reason}", file=sys.stderr)
    pytest.skip(reason)


@pytest.mark.timeout(240)
def test_netns_node_sigkill_under_a_session_restart_adopts_and_cleans(test_host, tmp_path, pg_server,  # noqa: F811
                                                                      fresh_db_name):
    if pg_server.embedded is None:
        _skip("needs the embedded PostgreSQL (its unix socket reaches into the test namespace)")
    init = shutil.which("qvd-vm-init", path=os.path.dirname(sys.executable))
    if not init:
        _skip("qvd-vm-init is not installed (pip install -e .)")
    from helpers.database import TEST_ROLE, TEST_ROLE_PASSWORD
    values = node_values(tmp_path, "test-node", **{"l7r.port": 8443, "internal.l7r.timeout.vm_start": 60})
    for key in ("vm.process.address.base", "vm.network.use_dhcp", "internal.hkd.address_check.enabled"):
        values.pop(key)
    values.update(node_settings(test_host, tmp_path))
    values.update({
        "database.host": str(pg_server.embedded.directory), "database.port": pg_server.port,
        "database.name": fresh_db_name, "database.user": TEST_ROLE, "database.password": TEST_ROLE_PASSWORD,
        "internal.hkd.timeout.on_state.stopping.shutdown": 5,
        "internal.hkd.timeout.on_state.stopping.stop": 5,
    })
    conf = tmp_path / "node.conf"
    conf.write_text("".join(f"{k} = {v}\n" for k, v in values.items()))
    db = Database.from_config(Config.load(str(conf)))
    node = NodeProcess(conf, tmp_path / "node.log", wrap=test_host.argv)
    clients = []
    try:
        cert, key = make_cert(tmp_path / "ssl")
        seed_ssl(db, cert, key)
        host_id = seed_host(db, "test-node", f"{VM_NET}.0.1")
        keep, crash = seed_users_and_vms(db, [("frank", "frank pw")], vms_per_user=2, di_path=init)["frank"]
        for i, vm_id in enumerate((keep, crash)):
            db.execute("UPDATE vms SET ip = %s WHERE id = %s", (f"{VM_NET}.0.{160 + i}", vm_id))
        node.start()
        node.wait_running(timeout=90)

        def client(vm_id, script):
            return CLIENT + ["--host", "127.0.0.1", "--port", "8443", "--user", "frank", "--password", "frank pw",
                             "--ca", str(cert), "connect", "--vm", str(vm_id), "--exec", "sh", "-c", script]
        done = test_host.run(client(crash, "echo short; head -n 1 >&2"), timeout=120)
        assert done.returncode == 0 and done.stderr.rstrip().endswith("short"), done.stderr
        err = open(tmp_path / "long.err", "wb")  # noqa: SIM115 - closed in finally
        clients.append((test_host.popen(client(keep, "echo long; head -n 1 >&2; sleep 200"),
                                        stdout=subprocess.DEVNULL, stderr=err), err))
        wait_for(lambda: db.query_one("SELECT user_state FROM vm_runtimes WHERE vm_id = %s", (keep,))[0] == "connected",
                 90, what="the long session")
        spaces = {vm_id: f"{test_host.vm_prefix}-vm{vm_id}" for vm_id in (keep, crash)}
        assert sorted(test_host.vm_namespaces()) == sorted(spaces.values())
        keep_pids = sorted(pids_in(spaces[keep]))
        assert keep_pids

        node.kill9()
        assert db.query_one("SELECT user_state FROM vm_runtimes WHERE vm_id = %s", (keep,))[0] == "connected"
        for pid in pids_in(spaces[crash]):                        # dies while the node is down
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pids_in(spaces[crash]), 10, what="the crashed VM's processes gone")

        t0 = time.monotonic()
        node.start()
        node.wait_running(timeout=90)
        t_up = time.monotonic() - t0
        rows = dict((r[0], r[1:]) for r in db.query(
            "SELECT vm_id, vm_state, host_id, user_state, l7r_host_id FROM vm_runtimes"))
        assert rows[keep] == ("running", host_id, "disconnected", None), rows
        assert rows[crash] == ("stopped", None, "disconnected", None), rows
        wait_for(lambda: test_host.vm_namespaces() == [spaces[keep]], 20, what="the dead VM's namespace removed")
        assert sorted(pids_in(spaces[keep])) == keep_pids               # adopted, not restarted

        done = test_host.run(client(keep, "echo back; head -n 1 >&2"), timeout=120)
        assert done.returncode == 0 and done.stderr.rstrip().endswith("back"), done.stderr
        assert sorted(pids_in(spaces[keep])) == keep_pids
        print(f"\nMEASURED: netns node restarted after SIGKILL and running in {t_up:.1f} s")

        assert node.terminate(timeout=120) == 0
        assert test_host.vm_namespaces() == []
        assert db.query("SELECT vm_id FROM vm_runtimes WHERE vm_state <> 'stopped' OR user_state <> 'disconnected' "
                        "OR l7r_host_id IS NOT NULL") == []
        assert "Traceback" not in node.log_text()
    finally:
        for proc, err in clients:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            err.close()
        node.cleanup()
        db.close()
