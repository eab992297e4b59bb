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
    write_conf,
)
from helpers.nodes import wait_for
from helpers.netns import TestNamespace, list_netns, pids_in, processes_mentioning, require_root

from qvd_gevent.config import Config
from qvd_gevent.db import Database

pytestmark = [pytest.mark.root, pytest.mark.slow]

# The timers are the defaults an operator gets: A fences itself ticker.timeout after its last
# heartbeat, the others call it lost node.timeout after it, and the users are back within a minute.
DEFAULTS = Config(None)
TICKER_TIMEOUT = DEFAULTS.get_int("internal.hkd.agent.ticker.timeout")
NODE_TIMEOUT = DEFAULTS.get_int("internal.hkd.cluster.node.timeout")
MONITOR_PERIOD = (DEFAULTS.get_int("internal.hkd.agent.cluster_monitor.delay")
                  + DEFAULTS.get_int("internal.hkd.agent.cluster_monitor.fuzzy_delay"))
BACK_WITHIN = 60
CLIENT = [sys.executable, "-c", "from qvd_gevent.client.cli import main; main()"]


def _db_lines(socket_dir, port, dbname):
    from helpers.database import TEST_ROLE, TEST_ROLE_PASSWORD
    return [f"database.host = {socket_dir}", f"database.port = {port}", f"database.name = {dbname}",
            f"database.user = {TEST_ROLE}", f"database.password = {TEST_ROLE_PASSWORD}",
            "internal.database.pool.connection.timeout = 5", "internal.database.client.connect.timeout = 3"]


def _client_argv(port, cert, login, password, vm_id, script):
    return CLIENT + ["--host", "127.0.0.1", "--port", str(port), "--user", login, "--password", password,
                     "--ca", str(cert), "connect", "--vm", str(vm_id), "--exec", "sh", "-c", script]


def _running_vm_inits(run_dir):
    """{vm_id: pid} of the node's VM inits that are running (a frozen one is not)."""
    found = {}
    for vm_id, pid in vm_processes(run_dir).items():
        try:
            with open(f"/proc/{pid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("T", "t", "Z", "X"):
            found[vm_id] = pid
    return found


class Cluster:
    """Three nodes in three namespaces, users dora and eve with a VM each, VMs placed on A."""

    names = ("node-a", "node-b", "node-c")

    def __init__(self, tmp_path, pg_server, dbname, node_timeout, relay_for_a):
        require_root()
        if pg_server.embedded is None:
            reason = "needs the embedded test PostgreSQL (its unix socket folder); QVD_TEST_PG_DSN is set"
            print(f"SKIP: {reason}", file=sys.stderr)
            pytest.skip(reason)
        self.tmp_path = tmp_path
        self.pg_dir, self.pg_port = str(pg_server.embedded.directory), pg_server.embedded.port
        self.dbname = dbname
        self.node_timeout = node_timeout
        self.relay_for_a = relay_for_a
        self.spaces = {name: TestNamespace() for name in self.names}
        self.nodes, self.values, self.run_dirs = {}, {}, {}
        self.relay = None
        self.clients = []
        self.violations = []          # (seconds since start, {vm: [nodes running it]})
        self.samples = 0
        self.watching = gevent.event.Event()
        self.db = None
        self.t0 = time.monotonic()

    def start(self):
        tmp_path = self.tmp_path
        for ns in self.spaces.values():
            ns.create()
        self.relay_socket = None
        if self.relay_for_a:
            relay_dir = tmp_path / "relay"
            relay_dir.mkdir()
            self.relay_socket = relay_dir / f".s.PGSQL.{self.pg_port}"
            self.relay = subprocess.Popen(["socat", f"UNIX-LISTEN:{self.relay_socket},fork,mode=0777",
                                           f"UNIX-CONNECT:{self.pg_dir}/.s.PGSQL.{self.pg_port}"],
                                          start_new_session=True)
            wait_for(self.relay_socket.exists, 10, what="the relay's socket")
        for i, name in enumerate(self.names):
            self.values[name] = node_values(tmp_path, name, **{
                "l7r.port": 8443 + i,                  # each namespace has its own loopback
                "vm.process.address.base": "127.100.0.0/24",
                "internal.l7r.timeout.vm_start": 60,
                "internal.hkd.stopping.vms.timeout": 2,
                "internal.hkd.killing.vms.retry.timeout": 1,
            })
            socket_dir = self.relay_socket.parent if (name == "node-a" and self.relay_for_a) else self.pg_dir
            conf = write_conf(tmp_path / f"{name}.conf", _db_lines(socket_dir, self.pg_port, self.dbname), name,
                              self.values[name])
            self.nodes[name] = NodeProcess(conf, tmp_path / f"{name}.log", wrap=self.spaces[name].argv)
            self.run_dirs[name] = tmp_path / f"run-{name}"
        self.db = Database.from_config(Config.load(str(tmp_path / "node-b.conf")))
        self.cert, key = make_cert(tmp_path / "ssl")
        seed_ssl(self.db, self.cert, key)
        # only A takes VMs at first: every L7R reaches only the VMs of its own namespace
        self.host_ids = {name: seed_host(self.db, name, f"127.0.0.{11 + i}", backend=(name == "node-a"))
                         for i, name in enumerate(self.names)}
        self.users = [("dora", "dora pw"), ("eve", "eve pw")]
        self.vm_of = {login: ids[0] for login, ids in seed_users_and_vms(self.db, self.users).items()}
        for node in self.nodes.values():
            node.start()
        for node in self.nodes.values():
            node.wait_running()
        self.watcher = gevent.spawn(self._watch)
        return self

    def _watch(self):
        """Every VM init of every node, sampled all along: never running on two nodes."""
        while not self.watching.is_set():
            where = {}
            for name in self.names:
                for vm_id in _running_vm_inits(self.run_dirs[name]):
                    where.setdefault(vm_id, []).append(name)
            doubled = {vm: ns for vm, ns in where.items() if len(ns) > 1}
            if doubled:
                self.violations.append((round(time.monotonic() - self.t0, 2), doubled))
            self.samples += 1
            gevent.sleep(0.1)

    def stop_watching(self):
        self.watching.set()
        self.watcher.join(5)

    def host_state(self, name):
        return self.db.query_one("SELECT state FROM host_runtimes WHERE host_id = %s", (self.host_ids[name],))[0]

    def port(self, name):
        return self.values[name]["l7r.port"]

    def run_client(self, name, login, password, script):
        """qvd-client connect inside node `name`'s namespace, through its L7R; returns stderr."""
        done = self.spaces[name].run(_client_argv(self.port(name), self.cert, login, password, self.vm_of[login],
                                                  script), timeout=90)
        assert done.returncode == 0, done.stderr
        return done.stderr

    def open_client(self, name, login, password, script, err_path):
        err = open(err_path, "wb")  # noqa: SIM115 - the child writes to it; closed in close()
        proc = self.spaces[name].popen(_client_argv(self.port(name), self.cert, login, password, self.vm_of[login],
                                                    script), stdout=subprocess.DEVNULL, stderr=err)
        self.clients.append((proc, err))
        return proc

    def close(self):
        self.watching.set()
        for proc, err in self.clients:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            err.close()
        for node in self.nodes.values():
            node.cleanup()
        for name in self.run_dirs:
            kill_vm_processes(self.run_dirs[name])
        if self.relay is not None and self.relay.poll() is None:
            os.killpg(self.relay.pid, signal.SIGKILL)
            self.relay.wait(5)
        for ns in self.spaces.values():
            ns.destroy()
        if self.db is not None:
            self.db.close()
        left = [n for n in list_netns() if any(n == ns.name for ns in self.spaces.values())]
        assert not left, f"namespaces left behind: {left}"
        escaped = processes_mentioning(str(self.tmp_path))
        assert not escaped, f"processes left behind: {escaped}"


def _users_on_a(c):
    """dora keeps a session open through A, eve had one; both VMs run on A."""
    dora = c.open_client("node-a", "dora", "dora pw", "echo dora; head -n 1 >&2; sleep 200", c.tmp_path / "dora.err")
    assert c.run_client("node-a", "eve", "eve pw", "echo eve; head -n 1 >&2").rstrip().endswith("eve")
    wait_for(lambda: c.db.query_one("SELECT user_state, l7r_host_id FROM vm_runtimes WHERE vm_id = %s",
                                    (c.vm_of["dora"],)) == ("connected", c.host_ids["node-a"]), 60,
             what="dora's session on A")
    assert set(vm_processes(c.run_dirs["node-a"])) == set(c.vm_of.values())
    return dora


def _back_through_b(c):
    c.db.execute("UPDATE hosts SET backend = true WHERE id = %s", (c.host_ids["node-b"],))
    for login, password in c.users:
        err = c.run_client("node-b", login, password, f"echo {login} again; head -n 1 >&2")
        assert err.rstrip().endswith(f"{login} again"), err
    rows = c.db.query("SELECT vm_id, vm_state, host_id FROM vm_runtimes ORDER BY vm_id")
    assert rows == [(vm, "running", c.host_ids["node-b"]) for vm in sorted(c.vm_of.values())], rows
    assert set(vm_processes(c.run_dirs["node-b"])) == set(c.vm_of.values())


def _released(c):
    rows = c.db.query("SELECT vm_id, vm_state, host_id, user_state, l7r_host_id FROM vm_runtimes ORDER BY vm_id")
    assert rows == [(vm, "stopped", None, "disconnected", None) for vm in sorted(c.vm_of.values())], rows
    assert any("marked as lost" in c.nodes[n].log_text() for n in ("node-b", "node-c")), \
        "neither B nor C logged marking A lost"


@pytest.mark.timeout(300)
def test_node_cut_off_fences_itself_and_its_users_reconnect_elsewhere(tmp_path, pg_server, fresh_db_name):
    c = Cluster(tmp_path, pg_server, fresh_db_name, NODE_TIMEOUT, relay_for_a=True)
    try:
        c.start()
        dora = _users_on_a(c)

        # --- cut A off the database: kill the relay and every connection through it ------------------
        t_cut = time.monotonic()
        os.killpg(c.relay.pid, signal.SIGKILL)
        c.relay.wait(10)
        os.unlink(c.relay_socket)
        wait_for(lambda: not vm_processes(c.run_dirs["node-a"]), NODE_TIMEOUT + 20, interval=0.1,
                 what="A's VMs stopped by A itself")
        t_fenced = time.monotonic() - t_cut
        assert t_fenced < TICKER_TIMEOUT + DEFAULTS.get_int("internal.hkd.fence.kill_time"), t_fenced
        assert c.host_state("node-a") != "lost", \
            f"A was declared lost before it had stopped its VMs ({t_fenced:.1f} s after the cut)"
        dora.kill()                               # its command outlives the session; enough
        dora.wait(10)
        assert "dora" in (tmp_path / "dora.err").read_text()      # the session had worked

        wait_for(lambda: c.host_state("node-a") == "lost", NODE_TIMEOUT + 20, interval=0.1, what="A marked lost")
        t_lost = time.monotonic() - t_cut
        _released(c)

        # --- the users come back through B and find their VMs there -----------------------------------
        _back_through_b(c)
        t_back = time.monotonic() - t_cut
        assert not vm_processes(c.run_dirs["node-a"]) and not vm_processes(c.run_dirs["node-c"])
        c.stop_watching()
        assert c.violations == [], c.violations[:5]
        assert c.samples > 20
        assert t_back < BACK_WITHIN, f"users back on B only after {t_back:.1f} s"
        print(f"\nMEASURED: A cut off the database -> its VMs stopped by itself {t_fenced:.1f} s, marked lost "
              f"{t_lost:.1f} s, both users back on B {t_back:.1f} s (ticker.timeout {TICKER_TIMEOUT} s, "
              f"node.timeout {NODE_TIMEOUT} s)")
        for name in ("node-b", "node-c"):
            assert c.nodes[name].terminate(timeout=90) == 0
            assert "Traceback" not in c.nodes[name].log_text()
        assert not vm_processes(c.run_dirs["node-b"])
    finally:
        c.close()


@pytest.mark.timeout(300)
def test_frozen_node_is_lost_its_users_move_and_it_kills_its_vms_when_it_wakes(tmp_path, pg_server, fresh_db_name):
    """kill -STOP of everything in A's namespace (a hung machine: node and VMs frozen).

    A frozen node cannot fence itself (the original does not fence either, docs/hkd.md#fencing):
    the others mark it lost, its users move to B. When A wakes, its first heartbeat finds
    it lost and it kills its own copies at once, never touching the rows B now owns.
    """
    c = Cluster(tmp_path, pg_server, fresh_db_name, NODE_TIMEOUT, relay_for_a=False)
    try:
        c.start()
        _users_on_a(c)
        frozen = pids_in(c.spaces["node-a"].name)
        t_freeze = time.monotonic()
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: c.host_state("node-a") == "lost", NODE_TIMEOUT + MONITOR_PERIOD + 20, interval=0.1,
                 what="A marked lost")
        t_lost = time.monotonic() - t_freeze
        _released(c)
        _back_through_b(c)
        t_back = time.monotonic() - t_freeze
        assert c.violations == [], c.violations[:5]
        assert t_back < BACK_WITHIN, f"users back on B only after {t_back:.1f} s"

        t_wake = time.monotonic()
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        wait_for(lambda: not vm_processes(c.run_dirs["node-a"]), 15, interval=0.05, what="A killed its copies")
        t_killed = time.monotonic() - t_wake
        # whichever runs first on waking: its fencing watcher (its last heartbeat is far too
        # old) or its first heartbeat (which finds it lost)
        log_a = c.nodes["node-a"].log_text()
        assert "fencing this node" in log_a or "was marked lost by the cluster" in log_a
        gevent.sleep(2)                                  # A's agents have run a few rounds by now
        rows = c.db.query("SELECT vm_id, vm_state, host_id FROM vm_runtimes ORDER BY vm_id")
        assert rows == [(vm, "running", c.host_ids["node-b"]) for vm in sorted(c.vm_of.values())], rows
        assert set(_running_vm_inits(c.run_dirs["node-b"])) == set(c.vm_of.values())
        assert c.host_state("node-a") == "lost"
        c.stop_watching()
        # the only double runs: A's woken copies, until A's first heartbeat after waking
        since_wake = t_wake - c.t0
        late = [v for v in c.violations if v[0] < since_wake or v[0] > since_wake + t_killed + 0.2]
        assert late == [], late
        print(f"\nMEASURED: A frozen -> marked lost {t_lost:.1f} s (node.timeout {NODE_TIMEOUT} s), users "
              f"back on B {t_back:.1f} s; A woken -> its copies killed in {t_killed:.2f} s "
              f"({len(c.violations)} of {c.samples} samples saw both copies running)")

        # A rejoins when restarted: it neither adopts nor kills what B runs (a node that fenced
        # itself has exited with status 1, for its supervisor to start it again)
        assert c.nodes["node-a"].terminate(timeout=60) == (1 if "fencing this node" in log_a else 0)
        c.nodes["node-a"].start()
        c.nodes["node-a"].wait_running()
        assert c.host_state("node-a") == "running"
        assert set(_running_vm_inits(c.run_dirs["node-b"])) == set(c.vm_of.values())
        for name in c.names:
            assert c.nodes[name].terminate(timeout=90) == 0
            assert "Traceback" not in c.nodes[name].log_text()
    finally:
        c.close()
