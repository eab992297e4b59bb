"""QVD-DB access: a gevent-aware pool of psycopg2 connections and retried transactions.

Each greenlet borrows a connection for one unit of work (``db.transaction``) and gives it
back; connections are never shared between greenlets. Under ``qvd-node`` psycopg2 is made
cooperative by psycogreen (``make_green``), so a query waits on the hub, not the process.
"""
import copy
import logging
import random
import time
from contextlib import contextmanager

import gevent
import psycopg2
import psycopg2.errors
import psycopg2.extensions
from gevent.lock import BoundedSemaphore

SCHEMA_VERSION = "4.3.0"

log = logging.getLogger("qvd.db")

# SQLSTATEs worth retrying: serialization failure, deadlock.
RETRY_SQLSTATES = {"40001", "40P01"}


class DatabaseError(Exception):
    """A database problem with a message fit for one line."""


class DatabaseUnavailable(DatabaseError):
    pass


_green = False


def make_green():
    """Make psycopg2 wait on the gevent hub (psycogreen). Idempotent."""
    global _green
    if not _green:
        from psycogreen.gevent import patch_psycopg
        patch_psycopg()
        _green = True


def describe_connect_error(exc, kw):
    where = kw.get("host") or "localhost"
    if kw.get("port"):
        where += f":{kw['port']}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"cannot connect to database {kw.get('dbname')!r} at {where} as {kw.get('user')!r}: {first}"


class Database:
    def __init__(self, dsn_kwargs, size=10, acquire_timeout=10, statement_timeout=30, retries=5):
        self.dsn_kwargs = dict(dsn_kwargs)
        self.size = size
        self.acquire_timeout = acquire_timeout
        self.statement_timeout = statement_timeout
        self.retries = retries
        self._idle = []
        self._slots = BoundedSemaphore(size)
        self._closed = False

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.dsn_kwargs(),
                   size=cfg.get_int("internal.database.pool.size"),
                   acquire_timeout=cfg.get_int("internal.database.pool.connection.timeout"),
                   statement_timeout=cfg.get_int("internal.database.client.statement.timeout"),
                   retries=cfg.get_int("internal.database.transaction.retries"))

    # --- connections -----------------------------------------------------------------
    def connect(self, autocommit=False):
        """A new connection outside the pool (LISTEN, deploy)."""
        kw = dict(self.dsn_kwargs)
        options = f"-c TimeZone=UTC -c statement_timeout={int(self.statement_timeout * 1000)}"
        kw["options"] = (kw.get("options", "") + " " + options).strip()
        try:
            conn = psycopg2.connect(**kw)
        except psycopg2.OperationalError as exc:
            raise DatabaseUnavailable(describe_connect_error(exc, kw)) from None
        conn.autocommit = autocommit
        if not autocommit:
            conn.set_session(isolation_level=psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE)
        return conn

    @contextmanager
    def connection(self):
        if self._closed:
            raise DatabaseUnavailable("database pool is closed")
        if not self._slots.acquire(timeout=self.acquire_timeout):
            raise DatabaseUnavailable(f"no free database connection within {self.acquire_timeout} s")
        conn = None
        try:
            while self._idle:
                candidate = self._idle.pop()
                if not candidate.closed:
                    conn = candidate
                    break
            if conn is None:
                conn = self.connect()
            yield conn
        except BaseException:
            if conn is not None:
                self._discard_or_reset(conn)
                conn = None
            raise
        finally:
            if conn is not None:
                self._give_back(conn)
            self._slots.release()

    def _give_back(self, conn):
        if conn.closed or self._closed:
            return
        try:
            if conn.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                conn.rollback()
        except psycopg2.Error:
            self._close_quietly(conn)
            return
        self._idle.append(conn)

    def _discard_or_reset(self, conn):
        try:
            if not conn.closed:
                conn.rollback()
                status = conn.get_transaction_status()
                if status == psycopg2.extensions.TRANSACTION_STATUS_IDLE and not self._closed:
                    self._idle.append(conn)
                    return
        except Exception:
            pass
        self._close_quietly(conn)

    @staticmethod
    def _close_quietly(conn):
        try:
            conn.close()
        except Exception:
            pass

    def _drop_idle(self):
        while self._idle:
            self._close_quietly(self._idle.pop())

    def with_retries(self, retries):
        """The same pool, with another default retry count for transaction/query/execute
        (the HKD's writes race L7Rs and other nodes and retry far more, as the original)."""
        view = copy.copy(self)  # shares the idle list and the slot semaphore
        view.retries = retries
        return view

    def close(self):
        self._closed = True
        while self._idle:
            self._close_quietly(self._idle.pop())

    # --- transactions ----------------------------------------------------------------
    def transaction(self, fn, *args, retries=None, **kwargs):
        """Run fn(cursor, *args, **kwargs) in one serializable transaction and commit.

        Retried on serialization failures and deadlocks (the original runs SERIALIZABLE
        and so must expect them) and, once, on a connection lost before commit.
        """
        retries = self.retries if retries is None else retries
        attempt = 0
        lost_connection_retried = False
        while True:
            attempt += 1
            try:
                with self.connection() as conn:
                    with conn.cursor() as cur:
                        result = fn(cur, *args, **kwargs)
                    conn.commit()
                    return result
            except psycopg2.Error as exc:
                code = getattr(exc, "pgcode", None)
                if code in RETRY_SQLSTATES and attempt <= retries:
                    gevent.sleep(random.uniform(0.005, 0.05) * attempt)
                    continue
                if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)) and code is None:
                    # a server restart kills every pooled connection at once: drop the idle
                    # ones too, or each would fail one more request after the server is back
                    self._drop_idle()
                    if not lost_connection_retried:
                        lost_connection_retried = True
                        continue
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise DatabaseUnavailable(f"database connection lost: {first}") from None
                raise

    def query(self, sql, params=None):
        """Run one statement in its own transaction; return all rows (or [] without rows)."""
        def run(cur):
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
        return self.transaction(run)

    def query_one(self, sql, params=None):
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def execute(self, sql, params=None):
        """Run one statement in its own transaction; return the row count."""
        def run(cur):
            cur.execute(sql, params)
            return cur.rowcount
        return self.transaction(run)

    def notify(self, channel, payload=""):
        self.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def ping(self):
        return self.query("SELECT 1") == [(1,)]


def notify(cur, channel, payload=""):
    """NOTIFY inside the caller's transaction: delivered only if it commits."""
    cur.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def now_epoch():
    return int(time.time())
