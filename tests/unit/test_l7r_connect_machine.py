"""The connect sequence without I/O (src/qvd_gevent/l7r/connect.py): playbooks of events
in and commands out, with the 102 lines, deadlines, retries and takeover of
docs/protocol.md#connect-to-vm."""
import pytest

from qvd_gevent.l7r.connect import (
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
    Count,
    DisplayConnected,
    Fail,
    Log,
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
    Switched,
    VmaAnswer,
    Waited,
    WaitVmEvent,
    XState,
)

VM, HOST, PID = 7, 3, 4242
SETTINGS = ConnectSettings(takeover=30, poll_vm=1, vm_start=60, poll_x=0.5, x_start=10, x_start_retries=2,
                           vma_port=3030)


def row(vm_state="running", vm_cmd=None, user_state="connecting", user_cmd=None, host_id=HOST, holder=(HOST, PID),
        address="10.1.0.5", vma_port=3030, x_port=4100):
    return SessionRow(vm_state, vm_cmd, user_state, user_cmd, host_id, holder[0], holder[1], address, vma_port, x_port)


class Play:
    """Drives one machine on a fake clock; `at` moves the clock before an event."""

    def __init__(self, settings=SETTINGS):
        self.m = ConnectMachine(VM, HOST, PID, settings)
        self.now = 0.0
        self.commands = []

    def send(self, event, at=None):
        if at is not None:
            self.now = at
        out = self.m.handle(event, self.now)
        self.commands.extend(out)
        return out

    def infos(self):
        return [c.text for c in self.commands if isinstance(c, SendInfo)]


# playbooks: (event, the commands it must produce)
CLAIMED = [
    (Begin(), [Claim()]),
    (ClaimResult("claim"), [SendInfo(f"Session acquired for VM_ID: {VM}"), ReadRow()]),
]
X_AND_DISPLAY = [
    (ParamsReady(), [SendInfo(f"Starting X session at VM {VM}"), StartX("10.1.0.5", 3030)]),
    (VmaAnswer(), [SendInfo(f"Waiting for X session to come up on VM {VM}"), PollX()]),
    (XState("starting"), [Sleep(0.5)]),
    (Waited(), [PollX()]),
    (XState("listening"), [SendInfo(f"Connecting X session for VM_ID: {VM}"), Count("nx_attempts"),
                           ConnectDisplay("10.1.0.5", 4100)]),
    (DisplayConnected(), [Count("nx_ok"), MarkConnected()]),
    (MarkResult(), [SendInfo("Connection established"), SendSwitch()]),
    (Switched(), [Connected()]),
]
RUNNING_VM = CLAIMED + [(RowSeen(row()), [BuildParams()])] + X_AND_DISPLAY
STOPPED_VM = CLAIMED + [
    (RowSeen(row(vm_state="stopped", host_id=None)),
     [SendInfo(f"Assigning VM {VM} to host"), SendInfo("Starting virtual machine"), RequestStart()]),
    (StartRequested(), [ReadRow()]),
    (RowSeen(row(vm_state="starting")), [SendInfo("Waiting for VM to reach state 'running'"), WaitVmEvent(5)]),
    (Waited(), [ReadRow()]),
    (RowSeen(row()), [BuildParams()]),
] + X_AND_DISPLAY


def play(book, p=None):
    p = p or Play()
    for event, expected in book:
        assert p.send(event) == expected, (event, p.m.phase)
    return p


def test_running_vm_happy_path():
    p = play(RUNNING_VM)
    assert p.m.outcome == "connected" and p.m.finished
    assert p.infos() == [f"Session acquired for VM_ID: {VM}", f"Starting X session at VM {VM}",
                         f"Waiting for X session to come up on VM {VM}", f"Connecting X session for VM_ID: {VM}",
                         "Connection established"]


def test_stopped_vm_is_assigned_started_and_waited_for():
    p = play(STOPPED_VM)
    assert p.m.outcome == "connected"


def test_stopped_vm_with_a_host_is_not_assigned_again():
    p = play(CLAIMED)
    assert p.send(RowSeen(row(vm_state="stopped"))) == [SendInfo("Starting virtual machine"), RequestStart()]


def test_vm_not_stopped_without_a_host_fails():
    p = play(CLAIMED)
    assert p.send(RowSeen(row(vm_state="starting", host_id=None))) == [
        Fail(f"Unable to start VM {VM}, state changed unexpectedly")]


def test_vm_gone_after_the_claim():
    p = play(CLAIMED)
    assert p.send(RowSeen(None)) == [Fail("The requested virtual machine does not exist")]
    p = play([(Begin(), [Claim()])])
    assert isinstance(p.send(ClaimResult("abort", (9, 55)))[-1], WaitVmEvent)
    p.send(Waited())
    assert p.send(ClaimResult("gone")) == [Fail("The requested virtual machine does not exist")]


@pytest.mark.parametrize("outcome,status,message", [
    ("gone", 404, "The requested virtual machine does not exist"),
    ("forbidden", 403, "You are not allowed to access requested virtual machine"),
    ("blocked", 403, "The requested virtual machine is offline for maintenance")])
def test_the_access_check_is_the_first_claims_answer(outcome, status, message):
    """Someone else's, a blocked or no VM: refused before any 102 line (the claim checked it)."""
    p = play([(Begin(), [Claim()])])
    assert p.send(ClaimResult(outcome)) == [Deny(status, message)]


def test_a_claim_that_brings_its_row_needs_no_read():
    p = play([(Begin(), [Claim()])])
    out = p.send(ClaimResult("claim", row=row()))
    assert out[0] == SendInfo("Session acquired for VM_ID: 7") and not any(isinstance(c, ReadRow) for c in out)
    assert isinstance(out[-1], BuildParams)


def test_no_host_to_place_the_vm_on():
    p = play(CLAIMED)
    p.send(RowSeen(row(vm_state="stopped", host_id=None)))
    assert p.send(StartRequested("Unable to assign vm to host, there is no host available")) == [
        Fail("Unable to assign vm to host, there is no host available")]


# --- takeover ------------------------------------------------------------------------------
def test_takeover_asks_the_holder_once_then_waits_and_retries():
    p = play([(Begin(), [Claim()])])
    assert p.send(ClaimResult("abort", (9, 55)), at=0.1) == [
        Log(f"VM {VM}: session held by host 9 pid 55; asking it to let go"),
        SendInfo(f"Aborting contending session for VM_ID: {VM}"), WaitVmEvent(1)]
    assert p.send(Waited(), at=1.1) == [Claim()]
    # asked already: no new log line, the same 102 line again
    assert p.send(ClaimResult("wait", (9, 55))) == [SendInfo(f"Aborting contending session for VM_ID: {VM}"),
                                                    WaitVmEvent(1)]
    assert p.send(Waited(), at=2.1) == [Claim()]
    assert p.send(ClaimResult("claim", (9, 55))) == [SendInfo(f"Session acquired for VM_ID: {VM}"), ReadRow()]


def test_takeover_gives_up_at_its_deadline():
    p = play([(Begin(), [Claim()])])
    out = []
    for t in range(0, 40):
        out = p.send(ClaimResult("wait", (9, 55)), at=t + 0.5)
        if p.m.finished:
            break
        waits = [c for c in out if isinstance(c, WaitVmEvent)]
        assert waits and 0 < waits[0].timeout <= 1 and t + 0.5 + waits[0].timeout <= 30
        p.send(Waited())
    assert out[-1] == Fail("Unable to acquire VM, close other clients")
    assert p.now == 30.5
    # the last wait is cut to the deadline
    q = play([(Begin(), [Claim()])])
    assert q.send(ClaimResult("wait", (9, 55)), at=29.75)[-1] == WaitVmEvent(0.25)


# --- waiting for the VM ----------------------------------------------------------------------
def started():
    p = play(CLAIMED)
    p.send(RowSeen(row(vm_state="stopped", host_id=None)))
    p.send(StartRequested(), at=2.0)   # the start deadline runs from here: 62
    return p


def test_vm_start_failure():
    p = started()
    assert p.send(RowSeen(row(vm_state="stopped", vm_cmd=None)), at=5) == [
        Fail(f"Failed to start virtual machine {VM}")]


def test_vm_start_timeout_and_the_waits_before_it():
    p = started()
    assert p.send(RowSeen(row(vm_state="starting")), at=58.0)[-1] == WaitVmEvent(4.05)
    p.send(Waited(), at=61.9)
    assert p.send(RowSeen(row(vm_state="starting")))[-1].timeout == pytest.approx(0.15)
    p.send(Waited(), at=62.5)
    assert p.send(RowSeen(row(vm_state="starting"))) == [Fail("VM didn't reach state 'running'. Timeout")]


def test_a_vm_that_is_running_at_the_deadline_still_connects():
    p = started()
    assert p.send(RowSeen(row()), at=100) == [BuildParams()]


@pytest.mark.parametrize("changed", [row(vm_state="starting", holder=(8, 1)), row(vm_state="starting", holder=(HOST, 1)),
                                     row(vm_state="starting", user_cmd="abort")])
def test_row_taken_while_waiting_for_the_vm(changed):
    p = started()
    assert p.send(RowSeen(changed)) == [Fail(f"Aborted by contending session VM_ID: {VM}")]


def test_running_vm_without_an_address():
    p = play(CLAIMED)
    assert p.send(RowSeen(row(address=None))) == [Fail(f"VM {VM} has no address yet")]
    p = play(CLAIMED)
    assert p.send(RowSeen(row(x_port=None))) == [Fail(f"VM {VM} has no address yet")]


def test_a_vm_without_its_agent_key_is_not_called():
    p = play(CLAIMED + [(RowSeen(row()), [BuildParams()])])
    assert p.send(ParamsReady(f"VM {VM} runs without an agent key")) == [Fail(f"VM {VM} runs without an agent key")]


def test_vma_port_defaults_when_the_row_has_none():
    p = play(CLAIMED)
    p.send(RowSeen(row(vma_port=None)))
    assert p.send(ParamsReady())[-1] == StartX("10.1.0.5", 3030)


# --- X ---------------------------------------------------------------------------------------
def x_started():
    p = play(CLAIMED + [(RowSeen(row()), [BuildParams()])])
    p.send(ParamsReady())
    return p


def test_x_start_retries_then_fails_with_the_vma_error():
    p = x_started()
    for _ in range(SETTINGS.x_start_retries):
        assert p.send(VmaAnswer("busy")) == [Sleep(0.5)]
        assert p.send(Waited()) == [ReadRow()]          # abort checked between tries
        assert p.send(RowSeen(row())) == [StartX("10.1.0.5", 3030)]
    assert p.send(VmaAnswer("busy")) == [Fail(f"Unable to start X session on VM {VM}: busy")]
    assert sum(isinstance(c, StartX) for c in p.commands) == SETTINGS.x_start_retries + 1


def test_x_start_retry_succeeds():
    p = x_started()
    p.send(VmaAnswer("suspending it, retry later"))
    p.send(Waited())
    p.send(RowSeen(row()))
    assert p.send(VmaAnswer()) == [SendInfo(f"Waiting for X session to come up on VM {VM}"), PollX()]


@pytest.mark.parametrize("seen", [None, row(user_cmd="abort"), row(holder=(8, 1))])
def test_abort_seen_between_x_start_tries(seen):
    p = x_started()
    p.send(VmaAnswer("busy"))
    p.send(Waited())
    assert p.send(RowSeen(seen)) == [Fail(f"Aborted by contending session VM_ID: {VM}")]


@pytest.mark.parametrize("state,at,message", [
    ("stopping", 1, f"Unable to start X session on VM {VM}, state went to stopping"),
    ("starting", 10.5, f"Unable to start X session on VM {VM}: operation timed out!"),
    (None, 10.5, f"Unable to start X session on VM {VM}: operation timed out!"),
    ("provisioning", 60.5, f"Unable to start X session on VM {VM}: provisioning took too long"),
])
def test_x_state_failures(state, at, message):
    p = x_started()
    p.send(VmaAnswer(), at=0)
    assert p.send(XState(state), at=at) == [Fail(message)]


def test_provisioning_may_outlast_the_x_start_timeout():
    p = x_started()
    p.send(VmaAnswer(), at=0)
    assert p.send(XState("provisioning"), at=30) == [Sleep(0.5)]


def test_display_and_mark_failures():
    p = x_started()
    p.send(VmaAnswer())
    p.send(XState("listening"))
    assert p.send(DisplayConnected("Connection refused")) == [
        Fail(f"Unable to connect X session for VM_ID: {VM}: Connection refused")]
    p = x_started()
    p.send(VmaAnswer())
    p.send(XState("listening"))
    p.send(DisplayConnected())
    assert p.send(MarkResult("User state unexpectedly went to disconnected")) == [
        Fail("User state unexpectedly went to disconnected")]


# --- aborts, stale events, the end -----------------------------------------------------------
@pytest.mark.parametrize("book", [RUNNING_VM, STOPPED_VM], ids=["running", "stopped"])
def test_an_abort_at_every_step_fails_with_its_reason_and_ends_everything(book):
    for cut in range(1, len(book)):
        p = play(book[:cut])
        assert p.send(Aborted("node draining")) == [Fail("node draining")], cut
        assert p.m.outcome == "node draining"
        for event, _ in book:
            assert p.send(event) == []
        assert p.send(Aborted("again")) == []
    p = play(book[:3])
    assert p.send(Aborted()) == [Fail(f"Aborted by contending session VM_ID: {VM}")]


def test_events_that_answer_no_step_in_flight_are_ignored():
    p = play(CLAIMED)
    for stray in (Begin(), ClaimResult("claim"), Waited(), VmaAnswer(), XState("listening"), Switched()):
        assert p.send(stray) == []
        assert p.m.phase == "check"
    assert p.send(RowSeen(row())) == [BuildParams()]


def test_nothing_after_connected():
    p = play(RUNNING_VM)
    for event, _ in RUNNING_VM:
        assert p.send(event) == []
    assert p.send(Aborted("late")) == [] and p.m.outcome == "connected"


def test_settings_come_from_the_config_keys():
    class Cfg:
        values = {"internal.l7r.timeout.takeover": 31, "internal.l7r.poll_time.vm": 2, "internal.l7r.timeout.vm_start": 301,
                  "internal.l7r.poll_time.x": 0.25, "internal.l7r.timeout.x_start": 61, "internal.l7r.retry.x_start": 4,
                  "internal.vm.port.vma": 3031}

        def get_float(self, key):
            return float(self.values[key])

        def get_int(self, key):
            return int(self.values[key])
    assert ConnectSettings.from_config(Cfg()) == ConnectSettings(31, 2, 301, 0.25, 61, 4, 3031)
