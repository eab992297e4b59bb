"""Database faults (issue 7 item 4) against a PostgreSQL of this module's own, so restarting
it disturbs no other test: a restart under 500 spliced sessions, and no database at start.

The node is a real `qvd-node` process. 498 sessions go to stand-in VMs (bench/farm.py: one
process answering as many VMs, rows `running` on a farm host with backend=false) and 2 to
process VMs the node's own HKD starts on demand.
"""
import itertools
import os
import time

import gevent
import gevent.pool
import pytest
from helpers.cluster import (
    Farm,
    NodeProcess,
    SessionRefused,
    client_context,
    echo_roundtrip,
    http_get,
    kill_vm_processes,
    make_cert,
    node_values,
    open_session,
    place_on_farm,
    seed_host,
    seed_ssl,
    seed_users_and_vms,
    vm_processes,
    write_conf,
)
from helpers.nodes import wait_for

from qvd_gevent.db import Database
from qvd_gevent.db.deploy import deploy
from qvd_gevent.db.embedded import EmbeddedPostgres

DB_USER = "qvd_fault"
DB_PASSWORD = "fault pass"
_names = itertools.count()


@pytest.fixture(scope="module")
def own_pg(tmp_path_factory):
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("fault-pg") / "pg").start()
    yield pg
    pg.destroy()


@pytest.fixture
def fault_db(own_pg):
    """(conf lines, Database) of a fresh deployed database on the module's own server."""
    name = f"qvd_fault_{os.getpid()}_{next(_names)}"
    own_pg.start()
    own_pg.create_database(name, DB_USER, DB_PASSWORD)
    lines = own_pg.node_conf_lines(name, DB_USER, DB_PASSWORD)
    db = Database(dict(host=own_pg.host, port=own_pg.port, user=DB_USER, password=DB_PASSWORD, dbname=name,
                       connect_timeout=10))
    assert deploy(db) == 0
    yield lines, db
    db.close()
    own_pg.start()
    own_pg.drop_database(name)


def _retrying(fn, timeout, what):
    """Call fn until it stops raising a DB error (the test's own pool lives through the restart too)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except Exception:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still failing after {timeout} s") from None
            gevent.sleep(0.2)


def _tally(outcomes):
    counts = {}
    for _, what in outcomes:
        counts[what] = counts.get(what, 0) + 1
    return counts


PROCESS_VMS = 2


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("sessions,outage", [(500, 0), (100, 8)], ids=["restart-500", "down-8s-100"])
def test_postgres_restart_under_spliced_sessions(tmp_path, own_pg, fault_db, sessions, outage):
    """outage 0: pg_ctl restart (fast shutdown, start); else the server stays down that long."""
    SESSIONS = sessions  # noqa: N806
    from qvd_gevent.node.run import raise_file_limit
    assert raise_file_limit() > 2 * SESSIONS + 200, "this test holds two sockets per session"
    lines, db = fault_db
    cert, key = make_cert(tmp_path / "ssl")
    seed_ssl(db, cert, key)
    node_host = seed_host(db, "fault-node")
    farm = Farm().start()
    node = None
    run_dir = tmp_path / "run-fault-node"
    sockets = {}
    try:
        farm_host = seed_host(db, "fault-farm", farm.address, state="running", backend=False, ok_now=True)
        vms = seed_users_and_vms(db, [("alice", "alice pw")], vms_per_user=SESSIONS + 10)["alice"]
        process_vms, farm_vms = vms[:PROCESS_VMS], vms[PROCESS_VMS:]
        place_on_farm(db, farm_vms, farm_host, farm)
        spare = farm_vms[SESSIONS - PROCESS_VMS:]           # never connected before the restart
        session_vms = process_vms + farm_vms[:SESSIONS - PROCESS_VMS]
        values = node_values(tmp_path, "fault-node", **{
            # the farm host has no heartbeat of its own: never declare it lost here
            "internal.hkd.cluster.node.timeout": 86400,
            "internal.l7r.timeout.vm_start": 60,
            "internal.l7r.poll_time.vm": 1,
        })
        conf = write_conf(tmp_path / "node.conf", lines, "fault-node", values)
        node = NodeProcess(conf, tmp_path / "node.log").start()
        node.wait_running()
        port = values["l7r.port"]
        ctx = client_context(cert)

        # --- 500 sessions spliced ------------------------------------------------------------------
        def connect(vm_id):
            sockets[vm_id] = open_session(port, ctx, "alice", "alice pw", vm_id, timeout=90)[0]
        started = time.monotonic()
        pool = gevent.pool.Pool(25)
        for vm_id in session_vms:
            pool.spawn(connect, vm_id)
        pool.join(raise_error=True)
        setup_s = time.monotonic() - started
        assert len(sockets) == SESSIONS
        for vm_id, sock in sockets.items():
            assert echo_roundtrip(sock, b"before %d\n" % vm_id) == b"before %d\n" % vm_id
        assert set(vm_processes(run_dir)) == set(process_vms)
        rows = db.query("SELECT vm_id, user_state, l7r_host_id FROM vm_runtimes WHERE vm_id = ANY(%s)", (session_vms,))
        assert sorted(rows) == sorted((v, "connected", node_host) for v in session_vms)

        # --- traffic keeps flowing while PostgreSQL restarts -----------------------------------------
        failures, rounds = [], [0]
        stop_flow = gevent.event.Event()
        server_down = gevent.event.Event()     # set from the server's stop until just before its start
        flowed_while_down = set()

        def flow(mine):
            # each flow greenlet owns its sockets: one reader per socket
            for i in itertools.count():
                if stop_flow.is_set() or i > 100000:
                    return
                vm_id = mine[i % len(mine)]
                payload = b"during %d %d\n" % (i, vm_id)
                try:
                    down = server_down.is_set()
                    if echo_roundtrip(sockets[vm_id], payload, timeout=10) != payload:
                        failures.append((vm_id, "wrong bytes"))
                    elif down and server_down.is_set():
                        flowed_while_down.add(vm_id)
                except Exception as exc:  # noqa: BLE001 - every failure is reported by the assert below
                    failures.append((vm_id, repr(exc)))
                rounds[0] += 1
                gevent.sleep(0.002)
        flows = [gevent.spawn(flow, session_vms[k::4]) for k in range(4)]

        # and new sessions keep being set up and closed throughout: some are caught mid-setup
        churn_vms = spare[2:]
        churn_outcomes = []

        def churn(mine):
            for i in itertools.count():
                if stop_flow.is_set() or i > 10000:
                    return
                try:
                    sock, _ = open_session(port, ctx, "alice", "alice pw", mine[i % len(mine)], timeout=15)
                    with sock:
                        echo_roundtrip(sock, b"churn\n", timeout=10)
                    churn_outcomes.append((time.monotonic(), "ok"))
                except SessionRefused as exc:
                    churn_outcomes.append((time.monotonic(), f"refused {exc.status}"))
                except (OSError, EOFError) as exc:
                    churn_outcomes.append((time.monotonic(), repr(exc)))
                gevent.sleep(0.01)
        flows += [gevent.spawn(churn, churn_vms[k::2]) for k in range(2)]
        gevent.sleep(1)
        before_restart = node.log_text()
        t_restart = time.monotonic()
        during = []
        if outage:
            own_pg.stop()
            t_down = time.monotonic()
            server_down.set()
            # while it is down a login gets a prompt 503 ("retry later"), never a hang
            for _ in range(1000):
                if time.monotonic() - t_down > outage:
                    break
                t = time.monotonic()
                status = http_get(port, ctx, "/qvd/list_of_vm", "alice", "alice pw", timeout=30).status
                during.append((status, round(time.monotonic() - t, 2)))
                gevent.sleep(0.5)
            server_down.clear()
            own_pg.start()
        else:
            own_pg.restart()
        t_up = time.monotonic()
        assert all(status == 503 and took < 5 for status, took in during), during
        if outage:
            # logins were really tried while the server was down (one every 0.5 s or so), and
            # every session carried bytes while it was down
            assert len(during) >= outage, during
            assert flowed_while_down == set(session_vms), \
                f"{len(set(session_vms) - flowed_while_down)} sessions carried nothing while PostgreSQL was down"

        # the first login once the server is back works: no stale pooled connection fails it
        first = http_get(port, ctx, "/qvd/list_of_vm", "alice", "alice pw", timeout=10)
        assert first.status == 200, f"first login after the restart: {first}"
        # new logins: list_of_vm answers 200 again
        def login_ok():
            try:
                return http_get(port, ctx, "/qvd/list_of_vm", "alice", "alice pw", timeout=10).status == 200
            except OSError:
                return False
        wait_for(login_ok, timeout=30, interval=0.1, what="a login after the restart")
        t_login = time.monotonic()
        # a new session on a VM nobody had before
        new_sock = _retrying(lambda: open_session(port, ctx, "alice", "alice pw", spare[0], timeout=30)[0],
                             30, "a new session after the restart")
        t_session = time.monotonic()
        sockets[spare[0]] = new_sock
        assert echo_roundtrip(new_sock, b"new\n") == b"new\n"
        wait_for(lambda: "LISTEN connection re-established" in node.log_text()[len(before_restart):], 30,
                 what="the node's LISTEN reconnect")
        t_listen = time.monotonic()
        gevent.sleep(2)
        stop_flow.set()
        gevent.joinall(flows, timeout=30)
        assert failures == [], f"{len(failures)} echo failures during the restart, first: {failures[:5]}"
        assert any(t > t_up and what == "ok" for t, what in churn_outcomes), churn_outcomes[-10:]
        # setups caught by the restart leave no row behind (released at once or by the node's sweep)
        wait_for(lambda: db.query("SELECT vm_id, user_state FROM vm_runtimes WHERE vm_id = ANY(%s) "
                                  "AND (user_state <> 'disconnected' OR l7r_host_id IS NOT NULL)", (churn_vms,)) == [],
                 30, what="churned sessions' rows released")
        t_churn_clean = time.monotonic()
        assert rounds[0] > SESSIONS, rounds            # every session got traffic during the fault

        # LISTEN works again: a takeover is answered by a NOTIFY to this node, not a timeout
        victim = farm_vms[10]
        t0 = time.monotonic()
        taker = open_session(port, ctx, "alice", "alice pw", victim, timeout=30)[0]
        takeover_s = time.monotonic() - t0
        sockets[victim].settimeout(10)
        assert sockets[victim].recv(100) == b"", "the taken-over session was not closed"
        sockets[victim] = taker
        assert takeover_s < 5, f"takeover took {takeover_s:.1f} s (LISTEN not back?)"

        # heartbeat resumed
        ok1 = _retrying(lambda: db.query_one("SELECT ok_ts FROM host_runtimes WHERE host_id = %s", (node_host,))[0],
                        20, "heartbeat row")
        wait_for(lambda: db.query_one("SELECT ok_ts FROM host_runtimes WHERE host_id = %s", (node_host,))[0] > ok1,
                 10, what="a heartbeat after the restart")

        # every session still flows, every row consistent
        for vm_id, sock in sockets.items():
            assert echo_roundtrip(sock, b"after %d\n" % vm_id) == b"after %d\n" % vm_id
        connected = session_vms + [spare[0]]
        rows = db.query("SELECT vm_id, user_state, l7r_host_id FROM vm_runtimes WHERE vm_id = ANY(%s)", (connected,))
        assert sorted(rows) == sorted((v, "connected", node_host) for v in connected)
        assert db.query_one("SELECT count(*) FROM vm_runtimes WHERE user_state <> 'disconnected'")[0] == len(connected)
        assert db.query("SELECT state FROM host_runtimes WHERE host_id = %s", (node_host,)) == [("running",)]
        assert set(vm_processes(run_dir)) == set(process_vms)

        # the clients leave: every row disconnected
        for sock in sockets.values():
            sock.close()
        sockets.clear()
        wait_for(lambda: db.query_one("SELECT count(*) FROM vm_runtimes WHERE user_state <> 'disconnected' "
                                      "OR l7r_host_id IS NOT NULL")[0] == 0, 30, what="all rows disconnected")
        print(f"\nMEASURED: {SESSIONS} sessions set up in {setup_s:.1f} s; PostgreSQL "
              f"{'down' if outage else 'restart'} for {t_up - t_restart:.1f} s ({len(during)} logins meanwhile: {during[:3]}...); after it was up: login {t_login - t_up:.2f} s, new session "
              f"{t_session - t_up:.2f} s, LISTEN seen back {t_listen - t_up:.2f} s; takeover {takeover_s:.2f} s; "
              f"{rounds[0]} echo round trips while the flows ran; churn {_tally(churn_outcomes)}, its rows clean "
              f"{t_churn_clean - t_up:.1f} s after")
        assert t_login - t_up < 10 and t_session - t_up < 15
        text = node.log_text()
        assert "Traceback" not in text, text[text.find("Traceback") - 500:][:3000]
        assert node.terminate() == 0
    finally:
        for sock in sockets.values():
            sock.close()
        if node is not None:
            node.cleanup()
        kill_vm_processes(run_dir)
        farm.stop()


def test_database_unreachable_at_start_retries_then_node_comes_up(tmp_path, own_pg, fault_db):
    lines, db = fault_db
    cert, key = make_cert(tmp_path / "ssl")
    seed_ssl(db, cert, key)
    host_id = seed_host(db, "late-db-node")
    values = node_values(tmp_path, "late-db-node", **{"internal.database.pool.connection.delay": 1,
                                                       "internal.database.pool.connection.retries": 60,
                                                       "internal.database.client.connect.timeout": 2})
    conf = write_conf(tmp_path / "node.conf", lines, "late-db-node", values)
    node = NodeProcess(conf, tmp_path / "node.log")
    try:
        own_pg.stop()
        node.start()
        wait_for(lambda: "(attempt 3 of 60)" in node.log_text(), 30, what="three retries logged")
        assert node.proc.poll() is None, "the node exited instead of retrying"
        errors = [line for line in node.log_text().splitlines() if "retrying in 1 s" in line]
        assert errors and all("cannot connect to database" in line for line in errors), errors
        assert "Traceback" not in node.log_text()
        assert DB_PASSWORD not in node.log_text()
        t0 = time.monotonic()
        own_pg.start()
        node.wait_running(timeout=60)
        print(f"\nMEASURED: node running {time.monotonic() - t0:.1f} s after PostgreSQL came up")
        assert db.query("SELECT state FROM host_runtimes WHERE host_id = %s", (host_id,)) == [("running",)]
        ctx = client_context(cert)
        seed = seed_users_and_vms(db, [("bob", "bob pw")])
        assert seed["bob"]
        assert http_get(values["l7r.port"], ctx, "/qvd/list_of_vm", "bob", "bob pw").status == 200
        assert node.terminate() == 0
    finally:
        node.cleanup()
        own_pg.start()

