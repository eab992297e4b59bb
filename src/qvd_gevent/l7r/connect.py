"""connect_to_vm after its pre-checks (docs/protocol.md#connect-to-vm): claim the session,
start the VM, start X, connect to the display, then the 101 and the splice. A browser's
desktop WebSocket goes through the same (docs/protocol.md#the-websocket).

Two halves:
- ``ConnectMachine``, pure: ``machine.handle(event, now) -> [commands]``. It holds the
  sequence, every deadline (by its config key), the retries, the takeover and the 102
  lines in the original's order, and never touches a socket, the database or the clock
  (``now`` comes with each event). Tested by playbooks and Hypothesis without I/O.
- ``ConnectRunner``, thin: executes the commands with db/runtime.py, the session registry
  (claims, LISTEN waits), the VMA and sockets, and feeds each outcome back as an event.

The client end is a *front*: what the runner says to the client and how the session's
bytes move once it is set up. ``NativeFront`` is connect_to_vm's (102 lines, the 101 with
the slave key, a 503, the splice); a browser's WebSocket has its own (web.BrowserFront: no
progress lines, its 101 sent before the connect, a close frame on failure, a WsRelay).
A front has ``conn`` (the http.HttpConnection), ``name`` (for the log), ``vma_params``
(x_start parameters of its own, the last word), ``info(text)``, ``switch(slave_key)``,
``fail(message)`` (the connect's failure, e.g. "VM didn't reach state 'running'. Timeout")
and ``pump`` (``pump(client_sock, vm_sock, on_done=)`` -> an object
with ``start(leftover)``, ``close(reason)``, ``bytes_to_vm``, ``bytes_to_client``).

At most one command that needs an answer (a *step*) is in flight, and it is the last of
its batch; a batch may start with fire-and-forget commands (SendInfo, Count, Log). Every
path ends in exactly one of ``Connected`` or ``Fail(message)``; nothing comes after it.
A takeover or a drain reaches a setup in progress as ``Aborted``, at whatever step.

Waiting is by LISTEN on ``qvd_vm_runtime`` with a slow safety re-check, never by
sleep-polling alone. The session row is always left ``disconnected`` by us when the
setup fails (docs/differences.md#release-after-setup-failure), guarded by l7r_host_id =
this host AND l7r_pid = this process.
"""
import logging
import time
from collections import deque, namedtuple
from dataclasses import dataclass

import gevent
import h11

from ..common import metrics
from ..db import runtime
from ..db.placement import NoHostAvailable
from ..vma.client import VmaClient, VmaError, legacy_unauthenticated, open_display
from .http import HttpError
from .sessions import SessionAborted, shielded
from .splice import Splice, tune_socket
from .vma_params import session_vma_params, slave_key

log = logging.getLogger("qvd.l7r.connect")

# runtime.session_row's columns
SessionRow = namedtuple("SessionRow", "vm_state vm_cmd user_state user_cmd host_id l7r_host_id l7r_pid "
                                      "vm_address vm_vma_port vm_x_port")

# the original's loops end after this many rounds whatever the clock says
MAX_ROUNDS = 100000


# --- events --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Begin:
    pass


@dataclass(frozen=True)
class ClaimResult:
    outcome: str                    # runtime.claim_session: claim, abort, wait, or gone/forbidden/blocked
    holder: tuple = (None, None)    # (l7r_host_id, l7r_pid) of the row before the claim
    row: object = None              # SessionRow after a claim: the connect goes on with it
    generation: int = None          # the claim's place in the VM's order of sessions (x_start carries it)


@dataclass(frozen=True)
class RowSeen:
    row: object                     # SessionRow, or None when the VM is gone


@dataclass(frozen=True)
class StartRequested:
    error: str = None               # no node to place the VM on


@dataclass(frozen=True)
class Waited:
    pass


@dataclass(frozen=True)
class ParamsReady:
    error: str = None               # the VM runs without the agent key it needs


@dataclass(frozen=True)
class VmaAnswer:
    error: str = None               # x_start refused or the VMA not reachable


@dataclass(frozen=True)
class XState:
    state: str = None               # None: the VMA did not answer


@dataclass(frozen=True)
class DisplayConnected:
    error: str = None


@dataclass(frozen=True)
class MarkResult:
    error: str = None               # runtime.mark_connected's refusal


@dataclass(frozen=True)
class Switched:
    pass


@dataclass(frozen=True)
class Aborted:
    reason: str = ""


# --- commands ------------------------------------------------------------------------------
class Step:
    """A command whose outcome comes back as an event (``answer``)."""
    answer = None


@dataclass(frozen=True)
class Claim(Step):
    answer = ClaimResult


@dataclass(frozen=True)
class ReadRow(Step):
    answer = RowSeen


@dataclass(frozen=True)
class RequestStart(Step):
    answer = StartRequested


@dataclass(frozen=True)
class WaitVmEvent(Step):
    """Wait for a change of the VM's row (LISTEN), at most timeout seconds."""
    timeout: float
    answer = Waited


@dataclass(frozen=True)
class Sleep(Step):
    seconds: float
    answer = Waited


@dataclass(frozen=True)
class BuildParams(Step):
    """The x_start parameters and the session's token."""
    answer = ParamsReady


@dataclass(frozen=True)
class StartX(Step):
    address: str
    port: int
    answer = VmaAnswer


@dataclass(frozen=True)
class PollX(Step):
    answer = XState


@dataclass(frozen=True)
class ConnectDisplay(Step):
    address: str
    port: int
    answer = DisplayConnected


@dataclass(frozen=True)
class MarkConnected(Step):
    answer = MarkResult


@dataclass(frozen=True)
class SendSwitch(Step):
    """The 101 with the slave key."""
    answer = Switched


@dataclass(frozen=True)
class SendInfo:
    """A 102 line."""
    text: str


@dataclass(frozen=True)
class Count:
    """host_counters column += 1."""
    name: str


@dataclass(frozen=True)
class Log:
    text: str


@dataclass(frozen=True)
class Connected:
    """End: the session is set up; splice it."""


@dataclass(frozen=True)
class Fail:
    """End: 503 with this message; the row is released."""
    message: str


@dataclass(frozen=True)
class Deny:
    """End, before any 102 line: not this user's VM (403), blocked (403) or none (404)."""
    status: int
    message: str


TERMINAL = (Connected, Fail, Deny)


@dataclass(frozen=True)
class ConnectSettings:
    """Every number the machine needs, by its key in the defaults table."""
    takeover: float = 30.0           # internal.l7r.timeout.takeover
    poll_vm: float = 3.0             # internal.l7r.poll_time.vm
    vm_start: float = 300.0          # internal.l7r.timeout.vm_start
    poll_x: float = 1.0              # internal.l7r.poll_time.x
    x_start: float = 60.0            # internal.l7r.timeout.x_start
    x_start_retries: int = 5         # internal.l7r.retry.x_start
    vma_port: int = 3030             # internal.vm.port.vma (a row without vm_vma_port)

    @classmethod
    def from_config(cls, cfg):
        return cls(takeover=cfg.get_float("internal.l7r.timeout.takeover"),
                   poll_vm=cfg.get_float("internal.l7r.poll_time.vm"),
                   vm_start=cfg.get_float("internal.l7r.timeout.vm_start"),
                   poll_x=cfg.get_float("internal.l7r.poll_time.x"),
                   x_start=cfg.get_float("internal.l7r.timeout.x_start"),
                   x_start_retries=cfg.get_int("internal.l7r.retry.x_start"),
                   vma_port=cfg.get_int("internal.vm.port.vma"))


# --- pure decisions ------------------------------------------------------------------------
def vm_start_progress(vm_state, vm_cmd, user_cmd, now, deadline, vm_id):
    """While waiting for 'running': ('ready'|'wait', None) or ('fail', message) or ('aborted', msg)."""
    if user_cmd == "abort":
        return "aborted", f"Aborted by contending session VM_ID: {vm_id}"
    if vm_state == "running":
        return "ready", None
    if vm_state == "stopped" and vm_cmd is None:
        return "fail", f"Failed to start virtual machine {vm_id}"
    if now > deadline:
        return "fail", "VM didn't reach state 'running'. Timeout"
    return "wait", None


def x_state_progress(state, now, deadline, hard_deadline, vm_id):
    """While waiting for X: 'ready', 'wait' or ('fail', message)."""
    if state == "listening":
        return "ready", None
    if state == "provisioning":
        if now > hard_deadline:
            return "fail", f"Unable to start X session on VM {vm_id}: provisioning took too long"
        return "wait", None
    if state in (None, "starting", "stopped", "suspended", "initiating", "connected"):
        # stopped/suspended: x_start was just accepted and the desktop has not caught up
        if now > deadline:
            return "fail", f"Unable to start X session on VM {vm_id}: operation timed out!"
        return "wait", None
    return "fail", f"Unable to start X session on VM {vm_id}, state went to {state}"


class ConnectMachine:
    """One connect's setup. ``phase`` names the step awaited; ``outcome`` is None until the
    end, then 'connected' or the failure message."""

    def __init__(self, vm_id, host_id, pid, settings=None):
        self.vm_id = vm_id
        self.me = (host_id, pid)
        self.s = settings or ConnectSettings()
        self.phase = "new"
        self.awaiting = Begin
        self.outcome = None
        self.claimed = False
        self.attempts = 0
        self.takeover_deadline = None
        self.vm_deadline = None
        self.rounds = 0
        self.x_tries = 0
        self.x_deadline = self.x_hard_deadline = None
        self.row = None                 # the row that said 'running', with the VM's address
        self.generation = None          # of the claim (runtime.claim_session)

    @property
    def finished(self):
        return self.outcome is not None

    def handle(self, event, now):
        out = []
        if self.finished:
            return out
        if isinstance(event, Aborted):
            self._fail(out, event.reason or f"Aborted by contending session VM_ID: {self.vm_id}")
            return out
        if self.awaiting is None or not isinstance(event, self.awaiting):
            return out                  # not the answer to the step in flight: stale, ignored
        self.awaiting = None
        getattr(self, "_on_" + self.phase)(out, event, now)
        return out

    # --- helpers ------------------------------------------------------------------------
    def _step(self, out, phase, command):
        self.phase = phase
        self.awaiting = command.answer
        out.append(command)

    def _fail(self, out, message):
        self.phase = "failed"
        self.awaiting = None
        self.outcome = message
        out.append(Fail(message))

    def _held_by_me(self, row):
        return (row.l7r_host_id, row.l7r_pid) == self.me

    def _aborted_message(self):
        return f"Aborted by contending session VM_ID: {self.vm_id}"

    # --- claim, with takeover -------------------------------------------------------------
    def _on_new(self, out, event, now):
        self.takeover_deadline = now + self.s.takeover
        self._step(out, "claim", Claim())

    def _on_claim(self, out, event, now):
        self.attempts += 1
        if event.outcome == "claim":
            self.claimed = True
            self.generation = event.generation
            out.append(SendInfo(f"Session acquired for VM_ID: {self.vm_id}"))
            if event.row is not None:
                self._on_check(out, RowSeen(event.row), now)   # the claim read the row it wrote
            else:
                self._step(out, "check", ReadRow())
            return
        if event.outcome in runtime.ACCESS_DENIED:
            status, message = runtime.ACCESS_DENIED[event.outcome]
            if self.attempts == 1:
                self.phase = "denied"
                self.awaiting = None
                self.outcome = message
                out.append(Deny(status, message))
            else:                       # gone (or given away) while we waited to take it over
                self._fail(out, message)
            return
        if self.attempts == 1 or event.outcome == "abort":
            out.append(Log(f"VM {self.vm_id}: session held by host {event.holder[0]} pid {event.holder[1]}; "
                           "asking it to let go"))
        out.append(SendInfo(f"Aborting contending session for VM_ID: {self.vm_id}"))
        remaining = self.takeover_deadline - now
        if remaining <= 0:
            self._fail(out, "Unable to acquire VM, close other clients")
            return
        self._step(out, "claim_wait", WaitVmEvent(min(self.s.poll_vm, remaining)))

    def _on_claim_wait(self, out, event, now):
        self._step(out, "claim", Claim())

    # --- the VM: start it if stopped, wait for 'running' -----------------------------------
    def _on_check(self, out, event, now):
        row = event.row
        if row is None:
            self._fail(out, "The requested virtual machine does not exist")
        elif row.vm_state == "stopped":
            if row.host_id is None:
                out.append(SendInfo(f"Assigning VM {self.vm_id} to host"))
            out.append(SendInfo("Starting virtual machine"))
            self._step(out, "start", RequestStart())
        elif row.host_id is None:
            self._fail(out, f"Unable to start VM {self.vm_id}, state changed unexpectedly")
        else:
            # already starting or running: this very row is the wait's first look
            self._begin_vm_wait(now)
            self._vm_row(out, row, now)

    def _on_start(self, out, event, now):
        if event.error:
            self._fail(out, event.error)
            return
        self._begin_vm_wait(now)
        self._step(out, "vm_row", ReadRow())

    def _begin_vm_wait(self, now):
        self.vm_deadline = now + self.s.vm_start
        self.rounds = 0

    def _on_vm_row(self, out, event, now):
        self._vm_row(out, event.row, now)

    def _vm_row(self, out, row, now):
        if row is None:
            self._fail(out, "The requested virtual machine does not exist")
            return
        if not self._held_by_me(row):
            self._fail(out, self._aborted_message())
            return
        verdict, message = vm_start_progress(row.vm_state, row.vm_cmd, row.user_cmd, now, self.vm_deadline, self.vm_id)
        if verdict == "ready":
            self._vm_ready(out, row)
        elif verdict in ("fail", "aborted"):
            self._fail(out, message)
        else:
            self.rounds += 1
            out.append(SendInfo("Waiting for VM to reach state 'running'"))
            self._step(out, "vm_wait", WaitVmEvent(max(0.05, min(self.s.poll_vm * 5, self.vm_deadline - now + 0.05))))

    def _on_vm_wait(self, out, event, now):
        if self.rounds >= MAX_ROUNDS:
            self._fail(out, "VM didn't reach state 'running'. Timeout")
            return
        self._step(out, "vm_row", ReadRow())

    def _vm_ready(self, out, row):
        if not row.vm_address or not row.vm_x_port:
            self._fail(out, f"VM {self.vm_id} has no address yet")
            return
        self.row = row
        self._step(out, "params", BuildParams())

    # --- X: x_start with retries, then x_state until 'listening' ---------------------------
    def _on_params(self, out, event, now):
        if event.error:
            self._fail(out, event.error)
            return
        out.append(SendInfo(f"Starting X session at VM {self.vm_id}"))
        self._start_x(out)

    def _start_x(self, out):
        self._step(out, "x_start", StartX(self.row.vm_address, self.row.vm_vma_port or self.s.vma_port))

    def _on_x_start(self, out, event, now):
        self.x_tries += 1
        if event.error is None:
            out.append(SendInfo(f"Waiting for X session to come up on VM {self.vm_id}"))
            self.x_deadline = now + self.s.x_start
            self.x_hard_deadline = now + self.s.vm_start
            self.rounds = 0
            self._step(out, "x_poll", PollX())
        elif self.x_tries >= self.s.x_start_retries + 1:
            self._fail(out, f"Unable to start X session on VM {self.vm_id}: {event.error}")
        else:
            self._step(out, "x_retry_wait", Sleep(self.s.poll_x))

    def _on_x_retry_wait(self, out, event, now):
        self._step(out, "x_abort_check", ReadRow())

    def _on_x_abort_check(self, out, event, now):
        row = event.row
        if row is None or row.user_cmd == "abort" or not self._held_by_me(row):
            self._fail(out, self._aborted_message())
        else:
            self._start_x(out)

    def _on_x_poll(self, out, event, now):
        self.rounds += 1
        verdict, message = x_state_progress(event.state, now, self.x_deadline, self.x_hard_deadline, self.vm_id)
        if verdict == "ready":
            self._connect(out)
        elif verdict == "fail":
            self._fail(out, message)
        else:
            self._step(out, "x_wait", Sleep(self.s.poll_x))

    def _on_x_wait(self, out, event, now):
        if self.rounds >= MAX_ROUNDS:
            self._fail(out, f"Unable to start X session on VM {self.vm_id}: operation timed out!")
            return
        self._step(out, "x_poll", PollX())

    # --- the display, the row, the 101 -----------------------------------------------------
    def _connect(self, out):
        out.append(SendInfo(f"Connecting X session for VM_ID: {self.vm_id}"))
        out.append(Count("nx_attempts"))
        self._step(out, "display", ConnectDisplay(self.row.vm_address, int(self.row.vm_x_port)))

    def _on_display(self, out, event, now):
        if event.error is not None:
            self._fail(out, f"Unable to connect X session for VM_ID: {self.vm_id}: {event.error}")
            return
        out.append(Count("nx_ok"))
        self._step(out, "mark", MarkConnected())

    def _on_mark(self, out, event, now):
        if event.error:
            self._fail(out, event.error)
            return
        out.append(SendInfo("Connection established"))
        self._step(out, "switch", SendSwitch())

    def _on_switch(self, out, event, now):
        self.phase = "connected"
        self.outcome = "connected"
        out.append(Connected())


# --- the fronts ----------------------------------------------------------------------------
class NativeFront:
    """connect_to_vm's client: 102 lines, the 101 with the slave key, a 503, the splice."""

    name = "connect_to_vm"
    vma_params = {}
    pump = Splice

    def __init__(self, conn):
        self.conn = conn

    def info(self, text):
        self.conn.send_info(text)

    def switch(self, slave_key):
        self.conn.send_switch(slave_key)

    def fail(self, message):
        if self.conn.h11.our_state is h11.SEND_RESPONSE:
            self.conn.send_error(503, f"The requested virtual machine is not available: {message}, retry later.")


# --- the runner ----------------------------------------------------------------------------
# the setup's database writes; the claim's own statement is whole in Sessions.claim
_DATABASE_WRITES = (RequestStart, BuildParams, MarkConnected)


def open_session(ctx, front, session, auth, client_params, auth_vars, began):
    """Set the session up, telling the front (102 lines for a native client), then its 101
    and its pump: True. On failure the front's failure (a 503) and the row released: False.
    began: when the request came (for the connect_to_vm histogram)."""
    return ConnectRunner(ctx, front, session, auth, client_params, auth_vars, began).run()


class ConnectRunner:
    """Executes one ConnectMachine's commands. ctx: endpoints.Context (cfg, db, sessions,
    counters, host); front: the client end (NativeFront or web.BrowserFront)."""

    def __init__(self, ctx, front, session, auth, client_params, auth_vars, began):
        self.ctx = ctx
        self.began = began
        self.front = front
        self.conn = front.conn
        self.session = session
        self.vm_id = session.vm_id
        self.auth = auth
        self.client_params = client_params
        self.auth_vars = auth_vars or {}
        self.host_id = ctx.host.id
        self.pid = ctx.sessions.pid
        self.key = slave_key()
        self.machine = ConnectMachine(self.vm_id, self.host_id, self.pid, ConnectSettings.from_config(ctx.cfg))
        self.params = None
        self.vma = None
        self.vm_sock = None
        self.denied = None

    def run(self):
        try:
            outcome = self._drive()
        except BaseException:
            # the client went away, the database failed, or a bug: the row is released all the same
            self.session.greenlet = None
            metrics.inc("qvd_l7r_connects_total", result="error")
            shielded(self._fail_setup, None)
            raise
        if outcome == "connected":
            return self._splice()
        if self.denied is not None and self.conn.h11.our_state is h11.SEND_RESPONSE:
            # the access check is the claim's first step: nothing was claimed, no 102 was sent
            self.session.greenlet = None
            metrics.inc("qvd_l7r_connects_total", result="denied")
            raise HttpError(self.denied.status, self.denied.message)
        self._failed(outcome)
        return False

    def _drive(self):
        machine = self.machine
        pending = deque(machine.handle(Begin(), time.monotonic()))
        # the 102 lines between two waits go out together: before a step that waits, they
        # are flushed (so the client sees them while it waits), and the last line goes out
        # with the 101 (docs/protocol.md#connect-to-vm: the same lines, fewer records)
        self.conn.hold_output()
        try:
            return self._drive_commands(machine, pending)
        finally:
            self.conn.flush()

    def _drive_commands(self, machine, pending):
        while pending:
            command = pending.popleft()
            if isinstance(command, Deny):
                self.denied = command
                return machine.outcome
            if isinstance(command, TERMINAL):
                return machine.outcome
            try:
                if isinstance(command, Step) and not isinstance(command, SendSwitch):
                    self.conn.flush()
                    self.conn.hold_output()
                event = self._execute(command)
            except SessionAborted as exc:
                if machine.finished:
                    # the outcome is decided: lines still queued before it are dropped
                    pending = deque(c for c in pending if isinstance(c, TERMINAL))
                    continue
                pending.clear()
                event = Aborted(str(exc))
            if event is not None:
                pending.extend(machine.handle(event, time.monotonic()))
        raise RuntimeError(f"connect machine stopped without an outcome in phase {machine.phase}")

    def _execute(self, command):
        """Run one command; its answer event, or None for a fire-and-forget one."""
        if isinstance(command, _DATABASE_WRITES):
            with self.session.whole_statement():
                return self._execute_one(command)
        return self._execute_one(command)

    def _execute_one(self, command):
        ctx = self.ctx
        if isinstance(command, SendInfo):
            self.front.info(command.text)
        elif isinstance(command, Count):
            ctx.counters.count(command.name)
        elif isinstance(command, Log):
            log.info("%s", command.text)
        elif isinstance(command, Claim):
            outcome, holder, row, generation = ctx.sessions.claim(self.session, self.auth.user_id)
            return ClaimResult(outcome, holder, SessionRow._make(row) if row is not None else None, generation)
        elif isinstance(command, ReadRow):
            row = runtime.session_row(ctx.db, self.vm_id)
            return RowSeen(SessionRow._make(row) if row is not None else None)
        elif isinstance(command, RequestStart):
            try:
                ctx.db.transaction(runtime.request_start, ctx.cfg, self.vm_id, retries=runtime.CLAIM_RETRIES)
            except NoHostAvailable as exc:
                return StartRequested(str(exc))
            return StartRequested()
        elif isinstance(command, WaitVmEvent):
            ctx.sessions.wait_vm_event(self.vm_id, command.timeout)
            return Waited()
        elif isinstance(command, Sleep):
            gevent.sleep(command.seconds)
            return Waited()
        elif isinstance(command, BuildParams):
            self.params = session_vma_params(ctx.db, self.host_id, self.vm_id, self.auth, self.client_params,
                                             self.auth_vars, ctx.cfg.get_int("l7r.token.lifetime"), self.key,
                                             legacy_unauthenticated(ctx.cfg), self.front.vma_params,
                                             generation=self.machine.generation)
            if self.params is None:
                return ParamsReady(f"VM {self.vm_id} runs without an agent key (started with "
                                   "vm.vma.legacy_unauthenticated on?); restart it")
            return ParamsReady()
        elif isinstance(command, StartX):
            self.vma = VmaClient(command.address, command.port, timeout=ctx.cfg.get_float("internal.l7r.timeout.vma"),
                                 key=self.params.agent_key)
            try:
                self.vma.x_start(**self.params.params)
            except VmaError as exc:
                return VmaAnswer(str(exc))
            return VmaAnswer()
        elif isinstance(command, PollX):
            try:
                return XState(self.vma.x_state())
            except VmaError:
                return XState(None)
        elif isinstance(command, ConnectDisplay):
            try:
                sock = open_display(command.address, command.port, self.params.display_key,
                                    timeout=ctx.cfg.get_float("internal.l7r.timeout.vma"))
            except OSError as exc:
                return DisplayConnected(str(exc.strerror or exc))
            tune_socket(sock)
            self.vm_sock = sock
            return DisplayConnected()
        elif isinstance(command, MarkConnected):
            return MarkResult(runtime.mark_connected(ctx.db, self.vm_id, self.host_id, self.pid))
        elif isinstance(command, SendSwitch):
            self.front.switch(self.key)
            metrics.observe("qvd_l7r_connect_to_vm_seconds", time.monotonic() - self.began)
            return Switched()
        else:
            raise TypeError(f"unknown connect command {command!r}")
        return None

    # --- the two ends -----------------------------------------------------------------------
    def _splice(self):
        session, conn = self.session, self.conn
        session.greenlet = None  # from here on an abort closes the splice instead
        leftover = conn.leftover()
        metrics.inc("qvd_l7r_connects_total", result="ok")
        log.info("session open: user %s VM %s from %s (%s)", self.auth.login, self.vm_id, session.peer,
                 self.front.name)
        self.ctx.sessions.splice(session, conn.sock, self.vm_sock, leftover, self.front.pump)
        return True

    def _failed(self, message):
        self.session.greenlet = None
        metrics.inc("qvd_l7r_connects_total", result="failed")
        log.info("%s failed: user %s VM %s from %s: %s", self.front.name, self.auth.login, self.vm_id,
                 self.session.peer, message)
        shielded(self._fail_setup, message)

    def _fail_setup(self, message):
        if self.vm_sock is not None:
            self.vm_sock.close()
        self.ctx.sessions.end_setup(self.session)
        if message is not None:
            self.front.fail(message)
