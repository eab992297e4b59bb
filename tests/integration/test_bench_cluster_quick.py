"""`python -m bench --quick --only cluster`: node processes on one PostgreSQL, measured end to end.

The quick form of the cluster-scale bench (issue 16; the full run and the model built on it:
docs/scale.md): 2
then 5 `qvd-node` processes with the default timers (the first cluster-monitor pass
aside) on the embedded PostgreSQL with pg_stat_statements, the farm's stand-in VMs,
10 s windows. Not a speed test: it asserts that every phase ran and counted what a
cluster does (statements, connections, notifications delivered, config reloads,
sessions), that no node fenced itself or was called lost, and that CPU was measured at
all; how much CPU is the full run's business. About two and a half minutes.
Run: python3 -m pytest -q -m slow tests/integration/test_bench_cluster_quick.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_quick_cluster_bench_measures_every_phase(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "cluster", "--results", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-5000:]
    data = json.loads((tmp_path / "cluster.json").read_text())
    assert "error" not in data, data.get("error")

    assert [level["nodes"] for level in data["levels"]] == [2, 5]
    assert data["timers"]["internal.hkd.agent.ticker.delay"] == 5      # the default heartbeat
    # the farm's VMs check the agent key as a VM's VMA does: connects take the real path
    assert data["farm_vma_answers"] == {"without_key": 401, "with_key": 200}
    for level in data["levels"]:
        nodes, idle = level["nodes"], level["idle"]
        # every node heartbeats (12 a minute) and runs its cluster monitor: statements in every window
        assert idle["statements_per_node_min"] > 0 and idle["transactions_per_node_min"] > 0
        assert any(s["query"].startswith("UPDATE host_runtimes SET ok_ts") for s in idle["top_statements"])
        # a pooled connection and the LISTEN connection, at least, per node
        assert idle["connections_per_node"] >= 2
        fanout = level["fanout"]
        sent = data["sizes"]["notify"] * data["sizes"]["notify_rounds"]
        assert fanout["notifications"] == fanout["control_notifications"] == sent
        assert fanout["received_by_bench"] == fanout["notifications"] and fanout["listeners"] == nodes + 1
        change = level["config_change"]
        assert change["changes"] == data["sizes"]["config_changes"]
        # each node read its configuration and its TLS material again after each change
        assert change["reload_statements_per_change_per_node"] >= 2
    top = data["levels"][-1]["idle"]
    assert top["pg_cpu_ms_per_node_min_raw"] > 0 and top["node_cpu_ms_per_node_min"] > 0
    assert top["wal_bytes_per_node_min"] > 0        # heartbeats are writes

    for level in data["levels"]:
        connect = level["connect"]
        assert connect["nodes"] == level["nodes"]
        assert connect["connects"] > 0 and connect["errors"] == 0, connect["last_error"]
        assert connect["statements_per_connect"] > 0 and connect["transactions_per_connect"] > 0
        assert connect["peak_connections"] >= 2 * connect["nodes"] and connect["rows_left_held"] == 0
        # a session row goes connecting, connected, disconnected: three notifications every L7R hears
        assert connect["notifications"]["qvd_vm_runtime"] >= 3 * connect["connects"]
    held = data["held"]
    assert held["sessions"] == data["sizes"]["held"] and held["failures"] == 0
    assert held["connected_rows"] >= held["sessions"] and held["rows_left_held"] == 0
    sessions = data["sessions"]
    assert sessions["vm_rows"] == data["sizes"]["rows"] and sessions["sessions"] > 0
    assert sessions["hosts"] == data["sizes"]["hosts"]
    assert sessions["idle"]["statements_per_node_min"] > 0
    assert sessions["what_if_index"]["idle"]["statements_per_node_min"] > 0

    # default timers, five nodes on a busy machine: nobody fenced, nobody called lost
    assert data["node_log"] == {"Traceback": 0, "marked as lost": 0, "fencing": 0}
    table = (tmp_path / "table.md").read_text()
    assert table.count("| cluster ") == len(data["rows"]) and "NOT MEASURED" not in table
