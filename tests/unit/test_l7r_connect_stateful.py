"""Hypothesis stateful tests of the connect machine (src/qvd_gevent/l7r/connect.py).

1. One machine against an environment that answers every step at random (rows in any
   state, VMA errors, X states, refusals, aborts at any moment, stray events, time jumps):
   the machine's promises hold on every path.
2. Several clients of one VM on two nodes, each a real ConnectMachine, the row and each
   node's registry modelled as db/runtime.py and l7r/sessions.py keep them (the claim
   decision and the abort decision are the real functions): never two live sessions.
"""
import re

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from qvd_gevent.db.runtime import decide_claim
from qvd_gevent.l7r.connect import (
    TERMINAL,
    Aborted,
    Begin,
    BuildParams,
    Claim,
    ClaimResult,
    ConnectDisplay,
    Connected,
    Deny,
    ConnectMachine,
    ConnectSettings,
    DisplayConnected,
    Fail,
    MarkConnected,
    MarkResult,
    ParamsReady,
    PollX,
    ReadRow,
    RequestStart,
    RowSeen,
    SendInfo,
    SendSwitch,
    SessionRow,
    Sleep,
    StartRequested,
    StartX,
    Step,
    Switched,
    VmaAnswer,
    Waited,
    WaitVmEvent,
    XState,
)
from qvd_gevent.l7r.sessions import abort_decision

VM, HOST, PID = 7, 3, 4242
SETTINGS = ConnectSettings(takeover=30, poll_vm=1, vm_start=60, poll_x=0.5, x_start=10, x_start_retries=2,
                           vma_port=3030)
STATEFUL = settings(max_examples=300, stateful_step_count=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# the 102 lines a client may see, in this order (docs/protocol.md#progress-lines)
PROGRESS = re.compile(
    r"A*"                           # Aborting contending session, once per attempt
    r"(S(N?B)?W*(X(Y(C(E)?)?)?)?)?$"  # acquired, [assign, start], waits, X start and wait, connecting, established
)
LETTER = {
    f"Aborting contending session for VM_ID: {VM}": "A",
    f"Session acquired for VM_ID: {VM}": "S",
    f"Assigning VM {VM} to host": "N",
    "Starting virtual machine": "B",
    "Waiting for VM to reach state 'running'": "W",
    f"Starting X session at VM {VM}": "X",
    f"Waiting for X session to come up on VM {VM}": "Y",
    f"Connecting X session for VM_ID: {VM}": "C",
    "Connection established": "E",
}

VM_STATES = st.sampled_from(["stopped", "starting", "running", "stopping", "zombie", "debugging"])
X_STATES = st.sampled_from([None, "starting", "listening", "provisioning", "stopped", "suspended", "connected",
                            "stopping", "weird"])
ERRORS = st.one_of(st.none(), st.sampled_from(["refused", "busy", "timed out"]))


@st.composite
def rows(draw, mine=True):
    holder = (HOST, PID) if mine else draw(st.sampled_from([(HOST, PID), (HOST, 1), (9, 55), (None, None)]))
    return SessionRow(draw(VM_STATES), draw(st.sampled_from([None, "start", "stop"])),
                      draw(st.sampled_from(["connecting", "connected", "disconnected"])),
                      draw(st.sampled_from([None, None, "abort"])), draw(st.sampled_from([HOST, None, 8])),
                      holder[0], holder[1], draw(st.sampled_from(["10.1.0.5", None])), draw(st.sampled_from([3030, None])),
                      draw(st.sampled_from([4100, None])))


GOOD_ROW = SessionRow("running", None, "connecting", None, HOST, HOST, PID, "10.1.0.5", 3030, 4100)
GOOD = {Claim: ClaimResult("claim"), ReadRow: RowSeen(GOOD_ROW), RequestStart: StartRequested(), BuildParams: ParamsReady(),
        StartX: VmaAnswer(), PollX: XState("listening"), ConnectDisplay: DisplayConnected(), MarkConnected: MarkResult()}


def answers(command):
    """What the environment may answer to a step: mostly the answer that lets the connect
    go on (so that random runs reach the last steps), else anything."""
    if type(command) in GOOD:
        good = st.just(GOOD[type(command)])
        return st.one_of(good, good, good, any_answer(command))
    return any_answer(command)


def any_answer(command):
    if isinstance(command, Claim):
        refused = st.builds(ClaimResult, st.sampled_from(["abort", "wait", "gone", "forbidden", "blocked"]),
                            st.sampled_from([(9, 55), (HOST, PID), (None, None)]))
        # a claim comes with the row it wrote (one round trip), or without (the runner reads it)
        claimed = st.builds(ClaimResult, st.just("claim"), st.sampled_from([(9, 55), (HOST, PID), (None, None)]),
                            st.one_of(st.none(), rows(mine=True)))
        return st.one_of(refused, claimed)
    if isinstance(command, ReadRow):
        return st.builds(RowSeen, st.one_of(st.none(), rows(mine=True), rows(mine=False)))
    if isinstance(command, RequestStart):
        return st.builds(StartRequested, st.one_of(st.none(), st.just("no host available")))
    if isinstance(command, (WaitVmEvent, Sleep)):
        return st.just(Waited())
    if isinstance(command, BuildParams):
        return st.builds(ParamsReady, st.one_of(st.none(), st.just("VM 7 runs without an agent key")))
    if isinstance(command, StartX):
        return st.builds(VmaAnswer, ERRORS)
    if isinstance(command, PollX):
        return st.builds(XState, X_STATES)
    if isinstance(command, ConnectDisplay):
        return st.builds(DisplayConnected, ERRORS)
    if isinstance(command, MarkConnected):
        return st.builds(MarkResult, st.one_of(st.none(), st.just("User state unexpectedly went to disconnected")))
    if isinstance(command, SendSwitch):
        return st.just(Switched())
    raise AssertionError(command)


STRAY = st.sampled_from([Begin(), ClaimResult("claim"), RowSeen(None), StartRequested(), Waited(), ParamsReady(),
                         VmaAnswer(), XState("listening"), DisplayConnected(), MarkResult(), Switched()])


class OneConnect(RuleBasedStateMachine):
    """One machine; every step answered at random, time jumping forward."""

    @initialize()
    def begin(self):
        self.m = ConnectMachine(VM, HOST, PID, SETTINGS)
        self.now = 0.0
        self.batches = []
        self.commands = []
        self.step = None
        self.answered = {}              # answer type -> the last answer of that type
        self.vm_deadline = self.x_deadline = None
        self._feed(Begin())

    def _feed(self, event):
        finished_before = self.m.finished
        out = self.m.handle(event, self.now)
        if finished_before:
            assert out == [], "a command after the end"
        self.batches.append(out)
        self.commands.extend(out)
        steps = [c for c in out if isinstance(c, Step)]
        ends = [c for c in out if isinstance(c, TERMINAL)]
        # fire-and-forget commands first, then exactly one step or one end, nothing after
        assert len(steps) + len(ends) <= 1, out
        if steps or ends:
            assert out[-1] is (steps or ends)[0], out
        if steps:
            self.step = steps[0]
        elif ends:
            self.step = None
        return out

    @precondition(lambda self: self.step is not None)
    @rule(data=st.data(), later=st.floats(min_value=0, max_value=20), roll=st.integers(0, 19))
    def answer(self, data, later, roll):
        """Answer the step in flight; one time in twenty an abort lands instead, one in
        twenty a stray event comes first."""
        self.now += later
        if roll == 0:
            self.abort(data.draw(st.sampled_from(["", "node draining"])))
            return
        if roll == 1:
            self.stray(data.draw(STRAY))
        step = self.step
        self.step = None
        event = data.draw(answers(step))
        self._check_wait_bound(step)
        phase = self.m.phase
        out = self._feed(event)
        assert out, f"{step} answered by {event} produced nothing"
        self.answered[type(event)] = event
        self._check_against_the_protocol(phase, event, out)

    def _check_against_the_protocol(self, phase, event, out):
        """What docs/protocol.md#the-steps-behind-the-lines promises, from this test's own clock."""
        last = out[-1]
        if isinstance(event, ClaimResult) and event.outcome in ("abort", "wait") and self.now >= SETTINGS.takeover:
            assert last == Fail("Unable to acquire VM, close other clients")
        row = getattr(event, "row", None)
        if phase == "claim" and isinstance(event, ClaimResult) and event.outcome == "claim" and row is not None:
            phase = "check"             # a claim that brings its row is the first look at it
        if phase == "check" and row is not None and row.vm_state != "stopped" and row.host_id is not None:
            self.vm_deadline = self.now + SETTINGS.vm_start
        if isinstance(event, StartRequested) and event.error is None:
            self.vm_deadline = self.now + SETTINGS.vm_start
        if row is not None and phase in ("vm_row", "x_abort_check", "check"):
            ours = (row.l7r_host_id, row.l7r_pid) == (HOST, PID) and row.user_cmd != "abort"
            waiting = phase == "vm_row" or (phase == "check" and row.vm_state != "stopped" and row.host_id is not None)
            if not ours and (waiting or phase == "x_abort_check"):
                assert isinstance(last, Fail), "an abort in the row was not obeyed"
            if ours and waiting and row.vm_state != "running" and self.now > self.vm_deadline:
                assert isinstance(last, Fail), "waited for the VM past internal.l7r.timeout.vm_start"
        if isinstance(event, VmaAnswer) and event.error is None:
            self.x_deadline = self.now + SETTINGS.x_start
        if isinstance(event, XState) and event.state in (None, "starting") and self.now > self.x_deadline:
            assert isinstance(last, Fail), "waited for X past internal.l7r.timeout.x_start"
        if isinstance(last, Connected):
            a = self.answered
            assert a[VmaAnswer].error is None and a[XState].state == "listening"
            assert a[DisplayConnected].error is None and a[MarkResult].error is None

    def _check_wait_bound(self, step):
        if isinstance(step, WaitVmEvent):
            assert 0 < step.timeout <= max(SETTINGS.poll_vm * 5, 0.05)
        if isinstance(step, Sleep):
            assert step.seconds == SETTINGS.poll_x

    def abort(self, reason):
        finished = self.m.finished
        out = self._feed(Aborted(reason))
        if not finished:
            assert out == [Fail(reason or f"Aborted by contending session VM_ID: {VM}")]

    def stray(self, event):
        if self.step is not None and isinstance(event, self.step.answer):
            return                      # that would be an answer, not a stray event
        phase = self.m.phase
        assert self._feed(event) == []
        assert self.m.phase == phase

    @precondition(lambda self: self.step is None)
    @rule(event=STRAY, reason=st.sampled_from(["", "late"]))
    def after_the_end(self, event, reason):
        assert self._feed(event) == [] and self._feed(Aborted(reason)) == []

    @invariant()
    def exactly_one_end_once_finished(self):
        ends = [c for c in self.commands if isinstance(c, TERMINAL)]
        assert len(ends) == (1 if self.m.finished else 0)
        if ends and isinstance(ends[0], Fail):
            assert ends[0].message and self.m.outcome == ends[0].message
        if ends and isinstance(ends[0], Deny):
            # the access check is the first claim's answer: refused before any 102 line
            assert self.commands == [Claim(), ends[0]], self.commands
        if ends and isinstance(ends[0], Connected):
            assert self.m.outcome == "connected"
            kinds = [type(c) for c in self.commands]
            assert kinds[-4:] == [MarkConnected, SendInfo, SendSwitch, Connected]

    @invariant()
    def a_step_in_flight_until_the_end(self):
        assert (self.step is None) == self.m.finished

    @invariant()
    def progress_lines_in_the_original_order(self):
        letters = "".join(LETTER[c.text] for c in self.commands if isinstance(c, SendInfo))
        assert PROGRESS.match(letters), letters

    @invariant()
    def nothing_happens_to_the_vm_before_the_claim(self):
        kinds = [type(c) for c in self.commands]
        if ReadRow in kinds or RequestStart in kinds:
            assert self.m.claimed
        acquired = sum(isinstance(c, SendInfo) and c.text.startswith("Session acquired") for c in self.commands)
        assert acquired == (1 if self.m.claimed else 0)

    @invariant()
    def x_start_tried_at_most_retries_plus_one(self):
        assert sum(isinstance(c, StartX) for c in self.commands) <= SETTINGS.x_start_retries + 1

    @invariant()
    def waits_end_by_their_deadline(self):
        if self.m.phase == "claim_wait":
            assert self.now + self.step.timeout <= SETTINGS.takeover + 1e-9
        if self.m.phase == "vm_wait":
            assert self.now + self.step.timeout <= max(self.vm_deadline + 0.05, self.now + 0.05) + 1e-9


TestOneConnect = OneConnect.TestCase
TestOneConnect.settings = STATEFUL


# --- several clients, one VM, two nodes ------------------------------------------------------
NODES = {"a": (1, 100), "b": (2, 200)}


class Client:
    def __init__(self, name, node):
        self.name = name
        self.node = node
        self.machine = ConnectMachine(VM, *NODES[node], SETTINGS)
        self.step = None
        self.status = "setup"           # setup, live (spliced), closing (splice closed, row not yet released), ended
        self.claimed = False


class OneVmTwoNodes(RuleBasedStateMachine):
    """The row is vm_runtimes' session columns of one running VM; each node has the
    registry of sessions.Sessions (one session per VM), a two-phase abort check (read,
    then act, as the real checker's query yields in between) and the reconcile sweep."""

    @initialize()
    def begin(self):
        self.row = {"user_state": "disconnected", "holder": (None, None), "user_cmd": None}
        self.live = {"a": None, "b": None}              # node -> Client registered for the VM
        self.abort_read = {"a": None, "b": None}        # node -> registered-before snapshot, or None
        self.clients = []
        self.now = 0.0

    # --- the cluster's side ------------------------------------------------------------
    def _snapshot(self):
        r = self.row
        return SessionRow("running", None, r["user_state"], r["user_cmd"], 1, r["holder"][0], r["holder"][1],
                          "10.1.0.5", 3030, 4100)

    def _release(self, node, only_if_abort=False):
        if self.row["holder"] == NODES[node] and (not only_if_abort or self.row["user_cmd"] == "abort"):
            self.row.update(user_state="disconnected", holder=(None, None), user_cmd=None)

    def _execute(self, client, step, data):
        node = client.node
        if isinstance(step, Claim):
            other = self.live[node]
            live_here = other is not None and other is not client
            r = self.row
            holder = r["holder"]
            outcome = decide_claim((r["user_state"], holder[0], holder[1], r["user_cmd"]), *NODES[node], live_here)
            if outcome == "claim":
                r.update(user_state="connecting", holder=NODES[node], user_cmd=None)
                client.claimed = True
                self.live[node] = client
            elif outcome == "abort":
                r["user_cmd"] = "abort"
            return ClaimResult(outcome, holder)
        if isinstance(step, ReadRow):
            return RowSeen(self._snapshot())
        if isinstance(step, MarkConnected):
            r = self.row
            if r["user_cmd"] == "abort" or r["holder"] != NODES[node]:
                return MarkResult(f"Aborted by contending session VM_ID: {VM}")
            if r["user_state"] != "connecting":
                return MarkResult(f"User state unexpectedly went to {r['user_state']}")
            r["user_state"] = "connected"
            return MarkResult()
        if isinstance(step, StartX):
            return VmaAnswer(data.draw(st.sampled_from([None, None, "busy"])))
        if isinstance(step, PollX):
            return XState(data.draw(st.sampled_from(["listening", "listening", "starting"])))
        if isinstance(step, ConnectDisplay):
            return DisplayConnected(data.draw(st.sampled_from([None, None, "refused"])))
        return data.draw(answers(step))

    def _apply(self, client, out):
        for command in out:
            if isinstance(command, Step):
                client.step = command
            elif isinstance(command, Fail):
                client.step = None
                client.status = "ended"
                # sessions.end_setup: release (guarded by node and process), then forget it
                if client.claimed:
                    self._release(client.node)
                if self.live[client.node] is client:
                    self.live[client.node] = None
            elif isinstance(command, Connected):
                client.step = None
                client.status = "live"

    def _end_session(self, client):
        # sessions._finish_session: release, then forget
        self._release(client.node)
        if self.live[client.node] is client:
            self.live[client.node] = None
        client.status = "ended"

    # --- rules -------------------------------------------------------------------------
    @precondition(lambda self: len(self.clients) < 6)
    @rule(node=st.sampled_from(sorted(NODES)))
    def new_client(self, node):
        client = Client(f"c{len(self.clients)}", node)
        self.clients.append(client)
        self._apply(client, client.machine.handle(Begin(), self.now))

    @precondition(lambda self: any(c.step is not None for c in self.clients))
    @rule(data=st.data(), later=st.floats(min_value=0, max_value=3))
    def step(self, data, later):
        self.now += later
        client = data.draw(st.sampled_from([c for c in self.clients if c.step is not None]))
        step, client.step = client.step, None
        event = self._execute(client, step, data)
        self._apply(client, client.machine.handle(event, self.now))

    @rule(node=st.sampled_from(sorted(NODES)))
    def abort_check_reads(self, node):
        if self.row["holder"] == NODES[node] and self.row["user_cmd"] == "abort":
            self.abort_read[node] = ("read", self.live[node])

    @precondition(lambda self: any(v is not None for v in self.abort_read.values()))
    @rule(node=st.sampled_from(sorted(NODES)))
    def abort_check_acts(self, node):
        read = self.abort_read[node]
        if read is None:
            return
        self.abort_read[node] = None
        now = self.live[node]
        decision = abort_decision(read[1], now)
        if decision == "close":
            if now.status == "live":
                now.status = "closing"          # the splice is closed at once; its row released later
            elif now.status == "setup":
                self._apply(now, now.machine.handle(Aborted(f"Aborted by contending session VM_ID: {VM}"), self.now))
        elif decision == "release":
            self._release(node, only_if_abort=True)

    @precondition(lambda self: any(c.status in ("live", "closing") for c in self.clients))
    @rule(data=st.data())
    def session_ends(self, data):
        client = data.draw(st.sampled_from([c for c in self.clients if c.status in ("live", "closing")]))
        self._end_session(client)

    @rule(node=st.sampled_from(sorted(NODES)))
    def reconcile(self, node):
        if self.live[node] is None:
            self._release(node)

    # --- invariants --------------------------------------------------------------------
    @invariant()
    def never_two_live_sessions(self):
        assert sum(c.status == "live" for c in self.clients) <= 1

    @invariant()
    def never_two_claims_held(self):
        holding = [c.name for c in self.clients if c.claimed and c.status in ("setup", "live", "closing")]
        assert len(holding) <= 1, holding

    @invariant()
    def a_live_session_is_the_one_its_row_names(self):
        for c in self.clients:
            if c.status == "live":
                assert self.row["holder"] == NODES[c.node] and self.row["user_state"] == "connected"
                assert self.live[c.node] is c

    @invariant()
    def every_ended_setup_ended_once_with_an_answer(self):
        for c in self.clients:
            assert (c.status == "setup") == (not c.machine.finished)


TestOneVmTwoNodes = OneVmTwoNodes.TestCase
TestOneVmTwoNodes.settings = STATEFUL
