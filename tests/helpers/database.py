"""The test PostgreSQL as tests see it: the role they log in as, the server, and node.conf files
pointing at one of its databases (the fixtures that make them are in tests/conftest.py)."""
import psycopg2

TEST_ROLE = "qvd_test"
TEST_ROLE_PASSWORD = "qvd test pass"  # with a space: node.conf must carry it verbatim
TEMPLATE = "qvd_template"


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
