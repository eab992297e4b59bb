"""The VM state machine without I/O: events in, actions out (docs/hkd.md#vm-state-machine)."""
from qvd_gevent.hkd import vm_machine as M
from qvd_gevent.hkd.vm_machine import (
    AcquireHeavy,
    Adopt,
    ArmTimer,
    CatchZombie,
    Cleanup,
    ClearRuntimeRow,
    CmdStart,
    CmdStop,
    Expired,
    ExpireVma,
    Finished,
    HkdKill,
    HkdStop,
    Kill,
    Poweroff,
    Prepare,
    RowLost,
    Shutdown,
    StartMonitor,
    StartVm,
    StepDone,
    StepFailed,
    StopMonitor,
    Timeout,
    VmaAlive,
    VmaFailed,
    VmExited,
    VmMachine,
    WatchExit,
    WriteState,
)


class Play:
    """Drive a machine; `ok()` completes the step in flight; records every action."""

    def __init__(self, **settings):
        s = M.Settings()
        for k, v in settings.items():
            setattr(s, k, v)
        self.m = VmMachine(42, s)
        self.actions = []

    def send(self, event):
        out = self.m.handle(event)
        self.actions.extend(out)
        return out

    def step(self):
        return self.m.in_flight[1] if self.m.in_flight else None

    def ok(self, result=None):
        return self.send(StepDone(self.m.in_flight[0], result))

    def fail(self, reason="boom"):
        return self.send(StepFailed(self.m.in_flight[0], reason))

    def run_steps(self, n=50):
        """Complete every step until none is in flight; returns the steps' types."""
        done = []
        for _ in range(n):
            if self.m.in_flight is None:
                break
            done.append(type(self.step()))
            self.ok()
        return done

    def written_states(self):
        return [a.state for a in self.actions if isinstance(a, WriteState)]


def start_to_running(p):
    p.send(CmdStart())
    assert p.run_steps() == [Prepare, AcquireHeavy, StartVm]
    assert p.m.state == "starting.waiting_for_vma"
    p.send(VmaAlive())
    assert p.run_steps() == [WriteState]
    assert p.m.state == "running.monitoring"


def test_normal_lifecycle_writes_running_stopping_and_clears_row():
    p = Play()
    start_to_running(p)
    assert any(isinstance(a, WatchExit) for a in p.actions)
    assert StartMonitor("starting") in p.actions and StartMonitor("running") in p.actions
    assert p.actions[[type(a) for a in p.actions].index(WriteState)].run_ok is True
    p.send(CmdStop())
    assert StopMonitor() in p.actions
    assert p.run_steps() == [WriteState, Poweroff]
    assert p.actions[-1] == ArmTimer("stopping.shutdown", 180)
    out = p.send(VmExited())
    assert any(isinstance(a, M.CancelTimer) for a in out)
    assert p.run_steps() == [Cleanup, ClearRuntimeRow]
    assert p.m.state == "stopped" and isinstance(p.actions[-1], Finished)
    assert p.written_states() == ["running", "stopping"]


def test_running_only_when_vma_answers():
    p = Play()
    p.send(CmdStart())
    p.run_steps()
    for i in range(1, 5):
        p.send(VmaFailed(i, i * 0.5))
    assert p.m.state == "starting.waiting_for_vma"
    assert p.written_states() == []


def test_poweroff_timeout_escalates_to_term_then_kill_then_zombie():
    p = Play()
    start_to_running(p)
    p.send(CmdStop())
    p.run_steps()
    p.send(Timeout("stopping.shutdown"))
    assert p.run_steps() == [Shutdown]
    assert p.actions[-1] == ArmTimer("stopping.stop", 180)
    p.send(Timeout("stopping.stop"))
    assert p.run_steps() == [Kill]
    assert p.actions[-1] == ArmTimer("zombie.reap", 120)
    p.send(Timeout("zombie.reap"))
    assert p.run_steps() == [WriteState, Kill, Cleanup, ClearRuntimeRow]
    assert p.written_states() == ["running", "stopping", "zombie"]
    assert p.m.state == "stopped"


def test_stale_timer_is_ignored():
    p = Play()
    start_to_running(p)
    p.send(CmdStop())
    p.run_steps()
    p.send(VmExited())          # leaves the shutdown wait
    assert p.send(Timeout("stopping.shutdown")) == []


def test_stop_during_starting_before_launch_clears_row_without_launching():
    p = Play()
    p.send(CmdStart())
    assert isinstance(p.step(), Prepare)
    assert p.send(CmdStop()) == []              # delayed while the step runs
    out = p.ok()                                # Prepare done: the wait for heavy is abandoned
    assert any(isinstance(a, AcquireHeavy) for a in out) and any(isinstance(a, M.CancelStep) for a in out)
    assert isinstance(p.step(), ClearRuntimeRow)
    assert StartVm not in [type(a) for a in p.actions]
    p.ok()
    assert p.m.state == "stopped"
    assert p.written_states() == []             # as the original: starting -> stopped, no 'stopping'


def test_stop_during_launch_is_delayed_then_graceful():
    p = Play()
    p.send(CmdStart())
    p.ok()
    p.ok()
    assert isinstance(p.step(), StartVm)
    p.send(CmdStop())
    p.ok()                                      # launched; the delayed stop fires now
    assert p.m.state.startswith("stopping.shutdown")
    assert p.run_steps() == [WriteState, Poweroff]


def test_hkd_stop_during_start_aborts_it():
    p = Play()
    p.send(CmdStart())
    p.send(HkdStop())
    assert p.run_steps() == [Prepare, ClearRuntimeRow]
    assert p.m.state == "stopped"


def test_hkd_kill_during_graceful_shutdown_escalates():
    p = Play()
    start_to_running(p)
    p.send(HkdStop())
    p.run_steps()
    assert p.m.state == "stopping.shutdown.waiting"
    p.send(HkdKill())
    assert p.run_steps() == [Shutdown]          # 'stopping' already written: no second write
    assert p.m.state == "stopping.stop.waiting"


def test_prepare_failure_goes_straight_to_db_cleanup():
    p = Play()
    p.send(CmdStart())
    p.fail("no DI")
    assert isinstance(p.step(), ClearRuntimeRow)
    p.ok()
    assert p.m.state == "stopped"


def test_launch_failure_cleans_up():
    p = Play()
    p.send(CmdStart())
    p.ok()
    p.ok()
    p.fail("not executable")
    assert p.run_steps() == [WriteState, Cleanup, ClearRuntimeRow]
    assert p.m.state == "stopped"


def test_dead_vma_stops_the_vm_after_both_limits():
    p = Play(max_count={"starting": 3, "running": 2}, max_time={"starting": 10, "running": 5})
    start_to_running(p)
    p.send(VmaFailed(2, 4.0))                   # count reached, time not
    assert p.m.state == "running.monitoring"
    p.send(VmaFailed(3, 6.0))
    assert p.m.state == "stopping.stop"
    assert p.run_steps() == [WriteState, Shutdown]


def test_dead_vma_while_starting_uses_starting_limits():
    p = Play(max_count={"starting": 3, "running": 1}, max_time={"starting": 10, "running": 1})
    p.send(CmdStart())
    p.run_steps()
    p.send(VmaFailed(2, 20))
    assert p.m.state == "starting.waiting_for_vma"
    p.send(VmaFailed(3, 20))
    assert p.m.state.startswith("stopping.stop")


def test_dead_vma_goes_to_debugging_with_debug_enable_and_back_to_running():
    p = Play(debug_enable=True, max_count={"starting": 1, "running": 1}, max_time={"starting": 0, "running": 0})
    p.send(CmdStart())
    p.run_steps()
    out = p.send(VmaFailed(1, 1))
    assert any(isinstance(a, M.ReleaseHeavy) for a in out)
    p.run_steps()
    assert p.m.state == "debugging"
    p.send(VmaFailed(5, 100))                   # ignored in debugging
    assert p.m.state == "debugging"
    p.send(VmaAlive())
    p.run_steps()
    assert p.m.state == "running.monitoring"
    assert p.written_states() == ["debugging", "running"]


def test_stop_in_debugging_is_a_hard_stop():
    p = Play(debug_enable=True, max_count={"starting": 1, "running": 1}, max_time={"starting": 0, "running": 0})
    p.send(CmdStart())
    p.run_steps()
    p.send(VmaFailed(1, 1))
    p.run_steps()
    p.send(CmdStop())
    assert p.run_steps() == [WriteState, Shutdown]


def test_crash_while_running_cleans_up():
    p = Play()
    start_to_running(p)
    p.send(VmExited())
    assert p.run_steps() == [WriteState, Cleanup, ClearRuntimeRow]
    assert p.written_states() == ["running", "stopping"]


def test_soft_expiration_calls_vma_and_keeps_running():
    p = Play()
    start_to_running(p)
    p.send(Expired(soft="2026-01-01 00:00:00", hard=None))
    assert isinstance(p.step(), ExpireVma) and p.step().soft == "2026-01-01 00:00:00"
    p.ok()
    assert p.m.state == "running.monitoring"
    assert p.actions[-1] == StartMonitor("running")


def test_catch_zombie_cleans_and_clears():
    p = Play()
    p.send(CatchZombie())
    assert p.run_steps() == [WriteState, Kill, Cleanup, ClearRuntimeRow]
    assert p.written_states() == ["zombie"]
    assert p.m.state == "stopped"


def test_zombie_retries_after_failure():
    p = Play()
    p.send(CatchZombie())
    p.ok()                                     # zombie written
    p.fail("cannot kill")
    assert p.actions[-1] == ArmTimer("zombie.delaying", 60)
    p.send(Timeout("zombie.delaying"))
    assert p.run_steps() == [Kill, Cleanup, ClearRuntimeRow]


def test_clear_row_failure_retries_later():
    p = Play()
    p.send(CmdStop())
    p.fail("db down")
    assert p.m.state == "zombie.delaying"
    p.send(Timeout("zombie.delaying"))
    assert p.run_steps() == [Kill, Cleanup, ClearRuntimeRow]
    assert p.m.state == "stopped"


def test_adopt_running_vm_monitors_without_writing():
    p = Play()
    out = p.send(Adopt("running"))
    assert WatchExit() in out and StartMonitor("running") in out
    assert p.m.state == "running.monitoring" and p.written_states() == []
    p.send(CmdStop())
    assert p.run_steps() == [WriteState, Poweroff]
    assert p.written_states() == ["stopping"]

def test_adopt_starting_vm_waits_for_vma():
    p = Play()
    p.send(Adopt("starting"))
    assert p.m.state == "starting.waiting_for_vma"
    p.send(VmaAlive())
    p.run_steps()
    assert p.written_states() == ["running"]


def test_row_lost_kills_without_touching_the_row():
    p = Play()
    start_to_running(p)
    p.send(RowLost())
    assert p.run_steps() == [Kill, Cleanup]
    assert p.m.state == "stopped"
    assert ClearRuntimeRow not in [type(a) for a in p.actions]
    assert p.written_states() == ["running"]


def test_row_lost_while_a_step_is_in_flight_is_delayed():
    p = Play()
    p.send(CmdStart())
    p.send(RowLost())
    p.ok()
    assert p.m.state == "lost"


def test_start_for_an_existing_handler_is_ignored():
    p = Play()
    start_to_running(p)
    assert p.send(CmdStart()) == []


def test_every_state_change_is_logged_once():
    p = Play()
    start_to_running(p)
    logs = [a.text for a in p.actions if isinstance(a, M.Log)]
    assert logs == ["VM 42: new -> starting", "VM 42: starting -> running"]


def test_settings_from_config_prefers_hypervisor_specific_key(tmp_path):
    from qvd_gevent.config import Config
    conf = tmp_path / "node.conf"
    conf.write_text("nodename = n\ninternal.hkd.timeout.on_state.stopping.stop = 7\n"
                    "internal.hkd.kvm.timeout.on_state.stopping.stop = 9\n"
                    "internal.hkd.vmhandler.vma.failed.max_count.on.running = 4\n")
    cfg = Config.load(str(conf))
    assert M.settings_from_config(cfg, "process").timeouts["stopping.stop"] == 7
    kvm = M.settings_from_config(cfg, "kvm")
    assert kvm.timeouts["stopping.stop"] == 9 and kvm.max_count["running"] == 4
    assert kvm.timeouts["stopping.shutdown"] == 180


def test_stop_while_waiting_for_the_heavy_semaphore_ends_the_start_at_once():
    p = Play()
    p.send(CmdStart())
    p.ok()
    assert isinstance(p.step(), AcquireHeavy)
    serial = p.m.in_flight[0]
    out = p.send(CmdStop())
    assert M.CancelStep(serial) in out and M.ReleaseHeavy() in out
    assert isinstance(p.step(), ClearRuntimeRow)
    assert p.send(StepDone(serial)) == []       # the abandoned wait's outcome is stale
    p.ok()
    assert p.m.state == "stopped" and StartVm not in [type(a) for a in p.actions]
