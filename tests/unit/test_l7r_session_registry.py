"""The session registry's own rules (src/qvd_gevent/l7r/sessions.py), without a database:
the row's claim (db/runtime.claim_session) is replaced inside each test by a stand-in that
records what the registry asked."""
import random

import gevent
import pytest

from qvd_gevent.db import runtime
from qvd_gevent.l7r import sessions
from qvd_gevent.l7r.sessions import Session, Sessions, abort_decision


class Host:
    id = 3

    def on_found(self, callback):
        pass


@pytest.fixture
def registry():
    return Sessions(cfg=None, db=None, listener=None, host=Host(), counters=None)


def test_one_claim_of_a_vm_at_a_time_however_claimers_interleave(registry, monkeypatch):
    """Claimers arriving while a claim ends and another waits must still queue: a lock
    released to a waiter reads as free until the waiter runs."""
    inside, worst, calls = [0], [0], [0]

    def claim_session(db, vm_id, host_id, pid, user_id, live_here):
        inside[0] += 1
        worst[0] = max(worst[0], inside[0])
        calls[0] += 1
        gevent.sleep(random.uniform(0, 0.002))
        inside[0] -= 1
        return "wait", (9, 55), None, None
    monkeypatch.setattr(runtime, "claim_session", claim_session)
    rng = random.Random(11)

    def client():
        for _ in range(40):
            gevent.sleep(rng.uniform(0, 0.002))
            registry.claim(Session(7, "u", "peer"), 1)
    gevent.joinall([gevent.spawn(client) for _ in range(5)], timeout=30, raise_error=True)
    assert calls[0] == 200 and worst[0] == 1
    assert registry._claim_locks == {}            # nothing kept once nobody claims


def test_a_claim_registers_the_session_and_sees_other_live_ones(registry, monkeypatch):
    seen = []

    def claim_session(db, vm_id, host_id, pid, user_id, live_here):
        seen.append((vm_id, host_id, pid, user_id, live_here))
        return ("claim" if not live_here else "abort"), (None, None), None, None
    monkeypatch.setattr(runtime, "claim_session", claim_session)
    first, second = Session(7, "u", "a"), Session(7, "u", "b")
    assert registry.claim(first, 1) == ("claim", (None, None), None, None)
    assert registry.live == {7: first} and first.claimed
    assert registry.claim(first, 1)[0] == "claim"            # itself is not "another live session"
    assert registry.claim(second, 1)[0] == "abort" and not second.claimed
    assert registry.live == {7: first}
    assert seen == [(7, 3, registry.pid, 1, False), (7, 3, registry.pid, 1, False), (7, 3, registry.pid, 1, True)]


def test_an_abort_closes_only_a_session_registered_before_it_was_read():
    a, b = object(), object()
    assert abort_decision(a, a) == "close"
    assert abort_decision(a, b) == "keep"        # a new claim of ours since: its claim cleared the abort
    assert abort_decision(None, b) == "keep"
    assert abort_decision(a, None) == "keep"     # gone meanwhile: its own end released the row
    assert abort_decision(None, None) == "release"


def test_an_aborted_setup_greenlet_gets_session_aborted():
    session = None
    caught = []

    def setup():
        nonlocal session
        session = Session(7, "u", "peer")
        try:
            gevent.sleep(5)
        except sessions.SessionAborted as exc:
            caught.append(str(exc))
    g = gevent.spawn(setup)
    gevent.sleep(0)
    session.abort("node draining")
    g.join(5)
    assert caught == ["node draining"]


def test_a_late_abort_never_runs_a_failed_setups_cleanup_twice():
    """The release a failed setup's cleanup makes names the process, not the session: run a
    second time after a late kill, it would release the row of the next session of this
    process. The kill interrupts the wait for the cleanup, never the cleanup."""
    from qvd_gevent.l7r.sessions import SessionAborted, shielded
    runs = []

    def cleanup():
        runs.append("started")
        gevent.sleep(0.05)                 # the release's round trip
        runs.append("done")

    def failed_setup():
        shielded(cleanup)
    setup = gevent.spawn(failed_setup)
    gevent.sleep(0.01)
    setup.kill(SessionAborted("late abort"), block=False)      # lands while the release is in flight
    setup.join(2)
    gevent.sleep(0.1)
    assert runs == ["started", "done"]


def test_an_abort_during_a_setup_write_comes_when_the_write_is_done():
    """Cut off on our side, a statement still runs at the server: an aborted setup's
    mark_connected landed after the next claim of this process and marked that one
    connected (the row names the process). The abort waits for the write, then comes."""
    events = []

    def setup(session):
        try:
            with session.whole_statement():
                gevent.sleep(0.05)                 # the statement's round trip
                events.append("written")
            events.append("went on")
        except sessions.SessionAborted as exc:
            events.append(f"aborted: {exc}")
    session = Session(7, "u", "peer")
    g = gevent.spawn(setup, session)
    session.greenlet = g
    gevent.sleep(0.01)
    session.abort("Aborted by contending session VM_ID: 7")
    g.join(2)
    assert events == ["written", "aborted: Aborted by contending session VM_ID: 7"]
    # outside a statement an abort comes at once, as before
    events.clear()
    session = Session(7, "u", "peer")
    g = gevent.spawn(lambda: (gevent.sleep(5), events.append("slept")))
    session.greenlet = g
    gevent.sleep(0.01)
    session.abort("node draining")
    g.join(2)
    assert g.dead and events == [] and isinstance(g.exception, sessions.SessionAborted)


def test_an_abort_during_the_claim_lets_the_claim_finish_and_register(registry, monkeypatch):
    """The claim's statement is whole too: a claim that took the row is registered (so the
    setup's cleanup releases it) before the abort is raised."""
    def claim_session(db, vm_id, host_id, pid, user_id, live_here):
        gevent.sleep(0.05)
        return "claim", (None, None), None, 42
    monkeypatch.setattr(runtime, "claim_session", claim_session)
    outcome = []

    def setup(session):
        try:
            outcome.append(registry.claim(session, 1))
        except sessions.SessionAborted:
            outcome.append("aborted")
    session = Session(7, "u", "peer")
    g = gevent.spawn(setup, session)
    session.greenlet = g
    gevent.sleep(0.01)
    session.abort("node draining")
    g.join(2)
    assert outcome == ["aborted"]
    assert session.claimed and registry.live == {7: session}
