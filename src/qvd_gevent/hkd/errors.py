"""What the HKD's parts raise, and how they turn an error into one line."""
import psycopg2

from ..db import DatabaseError

DB_ERRORS = (DatabaseError, psycopg2.Error)


class HkdError(Exception):
    """The HKD cannot start; one line for the operator."""


class HkdConfigError(HkdError):
    """The HKD cannot start until the operator changes something (configuration, the hosts
    row, a missing program): restarting it as it is would fail the same way."""


def check_cluster_timers(cfg):
    """The heartbeat, fencing and lost-node timers must keep one VM from running on two
    nodes, and a node from fencing itself between two heartbeats; one line otherwise."""
    delay = cfg.get_float("internal.hkd.agent.ticker.delay")
    fence_after = cfg.get_float("internal.hkd.agent.ticker.timeout")
    lost_after = cfg.get_float("internal.hkd.cluster.node.timeout")
    kill_time = cfg.get_float("internal.hkd.fence.kill_time")
    if delay <= 0 or 2 * delay > fence_after:
        raise HkdConfigError(f"internal.hkd.agent.ticker.delay ({delay:g}) must be more than 0 and at most half of "
                       f"internal.hkd.agent.ticker.timeout ({fence_after:g}), or one late heartbeat fences the node")
    if lost_after < fence_after + kill_time:
        raise HkdConfigError(f"internal.hkd.cluster.node.timeout ({lost_after:g}) must be at least "
                       f"internal.hkd.agent.ticker.timeout + internal.hkd.fence.kill_time ({fence_after:g} + "
                       f"{kill_time:g}), or other nodes may start VMs that a fencing node still runs")


def first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
