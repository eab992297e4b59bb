"""The cluster's protocol (src/qvd_gevent/db/runtime.py) against a real PostgreSQL:
each step once, with concurrent callers where nodes race in production."""
import pathlib
import re
import select

import gevent
import pytest
from helpers.hkd_env import add_host, add_vms

from qvd_gevent.db import runtime
from qvd_gevent.db.placement import NoHostAvailable

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "qvd_gevent"


def row(db, vm_id, cols="user_state, l7r_host_id, l7r_pid, user_cmd"):
    return db.query_one(f"SELECT {cols} FROM vm_runtimes WHERE vm_id = %s", (vm_id,))


def owner(db, vm_id):
    return db.query_one("SELECT user_id FROM vms WHERE id = %s", (vm_id,))[0]


def running_host(db, name, address="127.0.0.1"):
    host_id = add_host(db, name, address)
    db.execute("UPDATE host_runtimes SET state = 'running', usable_ram = 1000, usable_cpu = 1000, "
               "ok_ts = now() AT TIME ZONE 'UTC' WHERE host_id = %s", (host_id,))
    return host_id


def listen(db, channel):
    conn = db.connect(autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f'LISTEN "{channel}"')
    return conn


def notified(conn, timeout=5):
    select.select([conn], [], [], timeout)
    conn.poll()
    out = [(n.channel, n.payload) for n in conn.notifies]
    conn.notifies.clear()
    return out


def test_nothing_else_writes_the_shared_rows():
    """One owner: no INSERT, UPDATE or DELETE of the shared tables anywhere else in src/."""
    pattern = re.compile(r"(INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+(vm_runtimes|host_runtimes|user_tokens|"
                         r"user_auth_parameters|vm_agent_keys)\b", re.I)
    offenders = [f"{path.relative_to(SRC)}: {m.group(0)}"
                 for path in SRC.rglob("*.py") if path.name != "runtime.py"
                 for m in pattern.finditer(path.read_text())]
    assert offenders == []


def test_one_claim_wins_among_concurrent_claimers_and_the_holder_is_asked_to_let_go(db):
    hosts = [running_host(db, f"node{i}", f"127.0.0.{i + 1}") for i in range(8)]
    (vm_id,) = add_vms(db)
    user = owner(db, vm_id)
    outcomes = gevent.joinall([gevent.spawn(runtime.claim_session, db, vm_id, host, 1000 + i, user, False)
                               for i, host in enumerate(hosts)], raise_error=True)
    results = [g.value[0] for g in outcomes]
    assert results.count("claim") == 1 and set(results) <= {"claim", "abort", "wait"}
    winner = results.index("claim")
    holder = (hosts[winner], 1000 + winner)
    assert row(db, vm_id)[:3] == ("connecting", *holder)
    assert row(db, vm_id)[3] == "abort"          # the losers asked the holder to let go
    # only the holding process may release it, and (here) only while it is asked to
    assert runtime.release_aborted_session(db, vm_id, holder[0], holder[1] + 1) == 0
    assert runtime.release_aborted_session(db, vm_id, *holder) == 1
    assert row(db, vm_id) == ("disconnected", None, None, None)
    # a process of the holder's own host that finds no live session of its own takes over
    runtime.claim_session(db, vm_id, hosts[0], 1, user, False)
    assert runtime.claim_session(db, vm_id, hosts[0], 2, user, False)[0] == "claim"
    assert runtime.claim_session(db, 999999, hosts[0], 1, user, False)[0] == "gone"


def test_release_and_mark_connected_are_guarded_by_the_holder(db):
    me = running_host(db, "me")
    other = running_host(db, "other", "127.0.0.2")
    (vm_id,) = add_vms(db)
    assert runtime.claim_session(db, vm_id, me, 10, owner(db, vm_id), False)[0] == "claim"
    assert runtime.mark_connected(db, vm_id, other, 10).startswith("Aborted by contending session")
    assert runtime.mark_connected(db, vm_id, me, 10) is None
    assert row(db, vm_id)[0] == "connected"
    assert runtime.release_session(db, vm_id, me, 11) == 0
    assert runtime.release_session(db, vm_id, me, 10, older_than=runtime.now_epoch() - 60) == 0   # too fresh
    assert runtime.sessions_held(db, me, 10) == [vm_id]
    assert runtime.release_session(db, vm_id, me, 10) == 1
    assert runtime.sessions_held(db, me, 10) == []
    # a claim by another node is answered with an abort request to the holder's node
    assert runtime.claim_session(db, vm_id, me, 10, owner(db, vm_id), True)[0] == "claim"
    conn = listen(db, runtime.user_commands_channel(me))
    try:
        assert runtime.claim_session(db, vm_id, other, 20, owner(db, vm_id), False) == ("abort", (me, 10), None, None)
        assert notified(conn) == [(runtime.user_commands_channel(me), str(vm_id))]
        assert runtime.sessions_to_abort(db, me, 10) == [vm_id]
        assert runtime.mark_connected(db, vm_id, me, 10).startswith("Aborted by contending session")
    finally:
        conn.close()


def test_release_host_sessions_spares_the_current_process(db):
    me = running_host(db, "me")
    old_run, current = add_vms(db, count=2)
    runtime.claim_session(db, old_run, me, 1, owner(db, old_run), False)
    runtime.claim_session(db, current, me, 2, owner(db, current), False)
    assert runtime.release_host_sessions(db, me, except_pid=2) == 1
    assert row(db, old_run)[0] == "disconnected" and row(db, current)[0] == "connecting"
    assert runtime.release_host_sessions(db, me) == 1


def test_release_host_sessions_spares_every_live_worker_of_the_node(db):
    """A node of several L7R workers: a worker's start-up sweep releases the rows of dead
    processes of its host (an earlier run, a worker that died), never its live siblings'."""
    me = running_host(db, "me")
    other = running_host(db, "other", "127.0.0.2")
    dead, sibling, mine, elsewhere = add_vms(db, count=4)
    for vm_id, host, pid in ((dead, me, 1), (sibling, me, 2), (mine, me, 3), (elsewhere, other, 1)):
        assert runtime.claim_session(db, vm_id, host, pid, owner(db, vm_id), False)[0] == "claim"
    assert runtime.release_host_sessions(db, me, except_pid=3, keep_pids=[2]) == 1
    assert [row(db, v)[:3] for v in (dead, sibling, mine, elsewhere)] == [
        ("disconnected", None, None), ("connecting", me, 2), ("connecting", me, 3), ("connecting", other, 1)]


def test_a_live_worker_of_the_same_node_is_asked_to_let_go_and_a_dead_one_is_taken_over(db):
    """Across the workers of one node as across nodes: a claim on a VM held by a live sibling
    worker asks it to let go (abort + NOTIFY on the node's channel); one held by a pid that
    is no live worker of this node is taken at once."""
    me = running_host(db, "me")
    held, orphan = add_vms(db, count=2)
    user = owner(db, held)
    assert runtime.claim_session(db, held, me, 100, user, False)[0] == "claim"
    assert runtime.claim_session(db, orphan, me, 100, owner(db, orphan), False)[0] == "claim"
    conn = listen(db, runtime.user_commands_channel(me))
    try:
        outcome, holder, _, _ = runtime.claim_session(db, held, me, 200, user, False, live_pids=[100])
        assert (outcome, holder) == ("abort", (me, 100))
        assert notified(conn) == [(runtime.user_commands_channel(me), str(held))]
        assert row(db, held) == ("connecting", me, 100, "abort")
    finally:
        conn.close()
    # worker 100 died: the node's live workers are now 200 and 300
    outcome, holder, _, _ = runtime.claim_session(db, orphan, me, 200, owner(db, orphan), False, live_pids=[300])
    assert (outcome, holder) == ("claim", (me, 100))
    assert row(db, orphan) == ("connecting", me, 200, None)


def test_the_claim_checks_access_and_brings_the_row_it_wrote(db):
    me = running_host(db, "me")
    (vm_id,) = add_vms(db)
    user = owner(db, vm_id)
    db.execute("UPDATE vm_runtimes SET vm_state = 'running', host_id = %s, vm_address = '10.0.0.7', "
               "vm_vma_port = 3030, vm_x_port = 5000 WHERE vm_id = %s", (me, vm_id))
    before = db.query("SELECT * FROM vm_runtimes")
    assert runtime.claim_session(db, vm_id, me, 1, user + 1, False) == ("forbidden", (None, None), None, None)
    db.transaction(runtime.set_vms_blocked, [vm_id], True)
    assert runtime.claim_session(db, vm_id, me, 1, user, False)[0] == "blocked"
    db.transaction(runtime.set_vms_blocked, [vm_id], False)
    assert db.query("SELECT * FROM vm_runtimes") == before      # a refusal changes nothing
    outcome, holder, row, generation = runtime.claim_session(db, vm_id, me, 1, user, False)
    assert (outcome, holder) == ("claim", (None, None))
    runtime.release_session(db, vm_id, me, 1)
    later = runtime.claim_session(db, vm_id, me, 2, user, False)
    assert later[0] == "claim" and later[3] > generation          # each claim comes after the one before
    outcome, holder, row, generation = runtime.claim_session(db, vm_id, me, 2, user, True)   # the claimer itself
    assert outcome == "abort"
    runtime.release_session(db, vm_id, me, 2)
    outcome, holder, row, generation = runtime.claim_session(db, vm_id, me, 1, user, False)
    assert (outcome, holder) == ("claim", (None, None))
    assert row == runtime.session_row(db, vm_id) == ("running", None, "connecting", None, me, me, 1, "10.0.0.7",
                                                     3030, 5000)
    assert db.query_one("SELECT real_user_id FROM vm_runtimes WHERE vm_id = %s", (vm_id,))[0] == user


@pytest.mark.parametrize("user_state", ["disconnected", "connecting", "connected"])
@pytest.mark.parametrize("holder", ["none", "me", "my_other_pid", "my_live_worker", "other_host"])
@pytest.mark.parametrize("user_cmd", [None, "abort"])
@pytest.mark.parametrize("live_here", [False, True])
@pytest.mark.parametrize("live_pids", [(), (12,), (11, 12)], ids=["one-process", "worker-12", "workers-11-12"])
def test_the_claim_in_the_database_follows_decide_claim(db, user_state, holder, user_cmd, live_here, live_pids):
    """One rule: the server-side claim (db/functions.sql) decides as decide_claim does, for
    a node of one process and for one of several workers (live_pids: its other live ones)."""
    me = running_host(db, "me")
    other = running_host(db, "other", "127.0.0.2")
    (vm_id,) = add_vms(db)
    user = owner(db, vm_id)
    held = {"none": (None, None), "me": (me, 10), "my_other_pid": (me, 11), "my_live_worker": (me, 12),
            "other_host": (other, 20)}[holder]
    db.execute("UPDATE vm_runtimes SET user_state = %s, l7r_host_id = %s, l7r_pid = %s, user_cmd = %s "
               "WHERE vm_id = %s", (user_state, held[0], held[1], user_cmd, vm_id))
    expected = runtime.decide_claim((user_state, held[0], held[1], user_cmd), me, 10, live_here, live_pids)
    if user_state != "disconnected" and held[0] == me and held[1] in live_pids:
        assert expected in ("abort", "wait")          # a live sibling is asked, never taken over
    outcome, got_holder, _, _ = runtime.claim_session(db, vm_id, me, 10, user, live_here, live_pids)
    assert (outcome, got_holder) == (expected, held)
    after = db.query_one("SELECT user_state, l7r_host_id, l7r_pid, user_cmd FROM vm_runtimes WHERE vm_id = %s",
                         (vm_id,))
    if expected == "claim":
        assert after == ("connecting", me, 10, None)
    elif expected == "abort":
        assert after == (user_state, held[0], held[1], "abort")
    else:
        assert after == (user_state, held[0], held[1], user_cmd)


def test_vm_access(db):
    (vm_id,) = add_vms(db)
    owner = db.query_one("SELECT user_id FROM vms WHERE id = %s", (vm_id,))[0]
    assert runtime.check_vm_access(db, vm_id, owner, True) is None
    assert db.query_one("SELECT real_user_id FROM vm_runtimes WHERE vm_id = %s", (vm_id,))[0] == owner
    assert runtime.check_vm_access(db, vm_id, owner + 1, False)[0] == 403
    assert runtime.check_vm_access(db, 987654, owner, False)[0] == 404
    db.transaction(runtime.set_vms_blocked, [vm_id], True)
    assert runtime.check_vm_access(db, vm_id, owner, True)[0] == 403
    assert runtime.check_vm_access(db, vm_id, owner, False) is None     # stop_vm still allowed


def test_concurrent_starts_place_the_vm_once_and_the_node_takes_it_once(db, cfg):
    host = running_host(db, "me")
    (vm_id,) = add_vms(db)
    conn = listen(db, runtime.vm_commands_channel(host))
    try:
        results = [g.value for g in gevent.joinall(
            [gevent.spawn(db.transaction, runtime.request_start, cfg, vm_id, retries=runtime.CLAIM_RETRIES)
             for _ in range(6)], raise_error=True)]
        assert {r[0] for r in results} == {host}
        assert [r[1] for r in results].count("commanded") == 1
        assert notified(conn)[0] == (runtime.vm_commands_channel(host), str(vm_id))
    finally:
        conn.close()
    assert runtime.take_vm_commands(db, host) == ([], [vm_id])
    assert runtime.take_vm_commands(db, host) == ([], [])
    assert row(db, vm_id, "vm_state, vm_cmd") == ("starting", None)
    assert db.transaction(runtime.request_start, cfg, vm_id) == (host, "not_stopped")


def test_start_without_a_usable_host(db, cfg):
    (vm_id,) = add_vms(db)
    with pytest.raises(NoHostAvailable):
        db.transaction(runtime.request_start, cfg, vm_id)
    assert row(db, vm_id, "vm_cmd, host_id") == (None, None)


def test_stop_outcomes(db, cfg):
    host = running_host(db, "me")
    running, pending, zombie, stopped = add_vms(db, count=4)
    db.execute("UPDATE vm_runtimes SET vm_state = 'running', host_id = %s WHERE vm_id = %s", (host, running))
    db.execute("UPDATE vm_runtimes SET vm_state = 'zombie', host_id = %s WHERE vm_id = %s", (host, zombie))
    db.transaction(runtime.request_start, cfg, pending)
    assert db.transaction(runtime.request_stop, running) == "commanded"
    assert db.transaction(runtime.request_stop, pending) == "cancelled"
    assert row(db, pending, "vm_cmd, host_id") == (None, None)
    assert db.transaction(runtime.request_stop, zombie) == "zombie"
    assert db.transaction(runtime.request_stop, stopped) == "stopped"
    assert db.transaction(runtime.request_stop, 424242) == "gone"
    assert runtime.take_vm_commands(db, host) == ([running], [])


def test_vm_rows_are_written_only_by_their_node(db):
    me = running_host(db, "me")
    other = running_host(db, "other", "127.0.0.2")
    (vm_id,) = add_vms(db)
    db.execute("UPDATE vm_runtimes SET vm_state = 'starting', host_id = %s WHERE vm_id = %s", (me, vm_id))
    assert not db.transaction(runtime.prepare_vm, vm_id, other, "10.0.0.9", 3030, 5000, 22, None)
    assert db.transaction(runtime.prepare_vm, vm_id, me, "10.0.0.9", 3030, 5000, 22, None)
    assert not runtime.set_vm_launched(db, vm_id, other, "10.0.0.9", 123)
    assert runtime.set_vm_launched(db, vm_id, me, "10.0.0.9", 123)
    assert not runtime.set_vm_state(db, vm_id, other, "running", run_ok=True)
    assert runtime.set_vm_state(db, vm_id, me, "running", run_ok=True)
    assert db.query_one("SELECT run_attempts, run_ok FROM vm_counters WHERE vm_id = %s", (vm_id,)) == (1, 1)
    assert row(db, vm_id, "vm_state, vm_address, vm_pid, vm_x_port") == ("running", "10.0.0.9", 123, 5000)
    assert runtime.vms_assigned(db, [vm_id], me) == {vm_id} and runtime.vms_assigned(db, [vm_id], other) == set()
    assert runtime.clear_vm(db, vm_id, other) == 0
    assert runtime.clear_vm(db, vm_id, me) == 1
    assert row(db, vm_id, "vm_state, host_id, vm_address, vm_x_port") == ("stopped", None, None, None)


def test_host_lifecycle_heartbeat_and_commands(db):
    host = add_host(db, "me")
    db.transaction(runtime.ensure_host_runtime, host)        # idempotent
    runtime.host_starting(db, host, 4242)
    assert runtime.host_state(db, host) == ("starting", False)
    runtime.set_host_capacity(db, host, 2048.0, 1600.0)
    runtime.set_host_state(db, host, "running")
    assert runtime.heartbeat(db, host, 4242)
    assert db.query_one("SELECT pid, ok_ts IS NOT NULL, usable_ram FROM host_runtimes WHERE host_id = %s",
                        (host,)) == (4242, True, 2048.0)
    db.execute("UPDATE host_runtimes SET cmd = 'stop' WHERE host_id = %s", (host,))
    assert runtime.take_host_command(db, host) == "stop"
    assert runtime.take_host_command(db, host) is None
    db.transaction(runtime.set_hosts_blocked, [host], True)
    assert runtime.host_state(db, host) == ("running", True)
    db.execute("UPDATE host_runtimes SET state = 'lost' WHERE host_id = %s", (host,))
    assert not runtime.heartbeat(db, host, 4242)


def test_disconnect_asks_each_holding_node_once(db):
    a = running_host(db, "a")
    b = running_host(db, "b", "127.0.0.2")
    v1, v2, idle = add_vms(db, count=3)
    runtime.claim_session(db, v1, a, 1, owner(db, v1), False)
    runtime.claim_session(db, v2, b, 2, owner(db, v2), False)
    conn = listen(db, runtime.user_commands_channel(a))
    try:
        assert db.transaction(runtime.request_disconnect, [v1, v2, idle]) == 2
        assert notified(conn) == [(runtime.user_commands_channel(a), "")]
    finally:
        conn.close()
    assert row(db, v1)[3] == "abort" and row(db, v2)[3] == "abort" and row(db, idle)[3] is None


def test_tokens(db):
    (vm_id,) = add_vms(db)
    user_id, login = db.query_one("SELECT u.id, u.login FROM users u JOIN vms v ON v.user_id = u.id "
                                  "WHERE v.id = %s", (vm_id,))
    multi, params_id = db.transaction(runtime.issue_token, user_id, {"qvd.x": "1"}, 60)
    assert params_id is not None
    single, _ = db.transaction(runtime.issue_token, user_id, {}, 60, vm_id=vm_id, multi_use=False)
    expired, _ = db.transaction(runtime.issue_token, user_id, {}, -1)
    for _ in range(2):
        error, grant = runtime.redeem_token(db, multi)
        assert error is None and (grant.user_id, grant.login, grant.vm_id, grant.params) == (user_id, login, None,
                                                                                             {"qvd.x": "1"})
    assert runtime.redeem_token(db, single)[1].vm_id == vm_id
    assert runtime.redeem_token(db, single) == ("expired_token", None)
    assert runtime.redeem_token(db, expired) == ("expired_token", None)
    assert db.query_one("SELECT count(*) FROM user_tokens WHERE token = %s", (expired,))[0] == 0
    assert runtime.redeem_token(db, "no-such-token") == ("unknown_token", None)
    db.execute("UPDATE users SET blocked = true WHERE id = %s", (user_id,))
    assert runtime.redeem_token(db, multi) == ("user_blocked", None)


def test_tokens_are_stored_as_digests_and_die_with_their_vms_session(db):
    me = running_host(db, "me")
    (vm_id,) = add_vms(db)
    user = owner(db, vm_id)
    user_token, _ = db.transaction(runtime.issue_token, user, {}, 60)
    assert db.query("SELECT 1 FROM user_tokens WHERE token = %s", (user_token,)) == []
    assert db.query("SELECT 1 FROM user_tokens WHERE token = %s", (runtime.token_digest(user_token),)) == [(1,)]
    for release in ("release_session", "release_aborted_session", "release_host_sessions", "claim_over_dead_holder"):
        assert runtime.claim_session(db, vm_id, me, 7, user, False)[0] == "claim"
        session_token, _ = db.transaction(runtime.issue_token, user, {}, 60, vm_id=vm_id)
        assert runtime.redeem_token(db, session_token)[0] is None
        if release == "release_session":
            runtime.release_session(db, vm_id, me, 7)
        elif release == "release_aborted_session":
            db.execute("UPDATE vm_runtimes SET user_cmd = 'abort' WHERE vm_id = %s", (vm_id,))
            runtime.release_aborted_session(db, vm_id, me, 7)
        elif release == "release_host_sessions":
            runtime.release_host_sessions(db, me)
        else:
            assert runtime.claim_session(db, vm_id, me, 8, user, False)[0] == "claim"   # pid 7 is gone
            runtime.release_session(db, vm_id, me, 8)
        assert runtime.redeem_token(db, session_token) == ("unknown_token", None), release
    assert runtime.redeem_token(db, user_token)[0] is None       # a token not bound to the VM stays
    assert runtime.revoke_token(db, user_token)
    assert runtime.redeem_token(db, user_token) == ("unknown_token", None)


def test_lost_host_takes_its_session_tokens_along(db):
    me = running_host(db, "me")
    gone = running_host(db, "gone", "127.0.0.2")
    (vm_id,) = add_vms(db)
    user = owner(db, vm_id)
    runtime.claim_session(db, vm_id, gone, 3, user, False)
    session_token, _ = db.transaction(runtime.issue_token, user, {}, 60, vm_id=vm_id)
    db.execute("UPDATE host_runtimes SET ok_ts = (now() AT TIME ZONE 'UTC') - interval '1 hour' WHERE host_id = %s",
               (gone,))
    db.transaction(runtime.mark_lost_hosts, me, 600)
    assert runtime.redeem_token(db, session_token) == ("unknown_token", None)


def test_sweep_purges_expired_tokens_and_parameters_nobody_refers_to(db):
    (vm_id,) = add_vms(db)
    user = owner(db, vm_id)
    live, live_params = db.transaction(runtime.issue_token, user, {"a": 1}, 60)
    db.transaction(runtime.issue_token, user, {"b": 2}, -5)                  # expired
    stored_only = db.transaction(runtime.store_auth_params, {"c": 3})        # authenticate_user?store_auth
    tokens, params, seen = runtime.purge_tokens(db)
    assert (tokens, params) == (1, 0) and seen >= stored_only
    # the next sweep takes the parameters no token refers to, but not a row stored since
    fresh = db.transaction(runtime.store_auth_params, {"d": 4})
    tokens, params, _ = runtime.purge_tokens(db, orphans_up_to=seen)
    assert tokens == 0 and params == 2                                       # {"b"} of the expired token, {"c"}
    left = {r[0] for r in db.query("SELECT id FROM user_auth_parameters")}
    assert left == {live_params, fresh}
    assert runtime.redeem_token(db, live)[0] is None


def test_agent_keys_live_as_long_as_the_vms_run_on_their_node(db):
    """vm_agent_keys: written with the start's ports, replaced at the next start, gone when
    the node clears the row (only the VM's node can), when a lost node's VMs are released,
    and with the VM."""
    me = running_host(db, "me")
    gone = running_host(db, "gone", "127.0.0.2")
    mine, lost, deleted = add_vms(db, count=3)

    def prepare(vm_id, host, key):
        def tx(cur):
            assert runtime.prepare_vm(cur, vm_id, host, "10.0.0.9", 3030, 4100, 22, None)
            runtime.set_vm_agent_key(cur, vm_id, key)
        db.execute("UPDATE vm_runtimes SET vm_state = 'starting', host_id = %s WHERE vm_id = %s", (host, vm_id))
        db.transaction(tx)

    prepare(mine, me, "a" * 43)
    prepare(mine, me, "b" * 43)                           # the next start: a new key replaces the old
    prepare(lost, gone, "c" * 43)
    prepare(deleted, me, "d" * 43)
    assert runtime.vm_agent_keys(db, [mine, lost, deleted]) == {mine: "b" * 43, lost: "c" * 43, deleted: "d" * 43}
    assert runtime.clear_vm(db, mine, gone) == 0 and runtime.vm_agent_key(db, mine) == "b" * 43
    assert runtime.clear_vm(db, mine, me) == 1 and runtime.vm_agent_key(db, mine) is None
    db.execute("UPDATE host_runtimes SET ok_ts = (now() AT TIME ZONE 'UTC') - interval '1 hour' WHERE host_id = %s",
               (gone,))
    db.transaction(runtime.mark_lost_hosts, me, 600)
    assert runtime.vm_agent_key(db, lost) is None
    db.execute("DELETE FROM vms WHERE id = %s", (deleted,))
    assert runtime.vm_agent_keys(db, [mine, lost, deleted]) == {}
    prepare(mine, me, "e" * 43)
    db.transaction(runtime.set_vm_agent_key, mine, None)  # a start under vm.vma.legacy_unauthenticated
    assert runtime.vm_agent_key(db, mine) is None


def test_nodes_starting_together_install_the_functions_once(db):
    """Concurrent CREATE OR REPLACE of one function fails ("tuple concurrently updated"): the
    installers take turns, and a database that has this version already is left alone."""
    db.execute("COMMENT ON FUNCTION qvd_claim_session_v2(integer, integer, integer, integer, boolean, integer) "
               "IS 'an older version'")
    results = [g.value for g in gevent.joinall([gevent.spawn(runtime.install_functions, db) for _ in range(6)],
                                               raise_error=True)]
    assert results.count(True) == 1 and results.count(False) == 5
    assert runtime.install_functions(db) is False
