"""Cluster scale (issue 16): what PostgreSQL spends on a cluster of N nodes, from one run.

    python -m bench --only cluster [--cluster-levels 10,25,50]     (about 16 minutes)
    python -m bench --quick --only cluster                          (levels 2,5; about 2.5 minutes)

One embedded PostgreSQL (pg_stat_statements loaded), the farm (bench/farm.py: the stand-in
VMs every session goes to) and N `qvd-node` processes (bench/fleet.py: HKD + L7R each,
default timers), all on loopback. The server's cost is the CPU of all its processes
(/proc) and the nodes' statements (pg_stat_statements, the nodes' role only); the nodes'
cost is their own CPU. In order:

1. floor: the server with no node (its own background work);
2. for each level N (10, 25, 50): grow the fleet to N, let every node reach its steady
   state (the first cluster-monitor pass comes long_delay after start), then
   - idle: a window with nothing but the nodes' timers;
   - NOTIFY fan-out: K notifications on `qvd_vm_runtime` (which every L7R listens to),
     paced, against K on a channel nobody listens to: the difference is the cost of
     delivering to the listeners;
   - config change: `qvd-admin config set` M times (NOTIFY `qvd_config_changed`: every
     node reloads its configuration and its TLS material);
   - connect_to_vm bursts spread over the nodes (new TLS connection, 101, close: claim,
     mark connected, release), each user from a loopback address of its own; the farm
     checks the VMs' agent keys and the one-time display key as a VM's VMA does;
3. at the top level: H idle sessions held across the nodes (a window before, one with
   them); then vm_runtimes grown to R rows of running VMs with sessions held by the nodes'
   hosts and `hosts` to a larger cluster's rows, an idle window, and the same with one
   partial index more (a what-if).

Every window's cost is also given net of the server's floor and of the idle rate at that
level, so a figure per node, per connect, per listener or per session is what the nodes
add. Absolute CPU figures depend on the machine and its load: the load average is
recorded beside every window. Every loop is bounded in count and time; stop() ends every
process, also after a failure.
"""
import os
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import psycopg2

from .fleet import NodeFleet, node_name
from .pgstats import ConnectionSampler, PgProbe, window
from .workers import Crew

FARM_ADDRESS = "127.76.0.1"
ROLE = "qvd"
UNHEARD = "bench_unheard"           # a channel nobody listens to: the sender's own cost


def client_address(index):
    """The loopback address client index connects from (127.73.0.0/16)."""
    return f"127.73.{index // 250}.{index % 250 + 1}"


def sizes(quick, levels=None):
    if quick:
        base = {"levels": (2, 5), "floor_s": 5, "idle_s": 10, "notify": 200, "notify_rate": 100, "notify_rounds": 1,
                "config_changes": 2, "connect_users": 20, "connect_s": 5, "connect_count": 300, "held": 20,
                "rows": 2000, "hosts": 20,
                # CI: the first cluster pass 3 s after start instead of 45 s, so the quick run
                # reaches steady state in seconds (every other timer at its default)
                "node_extra": {"internal.hkd.agent.cluster_monitor.long_delay": 3}}
    else:
        base = {"levels": (10, 25, 50), "floor_s": 30, "idle_s": 60, "notify": 2000, "notify_rate": 200,
                "notify_rounds": 2, "config_changes": 5, "connect_users": 100, "connect_s": 20, "connect_count": 5000,
                "held": 1000, "rows": 100000, "hosts": 1000, "node_extra": {}}
    if levels:
        base["levels"] = tuple(levels)
    return base


TIMER_KEYS = ("internal.hkd.agent.ticker.delay", "internal.hkd.agent.cluster_monitor.delay",
              "internal.hkd.agent.cluster_monitor.fuzzy_delay", "internal.hkd.agent.cluster_monitor.long_delay",
              "internal.hkd.agent.command_handler.delay", "internal.hkd.agent.vm_command_handler.delay",
              "internal.hkd.agent.token_sweep.delay", "internal.database.pool.size")


class ClusterBench:
    def __init__(self, quick, say=print, levels=None):
        self.quick = quick
        self.say = say
        self.size = sizes(quick, levels)
        self.dir = Path(tempfile.mkdtemp(prefix="qvd-bench-cluster-"))
        self.pg = self.probe = self.farm = self.fleet = self.super = None
        self.timers = {}

    # --- environment ---------------------------------------------------------------------
    def start(self):
        from qvd_gevent.db.embedded import EmbeddedPostgres
        top = max(self.size["levels"])
        # each node: its pool (up to internal.database.pool.size) + its LISTEN connection
        self.pg = EmbeddedPostgres(self.dir / "pg", settings={
            "max_connections": max(300, 12 * top + 100), "shared_preload_libraries": "pg_stat_statements",
            "pg_stat_statements.track": "top", "pg_stat_statements.max": 5000}).start()
        self.password = secrets.token_urlsafe(18)
        self.pg.create_database("qvd", ROLE, self.password)
        self.db_lines = self.pg.node_conf_lines("qvd", ROLE, self.password)
        self.super = psycopg2.connect(**self.pg.superuser_dsn("qvd"))
        self.super.autocommit = True
        self._deploy()
        self.probe = PgProbe(self.pg, "qvd", ROLE)
        if not self.probe.has_statements:
            raise RuntimeError("pg_stat_statements is not available in the embedded server")
        self._start_farm()
        self._seed(top)
        self._vacuum()
        extra = dict(self.size["node_extra"])
        self.fleet = NodeFleet(self.dir / "nodes", self.db_lines, extra, self.say)
        from qvd_gevent.config import Config
        cfg = Config({k: str(v) for k, v in extra.items()})
        self.timers = {key: cfg.get(key) for key in TIMER_KEYS}
        return self

    def stop(self):
        if self.fleet is not None:
            self.fleet.stop()
        if self.farm is not None and self.farm.poll() is None:
            self.farm.terminate()
            try:
                self.farm.wait(10)
            except Exception:
                self.farm.kill()
        for conn in (self.probe, self.super):
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass
        if self.pg is not None:
            self.pg.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _deploy(self):
        from qvd_gevent.config import Config
        from qvd_gevent.db import Database
        from qvd_gevent.db.deploy import deploy
        from qvd_gevent.node.certs import make_self_signed
        conf = self.dir / "deploy.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(["nodename = bench-deploy", *self.db_lines]) + "\n")
        db = Database.from_config(Config.load(str(conf)))
        try:
            deploy(db)
        finally:
            db.close()
        ssl_dir = self.dir / "ssl"
        ssl_dir.mkdir(mode=0o700)
        self.cert, key = ssl_dir / "cert.pem", ssl_dir / "key.pem"
        make_self_signed(str(self.cert), str(key))
        self._sql("INSERT INTO ssl_configs (key, value) VALUES ('l7r.ssl.cert', %s), ('l7r.ssl.key', %s)",
                  (self.cert.read_text(), key.read_text()))
        # qvd-admin as the superuser: its statements stay out of the nodes' figures
        self.admin_conf = self.dir / "admin.conf"
        dsn = self.pg.superuser_dsn("qvd")
        fd = os.open(self.admin_conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"nodename = bench-admin\ndatabase.host = {dsn['host']}\ndatabase.port = {dsn['port']}\n"
                     f"database.name = qvd\ndatabase.user = postgres\ndatabase.password = {dsn['password']}\n")

    def _sql(self, sql, params=None):
        with self.super.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def _start_farm(self):
        import json
        import subprocess
        import sys
        repo = str(Path(__file__).resolve().parent.parent)
        self.farm_key = secrets.token_urlsafe(32)      # the agent key of every farm VM
        self.farm = subprocess.Popen([sys.executable, "-m", "bench.farm", "--address", FARM_ADDRESS],
                                     stdout=subprocess.PIPE, text=True, cwd=repo,
                                     env=dict(os.environ, QVD_VMA_SECRET=self.farm_key))
        self.farm_ports = json.loads(self.farm.stdout.readline())
        self.farm_vma_answers = self._farm_vma_answers()

    def _farm_vma_answers(self):
        """The HTTP status of the farm VMA's ping without the agent key and with it: 401 and
        200 when it checks keys as a VM's VMA does, so the connects measure that path."""
        import http.client
        answers = {}
        for name, headers in (("without_key", {}), ("with_key", {"Authorization": f"Bearer {self.farm_key}"})):
            conn = http.client.HTTPConnection(FARM_ADDRESS, self.farm_ports["rpc"], timeout=10)
            try:
                conn.request("GET", "/vma/ping", headers=headers)
                answers[name] = conn.getresponse().status
            finally:
                conn.close()
        if answers != {"without_key": 401, "with_key": 200}:
            raise RuntimeError(f"the farm's VMA does not check the agent key: {answers}")
        return answers

    def _seed(self, top):
        """Node host rows, the farm host, users with running farm VMs, bearer tokens."""
        from qvd_gevent.client.protocol import bearer_auth
        from qvd_gevent.db.runtime import token_digest
        size, ports = self.size, self.farm_ports
        tokens = {}

        def vms_for(cur, login, count, host_id, osf_id):
            cur.execute("INSERT INTO users (login, password, tenant_id) VALUES (%s, '!', 1) RETURNING id", (login,))
            user_id = cur.fetchone()[0]
            cur.execute("INSERT INTO vms (name, user_id, osf_id, di_tag) SELECT 'farm-' || g, %s, %s, 'default' "
                        "FROM generate_series(1, %s) g ORDER BY g RETURNING id", (user_id, osf_id, count))
            ids = sorted(r[0] for r in cur.fetchall())
            cur.execute("INSERT INTO vm_runtimes (vm_id, host_id, vm_state, vm_state_ts, user_state, blocked, "
                        "vm_address, vm_vma_port, vm_x_port) "
                        "SELECT id, %s, 'running', %s, 'disconnected', false, %s, %s, %s FROM unnest(%s) id",
                        (host_id, int(time.time()), FARM_ADDRESS, ports["rpc"], ports["echo"], ids))
            cur.execute("INSERT INTO vm_counters (vm_id) SELECT unnest(%s)", (ids,))
            cur.execute("INSERT INTO vm_agent_keys (vm_id, secret, created) SELECT id, %s, %s FROM unnest(%s) id",
                        (self.farm_key, int(time.time()), ids))
            token = secrets.token_urlsafe(24)
            cur.execute("INSERT INTO user_tokens (token, user_id, vm_id, expiration, multi_use) "
                        "VALUES (%s, %s, NULL, %s, true)", (token_digest(token), user_id, int(time.time()) + 86400))
            tokens[login] = bearer_auth(token)
            return ids

        with self.super, self.super.cursor() as cur:
            # host rows of the nodes (hosts.address is unique; the address check is off)
            for i in range(top):
                cur.execute("INSERT INTO hosts (name, address, frontend, backend) VALUES (%s, %s, true, true) "
                            "RETURNING id", (node_name(i), f"127.75.{i // 250}.{i % 250 + 1}"))
                host_id = cur.fetchone()[0]
                cur.execute("INSERT INTO host_runtimes (host_id, state, blocked) VALUES (%s, 'stopped', false)",
                            (host_id,))
                cur.execute("INSERT INTO host_counters (host_id) VALUES (%s)", (host_id,))
            # the farm's row stays 'stopped': it has no heartbeat, and the cluster monitor
            # skips stopped hosts (a running one would be called lost and its VMs released)
            cur.execute("INSERT INTO hosts (name, address, frontend, backend) VALUES ('bench-farm', %s, false, false) "
                        "RETURNING id", (FARM_ADDRESS,))
            self.farm_host = cur.fetchone()[0]
            cur.execute("INSERT INTO host_runtimes (host_id, state, blocked) VALUES (%s, 'stopped', false)",
                        (self.farm_host,))
            cur.execute("INSERT INTO host_counters (host_id) VALUES (%s)", (self.farm_host,))
            cur.execute("INSERT INTO osfs (tenant_id, name, memory, use_overlay) VALUES (1, 'bench', 256, false) "
                        "RETURNING id")
            self.osf = cur.fetchone()[0]
            self.connect_vms = [vms_for(cur, f"bench-c{u}", 3, self.farm_host, self.osf)
                                for u in range(size["connect_users"])]
            self.held_vms = vms_for(cur, "bench-held", size["held"], self.farm_host, self.osf)
        self.connect_auth = [tokens[f"bench-c{u}"] for u in range(size["connect_users"])]
        self.held_auth = tokens["bench-held"]

    def _seed_sessions(self, total):
        """vm_runtimes grown to total rows, each a running VM on one of the running nodes' hosts
        with a connected session held there (round robin), as a cluster of that size has them.
        The holder pid is none of the nodes' own, so no node releases or aborts them; what the
        nodes' periodic statements read and skip is the same as for sessions of their own."""
        have = self._sql("SELECT count(*) FROM vm_runtimes")[0][0]
        more = total - have
        if more <= 0:
            return have
        hosts = [r[0] for r in self._sql("SELECT id FROM hosts WHERE name = ANY(%s) ORDER BY id",
                                         ([node_name(i) for i in range(len(self.fleet))],))]
        now = int(time.time())
        with self.super, self.super.cursor() as cur:
            # the hosts table of a larger cluster: the other rows are stopped nodes (no heartbeat
            # to write; the cluster monitor reads them on every pass)
            cur.execute("SELECT count(*) FROM hosts")
            missing = self.size["hosts"] - cur.fetchone()[0]
            if missing > 0:
                cur.execute("INSERT INTO hosts (name, address, frontend, backend) "
                            "SELECT 'bench-h' || g, '127.74.' || (g / 250) || '.' || (g %% 250 + 1), true, true "
                            "FROM generate_series(1, %s) g RETURNING id", (missing,))
                extra = [r[0] for r in cur.fetchall()]
                cur.execute("INSERT INTO host_runtimes (host_id, state, blocked) SELECT unnest(%s), 'stopped', false",
                            (extra,))
                cur.execute("INSERT INTO host_counters (host_id) SELECT unnest(%s)", (extra,))
            cur.execute("INSERT INTO users (login, password, tenant_id) VALUES ('bench-many', '!', 1) RETURNING id")
            user_id = cur.fetchone()[0]
            cur.execute("INSERT INTO vms (name, user_id, osf_id, di_tag) SELECT 'many-' || g, %s, %s, 'default' "
                        "FROM generate_series(1, %s) g RETURNING id", (user_id, self.osf, more))
            ids = sorted(r[0] for r in cur.fetchall())
            cur.execute("INSERT INTO vm_runtimes (vm_id, host_id, vm_state, vm_state_ts, user_state, user_state_ts, "
                        "l7r_host_id, l7r_pid, real_user_id, blocked, vm_address, vm_vma_port, vm_x_port) "
                        "SELECT id, h, 'running', %s, 'connected', %s, h, 0, %s, false, %s, %s, %s "
                        "FROM (SELECT id, (%s::int[])[1 + (row_number() OVER (ORDER BY id))::int %% %s] AS h "
                        "FROM unnest(%s::int[]) id) s",
                        (now, now, user_id, FARM_ADDRESS, self.farm_ports["rpc"], self.farm_ports["echo"], hosts,
                         len(hosts), ids))
            cur.execute("INSERT INTO vm_counters (vm_id) SELECT unnest(%s)", (ids,))
            cur.execute("INSERT INTO vm_agent_keys (vm_id, secret, created) SELECT id, %s, %s FROM unnest(%s) id",
                        (self.farm_key, now, ids))
        return self._sql("SELECT count(*) FROM vm_runtimes")[0][0]

    def _vacuum(self):
        # a steady state: seeding's dead rows and statistics are not what the nodes cost
        for table in ("vm_runtimes", "vms", "vm_counters", "vm_agent_keys", "users", "user_tokens", "hosts",
                      "host_runtimes"):
            self._sql(f"VACUUM ANALYZE {table}")

    # --- measuring -----------------------------------------------------------------------
    def snapshot(self):
        return self.probe.snapshot(self.fleet.cpu_seconds() if self.fleet is not None else 0.0)

    def measure(self, seconds, action=None):
        """A window of at least `seconds`; action() runs at its start (bounded by itself)."""
        load0 = os.getloadavg()[0]
        before = self.snapshot()
        t0 = time.monotonic()
        result = action() if action is not None else None
        left = seconds - (time.monotonic() - t0)
        if left > 0:
            time.sleep(left)
        after = self.snapshot()
        if self.fleet is not None:
            self.fleet.check_alive()
        out = window(before, after)
        out["load_average"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        return out, result

    def settle(self):
        """Until every node is past its first cluster-monitor pass (long_delay + fuzzy after start)."""
        wait = (float(self.timers["internal.hkd.agent.cluster_monitor.long_delay"])
                + float(self.timers["internal.hkd.agent.cluster_monitor.fuzzy_delay"]) + 3)
        left = self.fleet.last_start + wait - time.monotonic()
        if left > 0:
            self.say(f"settling {left:.0f} s (first cluster-monitor pass)")
            time.sleep(left)

    def notify_burst(self, channel, count, rate, deadline_s=120):
        """count notifications on channel, each its own transaction, paced at rate per second."""
        sent = 0
        t0 = time.monotonic()
        with self.super.cursor() as cur:
            for i in range(count):
                due = t0 + i / rate
                now = time.monotonic()
                if now - t0 > deadline_s:
                    break
                if due > now:
                    time.sleep(due - now)
                cur.execute("SELECT pg_notify(%s, %s)", (channel, "0"))
                sent += 1
        return sent

    def config_changes(self, count, spacing=3.0):
        from qvd_gevent.admin.cli import main as admin_main
        done = 0
        for i in range(count):
            t = time.monotonic()
            if admin_main(["--config", str(self.admin_conf), "-q", "config", "set", f"l7r.timeout.idle={301 + i}"]) == 0:
                done += 1
            time.sleep(max(0.0, spacing - (time.monotonic() - t)))
        return done

    def wait_released(self, timeout=120):
        deadline = time.monotonic() + timeout
        held = None
        while time.monotonic() < deadline:
            held = self._sql("SELECT count(*) FROM vm_runtimes WHERE user_state <> 'disconnected'")[0][0]
            if held == 0:
                return 0
            time.sleep(0.5)
        return held


def idle_figures(win, nodes, floor_rate):
    minutes = win["seconds"] / 60.0
    pg_net = win["pg_cpu_s"] - floor_rate * win["seconds"]
    return {
        "nodes": nodes, "window_s": win["seconds"], "load_average": win["load_average"],
        "pg_cpu_ms_per_node_min": pg_net * 1000 / nodes / minutes,
        "pg_cpu_ms_per_node_min_raw": win["pg_cpu_s"] * 1000 / nodes / minutes,
        "node_cpu_ms_per_node_min": win["node_cpu_s"] * 1000 / nodes / minutes,
        "statements_per_node_min": win["statements"] / nodes / minutes,
        "queries_per_node_min": win["queries"] / nodes / minutes,
        "transactions_per_node_min": win["transactions"] / nodes / minutes,
        "exec_ms_per_node_min": win["exec_ms"] / nodes / minutes,
        "wal_bytes_per_node_min": win["wal_bytes"] / nodes / minutes,
        "connections_per_node": win["connections"] / nodes,
        "top_statements": [dict(s, calls_per_node_min=s["calls"] / nodes / minutes,
                                mean_ms=s["exec_ms"] / s["calls"] if s["calls"] else 0.0)
                           for s in win["top_statements"]],
    }


def run(quick, say=print, levels=None):
    bench = ClusterBench(quick, say, levels)
    size = bench.size
    out = {"sizes": {k: v for k, v in size.items() if k != "node_extra"}, "node_extra": size["node_extra"],
           "farm_address": FARM_ADDRESS, "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        say(f"cluster: PostgreSQL, farm, {max(size['levels'])} host rows")
        bench.start()
        out["timers"] = bench.timers
        out["pg_settings"] = bench.pg.settings
        out["pg_version"] = bench._sql("SHOW server_version")[0][0]
        out["farm_vma_answers"] = bench.farm_vma_answers
        floor, _ = bench.measure(size["floor_s"])
        floor_rate = floor["pg_cpu_s"] / floor["seconds"]
        out["floor"] = {"window_s": floor["seconds"], "pg_cpu_s": floor["pg_cpu_s"],
                        "pg_cpu_ms_per_min": floor["pg_cpu_s"] * 1000 / (floor["seconds"] / 60),
                        "load_average": floor["load_average"]}
        say(f"floor: PostgreSQL {out['floor']['pg_cpu_ms_per_min']:.0f} ms CPU per minute with no node")
        out["levels"] = []
        for nodes in size["levels"]:
            level = {"nodes": nodes}
            bench.fleet.grow_to(nodes)
            bench.settle()
            level["node_rss_mb"] = bench.fleet.rss_bytes() / nodes / 2**20
            idle, _ = bench.measure(size["idle_s"])
            level["idle"] = idle_figures(idle, nodes, floor_rate)
            idle_rate = idle["pg_cpu_s"] / idle["seconds"]
            node_idle_rate = idle["node_cpu_s"] / idle["seconds"]
            say(f"{nodes} nodes idle: PostgreSQL {level['idle']['pg_cpu_ms_per_node_min']:.1f} ms CPU and "
                f"{level['idle']['statements_per_node_min']:.1f} statements per node per minute "
                f"(load {idle['load_average']})")
            level["fanout"] = fanout(bench, nodes, idle_rate, node_idle_rate)
            say(f"{nodes} nodes fan-out: {level['fanout']['pg_us_per_delivery']:.1f} µs PostgreSQL, "
                f"{level['fanout']['node_us_per_delivery']:.1f} µs node CPU per notification per listener")
            level["config_change"] = config_fanout(bench, nodes, idle_rate, node_idle_rate)
            level["connect"] = connects(bench, idle_rate, node_idle_rate)
            say(f"{nodes} nodes connect: {level['connect']['connects']} in {level['connect']['window_s']:.0f} s; per "
                f"connect PostgreSQL {level['connect']['pg_ms_per_connect']:.2f} ms, nodes "
                f"{level['connect']['node_ms_per_connect']:.2f} ms")
            out["levels"].append(level)
        out["fanout_fit"] = fanout_fit(out["levels"])
        out["connect_fit"] = fit([lv["connect"]["nodes"] for lv in out["levels"]],
                                 [lv["connect"]["pg_ms_per_connect"] for lv in out["levels"]])
        top = out["levels"][-1]
        out["connect"] = top["connect"]
        out["held"] = held_sessions(bench, top, floor_rate)
        say(f"held: {out['held']['sessions']} sessions; PostgreSQL "
            f"{out['held']['pg_cpu_ms_per_session_min']:.3f} ms per session per minute")
        out["sessions"] = seeded_sessions(bench, top, floor_rate)
        say(f"{out['sessions']['vm_rows']} vm_runtimes rows ({out['sessions']['sessions']} sessions held): "
            f"PostgreSQL {out['sessions']['idle']['pg_cpu_ms_per_node_min']:.1f} ms per node per minute")
        out["node_log"] = {"Traceback": bench.fleet.log_count("Traceback"),
                           "marked as lost": bench.fleet.log_count("marked as lost"),
                           "fencing": bench.fleet.log_count("fencing this node")}
    finally:
        bench.stop()
    out["rows"] = rows(out)
    return out


def fanout(bench, nodes, idle_rate, node_idle_rate):
    """K notifications on qvd_vm_runtime (every L7R listens, and the bench, to count them) and K
    on a channel nobody listens to, interleaved, `notify_rounds` of each; every window net of
    the level's idle rate, the median per kind. PostgreSQL wakes every listening backend of
    the database for every NOTIFY, whatever its channel: the unheard kind shows that part."""
    size = bench.size
    count, rate = size["notify"], size["notify_rate"]
    runs = {"heard": [], "unheard": []}
    received = 0
    watcher = psycopg2.connect(**bench.pg.superuser_dsn("qvd"))
    watcher.autocommit = True
    try:
        with watcher.cursor() as cur:
            cur.execute("LISTEN qvd_vm_runtime")
        for _ in range(size["notify_rounds"]):
            for kind, channel in (("unheard", UNHEARD), ("heard", "qvd_vm_runtime")):
                win, sent = bench.measure(count / rate + 3, lambda ch=channel: bench.notify_burst(ch, count, rate))
                runs[kind].append({
                    "sent": sent, "window_s": win["seconds"], "pg_cpu_s": win["pg_cpu_s"],
                    "node_cpu_s": win["node_cpu_s"], "load_average": win["load_average"],
                    "pg_us_per_notification": (win["pg_cpu_s"] - idle_rate * win["seconds"]) * 1e6 / max(sent, 1),
                    "node_us_per_notification": (win["node_cpu_s"] - node_idle_rate * win["seconds"]) * 1e6
                    / max(sent, 1)})
                if kind == "heard":
                    received += _drain(watcher, sent)
    finally:
        watcher.close()
    listeners = nodes + 1

    def median(kind, key):
        return statistics.median(r[key] for r in runs[kind])
    heard, unheard = median("heard", "pg_us_per_notification"), median("unheard", "pg_us_per_notification")
    return {"runs": runs, "rate_per_s": rate, "listeners": listeners, "received_by_bench": received,
            "notifications": sum(r["sent"] for r in runs["heard"]),
            "control_notifications": sum(r["sent"] for r in runs["unheard"]),
            "pg_us_per_notification_heard": heard, "pg_us_per_notification_unheard": unheard,
            "pg_us_per_delivery": (heard - unheard) / listeners,
            "node_us_per_delivery": (median("heard", "node_us_per_notification")
                                     - median("unheard", "node_us_per_notification")) / nodes,
            "load_average": [min(r["load_average"][0] for rs in runs.values() for r in rs),
                             max(r["load_average"][1] for rs in runs.values() for r in rs)]}


def _drain(conn, expected, timeout=10):
    got = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn.poll()
        got += len(conn.notifies)
        conn.notifies.clear()
        if got >= expected:
            break
        time.sleep(0.1)
    return got


def fit(xs, ys):
    """Least squares y = fixed + slope * x, with the points; None with fewer than two x."""
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"slope": slope, "fixed": my - slope * mx, "points": list(zip(xs, ys))}


def fanout_fit(levels):
    """PostgreSQL µs per notification against the listening backends, for notifications heard
    and unheard: the slope is the cost per listener, the intercept the sender's own (its
    statement and commit)."""
    out = {}
    for kind in ("heard", "unheard"):
        line = fit([lv["fanout"]["listeners"] for lv in levels],
                   [lv["fanout"][f"pg_us_per_notification_{kind}"] for lv in levels])
        if line is not None:
            out[kind] = {"us_per_listener": line["slope"], "us_fixed": line["fixed"], "points": line["points"]}
    return out


def config_fanout(bench, nodes, idle_rate, node_idle_rate):
    changes = bench.size["config_changes"]
    win, done = bench.measure(changes * 3.0 + 3, lambda: bench.config_changes(changes))
    pg_extra = win["pg_cpu_s"] - idle_rate * win["seconds"]
    node_extra = win["node_cpu_s"] - node_idle_rate * win["seconds"]
    # what each node reads again: the configs table (ConfigWatcher) and the TLS material (L7R)
    reloads = [s for s in win["all_statements"] if " FROM configs " in s["query"] + " "
               or " FROM ssl_configs " in s["query"] + " "]
    return {"changes": done, "window_s": win["seconds"], "load_average": win["load_average"],
            "pg_ms_per_change": pg_extra * 1000 / max(done, 1),
            "node_ms_per_change_per_node": node_extra * 1000 / max(done, 1) / nodes,
            "reload_statements_per_change_per_node": sum(s["calls"] for s in reloads) / max(done, 1) / nodes,
            "reload_exec_ms_per_change": sum(s["exec_ms"] for s in reloads) / max(done, 1),
            "reload_statements": reloads}


def connects(bench, idle_rate, node_idle_rate):
    size, ports = bench.size, bench.fleet.ports
    # each user from a loopback address of its own: the L7R throttles logins per source address,
    # and a hundred users of one address are not what a cluster sees
    users = [{"auth": auth, "vm_ids": vms, "port": ports[u % len(ports)], "source": client_address(u)}
             for u, (auth, vms) in enumerate(zip(bench.connect_auth, bench.connect_vms))]
    workers = 2
    per = (len(users) + workers - 1) // workers
    target = {"kind": "l7r", "host": "127.0.0.1", "port": ports[0], "ca": str(bench.cert), "auth": None, "vm_ids": []}
    specs = [{"job": "connect", "target": target, "users": users[i * per:(i + 1) * per], "seconds": size["connect_s"],
              "count": size["connect_count"] // workers} for i in range(workers)]
    hosts = [r[0] for r in bench._sql("SELECT id FROM hosts WHERE name = ANY(%s)",
                                      ([node_name(i) for i in range(len(ports))],))]
    # every channel a connect may notify on: the vm_runtimes triggers' and the nodes' command channels
    channels = ["qvd_vm_runtime", "vm_changed", "desktop_changed", "vm_blocked_or_unblocked"]
    channels += [f"qvd_cmd_for_user_on_host{h}" for h in hosts] + [f"qvd_cmd_for_vm_on_host{h}" for h in hosts]
    with Crew(specs) as crew, ConnectionSampler(bench.pg, "qvd", ROLE, max_seconds=size["connect_s"] + 180,
                                                channels=channels) as sampler:
        crew.ready(60)

        def burst():
            crew.go()
            results = crew.results(size["connect_s"] + 120)
            # the last sessions' releases belong to their connects: the window ends after them
            return results, bench.wait_released()
        win, (results, left) = bench.measure(0, burst)
    done = sum(len(r["latencies"]) for r in results)
    lat = sorted(x for r in results for x in r["latencies"])
    pg_net = win["pg_cpu_s"] - idle_rate * win["seconds"]
    node_net = win["node_cpu_s"] - node_idle_rate * win["seconds"]
    return {"users": len(users), "nodes": len(ports), "connects": done, "errors": sum(r["errors"] for r in results),
            "last_error": next((r["last_error"] for r in results if r["last_error"]), None),
            "window_s": win["seconds"], "rate_per_s": done / win["seconds"] if win["seconds"] else 0.0,
            "p50_ms": lat[len(lat) // 2] * 1000 if lat else 0.0, "load_average": win["load_average"],
            "pg_cpu_s": win["pg_cpu_s"], "node_cpu_s": win["node_cpu_s"],
            "pg_ms_per_connect": pg_net * 1000 / max(done, 1), "node_ms_per_connect": node_net * 1000 / max(done, 1),
            # the nodes' idle statements in the window are left in: a few per node, against thousands
            "statements_per_connect": win["statements"] / max(done, 1),
            "queries_per_connect": win["queries"] / max(done, 1),
            "transactions_per_connect": win["transactions"] / max(done, 1),
            "wal_bytes_per_connect": win["wal_bytes"] / max(done, 1),
            "peak_connections": sampler.peak, "peak_connections_per_node": sampler.peak / len(ports),
            "notifications": sampler.notifications,
            "notifications_per_connect": sum(sampler.notifications.values()) / max(done, 1),
            "rows_left_held": left,
            "top_statements": [dict(s, per_connect=s["calls"] / max(done, 1)) for s in win["top_statements"]]}


def held_sessions(bench, top, floor_rate):
    """H real sessions held through the L7Rs (idle): an idle window just before them and one
    with them, so the difference is what holding them costs."""
    size, ports = bench.size, bench.fleet.ports
    count, nodes = size["held"], top["nodes"]
    target = {"kind": "l7r", "host": "127.0.0.1", "port": ports[0], "ports": ports, "ca": str(bench.cert),
              "auth": bench.held_auth, "vm_ids": bench.held_vms,
              "sources": [client_address(i) for i in range(min(count, 200))]}
    before, _ = bench.measure(size["idle_s"])
    with Crew([{"job": "idle", "target": target, "parallel": 20}]) as crew:
        crew.ready(30)
        crew.send_all(f"open {count}")
        (opened,) = crew.results(60 + count * 0.5)
        held = opened["open"]
        connected = bench._sql("SELECT count(*) FROM vm_runtimes WHERE user_state = 'connected'")[0][0]
        time.sleep(2)
        win, _ = bench.measure(size["idle_s"])
        crew.send_all("close")
        crew.results(120)
    left = bench.wait_released()
    base, figures = idle_figures(before, nodes, floor_rate), idle_figures(win, nodes, floor_rate)
    return {"sessions": held, "failures": opened["failures"], "connected_rows": connected, "rows_left_held": left,
            "window_s": win["seconds"], "load_average": win["load_average"], "before": base, "idle": figures,
            "pg_cpu_ms_per_session_min": (figures["pg_cpu_ms_per_node_min"] - base["pg_cpu_ms_per_node_min"])
            * nodes / max(held, 1),
            "statements_per_session_min": (figures["statements_per_node_min"] - base["statements_per_node_min"])
            * nodes / max(held, 1),
            "statement_growth": statement_growth(base, figures)}


def statement_growth(before, after):
    """Per statement: mean execution time before and after (what a larger state costs each call)."""
    old = {s["query"]: s for s in before["top_statements"]}
    return [{"query": s["query"], "mean_ms_before": old[s["query"]]["mean_ms"] if s["query"] in old else None,
             "mean_ms": s["mean_ms"], "calls_per_node_min": s["calls_per_node_min"]}
            for s in after["top_statements"]]


# not in the schema: what one partial index would change (the cluster monitor's last step
# looks for connected sessions on stopped VMs, which a healthy cluster has none of)
WHAT_IF_INDEX = ("CREATE INDEX bench_what_if_connected_on_stopped ON vm_runtimes (vm_id) "
                 "WHERE user_state = 'connected' AND vm_state = 'stopped'")


def seeded_sessions(bench, top, floor_rate):
    """The vm_runtimes table grown to R rows of running VMs with connected sessions held by the
    nodes' hosts, and the hosts table to the size of a larger cluster: the nodes' idle cost
    with that many sessions; then the same with one partial index more (a what-if)."""
    rows_before = bench._sql("SELECT count(*) FROM vm_runtimes")[0][0]
    rows = bench._seed_sessions(bench.size["rows"])
    hosts = bench._sql("SELECT count(*) FROM hosts")[0][0]
    bench._vacuum()
    time.sleep(2)
    win, _ = bench.measure(bench.size["idle_s"])
    figures = idle_figures(win, top["nodes"], floor_rate)
    plans = {stmt["query"]: bench.probe.explain(stmt["query"]) for stmt in figures["top_statements"][:6]}
    bench._sql(WHAT_IF_INDEX)
    bench._sql("ANALYZE vm_runtimes")
    time.sleep(2)
    indexed, _ = bench.measure(bench.size["idle_s"])
    with_index = idle_figures(indexed, top["nodes"], floor_rate)
    return {"vm_rows_before": rows_before, "vm_rows": rows, "sessions": rows - rows_before, "hosts": hosts,
            "idle": figures, "plans": plans, "load_average": win["load_average"],
            "statement_growth": statement_growth(top["idle"], figures),
            "what_if_index": {"sql": WHAT_IF_INDEX, "idle": with_index, "load_average": indexed["load_average"],
                              "statement_growth": statement_growth(figures, with_index)}}


def rows(out):
    levels = out["levels"]
    la = lambda w: f"load {w['load_average'][0]:.1f}-{w['load_average'][1]:.1f}"  # noqa: E731
    per_level = lambda fmt: " / ".join(f"{lv['nodes']}: {fmt(lv)}" for lv in levels)  # noqa: E731
    top = levels[-1]
    c, h, b = out["connect"], out["held"], out["sessions"]
    fit = out.get("fanout_fit", {})
    slope = (f"; fitted {fit['heard']['us_per_listener']:.1f} µs per listener heard, "
             f"{fit['unheard']['us_per_listener']:.1f} unheard" if "heard" in fit and "unheard" in fit else "")
    w = b["what_if_index"]
    return [
        ("cluster idle: PostgreSQL CPU per node per minute, net of the server's floor (ms; nodes: value)",
         per_level(lambda lv: f"{lv['idle']['pg_cpu_ms_per_node_min']:.1f}"), "(no reference)", "-",
         per_level(lambda lv: f"{lv['idle']['statements_per_node_min']:.0f}") + " statements per node-minute; "
         + la(top["idle"])),
        (f"cluster idle at {top['nodes']} nodes: WAL, connections, node CPU per node",
         f"{top['idle']['wal_bytes_per_node_min'] / 1024:.1f} KB WAL/min, {top['idle']['connections_per_node']:.1f} "
         f"connections, node {top['idle']['node_cpu_ms_per_node_min']:.0f} ms CPU/min, "
         f"{top['node_rss_mb']:.0f} MB RSS", "(no reference)", "-", la(top["idle"])),
        ("cluster connect_to_vm: PostgreSQL CPU per connect (connect, 101, close, release; ms; nodes: value)",
         per_level(lambda lv: f"{lv['connect']['pg_ms_per_connect']:.1f}")
         + (f" (fitted {out['connect_fit']['slope']:.2f} ms more per node)" if out.get("connect_fit") else ""),
         "(no reference)", "-", per_level(lambda lv: f"{lv['connect']['rate_per_s']:.0f}") + " connects/s; "
         + la(c)),
        (f"cluster connect_to_vm over {c['nodes']} nodes: cost per connect",
         f"PostgreSQL {c['pg_ms_per_connect']:.2f} ms, nodes {c['node_ms_per_connect']:.2f} ms CPU, "
         f"{c['statements_per_connect']:.1f} statements, {c['wal_bytes_per_connect'] / 1024:.1f} KB WAL, "
         f"{c['notifications_per_connect']:.1f} NOTIFYs ({c['connects']} connects, {c['rate_per_s']:.0f}/s)",
         "(no reference)", "-",
         f"{c['errors']} errors; peak {c['peak_connections_per_node']:.1f} connections per node; {la(c)}"),
        ("cluster NOTIFY: PostgreSQL CPU per notification, heard by every L7R / on a channel nobody hears "
         "(µs; nodes: value)",
         per_level(lambda lv: f"{lv['fanout']['pg_us_per_notification_heard']:.0f} / "
                   f"{lv['fanout']['pg_us_per_notification_unheard']:.0f}"), "(no reference)", "-",
         "node CPU per delivery (µs) " + per_level(lambda lv: f"{lv['fanout']['node_us_per_delivery']:.0f}")
         + slope + "; " + la(top["fanout"])),
        ("cluster config change (qvd-admin config set): PostgreSQL CPU per change (ms; nodes: value)",
         per_level(lambda lv: f"{lv['config_change']['pg_ms_per_change']:.1f}"), "(no reference)", "-",
         f"{top['config_change']['reload_statements_per_change_per_node']:.1f} statements and "
         f"{top['config_change']['node_ms_per_change_per_node']:.1f} ms CPU per node per change"),
        (f"cluster held idle sessions ({h['sessions']} over {top['nodes']} nodes): PostgreSQL CPU per session "
         "per minute (ms)", f"{h['pg_cpu_ms_per_session_min']:.3f}", "(no reference)", "-",
         f"{h['statements_per_session_min']:.3f} statements per session-minute; {la(h)}"),
        (f"cluster idle with {b['sessions']} more sessions held ({b['vm_rows']} vm_runtimes rows, {b['hosts']} "
         "hosts): PostgreSQL CPU per node per minute (ms)",
         f"{b['idle']['pg_cpu_ms_per_node_min']:.1f} (vs {top['idle']['pg_cpu_ms_per_node_min']:.1f} at "
         f"{b['vm_rows_before']} rows); with one partial index more: {w['idle']['pg_cpu_ms_per_node_min']:.1f}",
         "(no reference)", "-", f"{la(b)}; {la(w)}"),
    ]
