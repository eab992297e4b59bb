"""vm.hypervisor -> implementation. Imported lazily: libvirt is an optional extra."""
import importlib

from .base import Hypervisor, HypervisorError, VmHandle, VmSpec

_IMPLEMENTATIONS = {
    "process": ("qvd_gevent.hypervisors.process", "ProcessHypervisor"),
    "netns": ("qvd_gevent.hypervisors.netns", "NetnsHypervisor"),
    "kvm": ("qvd_gevent.hypervisors.kvm", "KvmHypervisor"),
    "lxc": ("qvd_gevent.hypervisors.lxc", "LxcHypervisor"),
}

__all__ = ["Hypervisor", "HypervisorError", "VmHandle", "VmSpec", "get_hypervisor", "NAMES"]
NAMES = tuple(_IMPLEMENTATIONS)


def get_hypervisor(name, cfg) -> Hypervisor:
    if name not in _IMPLEMENTATIONS:
        raise HypervisorError(f"vm.hypervisor {name!r} is not one of {', '.join(NAMES)}")
    module_name, class_name = _IMPLEMENTATIONS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HypervisorError(f"hypervisor {name} is not available: {exc}") from None
    return getattr(module, class_name)(cfg)
