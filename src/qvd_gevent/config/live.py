"""Live configuration: reload the configs table on NOTIFY qvd_config_changed.

Bursts of notifications (``config set a=1 b=2`` sends one per row) are coalesced into
one reload. After a LISTEN reconnect the table is re-read, since notifications sent while
we were away are lost.
"""
import logging

import gevent
import gevent.event

log = logging.getLogger("qvd.config")


def load_db_overrides(db):
    return db.query("SELECT key, value FROM configs WHERE tenant_id = -1")


class ConfigWatcher:
    def __init__(self, cfg, db, listener, retry_delay=None):
        self.cfg = cfg
        self.db = db
        self.listener = listener
        self.retry_delay = retry_delay or cfg.get_int("internal.hkd.agent.config.delay")
        self._callbacks = []
        self._dirty = gevent.event.Event()
        self._greenlet = None
        self.reloads = 0

    def on_change(self, callback):
        """callback(cfg) after each successful reload."""
        self._callbacks.append(callback)

    def load_now(self):
        self.cfg.set_db_overrides(load_db_overrides(self.db))
        self.reloads += 1
        for callback in list(self._callbacks):
            try:
                callback(self.cfg)
            except Exception:
                log.exception("configuration change handler failed")

    def start(self):
        self.listener.subscribe("qvd_config_changed", lambda channel, payload: self._dirty.set())
        self.listener.on_reconnect(self._dirty.set)
        self._greenlet = gevent.spawn(self._run)
        return self

    def stop(self):
        if self._greenlet is not None:
            self._greenlet.kill()

    def _run(self):
        while True:
            self._dirty.wait()
            gevent.sleep(0.05)  # coalesce a burst of row notifications
            self._dirty.clear()
            try:
                self.load_now()
                log.info("configuration reloaded from the database")
            except Exception as exc:
                log.warning("configuration reload failed (%s); retrying in %s s", exc, self.retry_delay)
                gevent.sleep(self.retry_delay)
                self._dirty.set()
