"""python -m bench: every figure of issue 6, measured beside its reference in one run.

    python -m bench [--quick] [--only bulk,relay,...] [--results DIR]

Starts an embedded PostgreSQL, a provisioned node (`qvd-node`, process hypervisor), the
farm of stand-in VMs, HAProxy; runs the chosen scenarios; writes DIR/<scenario>.json,
DIR/bench.png and DIR/table.md, and prints the table. Everything on loopback (the HKD
density run: inside a network namespace it makes, with no route out).
"""
import argparse
import datetime
import sys
import time
import traceback
from pathlib import Path

from . import report
from .procstat import machine

# browser before idle: idle's 10,000 sessions leave the node memory that later sessions reuse
ORDER = ("bulk", "relay", "handshake", "workers", "connect", "cold", "browser", "idle", "tlslib", "hkd", "cluster")
# scenarios with an environment of their own (the others share one node, farm and HAProxy)
STANDALONE = ("hkd", "cluster")


def source_state():
    """The commit the figures belong to, and whether src/ differed from it."""
    import subprocess
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "src"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown source state"
    return f"commit {head}" + (" plus uncommitted changes in src/" if dirty else "") if head else "not a git checkout"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a few minutes (the cluster run alone about 2.5)")
    parser.add_argument("--only", default="", help=f"comma-separated scenarios out of {','.join(ORDER)}")
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"),
                        help="folder for the JSON files, the chart and the table")
    parser.add_argument("--hkd-hypervisor", choices=("netns", "process"), default="netns",
                        help="VMs of the HKD density run (netns needs root)")
    parser.add_argument("--cluster-levels", default="",
                        help="node counts of the cluster run, comma-separated (default 10,25,50; --quick 2,5)")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(ORDER)
    unknown = [s for s in chosen if s not in ORDER]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    chosen = [s for s in ORDER if s in chosen]
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    source = source_state()
    command = ("python -m bench" + (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "")
               + (f" --cluster-levels {args.cluster_levels}" if args.cluster_levels else ""))

    def say(text):
        print(f"[bench {time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    from .scenarios import SCENARIOS
    results = {}
    node_scenarios = [s for s in chosen if s in SCENARIOS]
    try:
        levels = [int(n) for n in args.cluster_levels.split(",") if n.strip()]
    except ValueError:
        parser.error("--cluster-levels: comma-separated node counts, e.g. 10,25,50")
    env = None
    try:
        if node_scenarios:
            from .env import BenchEnv
            say("starting PostgreSQL, node, farm and HAProxy")
            env = BenchEnv(farm_vms=200, connect_users=100)
            env.keep_logs = folder
            env.start()
            say(f"node pid {env.node.pid} on 127.0.0.1:{env.l7r_port}, {env.haproxy_version}, "
                f"file limit {env.file_limit}")
        for position, name in enumerate(chosen):
            if env is not None and all(later in STANDALONE for later in chosen[position:]):
                # the shared node and HAProxy would only add load to the runs that follow
                say("stopping the shared node, farm and HAProxy")
                env.stop()
                env = None
            say(f"scenario {name}")
            t = time.monotonic()
            try:
                if name == "hkd":
                    from .hkd_density import run as hkd_run
                    data = hkd_run(args.quick, args.hkd_hypervisor, say)
                elif name == "cluster":
                    from .cluster import run as cluster_run
                    data = cluster_run(args.quick, say, levels or None)
                else:
                    env.farm_heartbeat()
                    data = SCENARIOS[name](env, args.quick)
            except Exception as exc:  # a failed scenario is reported, the others still run
                traceback.print_exc()
                data = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
            data.update({"scenario": name, "quick": args.quick, "seconds": time.monotonic() - t, "source": source,
                         "machine": machine(), "date": stamp, "command": command})
            if env is not None and name not in STANDALONE:
                data["haproxy"] = env.haproxy_version
            results[name] = data
            report.write_json(folder, name, data)
            for row in data.get("rows", []):
                say(f"  {row[0]}: {row[1]} | {row[2]} | target {row[3]}: {row[4]}")
    finally:
        if env is not None:
            say("stopping")
            env.stop()
    header = (f"Machine: {machine()}. Date: {stamp}. Source: {source}. Command: `{command}` "
              f"({time.monotonic() - started:.0f} s).")
    text = report.table(results, header)
    (folder / "table.md").write_text(text)
    png = report.chart(results, folder / "bench.png")
    print(text)
    if png:
        print(f"chart: {png}")
    return 1 if any("error" in d for d in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
