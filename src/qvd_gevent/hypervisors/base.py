"""The one small interface every hypervisor implements (kvm, lxc, netns, process).

The HKD's VM runner calls these from a greenlet. Implementations that use blocking C
libraries (libvirt) run those calls in gevent's threadpool; everything else must be
cooperative (subprocess and sockets are, under monkey patching).
"""
import re
from dataclasses import dataclass, field

IFNAMSIZ = 15               # longest interface name the kernel takes
MAX_PORT_PREFIX = 8         # prefix + "v" + a 6-digit VM id fit in IFNAMSIZ


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
    port: str | None = None     # the VM's interface on vm.network.bridge (Hypervisor.port_name)
    # the secret the VM's agent must require of every caller, made at this start
    # (docs/hkd.md#vma-secret); None with vm.vma.legacy_unauthenticated. Never in a repr.
    agent_key: str | None = field(default=None, repr=False)


def agent_key_environment(spec):
    """How process, netns and lxc VMs get the secret: their init's environment (never its
    command line, which every user of the machine can read)."""
    if spec.agent_key:
        return {"QVD_VMA_SECRET": spec.agent_key}
    return {"QVD_VMA_UNAUTHENTICATED": "1"}


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

    # --- the VM's port on the bridge, which the network filter names (docs/hkd.md#firewall) ---
    def port_prefix(self):
        return self.cfg.get_str("vm.network.netns.prefix")

    def check_port_prefix(self):
        prefix = self.port_prefix()
        if not re.fullmatch(rf"[A-Za-z][A-Za-z0-9_]{{0,{MAX_PORT_PREFIX - 1}}}", prefix):
            raise HypervisorError(f"vm.network.netns.prefix {prefix!r} must be 1-{MAX_PORT_PREFIX} letters/digits "
                                  f"(interface names are at most {IFNAMSIZ} characters)")

    def port_name(self, vm_id):
        """``<prefix>v<vm id>``: the VM's interface on the bridge; None without a bridge."""
        if not self.uses_bridge:
            return None
        name = f"{self.port_prefix()}v{vm_id}"
        if len(name) > IFNAMSIZ:
            raise HypervisorError(f"interface name {name} is too long (shorten vm.network.netns.prefix)")
        return name

    def port_pattern(self):
        """What every VM port's name matches (nftables wildcard)."""
        return f"{self.port_prefix()}v*"

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
