"""The host (node) lifecycle without I/O: ``machine.handle(event) -> [actions]``.

docs/hkd.md#host-state-machine: starting (checks, then setup), running, stopping,
stopped. A failure before anything is written to host_runtimes ends the start with
Fail(reason) (the caller raises HkdError); a failure after that goes through stopping,
so the row never stays `starting`. Each step's outcome comes back as StepDone/StepFailed.
"""
from dataclasses import dataclass


# --- events -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    pass


@dataclass(frozen=True)
class CmdStop:
    reason: str = "stop requested"


@dataclass(frozen=True)
class TickerDead:
    pass


@dataclass(frozen=True)
class AllVmsStopped:
    pass


@dataclass(frozen=True)
class Timeout:
    name: str


@dataclass(frozen=True)
class StepDone:
    name: str


@dataclass(frozen=True)
class StepFailed:
    name: str
    reason: str = ""


# --- actions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """Run the named step (the runner has one method per name); outcome fed back."""
    name: str


@dataclass(frozen=True)
class StopAllVms:
    pass


@dataclass(frozen=True)
class KillAllVms:
    pass


@dataclass(frozen=True)
class ArmTimer:
    name: str
    seconds: float


@dataclass(frozen=True)
class Ready:
    """The host is running: start() may return."""


@dataclass(frozen=True)
class Fail:
    reason: str


@dataclass(frozen=True)
class Stopped:
    pass


@dataclass(frozen=True)
class Log:
    text: str


# starting/zero: nothing written yet, a failure just ends the start
# (tools before network: nothing on the host changes until every program the node runs is
# there; network before address: with vm.network.setup the node's address is the bridge's gateway)
CHECKS = ("check_schema", "load_host", "check_hypervisor", "check_tools", "check_network", "check_address")
# starting/setup: the row says 'starting'; a failure goes through stopping
SETUP = ("save_starting", "save_loadbal", "first_tick", "reset_sessions", "reconcile", "start_agents")
RUNNING = ("save_running", "start_vm_intake")
STOPPING = ("stop_vm_intake", "save_stopping")
FINAL = ("stop_agents", "save_stopped")


class HostMachine:
    def __init__(self, stopping_vms_timeout=300, killing_retry_timeout=100):
        self.stopping_vms_timeout = stopping_vms_timeout
        self.killing_retry_timeout = killing_retry_timeout
        self.state = "new"
        self.phase = None           # which sequence we walk
        self.index = 0
        self.in_flight = None
        self.stop_pending = None
        self.ready = False

    def handle(self, event):
        out = []
        if isinstance(event, Run) and self.state == "new":
            out.append(Log("HKD starting"))
            self._begin(out, "starting", CHECKS)
        elif isinstance(event, (StepDone, StepFailed)):
            if event.name != self.in_flight:
                return out
            self.in_flight = None
            if isinstance(event, StepDone):
                self._next(out)
            else:
                self._failed(out, event)
        elif isinstance(event, CmdStop):
            if self.state in ("starting", "running") and self.stop_pending is None:
                self.stop_pending = event.reason
                if self.in_flight is None:
                    self._take_stop(out)
        elif isinstance(event, TickerDead):
            if self.state in ("starting", "running"):
                out.append(Log("no heartbeat for too long: stopping"))
                self.stop_pending = self.stop_pending or "heartbeat lost"
                if self.in_flight is None:
                    self._take_stop(out)
        elif isinstance(event, AllVmsStopped):
            if self.state == "stopping" and self.phase == "vms":
                self._begin(out, "stopping", FINAL, phase="final")
        elif isinstance(event, Timeout):
            if self.state == "stopping" and self.phase == "vms":
                if event.name == "stopping.vms":
                    out.append(Log("VMs did not stop in time: killing them"))
                out.append(KillAllVms())
                out.append(ArmTimer("killing.vms.retry", self.killing_retry_timeout))
        return out

    # --- internals --------------------------------------------------------------------
    def _begin(self, out, state, steps, phase=None):
        if state != self.state:
            out.append(Log(f"host state {self.state} -> {state}"))
        self.state = state
        self.phase = phase or steps
        self.steps = steps
        self.index = 0
        self._run_current(out)

    def _run_current(self, out):
        if self.index < len(self.steps):
            self.in_flight = self.steps[self.index]
            out.append(Step(self.in_flight))
        else:
            self._sequence_done(out)

    def _next(self, out):
        if self.stop_pending is not None and self.state in ("starting", "running"):
            self._take_stop(out)
            return
        self.index += 1
        self._run_current(out)

    def _sequence_done(self, out):
        if self.steps is CHECKS:
            self._begin(out, "starting", SETUP)
        elif self.steps is SETUP:
            self._begin(out, "running", RUNNING)
        elif self.steps is RUNNING:
            self.phase = "main"
            self.ready = True
            out.append(Ready())
        elif self.steps is STOPPING:
            self.phase = "vms"
            out.append(StopAllVms())
            out.append(ArmTimer("stopping.vms", self.stopping_vms_timeout))
        elif self.steps is FINAL:
            out.append(Log("host state stopping -> stopped"))
            self.state = "stopped"
            self.phase = None
            out.append(Stopped())

    def _failed(self, out, event):
        reason = event.reason or event.name
        if self.state == "starting" and self.steps is CHECKS:
            self.state = "failed"
            out.append(Fail(reason))
        elif self.state in ("starting", "running"):
            out.append(Log(f"{event.name} failed: {reason}; stopping"))
            self.stop_pending = self.stop_pending or reason
            self._take_stop(out)
        else:
            # while stopping every step is best effort: log and go on
            out.append(Log(f"{event.name} failed while stopping: {reason}"))
            self._next(out)

    def _take_stop(self, out):
        reason = self.stop_pending
        if self.state == "starting" and self.steps is CHECKS:
            self.state = "failed"
            out.append(Fail(f"stopped before start: {reason}"))
            return
        out.append(Log(f"stopping: {reason}"))
        if not self.ready:
            out.append(Fail(reason))
        self._begin(out, "stopping", STOPPING)
