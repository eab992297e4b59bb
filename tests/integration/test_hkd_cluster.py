"""Cluster monitor pass against a real PostgreSQL (docs/hkd.md#cluster-monitor)."""
import select

from helpers.hkd_env import add_host, add_vms

from qvd_gevent.db.runtime import mark_lost_hosts as scan


def test_scan_marks_stale_hosts_lost_and_frees_their_vms_and_sessions(db):
    me = add_host(db, "me", "127.0.0.1")
    stale = add_host(db, "stale", "127.0.0.2")
    fresh = add_host(db, "fresh", "127.0.0.3")
    starting = add_host(db, "booting", "127.0.0.4")
    db.execute("UPDATE host_runtimes SET state = 'running', ok_ts = (now() AT TIME ZONE 'UTC') - interval '1 hour' "
               "WHERE host_id IN (%s, %s)", (stale, me))
    db.execute("UPDATE host_runtimes SET state = 'running', ok_ts = now() AT TIME ZONE 'UTC' WHERE host_id = %s", (fresh,))
    db.execute("UPDATE host_runtimes SET state = 'starting', ok_ts = NULL WHERE host_id = %s", (starting,))
    on_stale, on_fresh, session_on_stale = add_vms(db, count=3)
    db.execute("UPDATE vm_runtimes SET host_id = %s, vm_state = 'running', vm_address = '10.0.0.5', vm_vma_port = 3030, "
               "vm_cmd = 'stop', vm_pid = 77 WHERE vm_id = %s", (stale, on_stale))
    db.execute("UPDATE vm_runtimes SET host_id = %s, vm_state = 'running' WHERE vm_id = %s", (fresh, on_fresh))
    db.execute("UPDATE vm_runtimes SET host_id = %s, vm_state = 'running', l7r_host_id = %s, l7r_pid = 5, "
               "user_state = 'connected' WHERE vm_id = %s", (fresh, stale, session_on_stale))

    lost, freed, _ = db.transaction(scan, me, 600)
    assert lost == [stale]                      # not me, not the fresh one, not one that is starting
    assert freed == [on_stale]
    row = db.query_one("SELECT vm_state, host_id, vm_address, vm_vma_port, vm_cmd, vm_pid FROM vm_runtimes "
                       "WHERE vm_id = %s", (on_stale,))
    assert row == ("stopped", None, None, None, "stop", 77)   # vm_cmd and vm_pid kept, as the original
    assert db.query_one("SELECT vm_state, host_id FROM vm_runtimes WHERE vm_id = %s", (on_fresh,)) == ("running", fresh)
    assert db.query_one("SELECT user_state, l7r_host_id, l7r_pid FROM vm_runtimes WHERE vm_id = %s",
                        (session_on_stale,)) == ("disconnected", None, None)
    # idempotent: a second pass (another node racing) changes nothing
    assert db.transaction(scan, me, 600) == ([], [], [])


def test_scan_aborts_sessions_on_stopped_vms_and_notifies_their_node(db, pg_server):
    """Fix of the original's bug: it wrote `user_cmd = NULL` and notified a channel nobody hears."""
    me = add_host(db, "me", "127.0.0.1")
    l7r = add_host(db, "l7r-node", "127.0.0.2")
    (vm_id,) = add_vms(db)
    db.execute("UPDATE vm_runtimes SET vm_state = 'stopped', user_state = 'connected', l7r_host_id = %s, "
               "l7r_pid = 9 WHERE vm_id = %s", (l7r, vm_id))
    listen = db.connect(autocommit=True)
    try:
        with listen.cursor() as cur:
            cur.execute(f"LISTEN qvd_cmd_for_user_on_host{l7r}")
        _, _, hosts = db.transaction(scan, me, 600)
        assert hosts == [l7r]
        assert db.query_one("SELECT user_cmd FROM vm_runtimes WHERE vm_id = %s", (vm_id,))[0] == "abort"
        select.select([listen], [], [], 5)
        listen.poll()
        assert [n.channel for n in listen.notifies] == [f"qvd_cmd_for_user_on_host{l7r}"]
    finally:
        listen.close()
    assert db.transaction(scan, me, 600)[2] == []     # already asked: not again
