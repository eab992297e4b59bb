"""`python -m bench --quick` runs every scenario end to end and writes sane figures (the
cluster scenario: test_bench_cluster_quick.py).

Not a speed test: it asserts that each scenario produced its JSON file with positive,
self-consistent numbers, the chart and the table (issue 6). About a minute.
Run: python3 -m pytest -q -m slow tests/integration/test_bench_quick.py
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = ("bulk", "relay", "handshake", "workers", "connect", "cold", "browser", "idle", "tlslib", "hkd")


def positive(value):
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.timeout(360)
def test_quick_bench_writes_every_scenario(tmp_path):
    if not os.path.exists("/usr/sbin/haproxy"):
        pytest.skip("haproxy is not installed (scripts/install-test-deps.sh installs it)")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # the cluster run has a test of its own (test_bench_cluster_quick.py)
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", ",".join(SCENARIOS),
                           "--results", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=330)
    assert proc.returncode == 0, proc.stderr[-5000:]
    data = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in SCENARIOS}

    for kind in ("l7r", "haproxy", "direct"):
        bulk = data["bulk"]["paths"][kind]
        assert positive(bulk["mb_s"])
        complete = [run for run in bulk["runs"] if run["complete"]]
        assert complete and all(run["bytes"] == data["bulk"]["bytes_per_run"] for run in complete)
        # a stalled run (the L7R has shown some) is counted, never silently dropped
        assert bulk["stalled_runs"] == len(bulk["runs"]) - len(complete)
        assert data["relay"]["paths"][kind]["round_trips"] > 0
    for kind in ("l7r", "haproxy"):
        assert positive(data["relay"]["paths"][kind]["us_cpu_per_message"])
        hs = data["handshake"]["paths"][kind]
        assert hs["handshakes"] > 0 and positive(hs["per_cpu_s"]) and hs["errors"] == 0
        points = data["idle"]["paths"][kind]["points"]
        assert [p["sessions"] for p in points] == data["idle"]["levels"]
        assert all(p["failures"] == 0 and positive(p["bytes_per_session"]) for p in points)

    for count, processes in (("1", 0), ("2", 2)):      # JSON keys: l7r.workers; 1: the L7R in the node process
        by = data["workers"]["by_workers"][count]
        assert {r["worker_processes"] for r in by["handshake"] + by["relay"]} == {processes}
        assert all(r["handshakes"] > 0 and r["errors"] == 0 and positive(r["per_cpu_s"]) for r in by["handshake"])
        assert all(r["round_trips"] > 0 and positive(r["us_cpu_per_message"]) for r in by["relay"])

    browser = data["browser"]
    for kind in ("native", "browser"):
        held = browser["kinds"][kind]
        assert held["sessions"] == browser["sessions_per_kind"] and held["failures"] == 0
        assert positive(held["bytes_per_session"])
    # every session of both kinds was up at once (warm-up included), and each row was released
    warm = sum(step["opened"] for step in browser["steps"] if step["warm_up"])
    assert browser["node_connections"] == 2 * browser["sessions_per_kind"] + warm
    assert browser["release_left"] == 0

    connect = data["connect"]
    assert connect["connects"] > 0 and connect["errors"] == 0
    assert 0 < connect["p50_ms"] <= connect["p99_ms"]
    # both CPU figures per connect, which the goals are about
    assert positive(connect["node_cpu_ms_per_connect"]) and positive(connect["postgres_cpu_ms_per_connect"])
    cold = data["cold"]
    assert len(cold["connect_to_101_s"]) == cold["runs"] and len(cold["vm_start_s"]) == cold["runs"]
    assert cold["median_connect_s"] > 0 and cold["median_vm_start_s"] > 0
    assert any("Starting virtual machine" in text for _, text in cold["progress_first_run"])
    for lib in ("ssl", "pyopenssl"):
        runs = data["tlslib"]["libs"][lib]
        assert all(r["handshakes"] > 0 and r["errors"] == 0 and positive(r["per_cpu_s"]) for r in runs["handshake"])
        assert all(p["failures"] == 0 and positive(p["bytes_per_session"]) for run in runs["idle"] for p in run)
    hkd = data["hkd"]
    assert hkd["running_at_end"] == hkd["vms"] and positive(hkd["idle_node_cpu_s"])

    table = (tmp_path / "table.md").read_text()
    assert table.count("\n| ") >= 13 and "NOT MEASURED" not in table
    # every goal is in the table as stated, its verdict says met or missed and by how much
    for goal in (">= 1.2x HAProxy's MB per proxy CPU-second", "<= 1.15x HAProxy's µs CPU per message",
                 ">= 0.75x HAProxy's handshakes per CPU-second", "<= 1.5 ms", "<= 1.0 ms"):
        row = next(line for line in table.splitlines() if f"| {goal} |" in line)
        assert re.search(r"\| (met|MISSED) by [0-9.]+", row), row
    # the rate and p99 goals are at 100 users; --quick runs 20 and says so
    row = next(line for line in table.splitlines() if "| >= 428/s and p99 <= 250 ms at 100 users |" in line)
    assert "| not judged: the goals are at 100 users (this run: 20" in row, row
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert table.strip() in proc.stdout
