"""The `process` hypervisor: a VM is the DI executable run as a child process, no root.

Each VM gets its own loopback address (the node's range plus the vm id) so every VM's VMA
and display listen on the same ports at different addresses, as in a real VM network.
The node's range (vm.process.address.base) is by default a /16 of 127.0.0.0/8 of its
own: several nodes or demos on one machine must not hand their first VMs one address
(``NodeAddressRange``). The init runs in its own session/process group: shutdown is SIGTERM to
the group, kill is SIGKILL. QVD_NODE=<nodename> and QVD_NODE_RUN=<path.run> in its
environment let a restarted node find its VMs again in /proc (adoption after a crash).
"""
import hashlib
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import time

from ..system import procfs
from ..system.spawn import wait_exit
from .base import Hypervisor, HypervisorError, VmHandle, VmSpec, agent_key_environment
from .sandbox import VmSandbox, vm_environment

log = logging.getLogger("qvd.hkd.process")


def vm_loopback_address(base, vm_id):
    """A stable per-VM address inside the loopback range `base` (e.g. 127.100.0.0/16)."""
    net = ipaddress.ip_network(base, strict=False)
    usable = net.num_addresses - 2
    if usable < 1 or not net.is_loopback:
        raise HypervisorError(f"vm.process.address.base {base} must be a loopback range with room for VMs")
    return str(net.network_address + 1 + (int(vm_id) % usable))


AUTO = "auto"
# 127.X.0.0/16 for X in 2..254: 127.0.0.1 and 127.0.1.1 (Debian's host name) are the machine's own
AUTO_BLOCKS = [ipaddress.ip_network(f"127.{x}.0.0/16") for x in range(2, 255)]


class NodeAddressRange:
    """The loopback range of this node's VMs, claimed for as long as the node runs.

    The claim is an abstract unix socket named after the range: abstract names, like
    loopback addresses, belong to the network namespace, and the kernel drops the name when
    the node's process ends, however it ends. ``auto`` takes the first free /16 in an order
    given by path.run (so two nodes rarely even try the same one) and keeps it in
    ``<path.run>/process-vms/address-range``: a restarted node takes the same range back,
    so the VMs it adopts keep their addresses. A /16 on which anything listens (a node
    that is down while its VMs run, a test's own range) is passed over.
    """

    def __init__(self, configured, run_dir, state_dir):
        self.configured = configured.strip() or AUTO
        self.run_dir = run_dir
        self.state_path = os.path.join(state_dir, "address-range")
        self.network = None
        self._claim = None

    def claim(self):
        if self.configured != AUTO:
            network = self._parse(self.configured)
            if not self._take(network):
                raise HypervisorError(f"vm.process.address.base {network} is taken by another node on this "
                                      "machine (give each node its own range, or 'auto')")
            return network
        stored = self._stored()
        if stored is not None:
            if self._take(stored):
                return stored
            log.warning("process VMs: this node's range %s is now taken by another node; choosing another "
                        "(VMs still running keep their addresses)", stored)
        busy = {address for _, address, _ in procfs.listening_sockets()}
        digest = int(hashlib.sha256(self.run_dir.encode()).hexdigest()[:8], 16)
        for i in range(len(AUTO_BLOCKS)):
            network = AUTO_BLOCKS[(digest + i) % len(AUTO_BLOCKS)]
            if network == stored or any(_in(address, network) for address in busy):
                continue
            if self._take(network):
                tmp = f"{self.state_path}.{os.getpid()}"
                with open(tmp, "w") as fh:
                    fh.write(f"{network}\n")
                os.replace(tmp, self.state_path)
                return network
        raise HypervisorError("no free /16 of 127.0.0.0/8 for process VMs (set vm.process.address.base)")

    @staticmethod
    def _parse(text):
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise HypervisorError(f"vm.process.address.base {text!r} is not an address range (or 'auto')") from None
        if not network.is_loopback or network.num_addresses < 4:
            raise HypervisorError(f"vm.process.address.base {text} must be a loopback range with room for VMs")
        return network

    def _stored(self):
        try:
            with open(self.state_path) as fh:
                return self._parse(fh.read().strip())
        except (OSError, HypervisorError):
            return None

    def _take(self, network):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(f"\0qvd-process-vms/{network}")
        except OSError:
            sock.close()
            return False
        self.release()
        self._claim, self.network = sock, network
        return True

    def release(self):
        if self._claim is not None:
            self._claim.close()
            self._claim = None


def _in(address, network):
    try:
        return ipaddress.ip_address(address) in network
    except ValueError:
        return False


class ProcessHypervisor(Hypervisor):
    name = "process"
    needs_root = False
    uses_bridge = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.nodename = cfg.get_str("nodename")
        # A VM belongs to this node when both its QVD_NODE and its QVD_NODE_RUN match: two
        # nodes with one name on one machine (test suites) never adopt each other's VMs.
        self.run_dir = os.path.abspath(cfg.get_str("path.run"))
        self.log_dir = os.path.join(self.run_dir, "process-vms")
        self.addresses = NodeAddressRange(cfg.get_str("vm.process.address.base"), self.run_dir, self.log_dir)
        self.sandbox = VmSandbox(cfg)
        self._children = {}      # vm_id -> Popen (started by this process)

    # --- helpers -----------------------------------------------------------------------
    @property
    def address_range(self):
        """This node's loopback range (claimed by check())."""
        if self.addresses.network is None:
            raise HypervisorError("process VMs: the node's address range is not chosen yet (check() first)")
        return str(self.addresses.network)

    def address_for(self, vm_id):
        return vm_loopback_address(self.address_range, vm_id)

    def _belongs(self, pid, vm_id):
        """pid is still the init of vm_id on this node (guards against pid reuse)."""
        if not procfs.is_alive(pid):
            return False
        env = procfs.read_environ(pid)
        return self._ours(env) and env.get("QVD_VM_ID") == str(vm_id)

    def _ours(self, env):
        return env.get("QVD_NODE") == self.nodename and env.get("QVD_NODE_RUN") == self.run_dir

    @staticmethod
    def _check_free(address, port, vm_id):
        """Someone else answering on the VM's address would pass for its VMA: refuse to start."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            raise HypervisorError(f"VM {vm_id}: {address}:{port} is already in use ({exc.strerror}); "
                                  "a leftover VM or another node's VM holds it") from None
        finally:
            sock.close()

    # --- interface ---------------------------------------------------------------------
    def check(self):
        os.makedirs(self.log_dir, exist_ok=True)
        self.addresses.claim()
        log.info("process VMs: addresses in %s", self.addresses.network)
        address = self.address_for(1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((address, 0))
        except OSError as exc:
            raise HypervisorError(f"cannot bind loopback address {address} for process VMs: {exc.strerror}") from None
        finally:
            sock.close()
        self.sandbox.check()

    def start(self, spec: VmSpec) -> VmHandle:
        path = spec.di_path
        if not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise HypervisorError(f"DI {path} of VM {spec.vm_id} is not an executable file")
        self.sandbox.check_di(spec.vm_id, path)
        self.sandbox.uid_for(spec.vm_id)        # a VM id beyond vm.uid.count fails here
        address = self.address_for(spec.vm_id)
        self._check_free(address, spec.vma_port, spec.vm_id)
        home = self.sandbox.prepare(spec.vm_id)
        env = vm_environment(self.cfg, home, {
            "QVD_VM_ID": str(spec.vm_id),
            "QVD_VM_NAME": spec.name,
            "QVD_VM_ADDRESS": address,
            "QVD_VMA_PORT": str(spec.vma_port),
            "QVD_X_PORT": str(spec.x_port),
            "QVD_NODE": self.nodename,
            "QVD_NODE_RUN": self.run_dir,
        })
        env.update(agent_key_environment(spec))
        for key, value in (spec.properties or {}).items():
            env["QVD_PROP_" + "".join(c if c.isalnum() else "_" for c in key).upper()] = str(value)
        os.makedirs(self.log_dir, exist_ok=True)
        log_path = os.path.join(self.log_dir, f"vm-{spec.vm_id}.log")
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {path}\n".encode())
            out.flush()
            try:
                child = subprocess.Popen(self.sandbox.command(spec.vm_id, path, spec.memory), env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=home, close_fds=True)
            except OSError as exc:
                raise HypervisorError(f"cannot run DI {path} for VM {spec.vm_id}: {exc.strerror}") from None
        self._children[spec.vm_id] = child
        return VmHandle(vm_id=spec.vm_id, address=address, pid=child.pid, name=f"vm-{spec.vm_id}",
                        extra={"log": log_path})

    def _signal_group(self, handle, signum):
        if not handle.pid:
            return
        child = self._children.get(handle.vm_id)
        if child is None and not self._belongs(handle.pid, handle.vm_id):
            return
        if child is not None and child.poll() is not None:
            # the init is gone; its group may still hold stragglers
            pass
        try:
            os.killpg(handle.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            raise HypervisorError(f"cannot signal VM {handle.vm_id} (pid {handle.pid}): {exc.strerror}") from None

    def shutdown(self, handle: VmHandle):
        self._signal_group(handle, signal.SIGTERM)

    def kill(self, handle: VmHandle):
        self._signal_group(handle, signal.SIGKILL)

    def is_running(self, handle: VmHandle) -> bool:
        child = self._children.get(handle.vm_id)
        if child is not None and child.pid == handle.pid:
            return child.poll() is None
        return bool(handle.pid) and self._belongs(handle.pid, handle.vm_id)

    def wait_exit(self, handle: VmHandle, timeout=None) -> bool:
        child = self._children.get(handle.vm_id)
        if child is not None and child.pid == handle.pid:
            try:
                handle.extra["exit_status"] = child.wait(timeout=timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        if not handle.pid:
            return True
        return wait_exit(handle.pid, lambda: self._belongs(handle.pid, handle.vm_id), timeout)     # an adopted VM

    def cleanup(self, handle: VmHandle):
        child = self._children.pop(handle.vm_id, None)
        if child is not None and child.poll() is None:
            # cleanup of a VM still running means the caller gave up on it: no orphans
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("VM %s: init pid %s did not die after SIGKILL", handle.vm_id, child.pid)
        elif handle.pid and self._belongs(handle.pid, handle.vm_id):
            try:
                os.killpg(handle.pid, signal.SIGKILL)
            except OSError:
                pass
        self.sandbox.remove_home(handle.vm_id)

    def list_running(self) -> dict:
        found = {}
        for pid in procfs.pids():
            env = procfs.read_environ(pid)
            if not self._ours(env) or "QVD_VM_ID" not in env:
                continue
            try:
                if os.getpgid(pid) != pid:    # a process inside a VM, not its init
                    continue
            except OSError:
                continue
            if not procfs.is_alive(pid):
                continue
            try:
                vm_id = int(env["QVD_VM_ID"])
            except ValueError:
                continue
            found[vm_id] = VmHandle(vm_id=vm_id, address=env.get("QVD_VM_ADDRESS", ""), pid=pid,
                                    name=f"vm-{vm_id}")
        return found

    def close(self):
        self.addresses.release()
