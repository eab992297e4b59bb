"""The node's heartbeat and its fencing (docs/hkd.md#heartbeat, docs/hkd.md#fencing).

Every internal.hkd.agent.ticker.delay the row's ok_ts is written; a row marked lost means
the cluster released this node's VMs, which are then killed. Fencing runs on a clock of its
own: ticker.timeout after the last heartbeat written, every VM here is killed and the node
stops, before the other nodes may call it lost (check_cluster_timers).
"""
import logging
import os
import time

import gevent

from ..common import metrics
from ..db import runtime
from . import host_machine as H
from . import vm_machine as M
from .errors import DB_ERRORS as _DB_ERRORS, first_line as _first_line

log = logging.getLogger("qvd.hkd")


def tick(hkd):
    """Heartbeat. True on success; on `lost`, kills the VMs the cluster released."""
    sent = time.monotonic()     # the row's ok_ts is written no earlier than this
    try:
        alive = runtime.heartbeat(hkd.db, hkd.host_id, os.getpid())
    except _DB_ERRORS as exc:
        metrics.inc("qvd_hkd_heartbeats_total", result="error")
        log.warning("heartbeat failed: %s", _first_line(exc))
        return False
    if not alive:
        metrics.inc("qvd_hkd_heartbeats_total", result="lost")
        if not hkd.lost:
            hkd.lost = True
            log.error("this node (host %s) was marked lost by the cluster, which released its VMs: "
                      "killing the %d VMs still running here; restart the node to rejoin", hkd.host_id, len(hkd.vms))
            for runner in list(hkd.vms.values()):
                runner.send(M.RowLost())
        return False
    metrics.inc("qvd_hkd_heartbeats_total", result="ok")
    hkd.last_tick = max(hkd.last_tick or sent, sent)
    return True


def fence_watch(hkd):
    """Fencing, on a clock of its own (a heartbeat stuck in a dead connection must not
    delay it): ticker.timeout after the last heartbeat that was written, kill every VM
    here and stop. The other nodes call this node lost only node.timeout after that
    heartbeat, and node.timeout >= ticker.timeout + fence.kill_time (checked at start),
    so no VM ever runs here and elsewhere at once (docs/hkd.md#fencing)."""
    while True:
        deadline = hkd.last_tick + hkd.cfg.get_float("internal.hkd.agent.ticker.timeout")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        gevent.sleep(min(remaining, 1.0))      # a newer heartbeat moves the deadline
    fence(hkd)


def fence(hkd):
    timeout = hkd.cfg.get_float("internal.hkd.agent.ticker.timeout")
    log.error("no heartbeat written for %.0f s (internal.hkd.agent.ticker.timeout): fencing this node: killing "
              "its %d VMs and stopping; the other nodes start them after internal.hkd.cluster.node.timeout",
              timeout, len(hkd.vms))
    hkd.fenced = True
    runners = list(hkd.vms.values())
    for runner in runners:
        runner.send(M.Fence())
    kill_time = hkd.cfg.get_float("internal.hkd.fence.kill_time")
    gevent.joinall([gevent.spawn(r.finished.wait, kill_time) for r in runners], timeout=kill_time)
    alive = [r.vm_id for r in runners if not r.finished.is_set()]
    if alive:
        log.error("fencing: VMs %s not confirmed dead within %.0f s", ", ".join(map(str, alive)), kill_time)
    dead = [r.vm_id for r in runners if r.finished.is_set()]
    if dead:
        # if the database still takes writes (only our heartbeat row failing), the users
        # need not wait for node.timeout: these VMs are gone, their rows can say so
        try:
            with gevent.Timeout(2):
                for vm_id in dead:
                    runtime.clear_vm(hkd.db, vm_id, hkd.host_id)
        except (gevent.Timeout, *_DB_ERRORS):
            log.info("fencing: VM rows left for the cluster monitor to release")
    if hkd.on_stop_command is not None and hkd.machine.state == "running":
        # the whole node stops, as the original HKD exits when it loses the database
        gevent.spawn(hkd.on_stop_command, fence=True)
    else:
        hkd.events.put(H.TickerDead())


def ticker(hkd):
    while True:
        gevent.sleep(hkd.cfg.get_float("internal.hkd.agent.ticker.delay"))
        try:
            tick(hkd)
        except Exception:
            log.exception("heartbeat crashed")
