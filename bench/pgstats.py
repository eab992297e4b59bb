"""What a PostgreSQL server spent between two snapshots, for the cluster bench.

- CPU: utime + stime of the postmaster and every backend and helper process (/proc, as
  bench/procstat.py reads it), so the server's whole cost, background work included;
- statements of one role (the nodes'), from pg_stat_statements: calls, execution time and
  rows per normalised statement (the bench's own queries run as the superuser and are
  left out);
- WAL bytes written (pg_current_wal_lsn), connections of that role (pg_stat_activity),
  the NOTIFY queue's fill (pg_notification_queue_usage).

pg_stat_statements must be in shared_preload_libraries (bench/cluster.py starts the
server so); without it the statement figures are missing and say so. Statements are what
a client sent (pg_stat_statements.track = top): the statements inside a server-side
function are its call's cost, not statements of their own. Transactions are the
measured database's commits and rollbacks (pg_stat_database).
"""
import threading
import time

import psycopg2
import psycopg2.extensions

from .procstat import tree_cpu_seconds

# statements that only delimit a transaction or set a session variable: counted apart from
# the work they frame
TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SET ", "RESET ", "SAVEPOINT", "RELEASE")


def lsn_bytes(lsn):
    high, low = lsn.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def is_transaction_control(query):
    return query.lstrip().upper().startswith(TRANSACTION_CONTROL)


class Snapshot:
    def __init__(self, at, cpu, statements, wal, connections, xacts, node_cpu=0.0):
        self.at = at
        self.cpu = cpu
        self.statements = statements        # queryid -> (query, calls, total ms, rows)
        self.wal = wal
        self.connections = connections
        self.xacts = xacts                  # commits + rollbacks in the measured database
        self.node_cpu = node_cpu


class PgProbe:
    """Reads the statistics from the `postgres` database, so that its own queries are not
    transactions of the measured one."""

    def __init__(self, pg, dbname, role):
        self.pg = pg
        self.pid = int((pg.pgdata / "postmaster.pid").read_text().split()[0])
        self.role = role
        self.dbname = dbname
        self.conn = psycopg2.connect(**pg.superuser_dsn("postgres"))
        self.conn.autocommit = True
        self.has_statements = True
        try:
            self._run("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            self._run("SELECT count(*) FROM pg_stat_statements")
        except psycopg2.Error:
            self.has_statements = False

    def _run(self, sql, params=None):
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def close(self):
        self.conn.close()

    def connections(self):
        return self._run("SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND datname = %s",
                         (self.role, self.dbname))[0][0]

    def queue_usage(self):
        return float(self._run("SELECT pg_notification_queue_usage()")[0][0])

    def snapshot(self, node_cpu=0.0):
        statements = {}
        if self.has_statements:
            rows = self._run("SELECT s.queryid, s.query, s.calls, s.total_exec_time, s.rows FROM pg_stat_statements s "
                             "JOIN pg_roles r ON r.oid = s.userid JOIN pg_database d ON d.oid = s.dbid "
                             "WHERE r.rolname = %s AND d.datname = %s", (self.role, self.dbname))
            statements = {qid: (query, calls, ms, nrows) for qid, query, calls, ms, nrows in rows}
        wal = lsn_bytes(self._run("SELECT pg_current_wal_lsn()::text")[0][0])
        # a backend reports its counts at most once a second: the figure trails by up to that
        xacts = self._run("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                          (self.dbname,))[0][0]
        return Snapshot(time.monotonic(), tree_cpu_seconds(self.pid), statements, wal, self.connections(), xacts,
                        node_cpu)

    def explain(self, query):
        """The plan PostgreSQL would use for a normalised statement ($1 ... left as parameters)."""
        conn = psycopg2.connect(**self.pg.superuser_dsn(self.dbname))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("EXPLAIN (GENERIC_PLAN) " + query)
                return [r[0] for r in cur.fetchall()]
        except psycopg2.Error as exc:
            return [f"(no plan: {str(exc).strip().splitlines()[0]})"]
        finally:
            conn.close()


def window(before, after, top=12):
    """The figures between two snapshots: totals, and the statements with most execution time."""
    per = []
    for qid, (query, calls, ms, rows) in after.statements.items():
        _, calls0, ms0, rows0 = before.statements.get(qid, (query, 0, 0.0, 0))
        if calls > calls0:
            per.append({"query": " ".join(query.split()), "calls": calls - calls0, "exec_ms": ms - ms0,
                        "rows": rows - rows0})
    per.sort(key=lambda s: -s["exec_ms"])
    calls = sum(s["calls"] for s in per)
    control = [s for s in per if is_transaction_control(s["query"])]
    return {
        "seconds": after.at - before.at,
        "pg_cpu_s": after.cpu - before.cpu,
        "node_cpu_s": after.node_cpu - before.node_cpu,
        "statements": calls,
        "queries": calls - sum(s["calls"] for s in control),
        "transactions": after.xacts - before.xacts,
        "exec_ms": sum(s["exec_ms"] for s in per),
        "wal_bytes": after.wal - before.wal,
        "connections": after.connections,
        "top_statements": [s for s in per if not is_transaction_control(s["query"])][:top],
        "all_statements": per,
    }


class ConnectionSampler:
    """The highest number of the role's connections seen, sampled every interval seconds on a
    connection of its own, until stop() (or max_seconds, whichever comes first); with
    channels, that connection also LISTENs to them and counts what arrives per channel
    (one more listening backend meanwhile)."""

    def __init__(self, pg, dbname, role, interval=0.5, max_seconds=600, channels=()):
        self.pg, self.dbname, self.role = pg, dbname, role
        self.interval, self.max_seconds = interval, max_seconds
        self.channels = list(channels)
        self.notifications = {}
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        # counts from the postgres database; the measured one sees only the LISTENs
        counter = psycopg2.connect(**self.pg.superuser_dsn("postgres"))
        counter.autocommit = True
        listener = psycopg2.connect(**self.pg.superuser_dsn(self.dbname))
        listener.autocommit = True
        deadline = time.monotonic() + self.max_seconds
        try:
            with listener.cursor() as lcur:
                for channel in self.channels:
                    lcur.execute("LISTEN " + psycopg2.extensions.quote_ident(channel, lcur))
            with counter.cursor() as cur:
                while True:
                    cur.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND datname = %s",
                                (self.role, self.dbname))
                    self.peak = max(self.peak, cur.fetchone()[0])
                    self._count(listener)
                    if self._stop.is_set() or time.monotonic() >= deadline:
                        break
                    self._stop.wait(self.interval)
            end = time.monotonic() + 2          # what was sent just before the stop
            while time.monotonic() < end:
                time.sleep(0.2)
                self._count(listener)
        finally:
            counter.close()
            listener.close()

    def _count(self, conn):
        conn.poll()
        for note in conn.notifies:
            family = note.channel.rstrip("0123456789")
            self.notifications[family] = self.notifications.get(family, 0) + 1
        conn.notifies.clear()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)
