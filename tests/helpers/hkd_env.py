"""Shared set-up for HKD tests: node.conf with short timeouts, rows for hosts/users/VMs,
commands sent the way the admin CLI and the L7R send them, bounded waits."""
import atexit
import os
import random
import shutil
import sys
import tempfile

from .nodes import wait_for

TINY_VM_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_vm.py")


def _tiny_vm_di():
    """The DI that runs tiny_vm.py with this interpreter (a VM's PATH is the system's, where
    `python3` may lack the package), in a folder open to the VMs' uids."""
    folder = tempfile.mkdtemp(prefix="qvd-tiny-vm-")
    atexit.register(shutil.rmtree, folder, True)
    path = os.path.join(folder, "tiny-vm")
    with open(path, "w") as fh:
        fh.write(f"#!/bin/sh\nexec {sys.executable} {TINY_VM_SCRIPT} \"$@\"\n")
    os.chmod(path, 0o755)
    os.chmod(folder, 0o755)
    return path


TINY_VM = _tiny_vm_di()
# A node name of our own: several suites share this machine and a node adopts (or kills)
# the process VMs that carry its name.
NODE = f"hkd-test-{os.getpid()}"


def fast_hkd_settings(tmp_path, nodename=NODE, **extra):
    """node.conf extras: process hypervisor, a private loopback range, short timers."""
    # a /24 of its own (254 VMs): parallel suites on this machine do not share addresses
    base = f"127.{random.randint(101, 250)}.{random.randint(0, 255)}.0/24"
    values = {
        "nodename": nodename,
        "path.run": tmp_path / f"run-{nodename}",
        "path.storage.root": tmp_path / "storage",
        "vm.hypervisor": "process",
        "vm.process.address.base": base,
        # a development checkout (PYTHONPATH) must run its own code in the VMs too
        "vm.environment.pass": "PYTHONPATH",
        # these nodes run in the machine's own network namespace, where a test must not load
        # nftables rules (a killed node would leave them); tests/system/test_vm_filter.py tries
        # the process VMs' filter inside a test namespace
        "internal.vm.network.firewall.enable": 0,
        "internal.hkd.vmhandler.vma_monitor.delay.starting": 0.2,
        "internal.hkd.vmhandler.vma_monitor.delay.after.ok": 1,
        "internal.hkd.vmhandler.vma_monitor.delay.after.error": 0.3,
        "internal.hkd.timeout.on_state.stopping.shutdown": 3,
        "internal.hkd.timeout.on_state.stopping.stop": 3,
        "internal.hkd.timeout.on_state.zombie.reap": 3,
        "internal.hkd.timeout.on_state.zombie.delaying": 1,
        "internal.hkd.agent.ticker.delay": 1,
        "internal.hkd.agent.vm_command_handler.delay": 2,
        "internal.hkd.agent.command_handler.delay": 2,
        "internal.hkd.agent.cluster_monitor.long_delay": 1,
        "internal.hkd.agent.cluster_monitor.delay": 1,
        "internal.hkd.agent.cluster_monitor.fuzzy_delay": 0,
        "internal.hkd.agent.rpc.timeout": 1,
        "internal.hkd.stopping.vms.timeout": 10,
        "internal.hkd.killing.vms.retry.timeout": 3,
    }
    values.update(extra)
    return values


def write_conf(path, server, dbname, values):
    from .database import write_node_conf
    write_node_conf(path, server, dbname, {})
    text = path.read_text().replace("nodename = test-node\n", "")
    text += "".join(f"{k} = {v}\n" for k, v in values.items())
    path.write_text(text)
    return path


def add_host(db, name=NODE, address="127.0.0.1"):
    def run(cur):
        cur.execute("INSERT INTO hosts (name, address, frontend, backend) VALUES (%s, %s, true, true) RETURNING id",
                    (name, address))
        host_id = cur.fetchone()[0]
        cur.execute("INSERT INTO host_runtimes (host_id, state, blocked) VALUES (%s, 'stopped', false)", (host_id,))
        return host_id
    return db.transaction(run)


def write_di_script(path, env=None):
    """An executable DI that runs tiny_vm.py with extra environment."""
    lines = ["#!/bin/sh"]
    for k, v in (env or {}).items():
        lines.append(f"export {k}={v}")
    lines.append(f"exec {sys.executable} {TINY_VM_SCRIPT}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    open_to_vms(path.parent)
    return str(path)


def open_to_vms(folder):
    """VMs of a root node run as uids of their own: a DI in a test's tmp folder (0700) must be
    reachable by them. Only the folder itself: a VM sees a private /tmp in which the folders
    above it are open (docs/hkd.md#vm-confinement)."""
    os.chmod(folder, 0o755)


def add_vms(db, count=1, di_path=TINY_VM, login="user1"):
    def run(cur):
        cur.execute("INSERT INTO users (tenant_id, login, password) VALUES (1, %s, 'x') "
                    "ON CONFLICT (login, tenant_id) DO UPDATE SET login = EXCLUDED.login RETURNING id", (login,))
        user_id = cur.fetchone()[0]
        cur.execute("INSERT INTO osfs (tenant_id, name, memory, use_overlay) VALUES (1, %s, 256, false) RETURNING id",
                    (f"osf-{random.randint(0, 10**9)}",))
        osf_id = cur.fetchone()[0]
        cur.execute("INSERT INTO dis (osf_id, path, version) VALUES (%s, %s, '1') RETURNING id", (osf_id, di_path))
        di_id = cur.fetchone()[0]
        cur.execute("INSERT INTO di_tags (di_id, tag) VALUES (%s, 'default'), (%s, 'head')", (di_id, di_id))
        ids = []
        for i in range(count):
            cur.execute("INSERT INTO vms (name, user_id, osf_id, di_tag, ip) VALUES (%s, %s, %s, 'default', %s) "
                        "RETURNING id", (f"vm-{osf_id}-{i}", user_id, osf_id, f"10.0.{osf_id % 200}.{100 + i}"))
            vm_id = cur.fetchone()[0]
            cur.execute("INSERT INTO vm_runtimes (vm_id, vm_state, user_state, blocked) "
                        "VALUES (%s, 'stopped', 'disconnected', false)", (vm_id,))
            ids.append(vm_id)
        return ids
    return db.transaction(run)


def start_vm(db, vm_id, host_id):
    """What the L7R does: assign the VM to a host, vm_cmd=start, NOTIFY the host."""
    def run(cur):
        cur.execute("UPDATE vm_runtimes SET host_id = %s, vm_cmd = 'start' WHERE vm_id = %s", (host_id, vm_id))
        cur.execute("SELECT pg_notify(%s, '')", (f"qvd_cmd_for_vm_on_host{host_id}",))
    db.transaction(run)


def stop_vm(db, vm_id):
    def run(cur):
        cur.execute("UPDATE vm_runtimes SET vm_cmd = 'stop' WHERE vm_id = %s RETURNING host_id", (vm_id,))
        host_id = cur.fetchone()[0]
        cur.execute("SELECT pg_notify(%s, '')", (f"qvd_cmd_for_vm_on_host{host_id}",))
    db.transaction(run)


def vm_row(db, vm_id):
    row = db.query_one("SELECT vm_state, host_id, vm_address, vm_vma_port, vm_x_port, vm_pid, current_di_id, vm_cmd "
                       "FROM vm_runtimes WHERE vm_id = %s", (vm_id,))
    keys = ("vm_state", "host_id", "vm_address", "vm_vma_port", "vm_x_port", "vm_pid", "current_di_id", "vm_cmd")
    return dict(zip(keys, row))



def wait_vm_state(db, vm_id, state, timeout=20.0):
    return wait_for(lambda: vm_row(db, vm_id)["vm_state"] == state and vm_row(db, vm_id),
                    timeout, what=f"VM {vm_id} {state}")


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except OSError:
        return False


def vma_of(db, vm_id, address, port=3030):
    """A VMA client of a running VM with the agent key its node made for this start."""
    from qvd_gevent.db import runtime
    from qvd_gevent.vma.client import VmaClient
    return VmaClient(address, port, timeout=2, key=runtime.vm_agent_key(db, vm_id))


def proc_environ(pid):
    with open(f"/proc/{pid}/environ", "rb") as fh:
        return dict(item.decode(errors="replace").partition("=")[::2] for item in fh.read().split(b"\0") if item)


def proc_cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().decode(errors="replace")
