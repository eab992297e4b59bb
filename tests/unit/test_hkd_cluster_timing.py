"""Cluster monitor timing: first pass after long_delay, then delay, back to long_delay on DB trouble."""
import pytest

from qvd_gevent.config import Config
from qvd_gevent.db import DatabaseUnavailable
from qvd_gevent.hkd.cluster import ClusterMonitor


class Stop(Exception):
    pass


class ScriptedDb:
    """One outcome per pass: 'ok' or 'down' (a unit-test stand-in for db.transaction)."""

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)

    def transaction(self, fn, *args):
        outcome = self.outcomes.pop(0)
        if outcome == "down":
            raise DatabaseUnavailable("connection refused")
        return [], [], []


def test_delays(tmp_path):
    conf = tmp_path / "node.conf"
    conf.write_text("nodename = n\ninternal.hkd.agent.cluster_monitor.long_delay = 600\n"
                    "internal.hkd.agent.cluster_monitor.delay = 120\n"
                    "internal.hkd.agent.cluster_monitor.fuzzy_delay = 0\n")
    monitor = ClusterMonitor(Config.load(str(conf)), ScriptedDb(["ok", "ok", "down", "ok", "ok"]), host_id=1)
    delays = []

    def fake_sleep(seconds):
        if len(delays) == 5:
            raise Stop()
        delays.append(seconds)
    monitor.sleep = fake_sleep
    with pytest.raises(Stop):
        monitor._run()
    assert delays == [600, 120, 120, 600, 120]
    assert monitor.passes == 4
