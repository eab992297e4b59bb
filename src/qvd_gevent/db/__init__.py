"""QVD-DB access: a gevent-aware pool of psycopg2 connections and retried transactions.

Each greenlet borrows a connection for one unit of work (``db.transaction``) and gives it
back; connections are never shared between greenlets. Under ``qvd-node`` psycopg2 is made
cooperative (``make_green``, connect.py), so a query waits on the hub, not the process.

Every connection asks libpq for a read-write server (``target_session_attrs``): with
``database.host`` listing a primary and its standbys, a new connection finds whichever is
the primary now, so after a failover the pool reconnects to the promoted standby. A pooled
connection whose server has become read-only is closed, never reused.
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

from ..config.properties import BLANKS
from .connect import ConnectFailed, describe_connect_error, make_green, open_connection, servers_of

__all__ = ["Database", "DatabaseError", "DatabaseUnavailable", "describe_connect_error", "make_green", "notify",
           "now_epoch", "server_is_read_only"]

SCHEMA_VERSION = "4.3.0"

log = logging.getLogger("qvd.db")

# SQLSTATEs worth retrying: serialization failure, deadlock.
RETRY_SQLSTATES = {"40001", "40P01"}
# A write reached a server that is read-only now (a primary demoted to a standby).
READ_ONLY_SQLSTATE = "25006"
# The server ended the connection: shut down, crashed, or refusing while it starts.
_SERVER_GONE_SQLSTATES = {"57P01", "57P02", "57P03"}


class DatabaseError(Exception):
    """A database problem with a message fit for one line."""


class DatabaseUnavailable(DatabaseError):
    pass


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def server_is_read_only(conn):
    """The server reported itself read-only (PostgreSQL 14+ reports both settings as they change)."""
    try:
        return (conn.info.parameter_status("default_transaction_read_only") == "on"
                or conn.info.parameter_status("in_hot_standby") == "on")
    except psycopg2.Error:
        return False


def _server_of(conn):
    try:
        return f"{conn.info.host}:{conn.info.port}"
    except (psycopg2.Error, AttributeError):
        return "the database server"


def _connection_lost(exc):
    """The error means the connection (or its server) is gone, not that the statement failed."""
    if not isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        return False
    code = getattr(exc, "pgcode", None)
    return code is None or code.startswith("08") or code in _SERVER_GONE_SQLSTATES


def _without_trailing_blanks(kw):
    return {k: v.rstrip(BLANKS) if k in ("user", "password") and isinstance(v, str) else v
            for k, v in kw.items()}


class Database:
    def __init__(self, dsn_kwargs, size=10, acquire_timeout=10, statement_timeout=30, retries=5):
        self.dsn_kwargs = dict(dsn_kwargs)
        # the node writes: with several hosts, libpq picks the primary (after a failover,
        # the promoted standby); with one, it refuses a standby
        self.dsn_kwargs.setdefault("target_session_attrs", "read-write")
        self.servers = servers_of(self.dsn_kwargs) if self.dsn_kwargs.get("host") else []
        self._preferred = None          # (host, port) of the server that took the last connection
        self.size = size
        self.acquire_timeout = acquire_timeout
        self.statement_timeout = statement_timeout
        self.retries = retries
        self._idle = []
        self._slots = BoundedSemaphore(size)
        self._closed = False

    @classmethod
    def from_config(cls, cfg, size=None):
        """size: the pool's, instead of internal.database.pool.size (an L7R worker's share)."""
        return cls(cfg.dsn_kwargs(),
                   size=size or cfg.get_int("internal.database.pool.size"),
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
            conn = self._open(kw)
        except ConnectFailed as exc:
            stripped = _without_trailing_blanks(kw)
            if not exc.password_refused or stripped == kw:
                raise DatabaseUnavailable(exc.describe(kw)) from None
            # node.conf keeps trailing blanks in values (as Config::Properties does); the
            # original then retries once without them, and so do we (and keep what worked).
            try:
                conn = self._open(stripped)
            except ConnectFailed as exc:
                raise DatabaseUnavailable(exc.describe(stripped)) from None
            for name in ("user", "password"):
                if name in self.dsn_kwargs:
                    self.dsn_kwargs[name] = stripped[name]
        conn.autocommit = autocommit
        if not autocommit:
            conn.set_session(isolation_level=psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE)
        return conn

    def _open(self, kw):
        """The server that took the last connection first: after a failover to a standby behind
        a silent primary, only the first new connection waits out connect_timeout."""
        servers = sorted(self.servers, key=lambda s: (s.host, s.port or "5432") != self._preferred)
        conn = open_connection(kw, servers, kw.get("connect_timeout"))
        try:
            self._preferred = (conn.info.host, str(conn.info.port))
        except psycopg2.Error:
            pass
        return conn

    @contextmanager
    def connection(self, autocommit=False):
        """A pooled connection; autocommit=True for one that runs each statement as its own
        transaction (``statement``). Idle connections keep their mode and one of the wanted
        mode is taken first: switching a connection's mode makes the driver send a SET
        (a round trip), so switching there and back around each statement would cost as
        much as the BEGIN and COMMIT it saves."""
        if self._closed:
            raise DatabaseUnavailable("database pool is closed")
        if not self._slots.acquire(timeout=self.acquire_timeout):
            raise DatabaseUnavailable(f"no free database connection within {self.acquire_timeout} s")
        conn = None
        try:
            while self._idle:
                candidate = self._take_idle(autocommit)
                if not candidate.closed:
                    conn = candidate
                    break
            if conn is None:
                conn = self.connect()
            if conn.autocommit != autocommit:
                conn.autocommit = autocommit
            yield conn
        except BaseException as exc:
            if conn is not None:
                self._discard_or_reset(conn, exc)
                conn = None
            raise
        finally:
            if conn is not None:
                self._give_back(conn)
            self._slots.release()

    def _take_idle(self, autocommit):
        idle = self._idle
        for i in range(len(idle) - 1, -1, -1):
            if idle[i].autocommit == autocommit:
                return idle.pop(i)
        return idle.pop()

    def _give_back(self, conn):
        if conn.closed or self._closed:
            return
        if server_is_read_only(conn):
            self._close_quietly(conn)
            return
        try:
            if conn.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                conn.rollback()
        except psycopg2.Error:
            self._close_quietly(conn)
            return
        self._idle.append(conn)

    def _discard_or_reset(self, conn, exc=None):
        if getattr(exc, "pgcode", None) == READ_ONLY_SQLSTATE or server_is_read_only(conn):
            self._close_quietly(conn)
            return
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
    def transaction(self, fn, *args, retries=None, autocommit=False, **kwargs):
        """Run fn(cursor, *args, **kwargs) in one serializable transaction and commit.

        autocommit=True: no BEGIN and no COMMIT; each statement of fn is a transaction of its
        own at the server's default isolation (for fn that runs one statement: one round
        trip instead of three).

        Retried on serialization failures and deadlocks (the original runs SERIALIZABLE
        and so must expect them); once on a connection lost before commit; and on a server
        that turned read-only under a pooled connection (a failover demoted it), with a new
        connection, which libpq opens on the read-write server.
        """
        retries = self.retries if retries is None else retries
        attempt = 0
        lost_connection_retried = False
        read_only_retries = 0
        while True:
            attempt += 1
            server_name = "the database server"
            try:
                with self.connection(autocommit) as conn:
                    try:
                        with conn.cursor() as cur:
                            result = fn(cur, *args, **kwargs)
                        if not autocommit:
                            conn.commit()
                        return result
                    except psycopg2.Error as exc:
                        if getattr(exc, "pgcode", None) == READ_ONLY_SQLSTATE:
                            server_name = _server_of(conn)      # named before the pool closes it
                        raise
            except psycopg2.Error as exc:
                code = getattr(exc, "pgcode", None)
                if code in RETRY_SQLSTATES and attempt <= retries:
                    gevent.sleep(random.uniform(0.005, 0.05) * attempt)
                    continue
                if code == READ_ONLY_SQLSTATE:
                    # every pooled connection went to that server: none may be reused
                    self._drop_idle()
                    if read_only_retries == 0:
                        log.warning("database server %s is read-only now (failover?); reconnecting to the "
                                    "read-write server", server_name)
                    if read_only_retries < max(1, retries):
                        read_only_retries += 1
                        gevent.sleep(random.uniform(0.005, 0.05) * read_only_retries)
                        continue
                    raise DatabaseUnavailable(f"database server {server_name} is read-only "
                                              f"(a standby?): {_first_line(exc)}") from None
                if _connection_lost(exc):
                    # a server restart kills every pooled connection at once: drop the idle
                    # ones too, or each would fail one more request after the server is back
                    self._drop_idle()
                    if not lost_connection_retried:
                        lost_connection_retried = True
                        continue
                    raise DatabaseUnavailable(f"database connection lost: {_first_line(exc)}") from None
                raise

    def statement(self, sql, params=None, retries=None):
        """One statement as its own transaction, in one round trip; its rows ([] without).
        Retried as transaction() retries."""
        def run(cur):
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
        return self.transaction(run, retries=retries, autocommit=True)

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
