"""Cluster monitor: every node marks nodes with a stale heartbeat `lost` and frees their VMs.

docs/hkd.md#cluster-monitor. All nodes race on the same idempotent updates. Ours does the
intended abort of connected sessions on stopped VMs (the original wrote `user_cmd = NULL`
and notified a channel nobody listens on: docs/differences.md#cluster-monitor-abort).
"""
import logging
import random
import time

import gevent
import psycopg2

from ..db import DatabaseError, notify

log = logging.getLogger("qvd.hkd.cluster")


def scan(cur, my_host_id, node_timeout):
    """One pass in one transaction. Returns (lost host ids, freed vm ids, hosts to notify)."""
    cur.execute("UPDATE host_runtimes SET state = 'lost' "
                "WHERE state NOT IN ('stopped', 'starting', 'lost') AND host_id <> %s "
                "AND (ok_ts IS NULL OR extract(epoch FROM (now() AT TIME ZONE 'UTC') - ok_ts) > %s) "
                "RETURNING host_id", (my_host_id, node_timeout))
    lost = [r[0] for r in cur.fetchall()]
    cur.execute("UPDATE vm_runtimes SET vm_state = 'stopped', host_id = NULL, vm_vma_port = NULL, "
                "vm_x_port = NULL, vm_vnc_port = NULL, vm_ssh_port = NULL, vm_serial_port = NULL, "
                "vm_mon_port = NULL, vm_address = NULL, vm_expiration_soft = NULL, vm_expiration_hard = NULL, "
                "vma_ok_ts = NULL, current_di_id = NULL "
                "WHERE vm_state <> 'stopped' AND host_id IN (SELECT host_id FROM host_runtimes WHERE state = 'lost') "
                "RETURNING vm_id")
    freed = [r[0] for r in cur.fetchall()]
    cur.execute("UPDATE vm_runtimes SET user_state = 'disconnected', user_state_ts = %s, user_cmd = NULL, "
                "l7r_host_id = NULL, l7r_pid = NULL WHERE user_state <> 'disconnected' "
                "AND l7r_host_id IN (SELECT host_id FROM host_runtimes WHERE state = 'lost')",
                (int(time.time()),))
    # the intended abort: sessions still connected to a VM that is not running any more
    cur.execute("UPDATE vm_runtimes SET user_cmd = 'abort' WHERE user_state = 'connected' "
                "AND vm_state = 'stopped' AND user_cmd IS NULL AND l7r_host_id IS NOT NULL "
                "RETURNING l7r_host_id")
    hosts = sorted({r[0] for r in cur.fetchall()})
    for host_id in hosts:
        notify(cur, f"qvd_cmd_for_user_on_host{host_id}", "")
    return lost, freed, hosts


class ClusterMonitor:
    def __init__(self, cfg, db, host_id):
        self.cfg = cfg
        self.db = db
        self.host_id = host_id
        self._greenlet = None
        self.passes = 0
        self.sleep = gevent.sleep           # replaceable in a unit test

    def start(self):
        self._greenlet = gevent.spawn(self._run)
        return self

    def stop(self):
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=5)
            self._greenlet = None

    def _delay(self, key):
        fuzzy = self.cfg.get_int("internal.hkd.agent.cluster_monitor.fuzzy_delay")
        return self.cfg.get_float(key) + (random.randint(0, fuzzy) if fuzzy > 0 else 0)

    def run_once(self):
        timeout = self.cfg.get_int("internal.hkd.cluster.node.timeout")
        lost, freed, hosts = self.db.transaction(scan, self.host_id, timeout)
        for host_id in lost:
            log.warning("host %s marked as lost (no heartbeat for more than %s s)", host_id, timeout)
        if freed:
            log.warning("released VMs of lost hosts: %s", ", ".join(map(str, freed)))
        for host_id in hosts:
            log.info("asked host %s to abort sessions on stopped VMs", host_id)
        self.passes += 1
        return lost, freed, hosts

    def _run(self):
        delay = self._delay("internal.hkd.agent.cluster_monitor.long_delay")
        while True:
            self.sleep(delay)
            try:
                self.run_once()
                delay = self._delay("internal.hkd.agent.cluster_monitor.delay")
            except (DatabaseError, psycopg2.Error) as exc:
                # back off: a DB hiccup must not make every node declare every other lost
                log.warning("cluster monitor: database trouble (%s); backing off", str(exc).strip().splitlines()[0])
                delay = self._delay("internal.hkd.agent.cluster_monitor.long_delay")
