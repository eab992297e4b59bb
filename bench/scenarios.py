"""The scenarios of issue 6. Each takes (env, quick) and returns a dict: the raw figures,
and `rows` for the summary table: (measure, qvd-gevent, reference, target, verdict).

Every load loop is bounded by a count and a deadline (see the specs sent to the workers).
"""
import os
import secrets
import signal
import statistics
import subprocess
import time

from .procstat import children, cpu_seconds, rss_bytes, tree_cpu_seconds
from .workers import Crew

PATHS = ("l7r", "haproxy", "direct")
# the goals (bench/README.md, Goals): against HAProxy in the same run, and per connect_to_vm
BULK_GOAL = 1.2             # x HAProxy's MB per proxy CPU-second, at least
RELAY_GOAL = 1.15           # x HAProxy's proxy CPU per relayed message, at most
HANDSHAKE_GOAL = 0.75       # x HAProxy's full handshakes per proxy CPU-second, at least
CONNECT_NODE_MS = 1.5       # node CPU per connect_to_vm, at most
CONNECT_PG_MS = 1.0         # PostgreSQL CPU per connect_to_vm, at most
CONNECT_USERS = 100         # the rate and p99 goals are at this many concurrent users
CONNECT_RATE = 2 * 214      # connects per second at CONNECT_USERS, at least (twice the rate before the work)
CONNECT_P99_MS = 250        # p99 latency at CONNECT_USERS, at most
# what the node logs when a session setup goes a slow or failing way
NODE_LOG_NEEDLES = ("asking it to let go", "SerializationFailure", "Traceback")


def _median(values):
    return statistics.median(values) if values else 0.0


def _percentile(values, p):
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def _verdict(ok):
    return "met" if ok else "MISSED"


def _of_runs(count):
    """How a figure was taken from count runs."""
    return "one run" if count == 1 else f"median of {count} interleaved runs, min-max"


def _against(value, goal, higher_is_better, unit="x", fmt="{:.2f}"):
    """'met' or 'MISSED', and by how much: the figure against its goal, the gap in the
    goal's unit and in per cent of the goal."""
    if value is None:
        return "not measured"
    ok = value >= goal if higher_is_better else value <= goal
    sign = (">=" if ok else "<") if higher_is_better else ("<=" if ok else ">")
    gap = abs(value - goal)
    share = gap / goal * 100 if goal else 0.0
    shown = f"{fmt.format(value)}{unit} {sign} {fmt.format(goal)}{unit}"
    if ok:
        return f"met by {fmt.format(gap)}{unit} ({share:.0f}%): {shown}"
    return f"MISSED by {fmt.format(gap)}{unit} ({share:.0f}%): {shown}"


def _spread(values, fmt="{:.0f}"):
    """'median (min-max)' of the runs' figures."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(_median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def _measured(env, kind, specs, ready_timeout, run_timeout):
    """Run a crew; return (results, proxy CPU seconds, wall seconds) of the go->results window."""
    with Crew(specs) as crew:
        crew.ready(ready_timeout)
        cpu0, t0 = env.proxy_cpu_seconds(kind), time.monotonic()
        crew.go()
        results = crew.results(run_timeout)
        cpu1, t1 = env.proxy_cpu_seconds(kind), time.monotonic()
    return results, cpu1 - cpu0, t1 - t0


# --- bulk throughput -------------------------------------------------------------------------
def bulk(env, quick):
    size = (32 if quick else 1024) << 20
    seconds = 10 if quick else 20
    runs = 3
    out = {"bytes_per_run": size, "runs": runs, "paths": {}}
    figures = {kind: [] for kind in PATHS}
    for _ in range(runs):           # interleaved: the shared machine's noise hits every path alike
        for kind in PATHS:
            spec = {"job": "bulk", "target": env.target(kind, sink=True), "bytes": size, "seconds": seconds}
            (res,), cpu, _ = _measured(env, kind, [spec], 60, seconds + 30)
            # MB/s at the sender: bytes over the time until the last one was written (the
            # socket buffers on the way hold a few MB: under 1% of 1 GiB). The sink's
            # acknowledged rate is kept beside it; a run whose ack never comes is "stalled".
            figures[kind].append({"mb_s": res["sent"] / res["send_seconds"] / 1e6, "sent": res["sent"],
                                  "send_seconds": res["send_seconds"],
                                  "acked_mb_s": res["bytes"] / res["seconds"] / 1e6 if res["complete"] else None,
                                  "bytes": res["bytes"], "seconds": res["seconds"], "complete": res["complete"],
                                  "stalled": res.get("stalled", False), "proxy_cpu_s": cpu})
    for kind in PATHS:
        runs_k = figures[kind]
        for f in runs_k:
            f["mb_per_proxy_cpu_s"] = f["sent"] / 1e6 / f["proxy_cpu_s"] if f["proxy_cpu_s"] > 0 else None
        out["paths"][kind] = {"runs": runs_k, "mb_s": _median([f["mb_s"] for f in runs_k]),
                              "acked_mb_s": _median([f["acked_mb_s"] for f in runs_k if f["complete"]]),
                              "stalled_runs": sum(1 for f in runs_k if f["stalled"]),
                              "mb_s_per_proxy_cpu_s": _median([f["mb_per_proxy_cpu_s"] for f in runs_k
                                                               if f["mb_per_proxy_cpu_s"] is not None])}
    stalls = {k: out["paths"][k]["stalled_runs"] for k in PATHS}
    note = "; ".join(f"{'L7R' if k == 'l7r' else k}: {n} of {runs} runs stalled (every byte reached the sink, "
                     "its 10-byte reply never reached the client in 10 s)" for k, n in stalls.items() if n)
    eff = {k: out["paths"][k]["mb_s_per_proxy_cpu_s"] for k in ("l7r", "haproxy")}
    ratio = eff["l7r"] / eff["haproxy"] if eff["haproxy"] else 0.0
    out["ratio_to_haproxy"] = ratio

    def spread(kind, key):
        return _spread([f[key] for f in figures[kind]])
    out["rows"] = [(f"bulk, one TLS stream into a sink: MB per proxy CPU-second (MB/s at the sender in brackets; "
                    f"{_of_runs(runs)})",
                    f"{spread('l7r', 'mb_per_proxy_cpu_s')} [{spread('l7r', 'mb_s')}] = {ratio:.2f}x HAProxy",
                    f"HAProxy {spread('haproxy', 'mb_per_proxy_cpu_s')} [{spread('haproxy', 'mb_s')}] / direct "
                    f"[{spread('direct', 'mb_s')}]", ">= 1.2x HAProxy's MB per proxy CPU-second",
                    ("MISSED (the L7R stalled): " if stalls["l7r"] else "") + _against(ratio, BULK_GOAL, True)
                    + (f"; {note}" if note else ""))]
    return out


# --- small-message relay cost ----------------------------------------------------------------
def relay(env, quick):
    sessions = 40 if quick else 200
    rounds = 50 if quick else 250
    runs = 1 if quick else 3
    workers = 2
    per = sessions // workers
    out = {"sessions": sessions, "message_bytes": 1024, "runs": runs, "paths": {}}
    figures = {kind: [] for kind in PATHS}
    for _ in range(runs):           # interleaved, as bulk
        for kind in PATHS:
            specs = [{"job": "pingpong", "target": env.target(kind), "sessions": per, "size": 1024,
                      "round_trips": rounds, "seconds": 30, "offset": i * per} for i in range(workers)]
            results, cpu, wall = _measured(env, kind, specs, 120, 60)
            trips = sum(r["round_trips"] for r in results)
            messages = 2 * trips    # a ping to the VM and its pong back: two relayed messages
            figures[kind].append({"round_trips": trips, "messages": messages, "wall_s": wall, "proxy_cpu_s": cpu,
                                  "round_trips_per_s": trips / wall,
                                  "us_cpu_per_message": cpu / messages * 1e6 if kind != "direct" else None})
            if kind == "l7r":
                _wait_released(env)
    for kind in PATHS:
        runs_k = figures[kind]
        out["paths"][kind] = {"runs": runs_k, "round_trips": sum(r["round_trips"] for r in runs_k),
                              "round_trips_per_s": _median([r["round_trips_per_s"] for r in runs_k]),
                              "us_cpu_per_message": (_median([r["us_cpu_per_message"] for r in runs_k])
                                                     if kind != "direct" else None)}
    l7r, ha = out["paths"]["l7r"]["us_cpu_per_message"], out["paths"]["haproxy"]["us_cpu_per_message"]
    ratio = l7r / ha if ha else 0.0
    out["ratio_to_haproxy"] = ratio

    def spread(kind):
        return _spread([r["us_cpu_per_message"] for r in figures[kind]], "{:.1f}")
    out["rows"] = [(f"relay cost, 1 KiB ping-pong over {sessions} sessions: µs proxy CPU per relayed message "
                    f"({_of_runs(runs)})", f"{spread('l7r')} = {ratio:.2f}x HAProxy",
                    f"HAProxy {spread('haproxy')}", "<= 1.15x HAProxy's µs CPU per message",
                    _against(ratio, RELAY_GOAL, False))]
    return out


def _wait_released(env, timeout=60):
    """Sessions end asynchronously in the L7R: wait until no farm VM is still held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = env.db.query_one("SELECT count(*) FROM vm_runtimes WHERE user_state <> 'disconnected'")[0]
        if held == 0:
            return 0
        time.sleep(0.2)
    return held


# --- TLS handshakes ----------------------------------------------------------------------------
def handshakes(env, quick):
    seconds = 3 if quick else 10
    rounds = 1 if quick else 3
    out = {"certificate": "ECDSA P-256 (self-signed)", "rounds": rounds, "paths": {}}
    figures = {kind: [] for kind in ("l7r", "haproxy")}
    for _ in range(rounds):         # interleaved: the shared machine's noise hits both alike
        for kind in ("l7r", "haproxy"):
            figures[kind].append(_handshake_run(env, kind, seconds))
    for kind, runs in figures.items():
        out["paths"][kind] = {"runs": runs, "handshakes": sum(r["handshakes"] for r in runs),
                              "errors": sum(r["errors"] for r in runs),
                              "per_s": _median([r["per_s"] for r in runs]),
                              "per_cpu_s": _median([r["per_cpu_s"] for r in runs]),
                              "last_error": next((r["last_error"] for r in runs if r["last_error"]), None)}
    out["tls_version"] = _negotiated(env)
    l7r, ha = out["paths"]["l7r"]["per_cpu_s"], out["paths"]["haproxy"]["per_cpu_s"]
    ratio = l7r / ha if ha else 0.0
    out["ratio_to_haproxy"] = ratio

    def spread(kind):
        return _spread([r["per_cpu_s"] for r in figures[kind]])
    out["rows"] = [(f"full TLS handshakes per proxy CPU-second (L7R: handshake + GET /qvd/ping; HAProxy: handshake "
                    f"+ backend connect; {_of_runs(rounds)})",
                    f"{spread('l7r')} = {ratio:.2f}x HAProxy", f"HAProxy {spread('haproxy')}",
                    ">= 0.75x HAProxy's handshakes per CPU-second", _against(ratio, HANDSHAKE_GOAL, True))]
    return out


def _handshake_run(env, kind, seconds):
    specs = [{"job": "handshake", "target": env.target(kind), "count": 50000, "seconds": seconds,
              "concurrency": 10, "ping": kind == "l7r"} for _ in range(2)]
    results, cpu, wall = _measured(env, kind, specs, 30, seconds + 60)
    done = sum(r["handshakes"] for r in results)
    return {"handshakes": done, "errors": sum(r["errors"] for r in results), "wall_s": wall, "proxy_cpu_s": cpu,
            "per_s": done / wall, "per_cpu_s": done / cpu if cpu else 0.0,
            "last_error": next((r["last_error"] for r in results if r["last_error"]), None)}


def _relay_run(env, sessions, rounds):
    per = sessions // 2
    specs = [{"job": "pingpong", "target": env.target("l7r"), "sessions": per, "size": 1024,
              "round_trips": rounds, "seconds": 30, "offset": i * per} for i in range(2)]
    results, cpu, wall = _measured(env, "l7r", specs, 120, 60)
    trips = sum(r["round_trips"] for r in results)
    _wait_released(env)
    return {"round_trips": trips, "wall_s": wall, "proxy_cpu_s": cpu, "round_trips_per_s": trips / wall,
            "us_cpu_per_message": cpu / (2 * trips) * 1e6 if trips else None}


# --- every core: the L7R in 1 and 2 worker processes -------------------------------------------
def workers(env, quick):
    """Handshakes and relay with l7r.workers = 1 and 2, the node restarted between, interleaved
    (1, 2, 1, 2): what a second core buys on this machine, where the load generators share
    the same two cores."""
    counts = (1, 2)
    rounds = 1 if quick else 2
    seconds = 3 if quick else 10
    sessions, trips = (40, 50) if quick else (200, 250)
    out = {"counts": list(counts), "rounds": rounds, "cores": os.cpu_count(), "by_workers": {}}
    figures = {n: {"handshake": [], "relay": []} for n in counts}
    try:
        for _ in range(rounds):
            for n in counts:
                env.restart_node(n)
                # uncounted: every worker opens its database connections (a SCRAM exchange each)
                _handshake_run(env, "l7r", 2)
                _relay_run(env, 20 * n, 5)
                # l7r.workers = 1: the L7R in the node process, no worker process
                processes = len(children(env.node.pid, b"l7r_worker"))
                figures[n]["handshake"].append(dict(_handshake_run(env, "l7r", seconds), worker_processes=processes))
                figures[n]["relay"].append(dict(_relay_run(env, sessions, trips), worker_processes=processes))
    finally:
        if env.l7r_workers != 1:
            # the scenarios after this one measure a node of one process, warmed up as before
            env.restart_node(1)
            _handshake_run(env, "l7r", 2)
            _relay_run(env, 20, 5)
    rows = []
    for n in counts:
        hs, rl = figures[n]["handshake"], figures[n]["relay"]
        out["by_workers"][n] = {"handshake": hs, "relay": rl,
                                "handshakes_per_s": _median([r["per_s"] for r in hs]),
                                "handshakes_per_cpu_s": _median([r["per_cpu_s"] for r in hs]),
                                "round_trips_per_s": _median([r["round_trips_per_s"] for r in rl]),
                                "us_cpu_per_message": _median([r["us_cpu_per_message"] for r in rl])}
    one, two = out["by_workers"][1], out["by_workers"][2]
    shown = "shown, no goal: what a second core buys here (bench/README.md: a 32-core node)"

    def gain(key, what):
        return f"2 workers: {two[key] / one[key]:.2f}x the {what} of 1" if one[key] else "-"

    def both(kind, key, fmt="{:.0f}"):
        return "; ".join(f"{n}: {_spread([r[key] for r in figures[n][kind]], fmt)}" for n in counts)
    rows.append((f"handshakes per second with 1 / 2 L7R workers (per node CPU-second in brackets; {_of_runs(rounds)} "
                 f"each; {os.cpu_count()} cores shared with the load generators)",
                 f"{both('handshake', 'per_s')} [{both('handshake', 'per_cpu_s')}]", "(no reference)", shown,
                 gain("handshakes_per_s", "handshakes per second")))
    rows.append((f"relay with 1 / 2 L7R workers: round trips per second over {sessions} sessions (µs node CPU per "
                 f"message in brackets; {_of_runs(rounds)} each)",
                 f"{both('relay', 'round_trips_per_s')} [{both('relay', 'us_cpu_per_message', '{:.1f}')}]",
                 "(no reference)", shown, gain("round_trips_per_s", "round trips per second")))
    out["rows"] = rows
    return out


def _negotiated(env):
    from .wire import client_context, open_connection
    found = {}
    for kind in ("l7r", "haproxy"):
        target = env.target(kind)
        sock = open_connection(target["host"], target["port"], client_context(target["ca"]))
        found[kind] = f"{sock.version()} {sock.cipher()[0]}"
        sock.close()
    return found


# --- connect_to_vm to running VMs --------------------------------------------------------------
def connect(env, quick):
    users = env.connect_users_spec[: 20 if quick else 100]
    seconds = 5 if quick else 20
    workers = 2
    per = (len(users) + workers - 1) // workers
    specs = [{"job": "connect", "target": env.target("l7r"), "users": users[i * per:(i + 1) * per],
              "seconds": seconds, "count": 20000} for i in range(workers)]
    mark = env.log_mark()
    pg0 = tree_cpu_seconds(env.postgres_pid())
    results, cpu, wall = _measured(env, "l7r", specs, 30, seconds + 120)
    pg_cpu = tree_cpu_seconds(env.postgres_pid()) - pg0
    lat = [x for r in results for x in r["latencies"]]
    node_log = env.log_count(mark, NODE_LOG_NEEDLES)
    out = {"users": len(users), "vms_per_user": env.vms_per_user, "mode": "each user its own VMs (round robin over 3)",
           "connects": len(lat), "errors": sum(r["errors"] for r in results), "wall_s": wall,
           "rate_per_s": len(lat) / wall, "p50_ms": _percentile(lat, 50) * 1000, "p99_ms": _percentile(lat, 99) * 1000,
           "node_cpu_s": cpu, "postgres_cpu_s": pg_cpu, "node_log": node_log, "last_error": next((r["last_error"] for r in results if r["last_error"]), None)}
    _wait_released(env)
    n = len(lat)
    node_ms = cpu / n * 1000 if n else None
    pg_ms = pg_cpu / n * 1000 if n else None
    out.update({"node_cpu_ms_per_connect": node_ms, "postgres_cpu_ms_per_connect": pg_ms,
                "l7r_workers": env.l7r_workers})
    at = f"{len(users)} concurrent users, {n} connects in {wall:.0f} s, l7r.workers = {env.l7r_workers}"
    errors = (f"{out['errors']} client errors; node log: {node_log['asking it to let go']} takeovers, "
              f"{node_log['SerializationFailure']} unretried serialization failures")
    if len(users) == CONNECT_USERS:
        rate_verdict = (_against(out["rate_per_s"], CONNECT_RATE, True, "/s", "{:.0f}") + "; p99 "
                        + _against(out["p99_ms"], CONNECT_P99_MS, False, " ms", "{:.0f}"))
    else:
        rate_verdict = f"not judged: the goals are at {CONNECT_USERS} users (this run: {len(users)}, --quick)"
    out["rows"] = [
        (f"connect_to_vm to a running VM: node CPU per connect, ms ({at})",
         f"{node_ms:.2f}" if n else "-", "(no reference)", f"<= {CONNECT_NODE_MS} ms",
         _against(node_ms, CONNECT_NODE_MS, False, " ms")),
        (f"connect_to_vm to a running VM: PostgreSQL CPU per connect, ms (all its processes; {at})",
         f"{pg_ms:.2f}" if n else "-", "(no reference)", f"<= {CONNECT_PG_MS} ms",
         _against(pg_ms, CONNECT_PG_MS, False, " ms")),
        (f"connect_to_vm to a running VM: rate and latency, TLS connect -> 101 ({at})",
         f"{out['rate_per_s']:.0f}/s, p50 {out['p50_ms']:.0f} ms, p99 {out['p99_ms']:.0f} ms "
         f"(node CPU {cpu / wall * 100:.0f}% of a core, PostgreSQL {pg_cpu / wall * 100:.0f}%)",
         "(no reference; 214/s, p99 784 ms before the work)",
         f">= {CONNECT_RATE}/s and p99 <= {CONNECT_P99_MS} ms at {CONNECT_USERS} users",
         f"{rate_verdict}; {errors}"),
    ]
    return out


# --- cold start: the node's own overhead ------------------------------------------------------
def cold_start(env, quick):
    from .wire import client_context, connect_to_vm, open_connection
    runs = 2 if quick else 7
    ctx = client_context(env.cert)
    connects, starts = [], []
    for _ in range(runs):           # interleaved with the VM's own start: same machine load for both
        _stop_cold_vm(env)
        progress = []
        t0 = time.monotonic()
        sock = open_connection("127.0.0.1", env.l7r_port, ctx, timeout=60)
        connect_to_vm(sock, env.cold_vm, env.cold_auth, "127.0.0.1",
                      on_progress=lambda text, log=progress, t0=t0: log.append((round(time.monotonic() - t0, 4), text)))
        connects.append({"seconds": time.monotonic() - t0, "progress": progress})
        sock.close()
        _stop_cold_vm(env)
        up = _vm_own_start(env.init)
        if up is not None:
            starts.append(up)
    connect_s = _median([c["seconds"] for c in connects])
    vm_s = _median(starts)
    overhead_ms = (connect_s - vm_s) * 1000
    out = {"runs": runs, "connect_to_101_s": [c["seconds"] for c in connects], "vm_start_s": starts,
           "median_connect_s": connect_s, "median_vm_start_s": vm_s, "overhead_ms": overhead_ms,
           "progress_first_run": connects[0]["progress"] if connects else []}
    spread = (f"; 101 after {min(c['seconds'] for c in connects) * 1000:.0f}-"
              f"{max(c['seconds'] for c in connects) * 1000:.0f} ms, VM start {min(starts) * 1000:.0f}-"
              f"{max(starts) * 1000:.0f} ms" if starts else "")
    out["rows"] = [(f"node overhead: connect_to_vm on a stopped process VM -> 101, minus the VM's own start "
                    f"(ms, medians of {runs})",
                    f"{overhead_ms:.0f} (101 after {connect_s * 1000:.0f} ms; VM start {vm_s * 1000:.0f} ms{spread})",
                    "original: polls every 2 s", "< 100", _verdict(overhead_ms < 100))]
    return out


def _vm_own_start(init, address="127.79.0.1"):
    """Seconds from exec of qvd-vm-init to its VMA answering ping (5 ms polls), or None."""
    from qvd_gevent.vma.client import VmaClient, VmaError
    key = secrets.token_urlsafe(32)          # as the HKD hands every VM its agent key
    envvars = dict(os.environ, QVD_VM_ID="999999", QVD_VM_NAME="bench-start", QVD_VM_ADDRESS=address,
                   QVD_VMA_SECRET=key)
    client = VmaClient(address, 3030, timeout=1, key=key)
    t0 = time.monotonic()
    proc = subprocess.Popen([init], env=envvars, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    up = None
    try:
        for _ in range(4000):
            try:
                client.ping()
                up = time.monotonic() - t0
                break
            except VmaError:
                if proc.poll() is not None or time.monotonic() - t0 > 30:
                    break
                time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return up


def _stop_cold_vm(env, timeout=60):
    state = env.db.query_one("SELECT vm_state FROM vm_runtimes WHERE vm_id = %s", (env.cold_vm,))[0]
    if state == "stopped":
        return
    env._admin("vm", "stop", "-f", f"id={env.cold_vm}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = env.db.query_one("SELECT vm_state, user_state FROM vm_runtimes WHERE vm_id = %s", (env.cold_vm,))
        if row[0] == "stopped" and row[1] == "disconnected":
            return
        time.sleep(0.1)
    raise RuntimeError(f"cold VM {env.cold_vm} did not stop in {timeout} s")


# --- idle sessions held ------------------------------------------------------------------------
def idle(env, quick):
    levels = (100, 200, 300) if quick else (1000, 5000, 10000)
    workers = 1 if quick else 2
    # two sockets per session in one proxy process: the file limit caps the top level
    levels = tuple(min(level, env.max_sessions) for level in levels)
    top = levels[-1]
    env.add_farm_vms(top - len(env.echo_vms))
    out = {"levels": list(levels), "paths": {}}
    for kind in ("l7r", "haproxy"):
        pid = env.proxy_pid(kind)
        per_worker = top // workers
        specs = [{"job": "idle", "target": env.target(kind), "offset": i * per_worker,
                  "parallel": 50 if kind == "l7r" else 100} for i in range(workers)]
        points = []
        mark = env.log_mark()
        with Crew(specs) as crew:
            crew.ready(30)
            time.sleep(1)
            rss0 = rss_bytes(pid)
            held = 0
            t0 = time.monotonic()
            for level in levels:
                crew.send_all(f"open {(level - held) // workers}")
                results = crew.results(600)
                held = sum(r["open"] for r in results)
                failures = sum(r["failures"] for r in results)
                time.sleep(2)
                rss = rss_bytes(pid)
                points.append({"sessions": held, "failures": failures, "rss_bytes": rss,
                               "bytes_per_session": (rss - rss0) / held if held else 0.0,
                               "elapsed_s": time.monotonic() - t0,
                               "last_error": next((r["last_error"] for r in results if r["last_error"]), None)})
                env.farm_heartbeat()
            crew.send_all("close")
            crew.results(120)
        out["paths"][kind] = {"rss_baseline_bytes": rss0, "points": points}
        if kind == "l7r":
            out["paths"][kind]["node_log"] = env.log_count(mark, NODE_LOG_NEEDLES)
        if kind == "l7r":
            out["l7r_release_left"] = _wait_released(env, 120)
    l7r_top = out["paths"]["l7r"]["points"][-1]
    ha_top = out["paths"]["haproxy"]["points"][-1]
    out["rows"] = []
    for i, level in enumerate(levels):
        a, b = out["paths"]["l7r"]["points"][i], out["paths"]["haproxy"]["points"][i]
        out["rows"].append((f"idle sessions: RSS per session at {a['sessions']} held (KB)"
                            + (f" [{a['failures']} failed]" if a["failures"] else ""),
                            f"{a['bytes_per_session'] / 1024:.1f}", f"HAProxy {b['bytes_per_session'] / 1024:.1f}",
                            "< 32", _verdict(a["bytes_per_session"] < 32 * 1024 and a["sessions"] >= level * 0.99)))
    out["l7r_top"], out["haproxy_top"] = l7r_top, ha_top
    return out


# --- idle browser sessions beside idle native ones ---------------------------------------------
RFB_BANNER = "RFB 003.008\n"       # what the farm's rfb display (like Xvnc) sends first


def browser(env, quick):
    """Idle desktops held by browsers (TLS WebSocket -> the L7R's WsRelay -> display) and by
    native clients (connect_to_vm -> splice -> display), on the same node in the same run,
    all held at once. A warm-up step of each kind comes first and is not counted (the first
    sessions of a node pay for its first use of each code path: several KB per session of
    the first 50 in a quick run); then the steps alternate native, browser, native,
    browser, so memory freed by earlier scenarios falls on both alike. A session counts
    once the desktop's first message (the farm's rfb stand-in sends the RFB banner, as Xvnc
    does) came through it. RSS growth of the node per step, per kind."""
    per_kind = 100 if quick else 500
    warm = 20 if quick else 50
    steps = 2
    vms = env.add_farm_vms(2 * (per_kind + warm), display="rfb")
    native_vms, web_vms = vms[:per_kind + warm], vms[per_kind + warm:]
    tokens = env.web_tokens(web_vms)
    kinds = ("native", "browser")
    specs = [{"job": "idle", "parallel": 50, "target": env.target("l7r", vm_ids=native_vms, expect=RFB_BANNER)},
             {"job": "idle", "parallel": 50,
              "target": env.target("web", vm_ids=web_vms, tokens=tokens, expect=RFB_BANNER)}]
    pid = env.proxy_pid("l7r")
    mark = env.log_mark()
    out = {"sessions_per_kind": per_kind, "steps": [], "kinds": {}}
    with Crew(specs) as crew:
        crew.ready(30)
        time.sleep(1)
        rss0 = rss = rss_bytes(pid)
        held = dict.fromkeys(kinds, 0)
        t0 = time.monotonic()
        for step in range(steps + 1):
            for worker, kind in zip(crew.workers, kinds):
                worker.send(f"open {per_kind // steps if step else warm}")
                result = worker.read(600)["result"]
                opened = result["open"] - held[kind]
                held[kind] = result["open"]
                time.sleep(2)
                before, rss = rss, rss_bytes(pid)
                out["steps"].append({"kind": kind, "warm_up": step == 0, "opened": opened, "held": dict(held), "rss_bytes": rss,
                                     "growth_bytes": rss - before, "failures": result["failures"],
                                     "last_error": result["last_error"], "elapsed_s": time.monotonic() - t0})
                env.farm_heartbeat()
        out["node_connections"] = _node_sessions(env)
        crew.send_all("close")
        crew.results(120)
    out["rss_baseline_bytes"] = rss0
    out["node_log"] = env.log_count(mark, NODE_LOG_NEEDLES)
    out["release_left"] = _wait_released(env, 120)
    out["rows"] = []
    for kind in kinds:
        mine = [s for s in out["steps"] if s["kind"] == kind and not s["warm_up"]]
        sessions = sum(s["opened"] for s in mine)
        growth = sum(s["growth_bytes"] for s in mine)
        failures = mine[-1]["failures"]
        out["kinds"][kind] = {"sessions": sessions, "growth_bytes": growth, "failures": failures,
                              "bytes_per_session": growth / sessions if sessions else 0.0}
    web, native = out["kinds"]["browser"], out["kinds"]["native"]
    out["rows"].append((f"idle browser sessions (WebSocket to an idle desktop): RSS per session, {web['sessions']} "
                        f"held beside {native['sessions']} native, after {warm} of each (KB)"
                        + (f" [{web['failures']} failed]" if web["failures"] else ""),
                        f"{web['bytes_per_session'] / 1024:.1f}",
                        f"native {native['bytes_per_session'] / 1024:.1f}", "< 32",
                        _verdict(web["bytes_per_session"] < 32 * 1024 and web["sessions"] >= per_kind * 0.99)))
    return out


def _node_sessions(env):
    """Rows the node holds connected right now (every session of both kinds)."""
    return env.db.query_one("SELECT count(*) FROM vm_runtimes WHERE user_state = 'connected'")[0]


# --- the TLS library: stdlib ssl against pyOpenSSL, the same server on each ----------------------
def _tls_lib_server(env, lib):
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "bench.tls_libs", "--lib", lib, "--cert", env.cert,
                             "--key", env.key], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"bench.tls_libs --lib {lib} did not start: {line!r}")
    return proc, int(line.split()[1])


def tls_libraries(env, quick):
    """Why the L7R uses the standard library's ssl: the same gevent TLS server on ssl and on
    pyOpenSSL (bench/tls_libs.py), full handshakes per CPU-second and memory per idle TLS
    connection, interleaved, in the same run."""
    seconds = 3 if quick else 8
    levels = (200,) if quick else (1000, 4000)
    rounds = 1 if quick else 2
    out = {"certificate": "ECDSA P-256 (self-signed)", "libs": {"ssl": {"handshake": [], "idle": []},
                                                                "pyopenssl": {"handshake": [], "idle": []}}}
    for _ in range(rounds):
        for lib in ("ssl", "pyopenssl"):
            proc, port = _tls_lib_server(env, lib)
            try:
                target = {"kind": "tls", "host": "127.0.0.1", "port": port, "ca": env.cert}
                specs = [{"job": "handshake", "target": target, "count": 50000, "seconds": seconds,
                          "concurrency": 10, "ping": True} for _ in range(2)]
                with Crew(specs) as crew:
                    crew.ready(30)
                    cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
                    crew.go()
                    results = crew.results(seconds + 60)
                    cpu, wall = cpu_seconds(proc.pid) - cpu0, time.monotonic() - t0
                done = sum(r["handshakes"] for r in results)
                out["libs"][lib]["handshake"].append({
                    "handshakes": done, "errors": sum(r["errors"] for r in results), "server_cpu_s": cpu,
                    "wall_s": wall, "per_cpu_s": done / cpu if cpu else 0.0,
                    "last_error": next((r["last_error"] for r in results if r["last_error"]), None)})
                points = []
                specs = [{"job": "idle", "target": target, "parallel": 100}]
                with Crew(specs) as crew:
                    crew.ready(30)
                    time.sleep(1)
                    rss0, held = rss_bytes(proc.pid), 0
                    for level in levels:
                        crew.send_all(f"open {level - held}")
                        results = crew.results(300)
                        held = sum(r["open"] for r in results)
                        time.sleep(1)
                        points.append({"sessions": held, "failures": sum(r["failures"] for r in results),
                                       "rss_bytes": rss_bytes(proc.pid),
                                       "bytes_per_session": (rss_bytes(proc.pid) - rss0) / held if held else 0.0})
                    crew.send_all("close")
                    crew.results(120)
                out["libs"][lib]["idle"].append(points)
            finally:
                proc.stdin.close()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)

    def hs(lib):
        return _median([r["per_cpu_s"] for r in out["libs"][lib]["handshake"]])

    def kb(lib, i):
        return _median([run[i]["bytes_per_session"] for run in out["libs"][lib]["idle"]]) / 1024
    ssl_hs, ossl_hs = hs("ssl"), hs("pyopenssl")
    out["rows"] = [("TLS library under gevent: full handshakes + GET per server CPU-second (stdlib ssl vs "
                    f"pyOpenSSL, same server; µs CPU per handshake in brackets; {_of_runs(rounds)})",
                    f"ssl {ssl_hs:.0f} [{1e6 / ssl_hs if ssl_hs else 0:.0f} µs]",
                    f"pyOpenSSL {ossl_hs:.0f} [{1e6 / ossl_hs if ossl_hs else 0:.0f} µs]",
                    "shown, no goal: the figures behind the README's choice of stdlib ssl",
                    f"ssl {ssl_hs / ossl_hs:.2f}x pyOpenSSL's handshakes per CPU-second" if ossl_hs else "-")]
    for i, level in enumerate(levels):
        mine, theirs = kb("ssl", i), kb("pyopenssl", i)
        out["rows"].append((f"TLS library under gevent: RSS per idle TLS connection at {level} (KB; "
                            "both with OpenSSL's release-buffers mode)",
                            f"ssl {mine:.1f}", f"pyOpenSSL {theirs:.1f}", "ssl <= pyOpenSSL",
                            _against(mine, theirs, False, " KB", "{:.1f}")))
    return out


SCENARIOS = {
    "bulk": bulk,
    "relay": relay,
    "handshake": handshakes,
    "workers": workers,
    "connect": connect,
    "cold": cold_start,
    "idle": idle,
    "browser": browser,
    "tlslib": tls_libraries,
}
