import gevent
import gevent.event
import psycopg2
import pytest
from psycopg2 import sql

from qvd_gevent.config import Config
from qvd_gevent.db import Database, notify
from qvd_gevent.db.deploy import main as deploy_main
from qvd_gevent.db.listen import Listener

from helpers.database import write_node_conf


def test_deploy_exit_codes(tmp_path, pg_server, empty_db_name, capsys):
    conf = write_node_conf(tmp_path / "node.conf", pg_server, empty_db_name)
    assert deploy_main(["--config", str(conf)]) == 0
    assert deploy_main(["--config", str(conf)]) == 2
    assert "already contains QVD tables" in capsys.readouterr().err
    db = Database.from_config(Config.load(str(conf)))
    db.execute("INSERT INTO hosts (name, address, frontend, backend) VALUES ('h', '10.0.0.1', true, true)")
    assert deploy_main(["--config", str(conf), "--force"]) == 0
    assert db.query("SELECT count(*) FROM hosts") == [(0,)]
    assert db.query("SELECT version FROM versions WHERE component='schema'") == [("4.3.0",)]
    assert db.query("SELECT id, name FROM tenants ORDER BY id") == [(-1, "-"), (0, "*"), (1, "default")]
    db.close()


def test_deploy_unreachable_database_is_one_line(tmp_path, capsys):
    conf = tmp_path / "node.conf"
    conf.write_text("database.host = 127.0.0.1\ndatabase.port = 1\ndatabase.password = x\n"
                    "internal.database.client.connect.timeout = 2\n")
    assert deploy_main(["--config", str(conf)]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("[ERROR] Code 3") and "cannot connect" in err and "\n" not in err


def test_sequences_start_at_10000(db):
    rows = db.query("INSERT INTO hosts (name, address, frontend, backend) VALUES ('h', '10.0.0.1', true, true) RETURNING id")
    assert rows == [(10000,)]


def test_lookup_constraints(db):
    db.execute("INSERT INTO hosts (name, address, frontend, backend) VALUES ('h', '10.0.0.1', true, true)")
    with pytest.raises(psycopg2.errors.ForeignKeyViolation):
        db.execute("INSERT INTO host_runtimes (host_id, state, blocked) VALUES (10000, 'bogus', false)")


def test_notify_reaches_a_waiting_greenlet(db):
    listener = Listener(db).start()
    try:
        got = gevent.event.AsyncResult()
        listener.subscribe("qvd_config_changed", lambda ch, payload: got.set(payload))
        assert listener.wait_connected(10)
        gevent.sleep(0.2)
        db.execute("INSERT INTO configs (tenant_id, key, value) VALUES (-1, 'l7r.port', '9999')")
        assert got.get(timeout=5) == "tenant_id=-1"
    finally:
        listener.stop()


def test_notify_inside_transaction_only_on_commit(db):
    listener = Listener(db).start()
    try:
        seen = []
        listener.subscribe("qvd_test_chan", lambda ch, payload: seen.append(payload))
        assert listener.wait_connected(10)
        gevent.sleep(0.2)

        def rolled_back(cur):
            notify(cur, "qvd_test_chan", "lost")
            raise RuntimeError("abort")
        with pytest.raises(RuntimeError):
            db.transaction(rolled_back)
        db.transaction(lambda cur: notify(cur, "qvd_test_chan", "kept"))
        deadline = gevent.Timeout(5)
        with deadline:
            while not seen:
                gevent.sleep(0.05)
        gevent.sleep(0.2)
        assert seen == ["kept"]
    finally:
        listener.stop()


def test_concurrent_serializable_transactions_retry(db):
    """Two greenlets increment one counter 20 times each: serialization failures are retried."""
    db.execute("INSERT INTO hosts (name, address, frontend, backend) VALUES ('h', '10.0.0.1', true, true)")
    db.execute("INSERT INTO host_counters (host_id) VALUES (10000)")

    def bump(cur):
        cur.execute("SELECT http_requests FROM host_counters WHERE host_id = 10000")
        (value,) = cur.fetchone()
        gevent.sleep(0.001)
        cur.execute("UPDATE host_counters SET http_requests = %s WHERE host_id = 10000", (value + 1,))

    def worker():
        for _ in range(20):
            db.transaction(bump, retries=100)

    gevent.joinall([gevent.spawn(worker), gevent.spawn(worker)], raise_error=True)
    assert db.query("SELECT http_requests FROM host_counters") == [(40,)]


def test_config_set_in_db_reaches_a_running_node(cfg, db):
    from qvd_gevent.config.live import ConfigWatcher
    listener = Listener(db).start()
    watcher = ConfigWatcher(cfg, db, listener)
    changed = gevent.event.Event()
    watcher.on_change(lambda c: changed.set())
    watcher.load_now()
    watcher.start()
    try:
        assert listener.wait_connected(10)
        gevent.sleep(0.2)
        assert cfg.get("l7r.port") == 8443
        changed.clear()
        db.execute("INSERT INTO configs (tenant_id, key, value) VALUES (-1, 'l7r.port', '9443')")
        assert changed.wait(5)
        assert cfg.get("l7r.port") == 9443
    finally:
        watcher.stop()
        listener.stop()


def test_password_with_backslashes_and_trailing_blanks_reaches_the_database(tmp_path, pg_server, fresh_db_name):
    """node.conf as an operator of the original writes it: `C:\\pa\\ss` is read verbatim (no
    escapes there), and trailing blanks after it are retried away as the original does."""
    role, password = "qvd_backslash", "C:\\pa\\ss\\x"
    conn = pg_server.superuser_connect()
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(role)), (password,))
    try:
        for written in ("C:\\pa\\ss\\x", "C:\\pa\\ss\\x   \t"):
            conf = tmp_path / "node.conf"
            conf.write_text(f"database.host = {pg_server.host}\ndatabase.port = {pg_server.port}\n"
                            f"database.name = {fresh_db_name}  \ndatabase.user = {role}\n"
                            f"database.password = {written}\n")
            db = Database.from_config(Config.load(str(conf)))
            assert db.query("SELECT current_user") == [(role,)]
            db.connect().close()  # a new connection goes straight to what worked
            db.close()
    finally:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        conn.close()
