"""LISTEN on one dedicated autocommit connection; fan notifications out to greenlets.

Subscribers register a callback per channel. Callbacks run in the listener greenlet and
must not block (set an Event, put in a Queue). After a reconnect every ``on_reconnect``
callback runs, because notifications sent while we were away are lost: subscribers
re-read the rows they care about (the slow poll of the original, done only when needed).

The connection asks for the read-write server like the pool's (``target_session_attrs``):
after a failover it reconnects to the promoted standby, where the nodes' NOTIFYs now go. A
server that reports itself read-only at the idle probe is left the same way.
"""
import logging
import os
from collections import defaultdict

import gevent
import gevent.event
import gevent.select
import psycopg2
import psycopg2.extensions

from . import DatabaseUnavailable, server_is_read_only

log = logging.getLogger("qvd.db.listen")


class Listener:
    # Retries stay frequent (a connect attempt is cheap): every notification sent while the
    # listener is away is lost, so after a restart or a failover it must be back in seconds.
    def __init__(self, db, reconnect_delay=1.0, max_reconnect_delay=2.0, probe_interval=30.0):
        self.db = db
        self.probe_interval = probe_interval
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self._callbacks = defaultdict(list)
        self._reconnect_callbacks = []
        self._listening = set()
        self._conn = None
        self._greenlet = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.connected = gevent.event.Event()
        self._stopping = False

    # --- public API -------------------------------------------------------------------
    def subscribe(self, channel, callback):
        """callback(channel, payload). Returns a function that unsubscribes."""
        self._callbacks[channel].append(callback)
        if channel not in self._listening:
            self._wake()

        def unsubscribe():
            try:
                self._callbacks[channel].remove(callback)
            except ValueError:
                pass
        return unsubscribe

    def on_reconnect(self, callback):
        self._reconnect_callbacks.append(callback)

    def start(self):
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)
        return self

    def stop(self):
        self._stopping = True
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=5)
            self._greenlet = None
        self._close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def wait_connected(self, timeout=None):
        return self.connected.wait(timeout)

    # --- internals --------------------------------------------------------------------
    def _wake(self):
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _close(self):
        self.connected.clear()
        self._listening = set()
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def _ensure_listening(self):
        wanted = {c for c, cbs in self._callbacks.items() if cbs} - self._listening
        if not wanted:
            return
        with self._conn.cursor() as cur:
            for channel in sorted(wanted):
                cur.execute("LISTEN " + psycopg2.extensions.quote_ident(channel, cur))
        self._listening |= wanted

    def _dispatch(self):
        self._conn.poll()
        while self._conn.notifies:
            note = self._conn.notifies.pop(0)
            for callback in list(self._callbacks.get(note.channel, ())):
                try:
                    callback(note.channel, note.payload)
                except Exception:
                    log.exception("notification callback for %s failed", note.channel)

    def _run(self):
        delay = self.reconnect_delay
        first = True
        while not self._stopping:
            try:
                self._conn = self.db.connect(autocommit=True)
                self._ensure_listening()
                self.connected.set()
                if not first:
                    log.info("LISTEN connection re-established")
                    for callback in list(self._reconnect_callbacks):
                        try:
                            callback()
                        except Exception:
                            log.exception("reconnect callback failed")
                first = False
                delay = self.reconnect_delay
                fd = self._conn.fileno()
                while not self._stopping:
                    readable, _, _ = gevent.select.select([fd, self._wake_r], [], [], self.probe_interval)
                    if self._wake_r in readable:
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                        self._ensure_listening()
                    if fd in readable:
                        self._dispatch()
                    elif not readable:
                        # Idle for a while: prove the connection is alive.
                        with self._conn.cursor() as cur:
                            cur.execute("SELECT 1")
                        self._dispatch()
                        if server_is_read_only(self._conn):
                            # NOTIFYs are written on the read-write server: listen there
                            raise DatabaseUnavailable(f"server {self._conn.info.host}:{self._conn.info.port} "
                                                      "is read-only now")
            except (psycopg2.Error, DatabaseUnavailable, OSError) as exc:
                if self._stopping:
                    break
                log.warning("LISTEN connection lost (%s); retrying in %.0f s", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, delay)
                self._close()
                gevent.sleep(delay)
                delay = min(delay * 2, self.max_reconnect_delay)
        self._close()
