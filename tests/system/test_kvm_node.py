"""The whole HKD with the `kvm` hypervisor: `qvd-admin vm start` boots a TCG guest to `running`, `vm stop` ends it.

Network safety as in test_kvm_guest.py: the node runs inside a test namespace (bridge with
the 10.77.0.1 gateway, dnsmasq, all made there by vm.network.setup) and talks to a private
libvirtd running in that namespace (helpers/private_libvirtd.py), so the guest's tap and its
10.77.0.x address never exist in the machine's network namespace. PostgreSQL is reached
through the embedded server's unix socket. The guest is helpers/tiny_guest.py: it takes its
address from the node's dnsmasq by MAC and answers the VMA ping, which is what makes the
HKD write `running`; its VMA has no `poweroff`, so the stop goes the original's way to the
hypervisor's graceful shutdown (ACPI power button), and the guest powers off.
"""
import io
import json
import os
import shutil
import signal
import subprocess
import time

import gevent
import pytest
from helpers.hkd_env import add_host, add_vms, vm_row, wait_vm_state
from helpers.netns import VM_NET, node_settings, processes_mentioning, test_host, vma_status  # noqa: F401
from helpers.nodes import HkdProcess
from helpers.private_libvirtd import PrivateLibvirtd

from qvd_gevent.db import runtime

pytestmark = [pytest.mark.root, pytest.mark.slow]

BOOT_TIMEOUT = 120

def _admin(conf, *argv):
    from qvd_gevent.admin.cli import run
    out, err = io.StringIO(), io.StringIO()
    rc = run(["--config", str(conf), *argv], out, err, io.StringIO(""))
    assert rc == 0, (rc, out.getvalue(), err.getvalue())
    return out.getvalue()


class KvmNode:
    """A node.conf, a database with one kvm VM (10.77.0.150) and a private libvirtd, for one test."""

    def __init__(self, test_host, tmp_path, pg_server, fresh_db_name, request):  # noqa: F811
        from helpers.database import TEST_ROLE, TEST_ROLE_PASSWORD
        from helpers.tiny_guest import build_tiny_guest

        from qvd_gevent.config import Config
        from qvd_gevent.db import Database

        self.host, self.tmp_path = test_host, tmp_path
        guest = build_tiny_guest()
        image = tmp_path / "images" / "blank.img"
        image.parent.mkdir()
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "16M"], check=True, timeout=30)
        self.libvirtd = PrivateLibvirtd(test_host.name, tmp_path / "libvirtd").start()
        request.addfinalizer(self.libvirtd.stop)
        values = node_settings(test_host, tmp_path, **{
            "vm.hypervisor": "kvm",
            "vm.libvirt.uri.kvm": self.libvirtd.uri("qemu"),
            "vm.kvm.cpus": 1,
            "vm.kvm.kernel": guest.kernel, "vm.kvm.initrd": guest.initrd, "vm.kvm.cmdline": guest.cmdline,
            "path.storage.root": str(tmp_path / "storage"),
            "path.storage.images": str(image.parent),
            "path.serial.captures": str(tmp_path / "serial"),
            "internal.hkd.libvirt.state_check.interval": 2,
            "internal.hkd.vmhandler.vma_monitor.delay.starting": 0.5,
            "internal.hkd.agent.vm_command_handler.delay": 2,
            "internal.hkd.timeout.on_state.stopping.shutdown": 30,
            "internal.hkd.timeout.on_state.stopping.stop": 10,
            "internal.hkd.stopping.vms.timeout": 30,
        })
        values.update({
            "database.host": str(pg_server.embedded.directory), "database.port": pg_server.port,
            "database.name": fresh_db_name, "database.user": TEST_ROLE, "database.password": TEST_ROLE_PASSWORD,
        })
        self.conf = tmp_path / "node.conf"
        self.conf.write_text("".join(f"{k} = {v}\n" for k, v in values.items()))
        self.db = Database.from_config(Config.load(str(self.conf)))
        request.addfinalizer(self.db.close)
        self.host_id = add_host(self.db, "test-node", f"{VM_NET}.0.1")
        (self.vm_id,) = add_vms(self.db, di_path=image.name)   # relative to path.storage.images, as QVD stores it
        self.db.execute("UPDATE vms SET ip = %s WHERE id = %s", (f"{VM_NET}.0.150", self.vm_id))
        self.hkd = HkdProcess(self.conf, tmp_path / "hkd.log", host=test_host)

    def start_node(self):
        """The HKD inside the test namespace, once it runs."""
        return self.hkd.start()

    def serial(self):
        return (self.tmp_path / "serial" / f"qvd-{self.vm_id}-serial.txt").read_text(errors="replace")

    def domains(self, all_=False):
        argv = ["virsh", "-c", self.libvirtd.uri("qemu"), "list", "--name"] + (["--all"] if all_ else [])
        return self.host.run(argv, check=True).stdout.split()


@pytest.fixture
def kvm_node(test_host, tmp_path, pg_server, fresh_db_name, request):  # noqa: F811
    if pg_server.embedded is None:
        pytest.skip("needs the embedded PostgreSQL (its unix socket reaches into the test namespace)")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        reason = "libvirt-python is not installed (scripts/install-test-deps.sh installs it)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    if shutil.which("qemu-system-x86_64") is None:
        reason = "qemu-system-x86_64 is not installed (package qemu-system-x86)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    node = KvmNode(test_host, tmp_path, pg_server, fresh_db_name, request)
    yield node
    node.hkd.cleanup()


def _finish(node, bridge_made_by_this_node=True):
    assert node.hkd.terminate(90) == 0
    # vm.network.setup removes exactly what it made: a node that found the bridge leaves it
    assert ("qvdbr0" in node.host.links()) != bridge_made_by_this_node
    assert vm_row(node.db, node.vm_id)["vm_state"] == "stopped"
    assert node.db.query_one("SELECT state FROM host_runtimes WHERE host_id = %s", (node.host_id,))[0] == "stopped"
    node.libvirtd.stop()
    assert processes_mentioning(json.dumps(str(node.tmp_path)).strip('"')) == []
    overlays = node.tmp_path / "storage" / "overlays"
    assert not overlays.exists() or os.listdir(overlays) == []


def test_admin_vm_start_boots_a_kvm_guest_to_running_and_vm_stop_leaves_nothing(kvm_node):
    node = kvm_node
    node.start_node()
    started = time.monotonic()
    assert _admin(node.conf, "vm", "start", "-f", f"id={node.vm_id}") == "Started 1 VMs.\n"
    row = wait_vm_state(node.db, node.vm_id, "running", timeout=BOOT_TIMEOUT)
    print(f"ADMIN-START-TO-RUNNING-SECONDS {time.monotonic() - started:.1f}")
    assert row["vm_address"] == f"{VM_NET}.0.150" and row["host_id"] == node.host_id
    assert f"QVD-GUEST-LEASE {VM_NET}.0.150" in node.serial()          # leased from the node's dnsmasq
    # the guest got this start's key through fw_cfg, and the HKD's pings carried it
    assert "QVD-GUEST-KEY yes" in node.serial()
    key = runtime.vm_agent_key(node.db, node.vm_id)
    assert vma_status(node.host.run, f"{VM_NET}.0.150", key=key) == 200
    assert vma_status(node.host.run, f"{VM_NET}.0.150") == 401
    assert node.domains() == [f"qvd-{node.vm_id}"]
    tap = f"{node.host.vm_prefix}v{node.vm_id}"                       # named for the VM network filter
    assert tap in node.host.run(["ip", "-o", "link", "show", "master", "qvdbr0"], check=True).stdout
    assert f'"{tap}" . 54:52:00:4d:00:96 . {VM_NET}.0.150' in node.host.run(
        ["nft", "list", "set", "bridge", "qvd", "vm_addresses"], check=True).stdout

    _admin(node.conf, "vm", "stop", "-f", f"id={node.vm_id}")
    row = wait_vm_state(node.db, node.vm_id, "stopped", timeout=60)
    assert row["host_id"] is None and row["vm_address"] is None
    assert "QVD-GUEST-POWEROFF" in node.serial()                       # stopped by ACPI, not destroyed
    assert node.domains(all_=True) == []
    _finish(node)


def test_node_killed_with_sigkill_adopts_its_running_guest_on_restart(kvm_node):
    """The guest outlives its node (it belongs to libvirtd); the restarted node finds it by its domain
    name and metadata, keeps it running (no second boot) and can stop it."""
    node = kvm_node
    node.start_node()
    _admin(node.conf, "vm", "start", "-f", f"id={node.vm_id}")
    wait_vm_state(node.db, node.vm_id, "running", timeout=BOOT_TIMEOUT)
    boots = node.serial().count("QVD-GUEST-LEASE")
    # the whole node dies at once: its process and its dnsmasq child
    victims = [pid for pid, cmd in processes_mentioning(f"qvd_gevent.node.hkd_only --config {node.conf}")
               if "python" in cmd]
    dnsmasq_pid = int((node.tmp_path / "run" / "dnsmasq.pid").read_text())
    assert len(victims) == 1
    for pid in victims + [dnsmasq_pid]:
        os.kill(pid, signal.SIGKILL)
    assert node.hkd.proc.wait(30) == -signal.SIGKILL                  # the node died at once
    assert node.domains() == [f"qvd-{node.vm_id}"]                     # the guest still runs

    node.start_node()
    row = vm_row(node.db, node.vm_id)
    assert row["vm_state"] == "running" and row["host_id"] == node.host_id
    gevent.sleep(3)                                                    # a few VMA health checks
    assert vm_row(node.db, node.vm_id)["vm_state"] == "running"
    assert node.serial().count("QVD-GUEST-LEASE") == boots             # adopted, not booted again
    # the lease was re-registered too, and the restarted node has the guest's key from the database
    assert vma_status(node.host.run, f"{VM_NET}.0.150", key=runtime.vm_agent_key(node.db, node.vm_id)) == 200

    _admin(node.conf, "vm", "stop", "-f", f"id={node.vm_id}")
    wait_vm_state(node.db, node.vm_id, "stopped", timeout=60)
    assert node.domains(all_=True) == []
    _finish(node, bridge_made_by_this_node=False)     # the killed node made it
