"""The one small interface every hypervisor implements (kvm, lxc, netns, process).

The HKD's VM runner calls these from a greenlet. Implementations that use blocking C
libraries (libvirt) run those calls in gevent's threadpool; everything else must be
cooperative (subprocess and sockets are, under monkey patching).
"""
from dataclasses import dataclass, field


class HypervisorError(Exception):
    """A VM could not be started/stopped; the message is fit for a log line."""


@dataclass
class VmSpec:
    """What the HKD knows about a VM when it starts it (from vms, osfs, dis, vm_runtimes)."""
    vm_id: int
    name: str
    ip: str | None              # vms.ip (netns/kvm/lxc get it by DHCP from our dnsmasq)
    mac: str | None             # derived from ip and vm.network.mac.prefix
    memory: int                 # MB, from osfs.memory
    di_id: int
    di_path: str                # absolute path of the DI (image, or init executable)
    use_overlay: bool = True
    user_storage_size: int | None = None
    login: str = ""
    vma_port: int = 3030
    x_port: int = 4100
    properties: dict = field(default_factory=dict)


@dataclass
class VmHandle:
    """A running VM as the hypervisor knows it; enough to stop it or adopt it after a restart."""
    vm_id: int
    address: str                # where the VMA and display are reached (vm_runtimes.vm_address)
    pid: int | None = None      # vm_runtimes.vm_pid where there is one process
    name: str = ""              # netns name, libvirt domain name, ...
    extra: dict = field(default_factory=dict)


class Hypervisor:
    name = "base"
    needs_root = False
    uses_bridge = False         # True: the VM gets its address by DHCP on vm.network.bridge

    def __init__(self, cfg):
        self.cfg = cfg

    def check(self):
        """Raise HypervisorError with a clear reason if this node cannot run such VMs."""

    def start(self, spec: VmSpec) -> VmHandle:
        """Create and boot the VM. Returns once it is launched (not when the VMA answers)."""
        raise NotImplementedError

    def shutdown(self, handle: VmHandle):
        """Ask the guest to stop gracefully (ACPI, SIGTERM to init)."""
        raise NotImplementedError

    def kill(self, handle: VmHandle):
        """Stop it now (SIGKILL, virDomainDestroy)."""
        raise NotImplementedError

    def is_running(self, handle: VmHandle) -> bool:
        raise NotImplementedError

    def wait_exit(self, handle: VmHandle, timeout=None) -> bool:
        """Block this greenlet until the VM is gone; True if it exited within timeout."""
        raise NotImplementedError

    def cleanup(self, handle: VmHandle):
        """Remove what start() made (namespace, veth, overlay, domain definition). Idempotent."""

    def list_running(self) -> dict:
        """{vm_id: VmHandle} of this node's VMs that still run (adoption after a restart)."""
        return {}

    def close(self):
        """Release connections/threads at node shutdown (VMs keep running)."""
