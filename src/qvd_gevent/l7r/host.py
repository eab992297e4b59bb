"""This node as its L7R sees it: its ``hosts`` row, found by ``nodename``, and its state.

The L7R may run before the node is registered (``qvd-admin host add`` later): until the
row exists every request looks again, and answers 503 meanwhile
(docs/protocol.md#endpoints). Parts that need the id once it is known (the session
registry listens on the node's abort channel) register with ``on_found``.
"""
from ..db import runtime


class NodeHost:
    def __init__(self, cfg, db):
        self.cfg = cfg
        self.db = db
        self.id = None
        self._on_found = []

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
        row = runtime.host_state(self.db, host_id)
        return (host_id, row[0], row[1]) if row else (host_id, "stopped", False)
