"""A 3-node cluster (issue 7 item 5): three `qvd-node` processes, each in a network
namespace of its own with no route out, one PostgreSQL reached over its unix socket (a
filesystem path works across network namespaces).

Node A reaches the database through a socat relay; killing the relay cuts A off the
database (its connections drop, new ones are refused) while its processes keep running,
as a network partition would. A must fence itself (its heartbeat fails for longer than
internal.hkd.agent.ticker.timeout: it stops and its VMs die) before the other nodes mark it
lost (internal.hkd.cluster.node.timeout); then its users reconnect through node B and find
their VMs started there. No VM ever runs on two nodes: every VM init of every node is
sampled from /proc all along, and the rows are checked after.
"""
import os
import signal
import subprocess
import sys
import time

import gevent
import gevent.event
import pytest
from helpers.cluster import (
    NodeProcess,
    kill_vm_processes,
    make_cert,
    node_values,
    seed_host,
    seed_ssl,
    seed_users_and_vms,
    vm_processes,
    wait_for,
    write_conf,
)
from helpers.netns import TestNamespace, list_netns, processes_mentioning, require_root

from qvd_gevent.config import Config
from qvd_gevent.db import Database

pytestmark = [pytest.mark.root, pytest.mark.slow]

TICKER_TIMEOUT = 3      # A gives up on itself after this long without a heartbeat ...
NODE_TIMEOUT = 25       # ... well before the others call it lost
CLIENT = [sys.executable, "-c", "from qvd_gevent.client.cli import main; main()"]


def _db_lines(socket_dir, port, dbname):
    from conftest import TEST_ROLE, TEST_ROLE_PASSWORD
    return [f"database.host = {socket_dir}", f"database.port = {port}", f"database.name = {dbname}",
            f"database.user = {TEST_ROLE}", f"database.password = {TEST_ROLE_PASSWORD}",
            "internal.database.pool.connection.timeout = 5", "internal.database.client.connect.timeout = 3"]


def _client_argv(port, cert, login, password, vm_id, script):
    return CLIENT + ["--host", "127.0.0.1", "--port", str(port), "--user", login, "--password", password,
                     "--ca", str(cert), "connect", "--vm", str(vm_id), "--exec", "sh", "-c", script]


@pytest.mark.timeout(300)
def test_node_cut_off_fences_itself_and_its_users_reconnect_elsewhere(tmp_path, pg_server, fresh_db_name):
    require_root()
    if pg_server.embedded is None:
        reason = "needs the embedded test PostgreSQL (its unix socket folder); QVD_TEST_PG_DSN is set"
        print(f"SKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)
    pg_dir, pg_port = str(pg_server.embedded.directory), pg_server.embedded.port
    names = ("node-a", "node-b", "node-c")
    spaces = {name: TestNamespace() for name in names}
    nodes, values, run_dirs = {}, {}, {}
    relay = None
    clients = []
    violations = []
    watching = gevent.event.Event()
    db = None
    try:
        for ns in spaces.values():
            ns.create()
        # A's way to the database: a relay we can cut
        relay_dir = tmp_path / "relay"
        relay_dir.mkdir()
        relay_socket = relay_dir / f".s.PGSQL.{pg_port}"
        relay = subprocess.Popen(["socat", f"UNIX-LISTEN:{relay_socket},fork,mode=0777",
                                  f"UNIX-CONNECT:{pg_dir}/.s.PGSQL.{pg_port}"], start_new_session=True)
        wait_for(relay_socket.exists, 10, what="the relay's socket")

        for i, name in enumerate(names):
            values[name] = node_values(tmp_path, name, **{
                "l7r.port": 8443 + i,                  # each namespace has its own loopback
                "vm.process.address.base": "127.100.0.0/24",
                "internal.hkd.agent.ticker.delay": 1,
                "internal.hkd.agent.ticker.timeout": TICKER_TIMEOUT,
                "internal.hkd.cluster.node.timeout": NODE_TIMEOUT,
                "internal.hkd.agent.cluster_monitor.delay": 1,
                "internal.hkd.agent.cluster_monitor.long_delay": 1,
                "internal.l7r.timeout.vm_start": 60,
                "internal.hkd.stopping.vms.timeout": 2,
                "internal.hkd.killing.vms.retry.timeout": 1,
            })
            socket_dir = relay_dir if name == "node-a" else pg_dir
            conf = write_conf(tmp_path / f"{name}.conf", _db_lines(socket_dir, pg_port, fresh_db_name), name,
                              values[name])
            nodes[name] = NodeProcess(conf, tmp_path / f"{name}.log", wrap=spaces[name].argv)
            run_dirs[name] = tmp_path / f"run-{name}"
        db = Database.from_config(Config.load(str(tmp_path / "node-b.conf")))
        cert, key = make_cert(tmp_path / "ssl")
        seed_ssl(db, cert, key)
        # only A takes VMs at first: every L7R reaches only the VMs of its own namespace
        host_ids = {name: seed_host(db, name, f"127.0.0.{11 + i}", backend=(name == "node-a"))
                    for i, name in enumerate(names)}
        users = [("dora", "dora pw"), ("eve", "eve pw")]
        vm_of = {login: ids[0] for login, ids in seed_users_and_vms(db, users).items()}
        for node in nodes.values():
            node.start()
        for node in nodes.values():
            node.wait_running()

        # --- the hypervisors of all three nodes, watched all along -------------------------------
        samples = [0]

        def watch():
            while not watching.is_set():
                where = {}
                for name in names:
                    for vm_id in vm_processes(run_dirs[name]):
                        where.setdefault(vm_id, []).append(name)
                doubled = {vm: ns for vm, ns in where.items() if len(ns) > 1}
                if doubled:
                    violations.append((time.strftime("%H:%M:%S"), doubled))
                samples[0] += 1
                gevent.sleep(0.1)
        watcher = gevent.spawn(watch)

        # --- users on A: dora keeps a session open, eve had one -----------------------------------
        port_a = values["node-a"]["l7r.port"]
        dora_err = open(tmp_path / "dora.err", "wb")  # noqa: SIM115 - closed once the client is gone
        dora = spaces["node-a"].popen(_client_argv(port_a, cert, "dora", "dora pw", vm_of["dora"],
                                                   "echo dora; head -n 1 >&2; sleep 200"),
                                      stdout=subprocess.DEVNULL, stderr=dora_err)
        clients.append(dora)
        done = spaces["node-a"].run(_client_argv(port_a, cert, "eve", "eve pw", vm_of["eve"],
                                                 "echo eve; head -n 1 >&2"), timeout=90)
        assert done.returncode == 0 and done.stderr.rstrip().endswith("eve"), done.stderr
        wait_for(lambda: db.query_one("SELECT user_state, l7r_host_id FROM vm_runtimes WHERE vm_id = %s",
                                      (vm_of["dora"],)) == ("connected", host_ids["node-a"]), 60,
                 what="dora's session on A")
        on_a = vm_processes(run_dirs["node-a"])
        assert set(on_a) == set(vm_of.values())

        # --- cut A off the database -------------------------------------------------------------------
        t_cut = time.monotonic()
        os.killpg(relay.pid, signal.SIGKILL)
        relay.wait(10)
        os.unlink(relay_socket)
        wait_for(lambda: not vm_processes(run_dirs["node-a"]), TICKER_TIMEOUT + 20, interval=0.1,
                 what="A's VMs stopped by A itself")
        t_fenced = time.monotonic() - t_cut
        state_at_fence = db.query_one("SELECT state FROM host_runtimes WHERE host_id = %s", (host_ids["node-a"],))[0]
        assert state_at_fence != "lost", "A was declared lost before it had stopped its VMs"
        dora.kill()                               # its command outlives the session; enough
        dora.wait(10)
        dora_err.close()
        dora_out = (tmp_path / "dora.err").read_text()
        assert "dora" in dora_out, dora_out       # the session had worked

        wait_for(lambda: db.query_one("SELECT state FROM host_runtimes WHERE host_id = %s",
                                      (host_ids["node-a"],))[0] == "lost", NODE_TIMEOUT + 20, interval=0.1,
                 what="A marked lost")
        t_lost = time.monotonic() - t_cut
        rows = db.query("SELECT vm_id, vm_state, host_id, user_state, l7r_host_id FROM vm_runtimes ORDER BY vm_id")
        assert rows == [(vm, "stopped", None, "disconnected", None) for vm in sorted(vm_of.values())], rows
        marker = [n for n in ("node-b", "node-c") if "marked as lost" in nodes[n].log_text()
                  or f"host {host_ids['node-a']} " in nodes[n].log_text()]
        assert marker, "neither B nor C logged marking A lost"

        # --- the users come back through B and find their VMs there --------------------------------------
        db.execute("UPDATE hosts SET backend = true WHERE id = %s", (host_ids["node-b"],))
        port_b = values["node-b"]["l7r.port"]
        for login, password in users:
            done = spaces["node-b"].run(_client_argv(port_b, cert, login, password, vm_of[login],
                                                     f"echo {login} again; head -n 1 >&2"), timeout=90)
            assert done.returncode == 0 and done.stderr.rstrip().endswith(f"{login} again"), done.stderr
        t_back = time.monotonic() - t_cut
        rows = db.query("SELECT vm_id, vm_state, host_id FROM vm_runtimes ORDER BY vm_id")
        assert rows == [(vm, "running", host_ids["node-b"]) for vm in sorted(vm_of.values())], rows
        assert set(vm_processes(run_dirs["node-b"])) == set(vm_of.values())
        assert not vm_processes(run_dirs["node-a"]) and not vm_processes(run_dirs["node-c"])
        watching.set()
        watcher.join(5)
        assert violations == [], violations[:5]
        assert samples[0] > 20
        print(f"\nMEASURED: A cut off the database -> its VMs stopped by itself {t_fenced:.1f} s, marked lost "
              f"{t_lost:.1f} s, both users back on B {t_back:.1f} s (ticker.timeout {TICKER_TIMEOUT} s, "
              f"node.timeout {NODE_TIMEOUT} s)")

        for name in ("node-b", "node-c"):
            assert nodes[name].terminate(timeout=90) == 0
            assert "Traceback" not in nodes[name].log_text()
        assert not vm_processes(run_dirs["node-b"])
    finally:
        watching.set()
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        for node in nodes.values():
            node.cleanup()
        for name in run_dirs:
            kill_vm_processes(run_dirs[name])
        if relay is not None and relay.poll() is None:
            os.killpg(relay.pid, signal.SIGKILL)
            relay.wait(5)
        for ns in spaces.values():
            ns.destroy()
        if db is not None:
            db.close()
    left = [n for n in list_netns() if any(n == ns.name for ns in spaces.values())]
    assert not left, f"namespaces left behind: {left}"
    escaped = processes_mentioning(str(tmp_path))
    assert not escaped, f"processes left behind: {escaped}"
