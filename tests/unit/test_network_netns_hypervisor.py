"""Pure parts of the netns hypervisor: names, lease parsing, the not-root message."""
import pytest

from qvd_gevent.config import Config
from qvd_gevent.hypervisors import get_hypervisor
from qvd_gevent.hypervisors.base import HypervisorError
from qvd_gevent.hypervisors.netns import NetnsHypervisor, _parse_lease


def test_names_follow_the_prefix():
    hv = get_hypervisor("netns", Config({"vm.network.netns.prefix": "qvd"}))
    assert isinstance(hv, NetnsHypervisor) and hv.uses_bridge and hv.needs_root
    assert hv.netns_name(42) == "qvd-vm42"
    assert hv.veth_name(42) == "qvdv42"
    assert hv._name_re.match("qvd-vm42").group(1) == "42"
    assert not hv._name_re.match("qvd-vm42x") and not hv._name_re.match("qvdx-vm42")


def test_lease_line_from_the_udhcpc_script():
    out = b"udhcpc: started, v1.35.0\nqvd-lease 10.77.0.107\n"
    assert _parse_lease(out) == "10.77.0.107"
    assert _parse_lease(b"udhcpc: no lease, failing\n") is None


def test_check_says_it_needs_root(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(HypervisorError, match="^the netns hypervisor needs root"):
        NetnsHypervisor(Config({})).check()


def test_check_rejects_a_prefix_too_long_for_interface_names(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 0)
    with pytest.raises(HypervisorError, match="must be 1-8 letters/digits"):
        NetnsHypervisor(Config({"vm.network.netns.prefix": "muchtoolong"})).check()



def test_check_wants_the_bridge_unless_setup_makes_it(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 0)
    settings = {"vm.network.bridge": "qvdnobridge9", "vm.network.netns.udhcpc": "busybox udhcpc"}
    with pytest.raises(HypervisorError, match="^bridge qvdnobridge9 .* does not exist"):
        NetnsHypervisor(Config(settings)).check()
    NetnsHypervisor(Config(dict(settings, **{"vm.network.setup": "1"}))).check()


def test_spawned_children_report_output_exit_codes_and_timeouts():
    import os
    import subprocess
    import time

    from qvd_gevent.system.spawn import SpawnedChild, run_collect
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    code, out = run_collect(["sh", "-c", "echo out; echo err >&2; exit 3"], env, 10)
    assert (code, out) == (3, b"out\nerr\n")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_collect(["sleep", "30"], env, 0.3)
    assert time.monotonic() - started < 5
    child = SpawnedChild(["sleep", "30"], env, setsid=True)
    assert child.poll() is None and not child.exited
    assert os.getsid(child.pid) == child.pid            # its own session: the tree can be signalled
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0.1)
    child.kill()
    assert child.wait(5) == -9 and child.exited
