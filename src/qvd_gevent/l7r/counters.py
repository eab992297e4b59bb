"""The L7R's counts: ``host_counters`` in batches, and its gauges on /metrics.

``host_counters`` is one row per node that every request would bump: written at once it
serializes the requests on that row, so counts are kept in memory and added every second
(and at stop). The gauges count open connections (a spliced session keeps its
connection open until its row is released) and open sessions.
"""
import logging

import gevent

from ..common import metrics
from ..db import runtime

log = logging.getLogger("qvd.l7r")

COUNTERS = ("http_requests", "auth_attempts", "auth_ok", "nx_attempts", "nx_ok", "short_sessions")

FLUSH_PERIOD = 1.0


class Counters:
    def __init__(self, db, host):
        self.db = db
        self.host = host
        self.connections_open = 0
        self.sessions_open = 0
        self._pending = {}
        self._flusher = None

    def count(self, name, amount=1):
        self._pending[name] = self._pending.get(name, 0) + amount

    def flush(self):
        """Add the pending counts to this node's host_counters row (kept for the next flush on error)."""
        if not self._pending or self.host.id is None:
            return
        counts, self._pending = self._pending, {}
        cols = [c for c in COUNTERS if c in counts]
        values = [counts[c] for c in cols]
        host_id = self.host.id

        def tx(cur):
            runtime.read_committed(cur)
            cur.execute("INSERT INTO host_counters (host_id) VALUES (%s) ON CONFLICT (host_id) DO NOTHING", (host_id,))
            cur.execute("UPDATE host_counters SET " + ", ".join(f"{c} = {c} + %s" for c in cols) + " WHERE host_id = %s",
                        values + [host_id])
        try:
            self.db.transaction(tx)
        except Exception as exc:
            log.warning("host_counters not updated (%s); will retry", exc)
            for c, v in zip(cols, values):
                self.count(c, v)

    def start(self):
        metrics.register_gauge_function("qvd_l7r_sessions_open", lambda: {(): self.sessions_open})
        metrics.register_gauge_function("qvd_l7r_connections_open", lambda: {(): self.connections_open})
        self._flusher = gevent.spawn(self._flush_loop)

    def stop(self, flush=True):
        if self._flusher is not None:
            self._flusher.kill()
            self._flusher = None
        if flush:
            self.flush()

    def _flush_loop(self):
        while True:
            gevent.sleep(FLUSH_PERIOD)
            self.flush()
