"""Cluster monitor: every node marks nodes with a stale heartbeat `lost` and frees their VMs.

docs/hkd.md#cluster-monitor. All nodes race on the same idempotent updates. Ours does the
intended abort of connected sessions on stopped VMs (the original wrote `user_cmd = NULL`
and notified a channel nobody listens on: docs/differences.md#cluster-monitor-abort).
"""
import logging
import random

import gevent
import psycopg2

from ..db import DatabaseError, runtime

log = logging.getLogger("qvd.hkd.cluster")


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
        lost, freed, hosts = self.db.transaction(runtime.mark_lost_hosts, self.host_id, timeout)
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
