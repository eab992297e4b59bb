"""database.host / database.port lists (libpq's multi-host form) and the one-line error that
names every server tried."""
import pytest

from qvd_gevent.config import Config, ConfigError
from qvd_gevent.db import Database, describe_connect_error


def _dsn(tmp_path, text):
    conf = tmp_path / "node.conf"
    conf.write_text(text)
    return Config.load(str(conf)).dsn_kwargs()


@pytest.mark.parametrize("host,port,want_host,want_port", [
    ("db1", "", "db1", None),
    ("db1", "5433", "db1", "5433"),
    ("10.0.0.5,10.0.0.6", "", "10.0.0.5,10.0.0.6", None),
    ("10.0.0.5, 10.0.0.6 ,10.0.0.7", "5432", "10.0.0.5,10.0.0.6,10.0.0.7", "5432,5432,5432"),
    ("10.0.0.5,10.0.0.6", "5432, 6432", "10.0.0.5,10.0.0.6", "5432,6432"),
    ("/run/postgresql,10.0.0.6", "5432", "/run/postgresql,10.0.0.6", "5432,5432"),
])
def test_host_and_port_lists_become_libpq_multi_host_values(tmp_path, host, port, want_host, want_port):
    kw = _dsn(tmp_path, f"database.host = {host}\ndatabase.port = {port}\n")
    assert kw["host"] == want_host
    assert kw.get("port") == want_port


@pytest.mark.parametrize("host,port,complaint", [
    ("10.0.0.5,,10.0.0.6", "", "empty entry in the host list"),
    ("10.0.0.5,", "", "empty entry in the host list"),
    ("10.0.0.5,10.0.0.6", "5432,5433,5434", "3 ports for 2 hosts"),
    ("10.0.0.5,10.0.0.6,10.0.0.7", "5432,5433", "2 ports for 3 hosts"),
    ("10.0.0.5", "postgres", "'postgres' is not a port number"),
    ("10.0.0.5,10.0.0.6", "5432,70000", "'70000' is not a port number"),
    ("10.0.0.5", "0", "'0' is not a port number"),
])
def test_malformed_lists_are_one_line_naming_the_keys(tmp_path, host, port, complaint):
    with pytest.raises(ConfigError) as caught:
        _dsn(tmp_path, f"database.host = {host}\ndatabase.port = {port}\n")
    message = str(caught.value)
    assert "database.host" in message and "database.port" in message and complaint in message
    assert "\n" not in message


def test_every_connection_asks_for_the_read_write_server():
    assert Database({"host": "db1,db2"}).dsn_kwargs["target_session_attrs"] == "read-write"


def test_connect_error_names_every_server_and_why():
    # libpq's text for two servers refused in turn; in non-blocking mode (under gevent) the
    # first server's line comes without its "connection to server at" prefix
    libpq = ('Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?\n'
             'connection to server at "10.0.0.6", port 5433 failed: session is read-only\n')
    kw = {"host": "10.0.0.5,10.0.0.6", "port": "5432,5433", "dbname": "qvd", "user": "qvd", "password": "s3cret"}
    assert describe_connect_error(Exception(libpq), kw) == (
        "cannot connect to database 'qvd' at 10.0.0.5:5432, 10.0.0.6:5433 as 'qvd': "
        "10.0.0.5:5432: Connection refused; 10.0.0.6:5433: session is read-only")


def test_connect_error_for_one_server_keeps_its_short_form():
    libpq = ('connection to server at "127.0.0.1", port 1 failed: Connection refused\n'
             '\tIs the server running on that host and accepting TCP/IP connections?\n')
    kw = {"host": "127.0.0.1", "port": 1, "dbname": "qvd", "user": "qvd"}
    assert describe_connect_error(Exception(libpq), kw) == (
        "cannot connect to database 'qvd' at 127.0.0.1:1 as 'qvd': Connection refused")
