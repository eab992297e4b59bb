"""`netns` hypervisor: a VM is its init command in its own network namespace on the bridge.

start(spec):
  1. named namespace ``<vm.network.netns.prefix>-vm<id>`` (``ip netns add``, so it appears
     in ``ip netns list`` and outlives a node restart);
  2. a veth pair made in the node's CURRENT namespace: host side ``<prefix>v<id>`` enslaved
     to vm.network.bridge and up; the peer is created directly inside the VM namespace as
     ``eth0`` with spec.mac (pyroute2);
  3. the DHCP client (vm.network.netns.udhcpc, busybox udhcpc) in the VM namespace with a
     script of ours (udhcpc itself configures nothing: the script brings lo and eth0 up on
     deconfig, applies address and default route on bound, and prints the lease). It quits
     once it has the lease (-q): the static lease reserves the address, so no renewals are
     needed, and 200 VMs do not keep 200 DHCP clients around. Bounded by
     vm.network.netns.dhcp_timeout;
  4. the DI executable (spec.di_path) as the VM's init, entering the namespace through
     ``nsenter --net`` and then confined by sandbox.py (mount and pid namespaces of its own,
     its own uid; the launcher keeps nsenter's pid), in a new session (so the whole tree can
     be signalled), with a scrubbed environment plus QVD_VM_ID, QVD_VM_NAME,
     QVD_VM_ADDRESS=<leased address>, QVD_NODE, QVD_VMA_PORT; its output goes to
     ``${path.run}/netns/<namespace>.log``.
Children are started with posix_spawn (SpawnedChild), not gevent's fork-in-Python Popen:
4 ms of node CPU per child becomes a fraction of a millisecond.
The state (init pid, address) is kept in ``${path.run}/netns/<namespace>.json`` so that
list_running() can adopt the VM after a node restart.

Because the bridge side lives in the current namespace, the whole thing works when the
node itself runs inside a test namespace (``nsenter --net=/run/netns/qvdtest-x qvd-node``),
which is how the tests keep every private address away from the machine's network.
(``ip netns exec`` works too, but gives the node a private mount namespace: see
netns_dir_is_private.)
The host-side work per VM is constant (no scan over other VMs) except kill/cleanup, which
scans /proc once to find every process of the VM's namespace.
"""
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import re
import shlex
import shutil
import signal
import time

import gevent
from gevent import subprocess

from ..system import procfs
from ..system.netlink import shared_netlink
from ..system.spawn import SpawnedChild, SpawnError, run_collect, wait_exit
from .base import Hypervisor, HypervisorError, VmHandle, VmSpec, agent_key_environment
from .sandbox import VmSandbox, vm_environment

log = logging.getLogger("qvd.hypervisors.netns")

MS_BIND = 4096
MNT_DETACH = 2
NETNS_DIR = "/run/netns"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

UDHCPC_SCRIPT = """#!/bin/sh
# Written by qvd-gevent's netns hypervisor. udhcpc configures nothing itself: this does.
case "$1" in
  deconfig)
    ip link set lo up
    ip link set "$interface" up
    ;;
  bound|renew)
    ip addr replace "$ip/${mask:-24}" dev "$interface"
    for r in $router; do
      ip route replace default via "$r" dev "$interface"
      break
    done
    echo "qvd-lease $ip"
    ;;
esac
exit 0
"""

_libc = None


def _get_libc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _netns_inode(name):
    try:
        st = os.stat(os.path.join(NETNS_DIR, name))
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pids_in_netns(name):
    """Every pid whose network namespace is the named one (one pass over /proc)."""
    target = _netns_inode(name)
    return [] if target is None else procfs.pids_in_network_namespace(target)


def netns_dir_is_private():
    """True when /run/netns is not a shared mount here (the node runs under ``ip netns exec``).

    ``ip netns exec`` gives its command a slave mount namespace: a namespace the node adds
    there is bound only in that private copy of /run/netns. Other processes see an empty
    file, and a restarted node must re-attach it (list_running does, from the init's pid).
    ``nsenter --net=/run/netns/<ns>`` enters only the network namespace and avoids this.
    """
    tags = procfs.mount_tags(NETNS_DIR)
    return tags is not None and not any(tag.startswith("shared:") for tag in tags)


def _attach(name, pid):
    """Bind /proc/<pid>/ns/net onto /run/netns/<name> (what ``ip netns attach`` does)."""
    libc = _get_libc()
    path = os.path.join(NETNS_DIR, name)
    if not os.path.exists(path):
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0))
    if libc.mount(f"/proc/{pid}/ns/net".encode(), path.encode(), b"none", MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), f"cannot bind the namespace of pid {pid} to {path}")


def _remove_netns(name):
    """What ``ip netns del`` does, without a fork: detach the bind mount, remove the file."""
    path = os.path.join(NETNS_DIR, name)
    if not os.path.lexists(path):
        return
    libc = _get_libc()
    if libc.umount2(path.encode(), MNT_DETACH) != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        raise HypervisorError(f"cannot unmount namespace {path}: {os.strerror(ctypes.get_errno())}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _parse_lease(stdout):
    for line in stdout.decode("utf-8", "replace").splitlines():
        if line.startswith("qvd-lease "):
            return line.split()[1]
    return None


class NetnsHypervisor(Hypervisor):
    name = "netns"
    needs_root = True
    uses_bridge = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.prefix = cfg.get_str("vm.network.netns.prefix")
        self.bridge = cfg.get_str("vm.network.bridge")
        self.state_dir = os.path.join(cfg.get_str("path.run"), "netns")
        self.netlink = shared_netlink()
        self._children = {}         # vm_id -> Popen of the init we started
        self.sandbox = VmSandbox(cfg)
        self._nsenter = shutil.which("nsenter") or "nsenter"
        self._name_re = re.compile(r"^" + re.escape(self.prefix) + r"-vm(\d+)$")

    # --- names ------------------------------------------------------------------------------
    def netns_name(self, vm_id):
        return f"{self.prefix}-vm{vm_id}"

    def veth_name(self, vm_id):
        return self.port_name(vm_id)

    def _state_path(self, ns):
        return os.path.join(self.state_dir, ns + ".json")

    # --- checks -----------------------------------------------------------------------------
    def check(self):
        if os.geteuid() != 0:
            raise HypervisorError("the netns hypervisor needs root (network namespaces, veth pairs); "
                                  "run qvd-node as root or use vm.hypervisor=process")
        self.check_port_prefix()
        link = self.netlink.link(self.bridge)
        # with vm.network.setup the HKD creates the bridge after this check
        if not self.cfg.get_bool("vm.network.setup") and (link is None or link["kind"] != "bridge"):
            raise HypervisorError(f"bridge {self.bridge} (vm.network.bridge) does not exist in this network "
                                  f"namespace; create it or set vm.network.setup=1")
        if netns_dir_is_private():
            log.warning("%s is a private mount here (node started with 'ip netns exec'?): VM namespaces will "
                        "not show in 'ip netns list' outside this process; prefer 'nsenter --net=...'", NETNS_DIR)
        udhcpc = shlex.split(self.cfg.get_str("vm.network.netns.udhcpc"))[0]
        if shutil.which(udhcpc) is None:
            raise HypervisorError(f"DHCP client {udhcpc!r} (vm.network.netns.udhcpc) not found")
        self.sandbox.check()

    # --- start --------------------------------------------------------------------------------
    def start(self, spec: VmSpec) -> VmHandle:
        if not spec.mac:
            raise HypervisorError(f"VM {spec.vm_id} has no MAC address (it needs vms.ip)")
        if not os.access(spec.di_path, os.X_OK):
            raise HypervisorError(f"DI {spec.di_path} of VM {spec.vm_id} is not an executable file")
        self.sandbox.check_di(spec.vm_id, spec.di_path)
        self.sandbox.uid_for(spec.vm_id)        # a VM id beyond vm.uid.count fails here
        ns = self.netns_name(spec.vm_id)
        veth = self.veth_name(spec.vm_id)
        handle = VmHandle(vm_id=spec.vm_id, address="", name=ns, extra={"veth": veth})
        os.makedirs(self.state_dir, exist_ok=True)
        started = time.monotonic()
        try:
            if _netns_inode(ns) is not None or self.netlink.index(veth) is not None:
                log.warning("VM %s: namespace %s or link %s left from an earlier run; removing them",
                            spec.vm_id, ns, veth)
                self.cleanup(handle)
            code, out = run_collect(["ip", "netns", "add", ns], {"PATH": os.environ.get("PATH", DEFAULT_PATH)}, 30)
            if code != 0:
                raise HypervisorError(f"ip netns add {ns} failed: {out.decode(errors='replace').strip()}")
            bridge_index = self.netlink.index(self.bridge)
            if bridge_index is None:
                raise HypervisorError(f"bridge {self.bridge} (vm.network.bridge) does not exist")
            with self.netlink as ipr:
                ipr.link("add", ifname=veth, kind="veth",
                         peer={"ifname": "eth0", "net_ns_fd": ns, "address": spec.mac})
                index = ipr.link_lookup(ifname=veth)[0]
                ipr.link("set", index=index, master=bridge_index, state="up")
            if self.cfg.get_bool("vm.network.use_dhcp"):
                address = self._dhcp(spec, ns)
            else:
                address = self._static(spec, ns)
            if spec.ip and address != spec.ip:
                log.warning("VM %s leased %s, expected %s", spec.vm_id, address, spec.ip)
            handle.address = address
            popen = self._spawn_init(spec, ns, address)
            handle.pid = popen.pid
            self._children[spec.vm_id] = popen
            self._save_state(handle)
        except BaseException as exc:
            self.cleanup(handle)
            if isinstance(exc, HypervisorError):
                raise
            if isinstance(exc, SpawnError):
                raise HypervisorError(str(exc)) from None
            if isinstance(exc, Exception):
                raise HypervisorError(f"VM {spec.vm_id}: netns start failed: {exc}") from exc
            raise
        log.info("VM %s started in %s at %s (pid %s, %.2f s)", spec.vm_id, ns, handle.address, handle.pid,
                 time.monotonic() - started)
        return handle

    def _in_ns(self, ns, argv):
        """argv run inside namespace ns: nsenter does the setns() in the child, after exec."""
        return [self._nsenter, f"--net={os.path.join(NETNS_DIR, ns)}", "--"] + list(argv)

    def _dhcp(self, spec, ns):
        timeout = self.cfg.get_int("vm.network.netns.dhcp_timeout")
        script = self._udhcpc_script()
        argv = shlex.split(self.cfg.get_str("vm.network.netns.udhcpc")) + [
            "-f", "-q", "-n", "-i", "eth0", "-s", script, "-t", str(max(timeout, 1)), "-T", "1"]
        env = {"PATH": os.environ.get("PATH", DEFAULT_PATH)}
        try:
            code, out = run_collect(self._in_ns(ns, argv), env, timeout + 2)
        except subprocess.TimeoutExpired:
            raise HypervisorError(f"VM {spec.vm_id}: no DHCP lease for {spec.mac} within {timeout} s "
                                  f"(is the node's dnsmasq running on {self.bridge}?)") from None
        address = _parse_lease(out)
        if code != 0 or not address:
            last = [line for line in out.decode("utf-8", "replace").strip().splitlines()
                    if not line.startswith("qvd-lease")][-1:] or ["no output"]
            raise HypervisorError(f"VM {spec.vm_id}: no DHCP lease for {spec.mac} within {timeout} s "
                                  f"(udhcpc: {last[0]})")
        return address

    def _udhcpc_script(self):
        script = os.path.join(self.state_dir, "udhcpc.script")
        if not os.path.exists(script):
            tmp = f"{script}.{os.getpid()}"
            with open(tmp, "w") as fh:
                fh.write(UDHCPC_SCRIPT)
            os.chmod(tmp, 0o755)
            os.replace(tmp, script)
        return script

    def _static(self, spec, ns):
        """vm.network.use_dhcp=0: vms.ip set directly, by the same script udhcpc would run."""
        if not spec.ip:
            raise HypervisorError(f"VM {spec.vm_id} has no address (vms.ip) and vm.network.use_dhcp is off")
        env = {"PATH": os.environ.get("PATH", DEFAULT_PATH), "interface": "eth0", "ip": spec.ip,
               "mask": str(self.cfg.vm_network().prefixlen),
               "router": (self.cfg.get_str("vm.network.gateway") or "").strip()}
        script = self._udhcpc_script()
        for phase in ("deconfig", "bound"):
            code, out = run_collect(self._in_ns(ns, ["/bin/sh", script, phase]), env, 30)
            if code != 0:
                raise HypervisorError(f"VM {spec.vm_id}: cannot set {spec.ip} on eth0: {out.decode(errors='replace')}")
        return spec.ip

    def _spawn_init(self, spec, ns, address):
        home = self.sandbox.prepare(spec.vm_id)
        env = vm_environment(self.cfg, home, dict(
            QVD_VM_ID=str(spec.vm_id), QVD_VM_NAME=spec.name, QVD_VM_ADDRESS=address,
            QVD_NODE=self.cfg.get_str("nodename", "") or "", QVD_VMA_PORT=str(spec.vma_port)))
        env.update(agent_key_environment(spec))
        logfile = os.path.join(self.state_dir, ns + ".log")
        fd = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            argv = self._in_ns(ns, self.sandbox.command(spec.vm_id, spec.di_path, spec.memory))
            return SpawnedChild(argv, env, output_fd=fd, setsid=True)
        finally:
            os.close(fd)

    def _save_state(self, handle):
        path = self._state_path(handle.name)
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"vm_id": handle.vm_id, "pid": handle.pid, "address": handle.address,
                       "veth": handle.extra.get("veth")}, fh)
        os.replace(tmp, path)

    # --- running VMs --------------------------------------------------------------------------
    def _init_alive(self, handle):
        """The init pid still runs in the VM's namespace (guards against pid reuse)."""
        popen = self._children.get(handle.vm_id)
        if popen is not None and popen.pid == handle.pid:
            return not popen.exited
        if not handle.pid:
            return False
        target = _netns_inode(handle.name)
        return target is not None and procfs.network_namespace(handle.pid) == target and procfs.is_alive(handle.pid)

    def is_running(self, handle):
        return self._init_alive(handle)

    def _signal_group(self, handle, sig):
        if not handle.pid or not self._init_alive(handle):
            return False
        try:
            os.killpg(handle.pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            os.kill(handle.pid, sig)
        return True

    def shutdown(self, handle):
        """SIGTERM to the init's process group (a shell init would not pass it on)."""
        self._signal_group(handle, signal.SIGTERM)

    def kill(self, handle):
        """SIGKILL to every process in the VM's namespace (escaped daemons included)."""
        self._signal_group(handle, signal.SIGKILL)
        for pid in pids_in_netns(handle.name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait_exit(self, handle, timeout=None):
        popen = self._children.get(handle.vm_id)
        if popen is not None and popen.pid == handle.pid:
            try:
                popen.wait(timeout=timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        return wait_exit(handle.pid, lambda: self._init_alive(handle), timeout)     # an adopted VM

    def cleanup(self, handle):
        """Kill what is left in the namespace, delete veth and namespace, forget state. Idempotent."""
        ns = handle.name or self.netns_name(handle.vm_id)
        veth = handle.extra.get("veth") or self.veth_name(handle.vm_id)
        for _ in range(50):                     # bounded: processes vanish right after SIGKILL
            pids = pids_in_netns(ns)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            gevent.sleep(0.02)
        popen = self._children.pop(handle.vm_id, None)
        if popen is not None:
            try:
                popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("VM %s: init %s did not die", handle.vm_id, popen.pid)
        # Unbinding the namespace (no process left in it) makes the kernel destroy it with its
        # eth0, which takes the host side of the veth along, off the hub. Deleting the veth
        # through netlink instead blocks the hub ~15 ms per VM (the kernel's work happens in
        # send()), so that is only the fallback when the link outlives the bounded wait.
        _remove_netns(ns)
        for _ in range(100):
            if self.netlink.index(veth) is None:
                break
            gevent.sleep(0.02)
        else:
            index = self.netlink.index(veth)
            if index is not None:
                with self.netlink as ipr:
                    try:
                        ipr.link("del", index=index)
                    except Exception as exc:    # gone meanwhile
                        log.debug("veth %s: %s", veth, exc)
        try:
            os.unlink(self._state_path(ns))
        except FileNotFoundError:
            pass
        self.sandbox.remove_home(handle.vm_id)

    def list_running(self):
        """{vm_id: VmHandle} of our namespaces whose init still runs (after a node restart)."""
        found = {}
        try:
            names = os.listdir(NETNS_DIR)
        except FileNotFoundError:
            return found
        for ns in names:
            match = self._name_re.match(ns)
            if not match:
                continue
            vm_id = int(match.group(1))
            try:
                with open(self._state_path(ns)) as fh:
                    state = json.load(fh)
            except (OSError, ValueError):
                continue
            handle = VmHandle(vm_id=vm_id, address=state.get("address", ""), pid=state.get("pid"), name=ns,
                              extra={"veth": state.get("veth") or self.veth_name(vm_id)})
            self._reattach(handle)
            if self._init_alive(handle):
                found[vm_id] = handle
        return found

    def _reattach(self, handle):
        """A namespace added by a node in a private mount namespace: bind it again from its init."""
        pid = handle.pid
        namespace = procfs.network_namespace(pid) if pid else None
        if namespace is None or namespace == _netns_inode(handle.name):
            return
        if procfs.read_environ(pid).get("QVD_VM_ID") != str(handle.vm_id) or not procfs.is_alive(pid):
            return      # not our init (pid reused)
        try:
            _attach(handle.name, pid)
            log.info("VM %s: re-attached namespace %s from its init %s", handle.vm_id, handle.name, pid)
        except OSError as exc:
            log.warning("VM %s: %s", handle.vm_id, exc)

    def list_leftovers(self):
        """Names of our namespaces without a live init (the HKD cleans them)."""
        running = {h.name for h in self.list_running().values()}
        try:
            names = os.listdir(NETNS_DIR)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if self._name_re.match(n) and n not in running)

    def cleanup_leftovers(self):
        """Remove our namespaces that have no live init (after a crash); returns their names."""
        removed = []
        for ns in self.list_leftovers():
            vm_id = int(self._name_re.match(ns).group(1))
            self.cleanup(VmHandle(vm_id=vm_id, address="", name=ns, extra={"veth": self.veth_name(vm_id)}))
            removed.append(ns)
        return removed

    def close(self):
        self._children.clear()

