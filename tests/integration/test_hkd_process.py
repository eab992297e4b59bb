"""The HKD against a real PostgreSQL with `process` VMs (tiny_vm.py as the DI)."""
import os
import signal

import gevent
import pytest
from helpers.hkd_env import (
    NODE,
    add_host,
    add_vms,
    fast_hkd_settings,
    pid_alive,
    proc_cmdline,
    proc_environ,
    start_vm,
    stop_vm,
    vm_row,
    vma_of,
    wait_vm_state,
    write_conf,
    write_di_script,
)
from helpers.nodes import wait_for

from qvd_gevent.config import Config
from qvd_gevent.db import Database
from qvd_gevent.db.listen import Listener
from qvd_gevent.db import runtime
from qvd_gevent.hkd import HKD, HkdError
from qvd_gevent.vma import display_gate
from qvd_gevent.vma.client import VmaClient, VmaError, open_display


class Node:
    """One HKD with its own Database and Listener, stopped at teardown."""

    def __init__(self, conf_path):
        self.cfg = Config.load(str(conf_path))
        self.db = Database.from_config(self.cfg)
        self.listener = Listener(self.db).start()
        self.listener.wait_connected(10)
        self.hkd = HKD(self.cfg, self.db, self.listener)

    def close(self):
        try:
            self.hkd.stop(timeout=5)
        finally:
            self.listener.stop()
            self.db.close()


@pytest.fixture
def make_node(tmp_path, pg_server, fresh_db_name):
    nodes = []

    def make(nodename=NODE, **extra):
        conf = write_conf(tmp_path / f"{nodename}.conf", pg_server, fresh_db_name,
                          fast_hkd_settings(tmp_path, nodename, **extra))
        node = Node(conf)
        nodes.append(node)
        return node
    yield make
    for node in nodes:
        node.close()


@pytest.fixture
def admin_db(tmp_path, pg_server, fresh_db_name):
    conf = write_conf(tmp_path / "admin.conf", pg_server, fresh_db_name, {"nodename": "admin"})
    db = Database.from_config(Config.load(str(conf)))
    yield db
    db.close()


def host_row(db, host_id):
    return db.query_one("SELECT state, usable_ram, usable_cpu, ok_ts, pid, cmd FROM host_runtimes WHERE host_id = %s",
                        (host_id,))


def echo_roundtrip(vma, address, port):
    """As the L7R reaches a VM's display: x_start arms a one-time key, the connection presents it."""
    display_key = display_gate.new_key()
    vma.x_start(**{display_gate.PARAM: display_key})
    with open_display(address, port, display_key, timeout=5) as sock:
        sock.sendall(b"hello\n")
        return sock.recv(100)


def test_start_refused_when_node_not_registered(make_node):
    node = make_node()
    with pytest.raises(HkdError, match="not registered in hosts"):
        node.hkd.start()


def test_start_refused_on_schema_version(make_node, admin_db):
    add_host(admin_db)
    admin_db.execute("UPDATE versions SET version = '4.2.0' WHERE component = 'schema'")
    node = make_node()
    with pytest.raises(HkdError, match="schema version is 4.2.0"):
        node.hkd.start()


def test_start_refused_when_address_not_local(make_node, admin_db):
    add_host(admin_db, address="192.0.2.77")
    node = make_node()
    with pytest.raises(HkdError, match="not an address of this machine"):
        node.hkd.start()
    assert host_row(admin_db, node.hkd.host_id)[0] == "stopped"


def test_host_lifecycle_and_vm_start_stop(make_node, admin_db):
    host_id = add_host(admin_db)
    (vm_id,) = add_vms(admin_db)
    node = make_node()
    node.hkd.start()
    state, ram, cpu, ok_ts, pid, _ = host_row(admin_db, host_id)
    assert (state, pid) == ("running", os.getpid())
    assert ram > 0 and cpu > 0 and ok_ts is not None

    start_vm(admin_db, vm_id, host_id)
    row = wait_vm_state(admin_db, vm_id, "running")
    assert row["vm_address"].startswith("127.") and row["vm_vma_port"] == 3030 and row["vm_x_port"] == 4100
    assert row["current_di_id"] is not None and pid_alive(row["vm_pid"])
    # the HKD's pings got through with the key it made for this start (tiny_vm answers 401 otherwise)
    key = runtime.vm_agent_key(admin_db, vm_id)
    assert len(key) >= 43 and proc_environ(row["vm_pid"])["QVD_VMA_SECRET"] == key
    assert key not in proc_cmdline(row["vm_pid"])
    with pytest.raises(VmaError, match="no agent key \\(401\\)"):
        VmaClient(row["vm_address"], 3030, timeout=2).ping()
    vma = vma_of(admin_db, vm_id, row["vm_address"])
    assert vma.ping()
    assert echo_roundtrip(vma, row["vm_address"], 4100) == b"hello\n"
    counters = admin_db.query_one("SELECT run_attempts, run_ok FROM vm_counters WHERE vm_id = %s", (vm_id,))
    assert counters == (1, 1)
    assert node.hkd.vms[vm_id].state == "running"

    stop_vm(admin_db, vm_id)
    row = wait_vm_state(admin_db, vm_id, "stopped")
    assert row["host_id"] is None and row["vm_address"] is None and row["vm_cmd"] is None
    assert runtime.vm_agent_key(admin_db, vm_id) is None       # forgotten with the row
    wait_for(lambda: not pid_alive(row["vm_pid"] or 0) and vm_id not in node.hkd.vms, 5, what="VM process gone")

    start_vm(admin_db, vm_id, host_id)                          # every start makes a new key
    wait_vm_state(admin_db, vm_id, "running")
    assert runtime.vm_agent_key(admin_db, vm_id) not in (None, key)

    node.hkd.stop()
    assert host_row(admin_db, host_id)[0] == "stopped"


def test_running_only_after_vma_answers(make_node, admin_db, tmp_path):
    host_id = add_host(admin_db)
    di = write_di_script(tmp_path / "mute-vm", {"TINY_VM_NO_VMA": "1"})
    (vm_id,) = add_vms(admin_db, di_path=di)
    node = make_node(**{"internal.hkd.vmhandler.vma.failed.max_count.on.starting": 3,
                        "internal.hkd.vmhandler.vma.failed.max_time.on.starting": 2})
    node.hkd.start()
    start_vm(admin_db, vm_id, host_id)
    wait_for(lambda: vm_row(admin_db, vm_id)["vm_pid"], 10, what="launch")
    pid = vm_row(admin_db, vm_id)["vm_pid"]
    gevent.sleep(1)
    assert vm_row(admin_db, vm_id)["vm_state"] == "starting"
    # the VMA never answers: after the limits the VM is stopped (internal.vm.debug.enable off)
    wait_vm_state(admin_db, vm_id, "stopped", timeout=20)
    assert not pid_alive(pid)


def test_dead_vma_goes_to_debugging_when_enabled(make_node, admin_db, tmp_path):
    host_id = add_host(admin_db)
    di = write_di_script(tmp_path / "mute-vm", {"TINY_VM_NO_VMA": "1"})
    (vm_id,) = add_vms(admin_db, di_path=di)
    node = make_node(**{"internal.hkd.vmhandler.vma.failed.max_count.on.starting": 3,
                        "internal.hkd.vmhandler.vma.failed.max_time.on.starting": 1,
                        "internal.vm.debug.enable": 1})
    node.hkd.start()
    start_vm(admin_db, vm_id, host_id)
    row = wait_vm_state(admin_db, vm_id, "debugging", timeout=15)
    assert pid_alive(row["vm_pid"])
    stop_vm(admin_db, vm_id)
    wait_vm_state(admin_db, vm_id, "stopped", timeout=15)
    assert not pid_alive(row["vm_pid"])


def test_crash_detected(make_node, admin_db):
    host_id = add_host(admin_db)
    (vm_id,) = add_vms(admin_db)
    node = make_node()
    node.hkd.start()
    start_vm(admin_db, vm_id, host_id)
    row = wait_vm_state(admin_db, vm_id, "running")
    os.kill(row["vm_pid"], signal.SIGKILL)
    row = wait_vm_state(admin_db, vm_id, "stopped", timeout=10)
    assert row["host_id"] is None
    wait_for(lambda: vm_id not in node.hkd.vms, 5, what="runner dropped")


def test_sigterm_ignored_vm_is_killed(make_node, admin_db, tmp_path):
    host_id = add_host(admin_db)
    di = write_di_script(tmp_path / "stubborn-vm", {"TINY_VM_IGNORE_TERM": "1"})
    (vm_id,) = add_vms(admin_db, di_path=di)
    node = make_node()
    node.hkd.start()
    start_vm(admin_db, vm_id, host_id)
    row = wait_vm_state(admin_db, vm_id, "running")
    # no VMA poweroff path: the HKD kill escalation (SIGTERM ignored -> SIGKILL) must end it
    node.hkd.vms[vm_id].send(__import__("qvd_gevent.hkd.vm_machine", fromlist=["HkdKill"]).HkdKill())
    wait_vm_state(admin_db, vm_id, "stopped", timeout=15)
    assert not pid_alive(row["vm_pid"])


def test_host_stop_command_stops_vms_and_host(make_node, admin_db):
    host_id = add_host(admin_db)
    vm_ids = add_vms(admin_db, count=2)
    node = make_node()
    node.hkd.start()
    for vm_id in vm_ids:
        start_vm(admin_db, vm_id, host_id)
    rows = [wait_vm_state(admin_db, vm_id, "running") for vm_id in vm_ids]

    def send_stop(cur):
        cur.execute("UPDATE host_runtimes SET cmd = 'stop' WHERE host_id = %s", (host_id,))
        cur.execute("SELECT pg_notify(%s, '')", (f"qvd_cmd_for_host{host_id}",))
    admin_db.transaction(send_stop)
    assert node.hkd.stopped.wait(20)
    assert host_row(admin_db, host_id)[0] == "stopped"
    assert host_row(admin_db, host_id)[5] is None
    for vm_id, row in zip(vm_ids, rows):
        assert vm_row(admin_db, vm_id)["vm_state"] == "stopped"
        assert not pid_alive(row["vm_pid"])


def test_start_resets_sessions_of_this_node(make_node, admin_db):
    host_id = add_host(admin_db)
    (vm_id,) = add_vms(admin_db)
    admin_db.execute("UPDATE vm_runtimes SET l7r_host_id = %s, l7r_pid = 4242, user_state = 'connected' "
                     "WHERE vm_id = %s", (host_id, vm_id))
    node = make_node()
    node.hkd.start()
    row = admin_db.query_one("SELECT user_state, l7r_host_id, l7r_pid FROM vm_runtimes WHERE vm_id = %s", (vm_id,))
    assert row == ("disconnected", None, None)


def test_lost_node_releases_vms_and_the_lost_node_kills_them(make_node, admin_db):
    host1 = add_host(admin_db, f"{NODE}-one", "127.0.0.1")
    host2 = add_host(admin_db, f"{NODE}-two", "127.0.0.2")
    (vm_id,) = add_vms(admin_db)
    timing = {"internal.hkd.cluster.node.timeout": 4, "internal.hkd.agent.ticker.timeout": 3,
              "internal.hkd.fence.kill_time": 1}
    one = make_node(f"{NODE}-one", **timing)
    one.hkd.start()
    start_vm(admin_db, vm_id, host1)
    old = wait_vm_state(admin_db, vm_id, "running")
    # node one freezes (its heartbeat stops) but its process and VM keep running: a partition
    for g in one.hkd.agents:
        g.kill()
    one.hkd.cluster.stop()
    two = make_node(f"{NODE}-two", **timing)
    two.hkd.start()
    wait_for(lambda: host_row(admin_db, host1)[0] == "lost", 15, what="node one lost")
    row = wait_vm_state(admin_db, vm_id, "stopped", timeout=10)
    assert row["host_id"] is None and row["vm_address"] is None
    # node one must not keep a VM the cluster gave away: its VM intake notices the row
    wait_for(lambda: not pid_alive(old["vm_pid"]), 15, what="old VM killed by the lost node")
    assert one.hkd.tick() is False and one.hkd.lost
    # the VM can now start on node two
    start_vm(admin_db, vm_id, host2)
    new = wait_vm_state(admin_db, vm_id, "running")
    assert new["host_id"] == host2 and pid_alive(new["vm_pid"])
    assert vma_of(admin_db, vm_id, new["vm_address"]).ping()


def test_vm_gauge_reports_states(make_node, admin_db):
    from qvd_gevent.common import metrics
    host_id = add_host(admin_db)
    (vm_id,) = add_vms(admin_db)
    node = make_node()
    node.hkd.start()
    start_vm(admin_db, vm_id, host_id)
    wait_vm_state(admin_db, vm_id, "running")
    assert metrics.get("qvd_hkd_vms", state="running") == 1


def test_expirations_soft_tells_vma_hard_stops(make_node, admin_db):
    host_id = add_host(admin_db)
    soft_vm, hard_vm = add_vms(admin_db, count=2)
    node = make_node(**{"internal.hkd.agent.expiration_monitor.delay": 1})
    node.hkd.start()
    for vm_id in (soft_vm, hard_vm):
        start_vm(admin_db, vm_id, host_id)
    soft_row = wait_vm_state(admin_db, soft_vm, "running")
    wait_vm_state(admin_db, hard_vm, "running")
    admin_db.execute("UPDATE vm_runtimes SET vm_expiration_soft = (now() AT TIME ZONE 'UTC') - interval '1 minute', "
                     "vm_expiration_hard = (now() AT TIME ZONE 'UTC') + interval '1 hour' WHERE vm_id = %s", (soft_vm,))
    admin_db.execute("UPDATE vm_runtimes SET vm_expiration_hard = (now() AT TIME ZONE 'UTC') - interval '1 minute' "
                     "WHERE vm_id = %s", (hard_vm,))
    row = wait_vm_state(admin_db, hard_vm, "stopped", timeout=15)
    assert row["host_id"] is None
    log_path = os.path.join(str(node.cfg.get_str("path.run")), "process-vms", f"vm-{soft_vm}.log")
    def expire_seen():
        with open(log_path) as fh:
            return "/vma/expire?vm.expiration.soft=" in fh.read()
    wait_for(expire_seen, 10, what="expire RPC at the VMA")
    assert vm_row(admin_db, soft_vm)["vm_state"] == "running" and pid_alive(soft_row["vm_pid"])


def test_vm_with_the_real_qvd_vm_init(make_node, admin_db):
    import shutil
    import sys
    init = os.path.join(os.path.dirname(sys.executable), "qvd-vm-init")
    if not os.access(init, os.X_OK):
        init = shutil.which("qvd-vm-init")
    if not init:
        pytest.skip("qvd-vm-init is not installed (pip install -e .)")
    host_id = add_host(admin_db)
    (vm_id,) = add_vms(admin_db, di_path=init)
    node = make_node()
    node.hkd.start()
    start_vm(admin_db, vm_id, host_id)
    row = wait_vm_state(admin_db, vm_id, "running", timeout=30)
    assert vma_of(admin_db, vm_id, row["vm_address"]).x_state() == "stopped"
    with pytest.raises(VmaError, match="no agent key \\(401\\)"):
        VmaClient(row["vm_address"], 3030, timeout=2).x_state()
    stop_vm(admin_db, vm_id)
    wait_vm_state(admin_db, vm_id, "stopped", timeout=20)
    wait_for(lambda: not pid_alive(row["vm_pid"]), 5, what="init gone")


def test_restart_right_after_stop_many_times(make_node, admin_db):
    """What an L7R does when a user reconnects at once: start as soon as the row says stopped."""
    host_id = add_host(admin_db)
    (vm_id,) = add_vms(admin_db)
    node = make_node()
    node.hkd.start()
    pids = set()
    for _ in range(3):
        start_vm(admin_db, vm_id, host_id)
        row = wait_vm_state(admin_db, vm_id, "running")
        pids.add(row["vm_pid"])
        stop_vm(admin_db, vm_id)
        wait_vm_state(admin_db, vm_id, "stopped")
    assert len(pids) == 3 and not any(pid_alive(p) for p in pids)
    assert admin_db.query_one("SELECT run_attempts, run_ok FROM vm_counters WHERE vm_id = %s", (vm_id,)) == (3, 3)


def test_node_stops_itself_when_its_heartbeat_fails_too_long(make_node, admin_db):
    """The ticker gives up after internal.hkd.agent.ticker.timeout, before others take over.

    docs/hkd.md#heartbeat, docs/hkd.md#fencing."""
    host_id = add_host(admin_db)
    (vm_id,) = add_vms(admin_db)
    node = make_node(**{"internal.hkd.agent.ticker.timeout": 2})
    node.hkd.start()
    start_vm(admin_db, vm_id, host_id)
    row = wait_vm_state(admin_db, vm_id, "running")
    admin_db.execute("ALTER TABLE host_runtimes RENAME TO host_runtimes_gone")   # every heartbeat now fails
    assert node.hkd.stopped.wait(30)
    assert not pid_alive(row["vm_pid"])        # its VMs were stopped, not left to run unwatched
    admin_db.execute("ALTER TABLE host_runtimes_gone RENAME TO host_runtimes")
    assert vm_row(admin_db, vm_id)["vm_state"] == "stopped"


def test_heavy_semaphore_follows_config_changes(make_node):
    node = make_node(**{"internal.hkd.max_heavy": 4})
    assert node.hkd.heavy.counter == 4
    node.cfg.set_db_overrides({"internal.hkd.max_heavy": "6"})
    node.hkd.on_config_changed(node.cfg)
    assert node.hkd.heavy.counter == 6
    node.cfg.set_db_overrides({"internal.hkd.max_heavy": "2"})
    node.hkd.on_config_changed(node.cfg)
    gevent.sleep(0.05)
    assert node.hkd.heavy.counter == 2


def test_start_refused_on_unknown_hypervisor(make_node, admin_db):
    add_host(admin_db)
    node = make_node(**{"vm.hypervisor": "vmware"})
    with pytest.raises(HkdError, match="vm.hypervisor 'vmware' is not in internal.hkd.hypervisor_list"):
        node.hkd.start()


def test_start_refused_when_the_vm_uid_range_holds_an_account(make_node, admin_db):
    """nobody (65534) is an account on every Debian machine: a range holding it is refused."""
    if os.geteuid() != 0:
        pytest.skip("VMs get uids of their own only under a node running as root (CI runs as root)")
    add_host(admin_db)
    node = make_node(**{"vm.uid.base": 65000, "vm.uid.count": 1000})
    with pytest.raises(HkdError) as refused:
        node.hkd.start()
    message = str(refused.value)
    assert "vm.uid.base 65000 .. 65999" in message and "nobody (65534)" in message and "\n" not in message
    assert host_row(admin_db, node.hkd.host_id)[0] == "stopped"


def test_second_hkd_with_the_same_run_dir_is_refused(make_node, admin_db):
    add_host(admin_db)
    first = make_node()
    first.hkd.start()
    second = Node(first.cfg.path)
    try:
        with pytest.raises(HkdError, match="another HKD holds"):
            second.hkd.start()
    finally:
        second.close()
    assert host_row(admin_db, first.hkd.host_id)[0] == "running"


def test_stop_of_a_vm_queued_for_the_heavy_semaphore_is_immediate(make_node, admin_db, tmp_path):
    host_id = add_host(admin_db)
    mute = write_di_script(tmp_path / "mute-vm", {"TINY_VM_NO_VMA": "1"})
    (slow,) = add_vms(admin_db, di_path=mute)
    (queued,) = add_vms(admin_db, login="user2")
    node = make_node(**{"internal.hkd.max_heavy": 1})
    node.hkd.start()
    start_vm(admin_db, slow, host_id)
    wait_for(lambda: vm_row(admin_db, slow)["vm_pid"], 10, what="slow VM launched")   # holds the semaphore
    start_vm(admin_db, queued, host_id)
    wait_for(lambda: node.hkd.vms.get(queued) and node.hkd.vms[queued].machine.state == "starting.heavy", 10,
             what="second VM waiting for the semaphore")
    stop_vm(admin_db, queued)
    row = wait_vm_state(admin_db, queued, "stopped", timeout=5)
    assert row["vm_pid"] is None                        # never launched
    assert vm_row(admin_db, slow)["vm_state"] == "starting"
    stop_vm(admin_db, slow)
    wait_vm_state(admin_db, slow, "stopped", timeout=15)
    assert node.hkd.heavy.counter == 1                  # every permit came back


def test_legacy_setting_runs_vms_without_a_key_and_warns(make_node, admin_db, caplog):
    """vm.vma.legacy_unauthenticated: no key is made or handed to the VM (tiny_vm then
    answers everyone, like the original VMA), the HKD calls without one, and says so."""
    host_id = add_host(admin_db)
    (vm_id,) = add_vms(admin_db)
    node = make_node(**{"vm.vma.legacy_unauthenticated": 1})
    with caplog.at_level("WARNING", logger="qvd.vma"):
        node.hkd.start()
    assert any("HKD: vm.vma.legacy_unauthenticated is on" in r.getMessage() for r in caplog.records)
    start_vm(admin_db, vm_id, host_id)
    row = wait_vm_state(admin_db, vm_id, "running")
    env = proc_environ(row["vm_pid"])
    assert "QVD_VMA_SECRET" not in env and env["QVD_VMA_UNAUTHENTICATED"] == "1"
    assert runtime.vm_agent_key(admin_db, vm_id) is None
    assert VmaClient(row["vm_address"], 3030, timeout=2).ping()
    stop_vm(admin_db, vm_id)
    wait_vm_state(admin_db, vm_id, "stopped")


def test_running_hkd_sweeps_expired_tokens_every_token_sweep_delay(make_node, admin_db):
    """Expired tokens and login parameters no token refers to are purged by the running HKD
    every internal.hkd.agent.token_sweep.delay seconds (1 here); live ones stay."""
    add_host(admin_db)
    (vm_id,) = add_vms(admin_db)
    user = admin_db.query_one("SELECT user_id FROM vms WHERE id = %s", (vm_id,))[0]
    node = make_node(**{"internal.hkd.agent.token_sweep.delay": 1})
    node.hkd.start()
    live, live_params = admin_db.transaction(runtime.issue_token, user, {"a": 1}, 600)
    expired, expired_params = admin_db.transaction(runtime.issue_token, user, {"b": 2}, -5)
    stored_only = admin_db.transaction(runtime.store_auth_params, {"c": 3})

    def tokens():
        return {d for (d,) in admin_db.query("SELECT token FROM user_tokens")}

    def params():
        return {i for (i,) in admin_db.query("SELECT id FROM user_auth_parameters")}
    assert runtime.token_digest(expired) in tokens()
    wait_for(lambda: runtime.token_digest(expired) not in tokens(), 3, interval=0.1, what="the expired token swept")
    # parameters nobody refers to go one sweep after a sweep has seen them
    wait_for(lambda: not params() & {expired_params, stored_only}, 4, interval=0.1,
             what="the unreferenced login parameters swept")
    assert runtime.token_digest(live) in tokens() and live_params in params()
    node.hkd.stop()
