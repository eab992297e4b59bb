"""This node as its L7R sees it: its ``hosts`` row, found by ``nodename``, and its state.

The L7R may run before the node is registered (``qvd-admin host add`` later): until the
row exists every request looks again, and answers 503 meanwhile
(docs/protocol.md#endpoints). Parts that need the id once it is known (the session
registry listens on the node's abort channel) register with ``on_found``.

Every request checks the state (running, blocked): it is read once and kept until the
database announces a change of a host (the triggers' NOTIFY host_changed and
host_blocked_or_unblocked) or the LISTEN connection comes back, and at most
STATE_MAX_AGE seconds as a safety net: one query fewer per request.
"""
import time

from ..db import runtime

STATE_MAX_AGE = 5.0
STATE_CHANNELS = ("host_changed", "host_blocked_or_unblocked")


class NodeHost:
    def __init__(self, cfg, db, listener=None):
        self.cfg = cfg
        self.db = db
        self.id = None
        self._on_found = []
        self._state = None              # (state, blocked, when read)
        self._generation = 0            # bumped by every announced change
        self._unsubscribe = []
        if listener is not None:
            for channel in STATE_CHANNELS:
                self._unsubscribe.append(listener.subscribe(channel, self._forget_state))
            listener.on_reconnect(self._forget_state)

    def _forget_state(self, *_):
        self._state = None
        self._generation += 1

    def close(self):
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []

    def on_found(self, callback):
        """callback(host_id), once, when the row is first found (at once if it is known)."""
        self._on_found.append(callback)
        if self.id is not None:
            callback(self.id)

    def lookup(self):
        """The host id, or None while this node is not in ``hosts``."""
        if self.id is None:
            row = self.db.query_one("SELECT id FROM hosts WHERE name = %s", (self.cfg.get_str("nodename"),))
            if row is not None and self.id is None:
                self.id = row[0]
                for callback in self._on_found:
                    callback(self.id)
        return self.id

    def state(self):
        """(host_id, state, blocked), or None when this node is not in ``hosts``."""
        host_id = self.lookup()
        if host_id is None:
            return None
        known = self._state
        if known is None or time.monotonic() - known[2] > STATE_MAX_AGE or not self._unsubscribe:
            generation = self._generation
            row = runtime.host_state(self.db, host_id)
            known = (row[0], row[1], time.monotonic()) if row else ("stopped", False, time.monotonic())
            # kept unless a change was announced while it was being read
            self._state = known if self._unsubscribe and generation == self._generation else None
        return (host_id, known[0], known[1])
