"""The pool with database.host listing two servers: it writes only to the read-write one.

Two private PostgreSQL servers of this module's own (turning a server read-only must not
disturb other tests). A server is made read-only live (``ALTER SYSTEM SET
default_transaction_read_only = on`` and a reload): what a pooled connection meets when its
server is no longer the primary. The write must not fail for the user: the pool drops that
connection and libpq's read-write pick finds the other server.
"""
import gevent
import gevent.event
import gevent.queue
import psycopg2
import pytest
from psycopg2 import sql

from qvd_gevent.db import Database, DatabaseUnavailable
from qvd_gevent.db.embedded import EmbeddedPostgres
from qvd_gevent.db.listen import Listener

DB_NAME, DB_USER, DB_PASSWORD = "qvd_rw", "qvd_rw", "rw pass"


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory):
    servers = [EmbeddedPostgres(tmp_path_factory.mktemp(f"rw-pg{i}") / "pg") for i in range(2)]
    try:
        gevent.joinall([gevent.spawn(pg.start) for pg in servers], raise_error=True)
        for pg in servers:
            pg.create_database(DB_NAME, DB_USER, DB_PASSWORD)
        yield servers
    finally:
        gevent.joinall([gevent.spawn(pg.destroy) for pg in servers])


def _superuser(pg):
    conn = psycopg2.connect(**pg.superuser_dsn(DB_NAME))
    conn.autocommit = True
    return conn


def _set_read_only(pg, on):
    conn = _superuser(pg)
    try:
        with conn.cursor() as cur:
            if on:
                cur.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            else:
                cur.execute("ALTER SYSTEM RESET default_transaction_read_only")
            cur.execute("SELECT pg_reload_conf()")
    finally:
        conn.close()


def _rows(pg):
    conn = _superuser(pg)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT note FROM notes ORDER BY note")
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


@pytest.fixture
def servers(two_servers):
    for pg in two_servers:
        _set_read_only(pg, False)
        conn = _superuser(pg)
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS notes")
            cur.execute("CREATE TABLE notes (note text)")
            cur.execute(sql.SQL("GRANT ALL ON notes TO {}").format(sql.Identifier(DB_USER)))
        conn.close()
    yield two_servers
    for pg in two_servers:
        _set_read_only(pg, False)


def _database(servers, **kw):
    return Database({"host": ",".join(pg.host for pg in servers), "port": ",".join(str(pg.port) for pg in servers),
                     "dbname": DB_NAME, "user": DB_USER, "password": DB_PASSWORD, "connect_timeout": 5}, **kw)


def _reload_seen():
    """pg_reload_conf only signals the server: give its processes a moment to re-read."""
    gevent.sleep(0.3)


def test_pooled_connection_on_a_server_turned_read_only_is_dropped_and_the_write_goes_to_the_other(servers, caplog):
    first, second = servers
    db = _database(servers, size=3)
    try:
        db.execute("INSERT INTO notes VALUES ('before')")
        assert _rows(first) == ["before"] and _rows(second) == []     # libpq took the first read-write one
        pooled = list(db._idle)
        assert pooled and not pooled[0].closed

        _set_read_only(first, True)
        _reload_seen()
        # the pooled connection meets SQLSTATE 25006; the user sees no error
        db.execute("INSERT INTO notes VALUES ('after')")
        assert _rows(second) == ["after"] and _rows(first) == ["before"]
        assert pooled[0].closed, "the connection to the read-only server went back to the pool"
        warned = [r.getMessage() for r in caplog.records if "read-only now" in r.getMessage()]
        assert warned == [f"database server {first.host}:{first.port} is read-only now (failover?); "
                          "reconnecting to the read-write server"], warned
        assert all(conn.info.port == second.port for conn in db._idle)
        db.execute("INSERT INTO notes VALUES ('again')")
        assert _rows(second) == ["after", "again"]
    finally:
        db.close()


def test_no_read_write_server_is_a_one_line_error_naming_both(servers):
    first, second = servers
    for pg in servers:
        _set_read_only(pg, True)
    db = _database(servers)
    try:
        with pytest.raises(DatabaseUnavailable) as caught:
            db.execute("INSERT INTO notes VALUES ('nowhere')")
        message = str(caught.value)
        print(f"\nMESSAGE: {message}")
        assert "\n" not in message and DB_PASSWORD not in message
        for pg in servers:
            assert f"{pg.host}:{pg.port}: session is read-only" in message, message
    finally:
        db.close()
    assert _rows(first) == _rows(second) == []


def test_a_server_that_stays_read_only_under_a_pooled_connection_is_a_503_kind_of_error(servers):
    """Both servers turn read-only while the pool holds a connection: bounded retries, then
    DatabaseUnavailable (the L7R answers 503 "retry later"), not a raw SQL error."""
    db = _database(servers, retries=2)
    try:
        db.execute("INSERT INTO notes VALUES ('before')")
        for pg in servers:
            _set_read_only(pg, True)
        _reload_seen()
        with pytest.raises(DatabaseUnavailable) as caught:
            db.execute("INSERT INTO notes VALUES ('nowhere')")
        message = str(caught.value)
        print(f"\nMESSAGE: {message}")
        assert "\n" not in message and "read-only" in message
        assert db._idle == []
    finally:
        db.close()


def test_listen_moves_to_the_read_write_server(servers):
    """The LISTEN connection's server turns read-only: it reconnects to the other server, its
    subscribers are told (on_reconnect), and a NOTIFY sent there reaches them."""
    first, second = servers
    db = _database(servers)
    listener = Listener(db, reconnect_delay=0.1, max_reconnect_delay=0.5, probe_interval=0.5).start()
    got, reconnected = gevent.queue.Queue(), gevent.event.Event()
    listener.subscribe("qvd_rw_test", lambda channel, payload: got.put(payload))
    listener.on_reconnect(reconnected.set)
    try:
        assert listener.wait_connected(10)
        assert listener._conn.info.port == first.port
        _set_read_only(first, True)
        assert reconnected.wait(10), "LISTEN did not leave the read-only server"
        assert listener.wait_connected(10) and listener._conn.info.port == second.port
        db.notify("qvd_rw_test", "hello")
        assert got.get(timeout=5) == "hello"
    finally:
        listener.stop()
        db.close()
