"""The per-VM state machine, without I/O: ``machine.handle(event) -> [actions]``.

Follows docs/hkd.md#vm-state-machine (the original KVM handler's shape, shared by every
hypervisor here). Main states, as written to vm_runtimes.vm_state: starting, running,
stopping, zombie, debugging, stopped. Substates are internal (`state.sub`).

At most one *step* (an action whose outcome matters: DB write, launch, RPC) is in flight;
its outcome comes back as StepDone/StepFailed with the step's serial number. Commands
arriving meanwhile are delayed and re-fired after the step, as the original delays them
until a state handles them (docs/hkd.md#stop-while-starting). Timers are named after the defaults-table key
they come from (``internal.hkd.timeout.on_state.<name>``).
"""
from dataclasses import dataclass, field


# --- events -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CmdStart:
    pass


@dataclass(frozen=True)
class CmdStop:
    pass


@dataclass(frozen=True)
class CatchZombie:
    """Startup: the row says this node runs the VM but the hypervisor has nothing."""


@dataclass(frozen=True)
class Adopt:
    """Startup: the VM still runs (node restarted); db_state is the row's vm_state."""
    db_state: str


@dataclass(frozen=True)
class HkdStop:
    pass


@dataclass(frozen=True)
class HkdKill:
    pass


@dataclass(frozen=True)
class RowLost:
    """A guarded write hit no row: the cluster gave this VM away. Stop it, touch no row."""


@dataclass(frozen=True)
class Fence:
    """This node has not written its heartbeat for too long: the cluster will give every VM
    away. Kill the VM now, touch no row (the database is not reachable anyway)."""


@dataclass(frozen=True)
class VmaAlive:
    pass


@dataclass(frozen=True)
class VmaFailed:
    count: int          # consecutive failures
    since: float        # seconds since the last good ping (or since the monitor started)


@dataclass(frozen=True)
class VmExited:
    pass


@dataclass(frozen=True)
class Expired:
    soft: object = None
    hard: object = None


@dataclass(frozen=True)
class Timeout:
    name: str


@dataclass(frozen=True)
class StepDone:
    serial: int
    result: object = None


@dataclass(frozen=True)
class StepFailed:
    serial: int
    reason: str = ""


# --- actions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """Base of actions whose outcome is fed back (StepDone/StepFailed with this serial)."""
    serial: int


@dataclass(frozen=True)
class Prepare(Step):
    """Load row + DI, compute attributes, save the runtime row, run_attempts += 1."""


@dataclass(frozen=True)
class AcquireHeavy(Step):
    pass


@dataclass(frozen=True)
class StartVm(Step):
    """Register DHCP (bridge hypervisors), launch, write vm_address/vm_pid."""


@dataclass(frozen=True)
class WriteState(Step):
    state: str
    run_ok: bool = False      # also vm_counters.run_ok += 1


@dataclass(frozen=True)
class Poweroff(Step):
    """VMA poweroff RPC; if the VMA cannot be reached, the hypervisor's graceful shutdown."""


@dataclass(frozen=True)
class Shutdown(Step):
    """Hypervisor graceful stop (SIGTERM to the init, ACPI)."""


@dataclass(frozen=True)
class Kill(Step):
    """Hypervisor hard stop (SIGKILL, destroy)."""


@dataclass(frozen=True)
class Cleanup(Step):
    """Unregister DHCP, hypervisor cleanup (links, namespaces, overlays)."""


@dataclass(frozen=True)
class ClearRuntimeRow(Step):
    pass


@dataclass(frozen=True)
class ExpireVma(Step):
    soft: object = None
    hard: object = None


@dataclass(frozen=True)
class ReleaseHeavy:
    pass


@dataclass(frozen=True)
class CancelStep:
    """Abandon the step with this serial (only a wait, never half-done I/O, is cancelled)."""
    serial: int


@dataclass(frozen=True)
class StartMonitor:
    mode: str                 # 'starting' or 'running': ping period and failure limits


@dataclass(frozen=True)
class StopMonitor:
    pass


@dataclass(frozen=True)
class WatchExit:
    pass


@dataclass(frozen=True)
class ArmTimer:
    name: str
    seconds: float


@dataclass(frozen=True)
class CancelTimer:
    pass


@dataclass(frozen=True)
class Log:
    text: str


@dataclass(frozen=True)
class Finished:
    """The handler reached `stopped`: the HKD drops it."""


@dataclass
class Settings:
    """Every number the machine needs, from the defaults table (see settings_from_config)."""
    timeouts: dict = field(default_factory=lambda: {
        "stopping.shutdown": 180, "stopping.stop": 180, "zombie.reap": 120, "zombie.delaying": 60})
    max_count: dict = field(default_factory=lambda: {"starting": 40, "running": 10})
    max_time: dict = field(default_factory=lambda: {"starting": 180, "running": 320})
    debug_enable: bool = False


def settings_from_config(cfg, hypervisor_name):
    """Timeouts by state name; internal.hkd.<hv>.timeout.on_state.X overrides the generic key."""
    s = Settings()
    for name in list(s.timeouts):
        generic = f"internal.hkd.timeout.on_state.{name}"
        specific = f"internal.hkd.{hypervisor_name}.timeout.on_state.{name}"
        value = cfg.get_float(specific, None) if cfg.known(specific) else None
        s.timeouts[name] = value if value is not None else cfg.get_float(generic)
    for key in ("starting", "running"):
        s.max_count[key] = cfg.get_int(f"internal.hkd.vmhandler.vma.failed.max_count.on.{key}")
        s.max_time[key] = cfg.get_float(f"internal.hkd.vmhandler.vma.failed.max_time.on.{key}")
    s.debug_enable = cfg.get_bool("internal.vm.debug.enable")
    return s


# Commands that wait while a step is in flight (the original's `delay`). RowLost does not
# wait: the step in flight is abandoned (its outcome becomes stale) and the VM is killed.
_DELAYABLE = (CmdStop, HkdStop, HkdKill, VmExited, Expired)


class VmMachine:
    def __init__(self, vm_id, settings=None):
        self.vm_id = vm_id
        self.settings = settings or Settings()
        self.state = "new"
        self.saved_state = None         # last vm_state this machine wrote
        self.timer = None
        self.monitoring = False
        self.in_flight = None           # (serial, step) awaiting its outcome
        self.pending = []               # delayed events
        self._serial = 0
        self._after = {}                # serial -> callable(ok, result) continuation

    # --- public -----------------------------------------------------------------------
    @property
    def main_state(self):
        return self.state.split(".", 1)[0]

    def handle(self, event):
        out = []
        if isinstance(event, (StepDone, StepFailed)):
            if self.in_flight is None or event.serial != self.in_flight[0]:
                return out                      # stale outcome
            self.in_flight = None
            then = self._after.pop(event.serial)
            ok = isinstance(event, StepDone)
            then(out, ok, event.result if ok else event.reason)
        elif isinstance(event, Timeout):
            if event.name != self.timer:
                return out                      # a timer from a state we left
            self.timer = None
            self._on_timeout(out, event.name)
        elif (self.in_flight is not None and isinstance(self.in_flight[1], AcquireHeavy)
              and isinstance(event, (CmdStop, HkdStop, HkdKill))):
            # the original's starting/heavy: a stop while waiting for the semaphore ends the start
            serial = self.in_flight[0]
            self.in_flight = None
            self._after.pop(serial, None)
            out.append(CancelStep(serial))
            out.append(ReleaseHeavy())
            self._stop_db(out)
        elif self.in_flight is not None and isinstance(event, _DELAYABLE):
            self.pending.append(event)
            return out
        else:
            self._dispatch(out, event)
        # re-fire delayed events once nothing is in flight (the original: after each state change)
        while self.in_flight is None and self.pending and self.state != "stopped":
            self._dispatch(out, self.pending.pop(0))
        # a stop delayed until now ends a wait for the heavy semaphore at once
        if self.in_flight is not None and isinstance(self.in_flight[1], AcquireHeavy):
            stops = [e for e in self.pending if isinstance(e, (CmdStop, HkdStop, HkdKill))]
            if stops:
                self.pending = [e for e in self.pending if not isinstance(e, (CmdStop, HkdStop, HkdKill))]
                out.extend(self.handle(stops[0]))
        return out

    # --- helpers ----------------------------------------------------------------------
    def _goto(self, out, state):
        if state != self.state:
            old_main = self.main_state
            if self.timer is not None:
                out.append(CancelTimer())
                self.timer = None
            self.state = state
            if self.main_state != old_main:
                out.append(Log(f"VM {self.vm_id}: {old_main} -> {self.main_state}"))

    def _step(self, out, cls, then, **kw):
        self._serial += 1
        step = cls(self._serial, **kw)
        self.in_flight = (self._serial, step)
        self._after[self._serial] = then
        out.append(step)

    def _arm(self, out, name):
        self.timer = name
        out.append(ArmTimer(name, self.settings.timeouts[name]))

    def _monitor(self, out, mode):
        self.monitoring = True
        out.append(StartMonitor(mode))

    def _unmonitor(self, out):
        if self.monitoring:
            self.monitoring = False
            out.append(StopMonitor())

    def _save(self, out, state, then, ignore_errors=False, run_ok=False):
        """WriteState unless the row already says so; then(out, ok, info)."""
        if self.saved_state == state:
            then(out, True, None)
            return

        def after(out, ok, info):
            if ok:
                self.saved_state = state
            then(out, ok or ignore_errors, info)
        self._step(out, WriteState, after, state=state, run_ok=run_ok)

    # --- dispatch ---------------------------------------------------------------------
    def _dispatch(self, out, ev):
        st = self.state
        if isinstance(ev, (RowLost, Fence)):
            if st not in ("stopped", "lost"):
                self._lost(out, fenced=isinstance(ev, Fence))
            return
        if st == "new":
            if isinstance(ev, CmdStart):
                self._start(out)
            elif isinstance(ev, (CmdStop, HkdStop, HkdKill)):
                self._stop_db(out)
            elif isinstance(ev, CatchZombie):
                self._zombie(out)
            elif isinstance(ev, Adopt):
                self._adopt(out, ev.db_state)
            return
        if isinstance(ev, CmdStart):
            return                              # a handler exists: start ignored
        if st.startswith("starting."):
            self._in_starting(out, ev)
        elif st == "running.monitoring":
            self._in_running(out, ev)
        elif st == "debugging":
            self._in_debugging(out, ev)
        elif st.startswith("stopping."):
            self._in_stopping(out, ev)
        elif st.startswith("zombie") and isinstance(ev, HkdKill):
            out.append(Log(f"VM {self.vm_id}: given up in zombie state at HKD kill"))
            self._finish(out)

    # starting ---------------------------------------------------------------------------
    def _start(self, out):
        self._goto(out, "starting.db")
        self.saved_state = "starting"           # written by the command intake
        self._step(out, Prepare, self._after_prepare)

    def _after_prepare(self, out, ok, info):
        if not ok:
            out.append(Log(f"VM {self.vm_id}: start failed: {info}"))
            self._stop_db(out)
            return
        self._goto(out, "starting.heavy")
        self._step(out, AcquireHeavy, self._after_heavy)

    def _after_heavy(self, out, ok, info):
        if not ok:
            self._stop_db(out)
            return
        if self.pending and any(isinstance(e, (CmdStop, HkdStop, HkdKill)) for e in self.pending):
            # stop before launch: nothing runs yet, just clear the row (the original's starting/heavy)
            self.pending = [e for e in self.pending if not isinstance(e, (CmdStop, HkdStop, HkdKill))]
            out.append(ReleaseHeavy())
            self._stop_db(out)
            return
        self._goto(out, "starting.launch")
        self._step(out, StartVm, self._after_launch)

    def _after_launch(self, out, ok, info):
        if not ok:
            out.append(Log(f"VM {self.vm_id}: launch failed: {info}"))
            self._cleanup(out)
            return
        self._goto(out, "starting.waiting_for_vma")
        out.append(WatchExit())
        self._monitor(out, "starting")

    def _in_starting(self, out, ev):
        if self.state in ("starting.db", "starting.heavy", "starting.launch"):
            return                              # only reached with nothing in flight: impossible
        if isinstance(ev, VmaAlive):
            self._goto(out, "running.saving")
            self._save(out, "running", self._after_running_saved, run_ok=True)
        elif isinstance(ev, VmaFailed):
            self._vma_failed(out, ev, "starting")
        elif isinstance(ev, (CmdStop, HkdStop)):
            self._shutdown(out)
        elif isinstance(ev, HkdKill):
            self._stop(out)
        elif isinstance(ev, VmExited):
            out.append(Log(f"VM {self.vm_id}: exited while starting"))
            self._cleanup(out)

    def _vma_failed(self, out, ev, key):
        s = self.settings
        if ev.count >= s.max_count[key] and ev.since > s.max_time[key]:
            if s.debug_enable:
                out.append(Log(f"VM {self.vm_id}: VMA dead ({ev.count} failures, {ev.since:.0f} s): debugging"))
                self._goto(out, "debugging.saving")
                out.append(ReleaseHeavy())
                self._save(out, "debugging", self._after_debugging_saved)
            else:
                out.append(Log(f"VM {self.vm_id}: VMA dead ({ev.count} failures, {ev.since:.0f} s): stopping"))
                self._stop(out)

    # running ----------------------------------------------------------------------------
    def _after_running_saved(self, out, ok, info):
        if not ok:
            self._stop(out)
            return
        out.append(ReleaseHeavy())
        self._goto(out, "running.monitoring")
        self._monitor(out, "running")

    def _in_running(self, out, ev):
        if isinstance(ev, VmaFailed):
            self._vma_failed(out, ev, "running")
        elif isinstance(ev, (CmdStop, HkdStop)):
            self._shutdown(out)
        elif isinstance(ev, HkdKill):
            self._stop(out)
        elif isinstance(ev, VmExited):
            out.append(Log(f"VM {self.vm_id}: exited unexpectedly while running"))
            self._cleanup(out)
        elif isinstance(ev, Expired):
            self._goto(out, "running.expiring")
            self._step(out, ExpireVma, self._after_expire, soft=ev.soft, hard=ev.hard)

    def _after_expire(self, out, ok, info):
        self._goto(out, "running.monitoring")
        self._monitor(out, "running")           # restarted, failure counters reset

    # debugging --------------------------------------------------------------------------
    def _after_debugging_saved(self, out, ok, info):
        if not ok:
            self._stop(out)
            return
        self._goto(out, "debugging")
        self._monitor(out, "running")

    def _in_debugging(self, out, ev):
        if isinstance(ev, VmaAlive):
            self._goto(out, "running.saving")
            self._save(out, "running", self._after_running_saved)
        elif isinstance(ev, (CmdStop, HkdStop, HkdKill)):
            self._stop(out)
        elif isinstance(ev, VmExited):
            self._cleanup(out)

    # stopping ---------------------------------------------------------------------------
    def _shutdown(self, out):
        self._unmonitor(out)
        self._goto(out, "stopping.shutdown")
        self._save(out, "stopping", self._after_stopping_saved_shutdown)

    def _after_stopping_saved_shutdown(self, out, ok, info):
        if not ok:
            self._zombie(out)
            return
        self._step(out, Poweroff, self._after_poweroff)

    def _after_poweroff(self, out, ok, info):
        if not ok:
            out.append(Log(f"VM {self.vm_id}: graceful shutdown failed ({info}); terminating"))
            self._stop(out)
            return
        self._goto(out, "stopping.shutdown.waiting")
        self._arm(out, "stopping.shutdown")

    def _stop(self, out):
        self._unmonitor(out)
        self._goto(out, "stopping.stop")
        self._save(out, "stopping", lambda out, ok, info: (
            self._step(out, Shutdown, self._after_term) if ok else self._zombie(out)))

    def _after_term(self, out, ok, info):
        self._goto(out, "stopping.stop.waiting")
        self._arm(out, "stopping.stop")

    def _kill(self, out):
        self._goto(out, "stopping.kill")
        self._step(out, Kill, self._after_kill)

    def _after_kill(self, out, ok, info):
        self._goto(out, "stopping.kill.waiting")
        self._arm(out, "zombie.reap")

    def _in_stopping(self, out, ev):
        st = self.state
        if isinstance(ev, VmExited):
            if st not in ("stopping.cleanup", "stopping.db"):
                self._cleanup(out)
        elif isinstance(ev, HkdKill):
            if st.startswith("stopping.shutdown"):
                self._stop(out)
            elif st.startswith("stopping.stop"):
                self._kill(out)

    def _on_timeout(self, out, name):
        st = self.state
        if name == "stopping.shutdown" and st == "stopping.shutdown.waiting":
            out.append(Log(f"VM {self.vm_id}: did not power off in time; terminating"))
            self._stop(out)
        elif name == "stopping.stop" and st == "stopping.stop.waiting":
            out.append(Log(f"VM {self.vm_id}: did not stop in time; killing"))
            self._kill(out)
        elif name == "zombie.reap" and st == "stopping.kill.waiting":
            out.append(Log(f"VM {self.vm_id}: still there after kill"))
            self._zombie(out)
        elif name == "zombie.reap" and st == "zombie.waiting":
            self._zombie_retry(out)
        elif name == "zombie.delaying" and st == "zombie.delaying":
            self._reap(out)

    def _cleanup(self, out):
        self._unmonitor(out)
        self._goto(out, "stopping.cleanup")
        self._save(out, "stopping", lambda out, ok, info: (
            self._step(out, Cleanup, self._after_cleanup) if ok else self._zombie(out)))

    def _after_cleanup(self, out, ok, info):
        if not ok:
            out.append(Log(f"VM {self.vm_id}: cleanup failed: {info}"))
            self._zombie(out)
            return
        out.append(ReleaseHeavy())
        self._stop_db(out)

    def _stop_db(self, out):
        self._goto(out, "stopping.db")
        self._step(out, ClearRuntimeRow, self._after_clear)

    def _after_clear(self, out, ok, info):
        if not ok:
            out.append(Log(f"VM {self.vm_id}: cannot clear runtime row: {info}"))
            self._goto(out, "zombie.delaying")
            self._arm(out, "zombie.delaying")
            return
        self._finish(out)

    def _finish(self, out):
        self._unmonitor(out)
        out.append(ReleaseHeavy())
        self._goto(out, "stopped")
        self.pending = []
        out.append(Finished())

    # zombie -----------------------------------------------------------------------------
    def _zombie(self, out):
        self._unmonitor(out)
        self._goto(out, "zombie")
        self._save(out, "zombie", lambda out, ok, info: self._reap(out), ignore_errors=True)

    def _reap(self, out):
        self._goto(out, "zombie.reap")
        self._step(out, Kill, self._after_zombie_kill)

    def _after_zombie_kill(self, out, ok, info):
        if not ok:
            self._zombie_retry(out)
            return
        self._goto(out, "zombie.cleanup")
        self._step(out, Cleanup, lambda out, ok, info: self._stop_db(out) if ok else self._zombie_retry(out))

    def _zombie_retry(self, out):
        self._goto(out, "zombie.delaying")
        self._arm(out, "zombie.delaying")

    # adoption and loss ------------------------------------------------------------------
    def _adopt(self, out, db_state):
        self.saved_state = db_state
        out.append(WatchExit())
        if db_state in ("running", "debugging"):
            self._goto(out, "running.monitoring" if db_state == "running" else "debugging")
            self._monitor(out, "running")
        elif db_state == "starting":
            self._goto(out, "starting.waiting_for_vma")
            self._monitor(out, "starting")
        else:                                   # it was being stopped or reaped: finish that
            self._stop(out)

    def _lost(self, out, fenced=False):
        if fenced:
            out.append(Log(f"VM {self.vm_id}: this node is fencing itself; killing the VM"))
        else:
            out.append(Log(f"VM {self.vm_id}: runtime row no longer assigned to this node; killing the VM"))
        self._unmonitor(out)
        self._goto(out, "lost")
        self.pending = []
        self.in_flight = None
        self._step(out, Kill, lambda out, ok, info: self._step(
            out, Cleanup, lambda out, ok, info: self._finish(out)))
