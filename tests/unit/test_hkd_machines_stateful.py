"""Hypothesis stateful tests of the HKD's two machines (src/qvd_gevent/hkd/vm_machine.py,
src/qvd_gevent/hkd/host_machine.py): random events in any order, every step answered
done or failed, timers fired or left; the promises of docs/hkd.md hold on every path,
and from any point a stop still ends the machine."""
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from qvd_gevent.hkd import host_machine as H
from qvd_gevent.hkd import vm_machine as M

STATEFUL = settings(max_examples=200, stateful_step_count=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# --- the VM machine ------------------------------------------------------------------------
def vm_settings():
    s = M.Settings()
    s.max_count = {"starting": 3, "running": 3}
    s.max_time = {"starting": 10, "running": 10}
    return s


class VmTrack:
    """What the runner would know from the actions: the timer armed, the step in flight,
    the monitor, and what was done to the VM."""

    def __init__(self):
        self.timer = None
        self.step = None
        self.monitoring = False
        self.finished = False
        self.starts = 0
        self.launched = False           # a VM process may exist
        self.exited = False
        self.cleaned_after_launch = False
        self.gave_up = False
        self.lost = False
        self.tried_after_lost = set()   # steps the lost path tried, whatever they answered
        self.actions = []

    def apply(self, actions):
        for a in actions:
            assert not self.finished, f"{a} after Finished"
            self.actions.append(a)
            if isinstance(a, M.ArmTimer):
                self.timer = a.name     # the runner cancels any earlier timer first
            elif isinstance(a, M.CancelTimer):
                self.timer = None
            elif isinstance(a, M.CancelStep):
                assert self.step is not None and a.serial == self.step.serial
                self.step = None
            elif isinstance(a, M.Step):
                assert self.step is None, f"{a} while {self.step} is in flight"
                self.step = a
                if isinstance(a, M.StartVm):
                    self.starts += 1
            elif isinstance(a, M.StartMonitor):
                self.monitoring = True
            elif isinstance(a, M.StopMonitor):
                self.monitoring = False
            elif isinstance(a, M.Finished):
                self.finished = True
            elif isinstance(a, M.Log) and "given up" in a.text:
                self.gave_up = True
            elif isinstance(a, M.Log) and "no longer assigned" in a.text:
                self.lost = True
            if self.lost and isinstance(a, (M.Kill, M.Cleanup)):
                self.tried_after_lost.add(type(a))

    def row_lost(self):
        """RowLost abandons the step in flight (its outcome turns stale) and kills the VM;
        the runner's Kill waits for a launch in flight, so an abandoned launch counts."""
        if self.step is not None:
            if isinstance(self.step, M.StartVm):
                self.launched = True
            self.step = None

    def outcome(self, event):
        """A StepDone/StepFailed: the step it answers is over (a stale one answers nothing)."""
        if self.step is not None and event.serial == self.step.serial:
            self.answered(isinstance(event, M.StepDone))

    def answered(self, ok):
        step, self.step = self.step, None
        if isinstance(step, M.StartVm):
            self.launched = True        # even a failed launch may have left something to clean
        if isinstance(step, M.Cleanup) and ok and self.launched:
            self.cleaned_after_launch = True


def drive_to_the_end(events, limit=400):
    """Replay events into a fresh machine, then stop it the way the HKD does: HkdStop,
    every step done, every armed timer fired, the VM process gone when a stop waits for
    it. Returns the track, or fails if the machine never finishes."""
    machine = M.VmMachine(42, vm_settings())
    track = VmTrack()
    for event in events:
        if isinstance(event, (M.StepDone, M.StepFailed)):
            track.outcome(event)
        if isinstance(event, M.RowLost) and machine.state not in ("stopped", "lost"):
            track.row_lost()
        track.apply(machine.handle(event))
    track.apply(machine.handle(M.HkdStop()))
    for _ in range(limit):
        if track.finished:
            return track
        if track.step is not None:
            event = M.StepDone(track.step.serial)
            track.answered(True)
        elif track.timer is not None:
            event, track.timer = M.Timeout(track.timer), None
        elif track.launched and not track.exited:
            event, track.exited = M.VmExited(), True
        else:
            event = M.HkdStop()
        track.apply(machine.handle(event))
    raise AssertionError(f"no end after HkdStop: stuck in {machine.state}")


def lost_path_tried(track):
    """When the row went to another node (RowLost) the machine tries a kill and a cleanup
    once and ends whatever they answer: it may not write the row any more to go zombie."""
    return track.lost and track.tried_after_lost == {M.Kill, M.Cleanup}


class VmMachineRuns(RuleBasedStateMachine):
    @initialize(first=st.sampled_from([M.CmdStart(), M.CmdStart(), M.CatchZombie(), M.CmdStop(),
                                       M.Adopt("running"), M.Adopt("starting"), M.Adopt("debugging"),
                                       M.Adopt("stopping")]))
    def begin(self, first):
        self.m = M.VmMachine(42, vm_settings())
        self.track = VmTrack()
        self.events = []
        if isinstance(first, M.Adopt):
            self.track.launched = True  # the VM survived a restart of the node
        self._send(first)

    def _send(self, event):
        if isinstance(event, (M.StepDone, M.StepFailed)):
            self.track.outcome(event)
        if isinstance(event, M.RowLost) and self.m.state not in ("stopped", "lost"):
            self.track.row_lost()
        self.events.append(event)
        out = self.m.handle(event)
        if self.track.finished:
            assert out == [], f"{out} after Finished"
        self.track.apply(out)
        return out

    @precondition(lambda self: self.track.step is not None)
    @rule(roll=st.integers(0, 4))
    def step_outcome(self, roll):
        """Mostly done, one time in five failed: runs get far enough to stop a running VM."""
        serial = self.track.step.serial
        self._send(M.StepDone(serial) if roll else M.StepFailed(serial, "boom"))

    @precondition(lambda self: not self.track.finished)
    @rule()
    def the_vma_answers(self):
        self._send(M.VmaAlive())

    @precondition(lambda self: not self.track.finished)
    @rule(event=st.sampled_from([M.CmdStart(), M.CmdStop(), M.HkdStop(), M.Expired(soft=1)]))
    def a_command(self, event):
        self._send(event)

    @precondition(lambda self: not self.track.finished)
    @rule(event=st.sampled_from([M.HkdKill(), M.RowLost(), M.VmaFailed(1, 1), M.VmaFailed(5, 60)]))
    def something_goes_wrong(self, event):
        self._send(event)

    @precondition(lambda self: self.track.finished)
    @rule(event=st.sampled_from([M.CmdStart(), M.CmdStop(), M.HkdKill(), M.RowLost(), M.VmaAlive(), M.VmExited(),
                                 M.Timeout("zombie.reap")]))
    def after_the_end(self, event):
        assert self._send(event) == []

    @precondition(lambda self: self.track.launched and not self.track.exited)
    @rule()
    def the_vm_exits(self):
        self.track.exited = True
        self._send(M.VmExited())

    @precondition(lambda self: self.track.timer is not None)
    @rule()
    def the_timer_fires(self):
        name, self.track.timer = self.track.timer, None
        self._send(M.Timeout(name))

    @rule(name=st.sampled_from(["stopping.shutdown", "stopping.stop", "zombie.reap", "zombie.delaying"]))
    def a_stale_timer_changes_nothing(self, name):
        if name == self.track.timer:
            return
        state = self.m.state
        assert self._send(M.Timeout(name)) == [] and self.m.state == state

    @precondition(lambda self: self.m._serial > 0)
    @rule(ok=st.booleans())
    def a_stale_outcome_changes_nothing(self, ok):
        serial = self.m._serial - (1 if self.track.step is None else 2)
        if serial <= 0:
            return
        state = self.m.state
        event = M.StepDone(serial) if ok else M.StepFailed(serial, "late")
        self.events.append(event)
        assert self.m.handle(event) == [] and self.m.state == state

    @invariant()
    def never_started_twice(self):
        assert self.track.starts <= 1

    @invariant()
    def the_step_in_flight_is_the_machines(self):
        in_flight = self.m.in_flight[1] if self.m.in_flight else None
        assert in_flight == self.track.step

    @invariant()
    def finished_leaves_no_timer_and_no_monitor(self):
        if self.track.finished:
            assert self.track.timer is None and not self.track.monitoring and self.m.state == "stopped"

    @invariant()
    def something_will_move_a_live_machine(self):
        """Never stuck: a step in flight, a timer armed, the VMA watched, or the VM's exit awaited."""
        t = self.track
        if not t.finished and self.m.state != "new":
            assert t.step is not None or t.timer is not None or t.monitoring or self.m.pending \
                or (t.launched and not t.exited), self.m.state

    @invariant()
    def a_launched_vm_is_cleaned_up_before_the_end(self):
        t = self.track
        if t.finished and t.launched:
            assert t.cleaned_after_launch or t.gave_up or lost_path_tried(t)

    def teardown(self):
        if not hasattr(self, "m"):
            return
        end = drive_to_the_end(self.events)
        if end.launched:
            assert end.cleaned_after_launch or end.gave_up or lost_path_tried(end), \
                "a stop left a launched VM without its cleanup"


TestVmMachineRuns = VmMachineRuns.TestCase
TestVmMachineRuns.settings = STATEFUL


# --- the host machine ----------------------------------------------------------------------
class HostMachineRuns(RuleBasedStateMachine):
    @initialize()
    def begin(self):
        self.m = H.HostMachine(stopping_vms_timeout=300, killing_retry_timeout=100)
        self.actions = []
        self.step = None
        self.done = False
        self._send(H.Run())

    def _send(self, event):
        out = self.m.handle(event)
        if self.done:
            assert out == [], f"{out} after the end"
        for a in out:
            self.actions.append(a)
            if isinstance(a, H.Step):
                assert self.step is None, f"{a} while {self.step} is in flight"
                self.step = a.name
            if isinstance(a, H.Stopped) or (isinstance(a, H.Fail) and self.m.state == "failed"):
                self.done = True
        return out

    @precondition(lambda self: self.step is not None)
    @rule(roll=st.integers(0, 9))
    def step_outcome(self, roll):
        """Mostly done, one time in ten failed: runs get through the start to Ready."""
        name, self.step = self.step, None
        self._send(H.StepDone(name) if roll else H.StepFailed(name, "boom"))

    @rule(event=st.sampled_from([H.CmdStop(), H.TickerDead(), H.AllVmsStopped(), H.Timeout("stopping.vms"),
                                 H.Timeout("killing.vms.retry"), H.Run()]))
    def something_happens(self, event):
        self._send(event)

    @rule(name=st.sampled_from(list(H.CHECKS + H.SETUP + H.RUNNING + H.STOPPING + H.FINAL)))
    def a_stale_outcome_changes_nothing(self, name):
        if name == self.step:
            return
        state = self.m.state
        assert self.m.handle(H.StepDone(name)) == [] and self.m.state == state

    def kinds(self, cls):
        return [a for a in self.actions if isinstance(a, cls)]

    @invariant()
    def at_most_one_ready_one_fail_one_stopped(self):
        assert len(self.kinds(H.Ready)) <= 1 and len(self.kinds(H.Fail)) <= 1 and len(self.kinds(H.Stopped)) <= 1

    @invariant()
    def ready_only_after_every_start_step_in_order(self):
        if self.kinds(H.Ready):
            steps = [a.name for a in self.actions[:self.actions.index(self.kinds(H.Ready)[0])] if isinstance(a, H.Step)]
            assert steps == list(H.CHECKS + H.SETUP + H.RUNNING)

    @invariant()
    def a_failed_start_wrote_nothing(self):
        if self.m.state == "failed":
            assert "save_starting" not in [a.name for a in self.kinds(H.Step)]

    @invariant()
    def stopped_only_after_the_vms_were_told_to_stop(self):
        if self.kinds(H.Stopped):
            assert self.kinds(H.StopAllVms) and self.actions.index(self.kinds(H.StopAllVms)[0]) < \
                self.actions.index(self.kinds(H.Stopped)[0])

    @invariant()
    def timers_only_while_the_vms_stop(self):
        for a in self.kinds(H.ArmTimer):
            assert a.name in ("stopping.vms", "killing.vms.retry")
        if self.kinds(H.ArmTimer):
            assert self.kinds(H.StopAllVms)

    @invariant()
    def the_step_in_flight_is_the_machines(self):
        assert self.m.in_flight == self.step

    def teardown(self):
        """From wherever the run stopped, a stop command ends the machine (or it had failed
        before writing anything)."""
        if not hasattr(self, "m"):
            return
        for _ in range(100):
            if self.done:
                return
            if self.step is not None:
                name, self.step = self.step, None
                self._send(H.StepDone(name))
            elif self.m.state == "stopping" and self.m.phase == "vms":
                self._send(H.AllVmsStopped())
            else:
                self._send(H.CmdStop())
        raise AssertionError(f"the host machine never ended: {self.m.state}/{self.m.phase}")


TestHostMachineRuns = HostMachineRuns.TestCase
TestHostMachineRuns.settings = STATEFUL
