"""The host lifecycle without I/O (docs/hkd.md#host-state-machine)."""
from qvd_gevent.hkd import host_machine as H
from qvd_gevent.hkd.host_machine import (
    AllVmsStopped,
    ArmTimer,
    CmdStop,
    Fail,
    HostMachine,
    KillAllVms,
    Ready,
    Run,
    Step,
    StepDone,
    StepFailed,
    StopAllVms,
    Stopped,
    TickerDead,
    Timeout,
)


def steps(actions):
    return [a.name for a in actions if isinstance(a, Step)]


def drive(m, until=None, fail=None):
    """Complete steps in order; optionally fail the one named `fail`. Returns all actions."""
    out = []
    for _ in range(50):
        if m.in_flight is None or m.in_flight == until:
            break
        name = m.in_flight
        out += m.handle(StepFailed(name, f"{name} broke") if name == fail else StepDone(name))
    return out


def started():
    m = HostMachine(stopping_vms_timeout=300, killing_retry_timeout=100)
    out = m.handle(Run()) + drive(m)
    return m, out


def test_startup_sequence_then_ready():
    m, out = started()
    assert steps(out) == list(H.CHECKS + H.SETUP + H.RUNNING)
    assert out[-1] == Ready() and m.state == "running"


def test_check_failure_ends_start_without_writing():
    m = HostMachine()
    out = m.handle(Run()) + drive(m, fail="load_host")
    assert Fail("load_host broke") in out
    assert m.state == "failed"
    assert "save_starting" not in steps(out)


def test_setup_failure_goes_through_stopping_to_stopped():
    m = HostMachine()
    out = m.handle(Run()) + drive(m, fail="reconcile")
    assert Fail("reconcile broke") in out
    assert steps(out)[-2:] == ["stop_vm_intake", "save_stopping"]
    assert out[-2:] == [StopAllVms(), ArmTimer("stopping.vms", 300)]
    out = m.handle(AllVmsStopped()) + drive(m)
    assert steps(out) == ["stop_agents", "save_stopped"]
    assert out[-1] == Stopped() and m.state == "stopped"


def test_stop_command_while_running_stops_vms_then_agents():
    m, _ = started()
    out = m.handle(CmdStop()) + drive(m)
    assert steps(out) == ["stop_vm_intake", "save_stopping"]
    assert StopAllVms() in out
    assert m.handle(CmdStop()) == []            # a second stop changes nothing
    out = m.handle(AllVmsStopped()) + drive(m)
    assert steps(out) == ["stop_agents", "save_stopped"] and out[-1] == Stopped()


def test_vms_not_stopping_in_time_are_killed_repeatedly():
    m, _ = started()
    m.handle(CmdStop())
    drive(m)
    out = m.handle(Timeout("stopping.vms"))
    assert out[-2:] == [KillAllVms(), ArmTimer("killing.vms.retry", 100)]
    out = m.handle(Timeout("killing.vms.retry"))
    assert out == [KillAllVms(), ArmTimer("killing.vms.retry", 100)]
    assert steps(m.handle(AllVmsStopped())) == ["stop_agents"]


def test_stop_during_checks_fails_the_start():
    m = HostMachine()
    m.handle(Run())
    assert m.handle(CmdStop("SIGTERM")) == []   # waits for the step in flight
    out = m.handle(StepDone("check_schema"))
    assert Fail("stopped before start: SIGTERM") in out and m.state == "failed"


def test_stop_during_setup_goes_to_stopping_after_the_step():
    m = HostMachine()
    m.handle(Run())
    drive(m, until="reset_sessions")
    m.handle(CmdStop("SIGTERM"))
    out = m.handle(StepDone("reset_sessions"))
    assert m.state == "stopping" and Fail("SIGTERM") in out
    assert steps(out) == ["stop_vm_intake"]


def test_lost_heartbeat_stops_the_host():
    m, _ = started()
    out = m.handle(TickerDead())
    assert m.state == "stopping" and steps(out) == ["stop_vm_intake"]


def test_failures_while_stopping_are_logged_and_skipped():
    m, _ = started()
    m.handle(CmdStop())
    out = m.handle(StepFailed("stop_vm_intake", "x"))
    assert steps(out) == ["save_stopping"]


def test_stale_step_outcomes_are_ignored():
    m, _ = started()
    assert m.handle(StepDone("check_schema")) == []
