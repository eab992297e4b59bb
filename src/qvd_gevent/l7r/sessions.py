"""The live sessions of this L7R and everything that ends them (docs/protocol.md#sessions).

One ``Session`` per VM at most, from its claim to the end of its splice. The registry
here claims a VM's row for a session (one claim of a VM at a time in this process), lets
a connect wait for the VM's row to change (LISTEN on ``qvd_vm_runtime``, woken by
notifications, never by sleep-polling alone), runs the splice once a session is set up
and releases the row when it ends.

It also does what the original's HKD did for its L7R children: it LISTENs on
``qvd_cmd_for_user_on_host<own host id>`` and ``qvd_vm_runtime`` and closes a session of
its own at once when another client takes the VM over (or an admin disconnects the
user), then releases the row; rows this process holds without a live session are
released by a slow sweep (``reconcile``).
"""
import logging
import os
import time
from contextlib import contextmanager

import gevent
import gevent.event
import gevent.lock
import gevent.pool

from ..db import runtime
from .splice import Splice

log = logging.getLogger("qvd.l7r")

RECONCILE_PERIOD = 10.0


class SessionAborted(BaseException):
    """Raised into a setup greenlet whose session was taken over (BaseException: not caught by accident)."""


class Session:
    """One connect_to_vm, from claim to the end of its splice."""

    __slots__ = ("vm_id", "login", "greenlet", "splice", "claimed", "started", "ended", "peer", "in_statement",
                 "deferred_abort", "__weakref__")

    def __init__(self, vm_id, login, peer):
        self.vm_id = vm_id
        self.login = login
        self.peer = peer
        self.greenlet = gevent.getcurrent()
        self.splice = None
        self.claimed = False
        self.started = None
        self.ended = False
        self.in_statement = False
        self.deferred_abort = None

    def abort(self, reason):
        if self.splice is not None:
            self.splice.close(reason)
        elif self.greenlet is not None and not self.greenlet.dead:
            if self.in_statement:
                self.deferred_abort = reason                      # raised when the statement is done
            else:
                gevent.kill(self.greenlet, SessionAborted(reason))     # a raw greenlet too

    @contextmanager
    def whole_statement(self):
        """A database write of the setup runs whole: an abort that comes meanwhile is raised
        when it is done. Cut off on our side, the statement would still run at the server
        (waiting there for the row's lock, say), and land late: a mark_connected or a claim
        of an aborted setup would then act on the next claim of this process, since the row
        names the process, not the session (a VM left with no live session)."""
        self.in_statement = True
        try:
            yield
        finally:
            self.in_statement = False
        if self.deferred_abort is not None:
            reason, self.deferred_abort = self.deferred_abort, None
            raise SessionAborted(reason)


def shielded(fn, *args):
    """Run fn (a failed setup's cleanup) in a greenlet of its own, exactly once, and wait for
    it. An abort's kill can be scheduled just before the setup failed by itself and land
    late: it interrupts only this wait, never the cleanup. (Running the cleanup again after
    such an interruption would release the row a second time: by then a newer session of
    this process may hold it, and the row names the process, not the session.)"""
    cleanup = gevent.spawn(fn, *args)
    for _ in range(5):
        try:
            return cleanup.get()
        except SessionAborted:
            continue
    return None


def abort_decision(registered_before, registered_now):
    """What to do about a row of ours that carries an abort, given the session registered
    for its VM before the abort was read and the one registered now: 'close' that session,
    'release' the row (nobody of ours holds it), or 'keep'.

    The row names this process, not one session of it: an abort read may be for a session
    already gone and replaced by a new claimer of ours, which must not be closed for it.
    Only a session registered before the read is eligible; a claim of ours since the read
    cleared user_cmd, and the guarded release keeps that claim."""
    if registered_now is not None:
        return "close" if registered_before is registered_now else "keep"
    return "release" if registered_before is None else "keep"


class Sessions:
    def __init__(self, cfg, db, listener, host, counters, node_pids=None):
        self.cfg = cfg
        self.node_pids = node_pids or (lambda: ())      # the node's other live L7R processes
        self.db = db
        self.listener = listener
        self.host = host
        self.counters = counters
        self.pid = os.getpid()
        self.live = {}                # vm_id -> Session (claimed or being set up)
        self._waiters = {}            # vm_id -> set of Events
        self._claim_locks = {}        # vm_id -> [Semaphore held around one claim of that VM, holders + waiters]
        self._unsubscribe = []
        self._cleanups = gevent.pool.Group()
        self._abort_check_wanted = gevent.event.Event()
        self._greenlets = []
        host.on_found(self._host_found)

    # --- lifecycle ------------------------------------------------------------------------
    def start(self):
        self._unsubscribe.append(self.listener.subscribe(runtime.VM_RUNTIME_CHANNEL, self._on_vm_runtime))
        self.listener.on_reconnect(self._on_listen_reconnect)
        self._greenlets = [gevent.spawn(self._abort_checker), gevent.spawn(self._reconcile_loop)]

    def drain(self, grace_seconds):
        """Let live sessions run up to grace, then close them; rows end disconnected."""
        deadline = time.monotonic() + max(0, grace_seconds)
        while self.live and time.monotonic() < deadline:
            gevent.sleep(0.1)
        for session in list(self.live.values()):
            session.abort("node draining")
        end = time.monotonic() + 10
        while (self.live or len(self._cleanups)) and time.monotonic() < end:
            gevent.sleep(0.05)
        self._cleanups.join(timeout=5)

    def stop(self):
        for unsub in self._unsubscribe:
            unsub()
        self._unsubscribe = []
        for g in self._greenlets:
            g.kill()
        self._greenlets = []

    def _host_found(self, host_id):
        self._unsubscribe.append(self.listener.subscribe(runtime.user_commands_channel(host_id), self._on_user_cmd))
        # rows this host held from an earlier run of the node (or a worker of it that died) are
        # stale; the node's other live workers hold theirs
        swept = runtime.release_host_sessions(self.db, host_id, except_pid=self.pid, keep_pids=self.node_pids())
        if swept:
            log.info("released %d session rows left by an earlier run of this node", swept)

    # --- claim and wait -------------------------------------------------------------------
    def claim(self, session, user_id):
        """Claim the VM's row for session (registered here when it is ours), or ask its
        holder to let go: runtime.claim_session's (outcome, holder, row, generation)."""
        vm_id = session.vm_id
        # One claim of a VM at a time in this process: whether another session of ours
        # holds it must still be true when the row is written (the row names the
        # process, not the session, so two of ours could both "claim" it otherwise).
        # The lock stays while anyone holds or waits for it: a semaphore just released
        # to a waiter reads as unlocked until that waiter runs, and a new lock made then
        # would let a third claimer in beside the waiter.
        entry = self._claim_locks.get(vm_id)
        if entry is None:
            entry = self._claim_locks[vm_id] = [gevent.lock.Semaphore(), 0]
        entry[1] += 1
        try:
            with entry[0]:
                other = self.live.get(vm_id)
                live_here = other is not None and other is not session
                siblings = self.node_pids()
                workers = (siblings,) if siblings else ()      # a node of one process names none
                with session.whole_statement():
                    outcome, holder, row, generation = runtime.claim_session(self.db, vm_id, self.host.id, self.pid,
                                                                             user_id, live_here, *workers)
                    if outcome == "claim":
                        session.claimed = True
                        self.live[vm_id] = session
        finally:
            entry[1] -= 1
            if entry[1] == 0 and self._claim_locks.get(vm_id) is entry:
                del self._claim_locks[vm_id]
        return outcome, holder, row, generation

    def wait_vm_event(self, vm_id, timeout):
        """Wait up to timeout for a change of the VM's row (or a LISTEN reconnect)."""
        event = gevent.event.Event()
        waiters = self._waiters.setdefault(vm_id, set())
        waiters.add(event)
        try:
            return event.wait(timeout)
        finally:
            waiters.discard(event)
            if not waiters:
                self._waiters.pop(vm_id, None)

    # --- ends -----------------------------------------------------------------------------
    def end_setup(self, session):
        """A session whose setup failed: release its row, forget it."""
        if session.claimed:
            try:
                runtime.release_session(self.db, session.vm_id, self.host.id, self.pid)
            except Exception as exc:
                log.error("VM %s: session row not released (%s)", session.vm_id, exc)
        # only after the release: until then a new claimer here must see the VM as held
        if self.live.get(session.vm_id) is session:
            del self.live[session.vm_id]

    def splice(self, session, client_sock, vm_sock, leftover, pump=Splice):
        """The session is set up: pump bytes until either side ends it, then release its row.
        pump: Splice, or a browser's WsRelay (the same start/close/bytes_* interface)."""
        session.started = time.monotonic()
        self.counters.sessions_open += 1
        session.splice = pump(client_sock, vm_sock, on_done=lambda reason: self._on_splice_done(session, reason))
        session.splice.start(leftover)

    def _on_splice_done(self, session, reason):
        # on the hub: database work goes to a greenlet
        self._cleanups.spawn(self._finish_session, session, reason)

    def _finish_session(self, session, reason):
        if session.ended:
            return
        session.ended = True
        lasted = time.monotonic() - (session.started or time.monotonic())
        up, down = session.splice.bytes_to_vm, session.splice.bytes_to_client
        log.info("session closed: user %s VM %s after %.1f s (%s; %d bytes to VM, %d to client)",
                 session.login, session.vm_id, lasted, reason, up, down)
        if lasted < self.cfg.get_float("internal.l7r.short_session"):
            self.counters.count("short_sessions")
        for attempt in range(10):
            try:
                runtime.release_session(self.db, session.vm_id, self.host.id, self.pid)
                break
            except Exception as exc:
                log.warning("VM %s: session row not released yet (%s)", session.vm_id, exc)
                gevent.sleep(min(0.2 * (attempt + 1), 2))
        if self.live.get(session.vm_id) is session:
            del self.live[session.vm_id]
        # counted down only now: "no open session" means every row is released
        self.counters.sessions_open -= 1
        self.counters.connections_open -= 1

    def reconcile(self):
        """Safety net: release rows this process holds without a live session (a release lost to an error)."""
        host_id = self.host.id
        if host_id is None:
            return 0
        try:
            held = runtime.sessions_held(self.db, host_id, self.pid)
            stale = [vm_id for vm_id in held if vm_id not in self.live]
            for vm_id in stale:
                if vm_id not in self.live:
                    runtime.release_session(self.db, vm_id, host_id, self.pid, older_than=runtime.now_epoch() - 5)
            if stale:
                log.warning("released %d session rows without a live session", len(stale))
            return len(stale)
        except Exception as exc:
            log.warning("session row reconcile failed: %s", exc)
            return 0

    def _reconcile_loop(self):
        while True:
            gevent.sleep(RECONCILE_PERIOD)
            self.reconcile()

    # --- notifications and aborts ----------------------------------------------------------
    def _on_vm_runtime(self, channel, payload):
        vm_id, _, what = payload.partition(":")
        try:
            vm_id = int(vm_id)
        except ValueError:
            return
        for event in self._waiters.get(vm_id, ()):
            event.set()
        # the abort itself: whoever writes one also notifies our host's channel; this is the
        # net for a writer that does not (the row says abort: payload "<id>:abort")
        if what == "abort" and vm_id in self.live:
            self._abort_check_wanted.set()

    def _on_user_cmd(self, channel, payload):
        self._abort_check_wanted.set()

    def _on_listen_reconnect(self):
        for events in list(self._waiters.values()):
            for event in events:
                event.set()
        self._abort_check_wanted.set()

    def _abort_checker(self):
        """One greenlet, one query per burst of notifications (not one per notification)."""
        while True:
            self._abort_check_wanted.wait()
            self._abort_check_wanted.clear()
            self._check_abort()
            gevent.sleep(0.02)

    def _check_abort(self):
        host_id = self.host.id
        if host_id is None:
            return
        before = dict(self.live)
        try:
            aborted = runtime.sessions_to_abort(self.db, host_id, self.pid)
        except Exception as exc:
            log.warning("cannot check for session aborts: %s", exc)
            return
        for vm_id in aborted:
            session = self.live.get(vm_id)
            decision = abort_decision(before.get(vm_id), session)
            if decision == "close":
                log.info("takeover: closing session of user %s on VM %s", session.login, vm_id)
                session.abort(f"Aborted by contending session VM_ID: {vm_id}")
            elif decision == "release":
                runtime.release_aborted_session(self.db, vm_id, host_id, self.pid)
