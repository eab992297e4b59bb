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


@pytest.mark.parametrize("values,wrong", [
    ({"internal.hkd.agent.ticker.delay": 20}, "internal.hkd.agent.ticker.delay"),
    ({"internal.hkd.cluster.node.timeout": 35}, "internal.hkd.cluster.node.timeout"),
    ({"internal.hkd.fence.kill_time": 20}, "internal.hkd.cluster.node.timeout"),
])
def test_timers_that_could_run_a_vm_twice_are_refused_with_one_line(tmp_path, values, wrong):
    from qvd_gevent.hkd.errors import HkdConfigError, check_cluster_timers
    check_cluster_timers(Config(None))                 # the defaults are consistent
    conf = tmp_path / "node.conf"
    conf.write_text("nodename = n\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    with pytest.raises(HkdConfigError) as info:
        check_cluster_timers(Config.load(str(conf)))
    assert wrong in str(info.value) and "\n" not in str(info.value)


def test_by_default_a_lost_node_is_called_lost_within_a_minute():
    cfg = Config(None)
    worst = (cfg.get_int("internal.hkd.cluster.node.timeout") + cfg.get_int("internal.hkd.agent.cluster_monitor.delay")
             + cfg.get_int("internal.hkd.agent.cluster_monitor.fuzzy_delay"))
    assert worst < 60
