"""Where the L7R's CPU goes: one workload, a fixed amount of work, the node measured three ways.

    python -m bench.profile handshake [--count 400] [--tool callgrind|pyspy|cpu]
    python -m bench.profile relay [--sessions 20 --rounds 100] [--tool ...]

The node, PostgreSQL and the farm start as for `python -m bench` (bench/env.py, no
HAProxy needed), then one client process does a fixed amount of work:

- handshake: COUNT new TLS connections, each a full handshake and one GET /qvd/ping
  (as the bench's handshake scenario), 10 at a time;
- relay: SESSIONS sessions (connect_to_vm to the farm's echo display), then ROUNDS 1 KiB
  round trips on each, all at once (as the bench's relay scenario).

A smaller run of the same job warms the node up first (its database pool fills up to its
size: each new connection costs a SCRAM key derivation that would otherwise be charged
to the first few hundred handshakes).

Tools, each around the measured window only (set-up and sessions' start excluded):

- cpu: the node's utime+stime per unit of work (noisy on a shared machine);
- callgrind: the node runs under `valgrind --tool=callgrind --instr-atstart=no`; counting
  is switched on for the window (`callgrind_control -i on`), so the figure is the
  instructions the node executed per unit of work in user space (the kernel's share is
  not counted). Repeatable to about 1% whatever else the machine runs: compare commits
  with it. The dump is kept for `callgrind_annotate`;
- perf: `perf stat` of the node (system calls, context switches, task-clock) per unit of
  work, in a real run (valgrind's slowness changes how much each wakeup finds to do);
- perfrecord: `perf record -e cpu-clock` of the node (software sampling, kernel included;
  `perf report -i DIR/perf.l7r.JOB.data --sort dso,sym`);
- cprofile: the node under cProfile for the whole run (calls per unit: difference of two
  runs with different counts);
- pyspy: `py-spy record --nonblocking` (200 samples a second, Python frames: time in C is
  charged to the Python call that made it) on the node for the window; prints the share of the
  samples per part of the path (the categories below), from the collapsed stacks.

One line of JSON on stdout: the figures and the machine's load average.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from .env import BenchEnv
from .procstat import cpu_seconds, user_system_seconds
from .workers import Crew

# part of the path -> patterns on a collapsed stack's frames (first match from the leaf up wins)
CATEGORIES = [
    ("TLS handshake (OpenSSL)", ("do_handshake",)),
    ("TLS close (close_notify, shutdown)", ("TlsStream.close",)),
    ("TLS record crypto (OpenSSL read/write)", ("_ssl__SSLSocket_read", "_ssl__SSLSocket_write", "SSL_read",
                                                "SSL_write", "ssl3_read", "ssl3_write", "TlsStream.recv",
                                                "TlsStream.sendall")),
    ("TLS object set-up (TlsStream)", ("TlsStream.__init__",)),
    ("database (ping's host row)", ("psycopg", "db/__init__.py", "wait_callback", "db/connect.py", "runtime.py")),
    ("HTTP parse and answer (http.py, h11, endpoints)", ("h11/", "l7r/http.py", "l7r/endpoints.py")),
    ("metrics (prometheus_client)", ("prometheus_client", "common/metrics.py")),
    ("splice (relay callbacks)", ("l7r/splice.py",)),
    # a sample whose innermost Python frame is the hub's loop: libev, accept(), epoll and the
    # kernel's socket work, in C (before gevent/ below, which the same frame matches)
    ("event loop in C under Hub.run (libev, accept, epoll, kernel)", ("Hub.run",)),
    ("accept and greenlet (server.py, gevent)", ("l7r/server.py", "gevent/")),
]


def load():
    return os.getloadavg()


def _handshake_specs(env, args):
    target = env.tlslib_target if args.proxy == "tlslib" else env.target(args.proxy)
    return [{"job": "handshake", "target": target, "count": args.count, "seconds": 3600,
             "concurrency": 10, "ping": args.proxy != "haproxy" and not args.no_ping}]


def _relay_specs(env, args):
    return [{"job": "pingpong", "target": env.target(args.proxy), "sessions": args.sessions, "size": 1024,
             "round_trips": args.rounds, "seconds": 3600, "offset": 0}]


def _bulk_specs(env, args):
    return [{"job": "bulk", "target": env.target(args.proxy, sink=True), "bytes": args.megabytes << 20,
             "seconds": 600}]


def _units(job, results):
    if job == "handshake":
        return sum(r["handshakes"] for r in results), "handshake"
    if job == "bulk":
        return sum(r["sent"] for r in results) / 1e6, "MB"
    return 2 * sum(r["round_trips"] for r in results), "relayed message"


def _callgrind_total(path):
    """Instructions in a callgrind dump (its 'summary:' or 'totals:' line)."""
    total = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            total = max(total, int(line.split()[1]))
    return total


def _pyspy_split(collapsed):
    counts, total = Counter(), 0
    for line in Path(collapsed).read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        frames = stack.split(";")
        if any("epoll_wait" in f or "_run_callbacks" in f and f is frames[-1] for f in frames[-2:]) and \
                not any("l7r/" in f for f in frames):
            counts["idle in the event loop (epoll_wait)"] += n
            total += n
            continue
        name = "other"
        for frame in reversed(frames):
            hit = next((label for label, pats in CATEGORIES if any(p in frame for p in pats)), None)
            if hit:
                name = hit
                break
        counts[name] += n
        total += n
    return {k: round(100 * v / total, 1) for k, v in counts.most_common()}, total


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=("handshake", "relay", "bulk"))
    parser.add_argument("--megabytes", type=int, default=256, help="bulk: MB sent into the sink")
    parser.add_argument("--tool", choices=("cpu", "callgrind", "pyspy", "perf", "perfrecord", "cprofile"), default="cpu")
    parser.add_argument("--proxy", choices=("l7r", "haproxy", "tlslib"), default="l7r",
                        help="what is measured: the node's L7R, HAProxy in front of the same farm, or "
                             "(handshake only) bench/tls_libs.py's minimal gevent TLS server (a floor for Python)")
    parser.add_argument("--count", type=int, default=400, help="handshakes")
    parser.add_argument("--no-ping", action="store_true", help="handshake and close, no request (as HAProxy's)")
    parser.add_argument("--workers", type=int, default=1, help="l7r.workers of the node (cpu and perf tools)")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--out", default=None, help="folder for the callgrind dump / py-spy stacks")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="qvd-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    env = BenchEnv(farm_vms=max(20, args.sessions), connect_users=1, log=lambda *a: None)
    env.keep_logs = out                          # node.log (and haproxy.log) of the run
    env.l7r_workers = args.workers
    dump = out / f"callgrind.{args.proxy}.{args.job}.out"
    wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={dump}"]
    if args.tool == "callgrind" and args.proxy == "l7r":
        env.node_wrapper = wrapper
        env.node_start_timeout = 600
    elif args.tool == "callgrind":
        env.haproxy_wrapper = wrapper
    if args.tool == "cprofile":
        # whole run, start-up and warm-up included: compare two counts to get a unit's share
        env.node_wrapper = ["env"]
        env.node_python_options = ["-m", "cProfile", "-o", str(out / f"cprofile.{args.job}.{args.count}.out")]
    if args.proxy == "l7r":
        env._start_haproxy = lambda: None            # not needed here
    if args.tool == "pyspy" and args.proxy != "l7r":
        parser.error("py-spy profiles Python: --proxy l7r only")
    result = {"job": args.job, "tool": args.tool, "proxy": args.proxy}
    with env:
        pid = env.proxy_pid(args.proxy)
        if args.proxy == "tlslib":
            from .scenarios import _tls_lib_server
            tlslib, port = _tls_lib_server(env, "ssl")
            env.procs.append(tlslib)
            env.tlslib_target = {"kind": "tls", "host": "127.0.0.1", "port": port, "ca": env.cert}
            pid = tlslib.pid
        specs = {"handshake": _handshake_specs, "relay": _relay_specs, "bulk": _bulk_specs}[args.job](env, args)
        # warm up first: the database pool grows to its size (each new connection costs a
        # SCRAM key derivation), the interpreter's caches fill
        warm = [dict(spec, count=min(args.count, 100), round_trips=min(args.rounds, 10), bytes=8 << 20)
                for spec in specs]
        with Crew(warm) as crew:
            crew.ready(3600)
            crew.go()
            crew.results(3600)
        if args.job in ("relay", "bulk") and args.proxy == "l7r":
            from .scenarios import _wait_released
            _wait_released(env)
        spy = None
        with Crew(specs) as crew:
            crew.ready(3600)
            load0 = load()
            if args.tool == "callgrind":
                subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
                subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)
            elif args.tool == "perf":
                spy = subprocess.Popen(["perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter,context-switches,task-clock",
                                        "-p", str(pid), "-o", str(out / f"perf.{args.proxy}.{args.job}.txt")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
            elif args.tool == "perfrecord":
                spy = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "2000", "-p", str(pid),
                                        "-o", str(out / f"perf.{args.proxy}.{args.job}.data")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
            elif args.tool == "pyspy":
                spy = subprocess.Popen(["py-spy", "record", "--nonblocking", "--rate", "200",
                                        "--format", "raw", "-o", str(out / f"pyspy.{args.job}.txt"),
                                        "--pid", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
            def cpu():
                return cpu_seconds(pid) if args.proxy == "tlslib" else env.proxy_cpu_seconds(args.proxy)
            cpu0, us0, t0 = cpu(), user_system_seconds(pid), time.monotonic()
            crew.go()
            results = crew.results(3600)
            cpu1, us1, t1 = cpu(), user_system_seconds(pid), time.monotonic()
            if args.tool == "callgrind":
                subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True, capture_output=True)
                subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
            elif spy is not None:
                spy.send_signal(2)
                spy.wait(60)
        units, unit = _units(args.job, results)
        result.update({"units": units, "unit": unit, "node_cpu_s": cpu1 - cpu0, "wall_s": t1 - t0,
                       "us_cpu_per_unit": (cpu1 - cpu0) / units * 1e6 if units else None,
                       "us_user_system_per_unit": [round((b - a) / units * 1e6, 1) for a, b in zip(us0, us1)]
                       if units else None,
                       "load_before": load0, "load_after": load()})
        errors = sum(r.get("errors", 0) for r in results)
        if errors:
            result["errors"] = errors
    if args.tool == "callgrind":
        dumps = sorted(out.glob(f"callgrind.{args.proxy}.{args.job}.out*"), key=lambda p: p.stat().st_mtime)
        window = [p for p in dumps if p != dump] or dumps
        total = _callgrind_total(window[-1])
        result.update({"instructions": total, "instructions_per_unit": total / units if units else None,
                       "dump": str(window[-1])})
    elif args.tool == "perf":
        for line in (out / f"perf.{args.proxy}.{args.job}.txt").read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 3 and fields[0].replace(".", "").isdigit():
                result[f"{fields[2]}_per_unit"] = round(float(fields[0]) / units, 2) if units else None
    elif args.tool == "pyspy":
        split, samples = _pyspy_split(out / f"pyspy.{args.job}.txt")
        result.update({"samples": samples, "split_percent": split})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    if not shutil.which("valgrind") and "callgrind" in sys.argv:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    sys.exit(main())
