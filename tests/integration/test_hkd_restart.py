"""A node killed with SIGKILL and restarted reconciles with what really runs: no orphans."""
import os
import signal

import pytest
from helpers.hkd_env import (
    add_host,
    add_vms,
    fast_hkd_settings,
    pid_alive,
    start_vm,
    stop_vm,
    vm_row,
    vma_of,
    wait_vm_state,
    write_conf,
)
from helpers.nodes import HkdProcess, start_node, wait_for

from qvd_gevent.config import Config
from qvd_gevent.db import Database


@pytest.mark.timeout(120)
def test_sigkill_and_restart_adopts_cleans_and_kills(tmp_path, pg_server, fresh_db_name):
    settings = fast_hkd_settings(tmp_path)
    conf = write_conf(tmp_path / "node.conf", pg_server, fresh_db_name, settings)
    db = Database.from_config(Config.load(str(conf)))
    node = HkdProcess(conf, tmp_path / "hkd.log")
    pids = []
    try:
        host_id = add_host(db)
        keep, crash, released = add_vms(db, count=3)
        node.start()
        for vm_id in (keep, crash, released):
            start_vm(db, vm_id, host_id)
        rows = {vm_id: wait_vm_state(db, vm_id, "running") for vm_id in (keep, crash, released)}
        pids = [r["vm_pid"] for r in rows.values()]

        node.kill9()
        assert all(pid_alive(p) for p in pids), "VMs must survive the node's death"
        os.kill(rows[crash]["vm_pid"], signal.SIGKILL)          # died while the node was down
        db.execute("UPDATE vm_runtimes SET host_id = NULL, vm_state = 'stopped' WHERE vm_id = %s", (released,))

        node.start()
        assert db.query_one("SELECT state FROM host_runtimes WHERE host_id = %s", (host_id,))[0] == "running"
        # adopted: same process, row untouched, still monitored
        row = vm_row(db, keep)
        assert row["vm_state"] == "running" and row["vm_pid"] == rows[keep]["vm_pid"] and row["host_id"] == host_id
        assert pid_alive(row["vm_pid"]) and vma_of(db, keep, row["vm_address"]).ping()
        # the restarted node pings the adopted VM with the key it was started with (from the database)
        vm_log = os.path.join(str(settings["path.run"]), "process-vms", f"vm-{keep}.log")
        pings = open(vm_log).read().count("GET /vma/ping")
        wait_for(lambda: open(vm_log).read().count("GET /vma/ping") > pings + 1, 10, what="pings after adoption")
        assert "refused" not in open(vm_log).read()
        # the VM that died meanwhile: row cleaned
        row = vm_row(db, crash)
        assert row["vm_state"] == "stopped" and row["host_id"] is None and row["vm_address"] is None
        # the VM the database no longer gives us: killed
        wait_for(lambda: not pid_alive(rows[released]["vm_pid"]), 10, what="released VM killed")

        # the adopted VM still obeys commands (exit watched through a pidfd: not our child)
        stop_vm(db, keep)
        wait_vm_state(db, keep, "stopped", timeout=15)
        wait_for(lambda: not pid_alive(rows[keep]["vm_pid"]), 5, what="adopted VM gone")

        assert node.terminate() == 0
        assert db.query_one("SELECT state FROM host_runtimes WHERE host_id = %s", (host_id,))[0] == "stopped"
    finally:
        node.cleanup()
        for pid in pids:
            if pid_alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
        db.close()


@pytest.mark.timeout(60)
def test_sigterm_stops_running_vms_gracefully(tmp_path, pg_server, fresh_db_name):
    conf = write_conf(tmp_path / "node.conf", pg_server, fresh_db_name, fast_hkd_settings(tmp_path))
    db = Database.from_config(Config.load(str(conf)))
    node = HkdProcess(conf, tmp_path / "hkd.log")
    try:
        host_id = add_host(db)
        vm_ids = add_vms(db, count=2)
        node.start()
        for vm_id in vm_ids:
            start_vm(db, vm_id, host_id)
        rows = [wait_vm_state(db, vm_id, "running") for vm_id in vm_ids]
        assert node.terminate() == 0
        for vm_id, row in zip(vm_ids, rows):
            assert vm_row(db, vm_id)["vm_state"] == "stopped"
            assert not pid_alive(row["vm_pid"])
        assert db.query_one("SELECT state FROM host_runtimes WHERE host_id = %s", (host_id,))[0] == "stopped"
        assert "VMA poweroff sent" in (tmp_path / "hkd.log").read_text()
    finally:
        node.cleanup()
        db.close()


@pytest.mark.timeout(120)
def test_dead_node_is_marked_lost_its_vm_runs_elsewhere_and_its_orphan_dies_on_restart(tmp_path, pg_server,
                                                                                       fresh_db_name):
    from qvd_gevent.node.run import HKD

    from helpers.hkd_env import NODE
    timing = {"internal.hkd.cluster.node.timeout": 4, "internal.hkd.agent.ticker.timeout": 3,
              "internal.hkd.fence.kill_time": 1}
    conf_one = write_conf(tmp_path / "one.conf", pg_server, fresh_db_name,
                          fast_hkd_settings(tmp_path, f"{NODE}-one", **timing))
    conf_two = write_conf(tmp_path / "two.conf", pg_server, fresh_db_name,
                          fast_hkd_settings(tmp_path, f"{NODE}-two", **timing))
    db = Database.from_config(Config.load(str(conf_two)))
    one = HkdProcess(conf_one, tmp_path / "one.log")
    node_two = None
    orphan = None
    try:
        host_one = add_host(db, f"{NODE}-one", "127.0.0.1")
        host_two = add_host(db, f"{NODE}-two", "127.0.0.2")
        (vm_id,) = add_vms(db)
        one.start()
        start_vm(db, vm_id, host_one)
        orphan = wait_vm_state(db, vm_id, "running")["vm_pid"]
        one.kill9()                                     # node one dies; its VM process lives on

        node_two = start_node(conf_two, parts={HKD})
        wait_for(lambda: db.query_one("SELECT state FROM host_runtimes WHERE host_id = %s", (host_one,))[0] == "lost",
                 15, what="node one lost")
        row = wait_vm_state(db, vm_id, "stopped", timeout=10)
        assert row["host_id"] is None
        start_vm(db, vm_id, host_two)                   # the next connect places it on node two
        row = wait_vm_state(db, vm_id, "running")
        assert row["host_id"] == host_two and row["vm_pid"] != orphan
        assert vma_of(db, vm_id, row["vm_address"]).ping()

        one.start()                                     # node one comes back: the orphan must go
        wait_for(lambda: not pid_alive(orphan), 10, what="orphan VM of the lost node killed")
        assert db.query_one("SELECT state FROM host_runtimes WHERE host_id = %s", (host_one,))[0] == "running"
        assert vm_row(db, vm_id)["host_id"] == host_two and pid_alive(row["vm_pid"])
        assert one.terminate() == 0
    finally:
        if node_two is not None:
            node_two.stop(0)
        one.cleanup()
        if orphan and pid_alive(orphan):
            os.killpg(orphan, signal.SIGKILL)
        db.close()
