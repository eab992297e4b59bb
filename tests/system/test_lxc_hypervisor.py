"""The `lxc` hypervisor: its whole code path on libvirt's test driver, and a real container where libvirt can.

On our CI machines libvirt's lxc driver cannot start a container (docs/kvm-lxc-notes.md#lxc: the host's
hybrid cgroup v1+v2 layout; libvirt fails to mount the container's cgroup tree).
test_real_container_in_a_test_namespace tries anyway, inside a test namespace with a
private libvirtd (helpers/private_libvirtd.py, same reasons as the kvm test), and skips
with libvirt's exact error when it cannot. The lifecycle itself (XML, start, list/adopt,
lifecycle events reaching the hub, shutdown, destroy, cleanup of leftovers, tarball DIs) is
covered by the other tests here through the same LxcHypervisor code on ``test:///default``.
"""
import os
import subprocess
import tarfile
import time

import gevent
import pytest
from helpers.netns import node_settings, run_driver, test_host  # noqa: F401
from helpers.private_libvirtd import PrivateLibvirtd

from qvd_gevent.config import Config
from qvd_gevent.config.network import mac_for_ip
from qvd_gevent.hypervisors.base import HypervisorError, VmSpec


def _require_libvirt():
    try:
        import libvirt  # noqa: F401
    except ImportError:
        reason = "libvirt-python is not installed (scripts/install-test-deps.sh installs it)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)


@pytest.fixture
def test_lxc(tmp_path):
    _require_libvirt()
    from qvd_gevent.hypervisors.lxc import LxcHypervisor
    cfg = Config({"vm.libvirt.uri.lxc": "test:///default", "path.storage.root": str(tmp_path / "storage"),
                  "internal.hkd.libvirt.state_check.interval": "30"})
    hv = LxcHypervisor(cfg)
    hv.check()
    yield hv
    for handle in hv.list_running().values():       # leave the shared test driver as we found it
        hv.kill(handle)
        hv.cleanup(handle)
    hv.close()


def _rootfs(tmp_path, name="rootfs"):
    root = tmp_path / name
    (root / "sbin").mkdir(parents=True)
    (root / "sbin" / "init").write_text("#!/bin/sh\nexec sleep 3600\n")
    (root / "sbin" / "init").chmod(0o755)
    return root


def _spec(vm_id, di_path, use_overlay=False):
    ip = f"10.0.0.{100 + vm_id}"
    return VmSpec(vm_id=vm_id, name=f"c{vm_id}", ip=ip, mac=mac_for_ip(ip), memory=128, di_id=3,
                  di_path=str(di_path), use_overlay=use_overlay)


def test_start_list_events_kill_and_cleanup_on_the_test_driver(test_lxc, tmp_path):
    hv = test_lxc
    events = []
    hv.connection.subscribe(lambda name, event, detail: events.append((name, event)))
    rootfs = _rootfs(tmp_path)
    spec = _spec(31, rootfs)
    handle = hv.start(spec)
    assert (handle.name, handle.address) == ("qvd-31", "10.0.0.131")
    assert hv.is_running(handle)
    listed = hv.list_running()
    assert list(listed) == [31]                     # the driver's own domain "test" is not ours
    assert listed[31].address == "10.0.0.131" and listed[31].extra["rootfs"] == str(rootfs)
    with pytest.raises(HypervisorError, match="already runs"):
        hv.start(spec)
    # the state check runs every 30 s here: returning within 5 s proves the lifecycle event
    # went native thread -> queue -> hub -> waiter
    gevent.spawn_later(0.2, hv.kill, handle)
    started = time.monotonic()
    assert hv.wait_exit(handle, timeout=10)
    assert time.monotonic() - started < 5
    assert ("qvd-31", "STARTED") in events and ("qvd-31", "STOPPED") in events
    hv.cleanup(handle)
    hv.cleanup(handle)                              # idempotent
    assert hv.list_running() == {} and hv.connection.lookup("qvd-31") is None


def test_shutdown_and_a_leftover_definition(test_lxc, tmp_path):
    hv = test_lxc
    spec = _spec(32, _rootfs(tmp_path))
    handle = hv.start(spec)
    hv.shutdown(handle)
    assert hv.wait_exit(handle, timeout=10) and not hv.is_running(handle)
    hv.cleanup(handle)
    # a persistent definition of that name left by someone else is replaced, then gone
    conn = hv.connection
    conn.call(conn.conn.defineXML, hv.domain_xml(spec, {"rootfs": spec.di_path}))
    assert conn.lookup("qvd-32") is not None
    handle = hv.start(spec)
    assert hv.is_running(handle)
    hv.kill(handle)
    assert hv.wait_exit(handle, timeout=10)
    hv.cleanup(handle)
    assert conn.lookup("qvd-32") is None
    assert not hv.wait_exit(hv.start(spec), timeout=0.5)       # a running one times out: False


def test_tarball_image_is_unpacked_once_into_basefs(test_lxc, tmp_path):
    hv = test_lxc
    rootfs = _rootfs(tmp_path)
    tarball = tmp_path / "images" / "tiny-root.tar.gz"
    tarball.parent.mkdir()
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(rootfs, arcname=".")
    basefs = os.path.join(hv.cfg.get_str("path.storage.basefs"), "tiny-root")
    first = hv.start(_spec(33, tarball))
    assert first.extra["rootfs"] == basefs and os.path.isfile(os.path.join(basefs, "sbin", "init"))
    marker = os.path.join(basefs, "unpacked-once")
    open(marker, "w").close()
    second = hv.start(_spec(34, tarball))
    assert second.extra["rootfs"] == basefs and os.path.exists(marker)   # not unpacked again
    assert sorted(hv.list_running()) == [33, 34]
    with pytest.raises(HypervisorError, match="neither a directory nor a file"):
        hv.start(_spec(35, tmp_path / "missing.tar.gz"))
    assert hv.connection.lookup("qvd-35") is None


REAL_CONTAINER_DRIVER = """
from qvd_gevent.hypervisors.lxc import LxcHypervisor
from qvd_gevent.vma.client import VmaClient, VmaError
setup = NetworkSetup(cfg)
setup.apply()
dns = DnsmasqSupervisor(cfg).start()
assert dns.wait_started(10), "dnsmasq did not start"
hv = LxcHypervisor(cfg)
hv.check()
spec = vm_spec(8, "10.77.0.108")
spec.use_overlay = True
dns.add_host(spec.mac, spec.ip)
out = {}
try:
    h = hv.start(spec)
except Exception as exc:
    out["error"] = str(exc)
else:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            VmaClient(h.address, 3030, timeout=2).ping()
            out["ping"] = True
            break
        except VmaError:
            gevent.sleep(0.5)
    out["running"] = hv.is_running(h)
    hv.shutdown(h)
    out["exited"] = hv.wait_exit(h, timeout=20)
    if not out["exited"]:
        hv.kill(h)
        hv.wait_exit(h, timeout=20)
    hv.cleanup(h)
    out["rootfs_mounted_after"] = os.path.ismount(h.extra["rootfs"])
    out["domains_after"] = hv.connection.domain_names("qvd-", active_only=False)
hv.close()
dns.stop()
setup.remove()
report(out)
"""


KNOWN_LXC_HOST_FAULT = "Unable to create directory /sys/fs/cgroup/unified"


@pytest.mark.root
def test_real_container_in_a_test_namespace(test_host, tmp_path, request):  # noqa: F811
    _require_libvirt()
    root = tmp_path / "image"
    for folder in ("bin", "sbin", "proc", "sys", "dev", "tmp", "www/vma"):
        (root / folder).mkdir(parents=True)
    subprocess.run(["cp", "/bin/busybox", str(root / "bin" / "busybox")], check=True)
    (root / "www" / "vma" / "ping").write_text("1\n")
    (root / "sbin" / "init").write_text(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin\n"
        "printf '#!/bin/sh\\n[ \"$1\" = bound ] && ip addr add $ip/16 dev $interface\\nexit 0\\n' > /tmp/s\n"
        "chmod +x /tmp/s\nip link set eth0 up\nudhcpc -i eth0 -s /tmp/s -q -t 20 -T 1\n"
        "exec httpd -f -p 3030 -h /www\n")
    (root / "sbin" / "init").chmod(0o755)
    libvirtd = PrivateLibvirtd(test_host.name, tmp_path / "libvirtd").start()
    request.addfinalizer(libvirtd.stop)
    settings = node_settings(test_host, tmp_path, **{
        "vm.hypervisor": "lxc", "vm.libvirt.uri.lxc": libvirtd.uri("lxc"),
        "path.storage.root": str(tmp_path / "storage"), "internal.hkd.libvirt.state_check.interval": 2})
    result, _ = run_driver(test_host, tmp_path, REAL_CONTAINER_DRIVER, settings=settings, timeout=120, di=str(root))
    libvirtd.stop()
    if "error" in result:
        # only the known machine fault (docs/kvm-lxc-notes.md: a hybrid cgroup layout where
        # libvirt_lxc cannot make /sys/fs/cgroup/unified) is a skip; any other failure is ours
        assert KNOWN_LXC_HOST_FAULT in result["error"], f"the container did not start: {result['error']}"
        reason = f"libvirt's lxc driver cannot start a container on this machine: {result['error']}"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    assert result["ping"] and result["running"] and result["exited"]
    assert not result["rootfs_mounted_after"] and result["domains_after"] == []
