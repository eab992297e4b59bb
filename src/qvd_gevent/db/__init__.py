"""QVD-DB access: a gevent-aware pool of psycopg2 connections and retried transactions.

Each greenlet borrows a connection for one unit of work (``db.transaction``) and gives it
back; connections are never shared between greenlets. Under ``qvd-node`` psycopg2 is made
cooperative by psycogreen (``make_green``), so a query waits on the hub, not the process.

Every connection asks libpq for a read-write server (``target_session_attrs``): with
``database.host`` listing a primary and its standbys, a new connection finds whichever is
the primary now, so after a failover the pool reconnects to the promoted standby. A pooled
connection whose server has become read-only is closed, never reused.
"""
import copy
import logging
import random
import re
import time
from contextlib import contextmanager

import gevent
import psycopg2
import psycopg2.errors
import psycopg2.extensions
from gevent.lock import BoundedSemaphore

from ..config.db_servers import Server, split_servers
from ..config.db_servers import describe as describe_server
from ..config.properties import BLANKS

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


_green = False


def make_green():
    """Make psycopg2 wait on the gevent hub (psycogreen). Idempotent."""
    global _green
    if not _green:
        from psycogreen.gevent import patch_psycopg
        patch_psycopg()
        _green = True


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# one line per server libpq tried: 'connection to server at "h" (10.0.0.5), port 5432 failed: why'
# or 'connection to server on socket "/run/postgresql/.s.PGSQL.5432" failed: why'; its hints
# follow on lines that start with a tab
_LIBPQ_SERVER_LINE = re.compile(r'connection to server (?:at "(?P<host>[^"]*)"(?: \([^)]*\))?, port (?P<port>\d+)'
                                r'|on socket "(?P<socket>[^"]*)") failed: (?P<reason>.*)')


def _reasons_by_server(text, servers):
    """[(server tried, why it failed)] from libpq's message, in the order it tried them."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("\t"):
            continue
        line = " ".join(line.split())        # libpq writes "FATAL:  the database system is ..."
        match = _LIBPQ_SERVER_LINE.fullmatch(line)
        if match is None:
            # libpq's non-blocking connect (psycogreen) drops the prefix of the first server
            first = describe_server(servers[0]) if servers and not out else None
            out.append((first, line))
        elif match["socket"]:
            out.append((match["socket"], match["reason"]))
        else:
            out.append((f"{match['host']}:{match['port']}", match["reason"]))
    return out


def describe_connect_error(exc, kw):
    """One line naming every server in database.host and why each refused."""
    try:
        servers = split_servers(kw.get("host") or "localhost", kw.get("port"))
    except ValueError:
        servers = [Server(str(kw.get("host")), str(kw.get("port") or ""))]
    where = ", ".join(describe_server(s) for s in servers)
    reasons = _reasons_by_server(str(exc), servers)
    if not reasons:
        why = _first_line(exc)
    elif len(servers) == 1 and len(reasons) == 1:
        why = reasons[0][1]
    else:
        why = "; ".join(f"{server}: {reason}" if server else reason for server, reason in reasons)
    return f"cannot connect to database {kw.get('dbname')!r} at {where} as {kw.get('user')!r}: {why}"


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
            stripped = _without_trailing_blanks(kw)
            if "password authentication failed" not in str(exc) or stripped == kw:
                raise DatabaseUnavailable(describe_connect_error(exc, kw)) from None
            # node.conf keeps trailing blanks in values (as Config::Properties does); the
            # original then retries once without them, and so do we (and keep what worked).
            try:
                conn = psycopg2.connect(**stripped)
            except psycopg2.OperationalError as exc:
                raise DatabaseUnavailable(describe_connect_error(exc, stripped)) from None
            for name in ("user", "password"):
                if name in self.dsn_kwargs:
                    self.dsn_kwargs[name] = stripped[name]
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
        except BaseException as exc:
            if conn is not None:
                self._discard_or_reset(conn, exc)
                conn = None
            raise
        finally:
            if conn is not None:
                self._give_back(conn)
            self._slots.release()

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
    def transaction(self, fn, *args, retries=None, **kwargs):
        """Run fn(cursor, *args, **kwargs) in one serializable transaction and commit.

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
                with self.connection() as conn:
                    try:
                        with conn.cursor() as cur:
                            result = fn(cur, *args, **kwargs)
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
