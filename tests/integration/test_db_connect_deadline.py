"""connect_timeout per server while psycopg2 waits on the gevent hub.

libpq ignores connect_timeout in the non-blocking mode the node uses, so a server that never
answers (a dead machine: SYNs dropped) would hold every connect for the kernel's SYN
retries, about two minutes, before libpq tried the next host of database.host. Here the
silent server is a loopback listener whose accept queue is full and which never accepts:
the kernel drops further SYNs, exactly as for a host that is gone.
"""
import socket
import time

import pytest

from helpers.database import TEST_ROLE, TEST_ROLE_PASSWORD
from qvd_gevent.db import Database, DatabaseUnavailable

TIMEOUT = 3


@pytest.fixture
def silent_port():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.2)
    yield listener.getsockname()[1]
    for sock in [*fillers, listener]:
        sock.close()


def _database(hosts, ports, dbname, timeout=TIMEOUT):
    return Database(dict(host=",".join(hosts), port=",".join(str(p) for p in ports), dbname=dbname,
                         user=TEST_ROLE, password=TEST_ROLE_PASSWORD, connect_timeout=timeout))


def test_silent_first_server_is_left_after_connect_timeout_and_skipped_next_time(pg_server, fresh_db_name,
                                                                                 silent_port):
    db = _database(["127.0.0.1", pg_server.host], [silent_port, pg_server.port], fresh_db_name)
    try:
        t0 = time.monotonic()
        first = db.connect()
        took_first = time.monotonic() - t0
        t0 = time.monotonic()
        second = db.connect()
        took_second = time.monotonic() - t0
        print(f"\nMEASURED: first connect {took_first:.2f} s (silent server first), next {took_second:.2f} s")
        assert first.info.port == second.info.port == pg_server.port
        # it waited out the silent server once, for connect_timeout, not the kernel's minutes ...
        assert TIMEOUT * 0.9 <= took_first < TIMEOUT + 10, took_first
        # ... and the next connection went to the server that answered first
        assert took_second < TIMEOUT - 0.5, took_second
        first.close()
        second.close()
        assert db.query("SELECT 1") == [(1,)]
    finally:
        db.close()


def test_only_silent_servers_is_one_line_naming_each(pg_server, fresh_db_name, silent_port):
    db = _database(["127.0.0.1", "127.0.0.1"], [silent_port, silent_port], fresh_db_name, timeout=1)
    try:
        t0 = time.monotonic()
        with pytest.raises(DatabaseUnavailable) as caught:
            db.query("SELECT 1")
        took = time.monotonic() - t0
        message = str(caught.value)
        assert took < 10, took
        assert message == (f"cannot connect to database {fresh_db_name!r} at 127.0.0.1:{silent_port}, "
                           f"127.0.0.1:{silent_port} as {TEST_ROLE!r}: 127.0.0.1:{silent_port}: no answer within 1 s; "
                           f"127.0.0.1:{silent_port}: no answer within 1 s")
    finally:
        db.close()
