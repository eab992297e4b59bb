"""`kvm` hypervisor: a VM is a libvirt domain on the qemu driver (docs/hkd.md#kvm).

- Domain ``qvd-<vm_id>``, transient (createXML): once it stops, libvirt forgets it, so a
  stopped VM leaves no definition behind; a leftover persistent definition of that name is
  removed before a start and at cleanup.
- Disk: the DI image directly (read-only) when the OSF has no overlay, else a qcow2 overlay
  ``<path.storage.overlays>/<di_id>-<vm_id>-overlay.qcow2`` on it, made with
  ``qemu-img create -f qcow2 -F <image format> -b <image>`` (the original gave no -F;
  current qemu refuses that), reused only with ``vm.overlay.persistent`` and deleted at
  cleanup otherwise.
- ``vm.kvm.kernel`` set: direct kernel boot (kernel, vm.kvm.initrd, vm.kvm.cmdline): that
  is how tiny test guests boot.
- NIC on ``vm.network.bridge`` with the MAC derived from the VM's IP (spec.mac); virtio
  with ``vm.kvm.virtio``, else e1000 (the original gave no device model at all: a BUG).
  The guest takes spec.ip from our dnsmasq by that MAC, so VmHandle.address = spec.ip.
- User disk (user_storage_size > 0): ``<path.storage.homes>/<vm_id>-data.qcow2``, made once
  with that many MB and kept (it is the user's home), attached as the second disk.
- Serial console to ``<path.serial.captures>/qvd-<vm_id>-serial.txt``.
- Accelerator (``vm.kvm.accel``): ``kvm`` (domain type kvm), ``tcg`` (domain type qemu), or
  ``auto`` (default): a probe in a child process checks that /dev/kvm offers guests SSE3
  (KVM_GET_SUPPORTED_CPUID; every CPU with hardware virtualisation has it) and runs a
  three-instruction guest that must come back with its I/O exit within
  ``internal.hkd.kvm.probe.timeout``. On our CI machines /dev/kvm exists and KVM_CREATE_VM
  works, the tiny guest even runs, but KVM offers no SSE3 and a Linux guest hangs right
  after SeaBIOS: the SSE3 check catches that. When the probe fails, TCG is used if
  ``vm.kvm.allow_tcg`` is on, else check() fails with the probe's reason.
- shutdown = ACPI power button, kill = virDomainDestroy, wait_exit = lifecycle events
  with a state check every ``internal.hkd.libvirt.state_check.interval`` seconds.
- What the node needs to adopt a domain after a restart (IP, DI, overlay) is kept in the
  domain's <metadata>, read back by list_running().
- The VM's agent key (docs/hkd.md#vma-secret) is a fw_cfg entry ``opt/qvd/vma-secret``
  (libvirt's ``<sysinfo type='fwcfg'>``): the guest reads it as root from
  /sys/firmware/qemu_fw_cfg/by_name/opt/qvd/vma-secret/raw (module qemu_fw_cfg) and hands
  it to its VMA (``qvd-vma --key-file``). Like the domain XML, qemu's command line shows it
  to whoever can list the node's processes; nothing in another VM sees it.
"""
import ctypes
import dataclasses
import json
import logging
import mmap
import os
import shutil
import subprocess as _std_subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from gevent import subprocess

from .base import HypervisorError, VmSpec
from .libvirt_common import LibvirtHypervisor, add_metadata, domain_name, parse_domain_metadata, require_libvirt  # noqa: F401
from .libvirt_common import xml_sub as _sub

log = logging.getLogger("qvd.hypervisors.kvm")

FW_CFG_AGENT_KEY = "opt/qvd/vma-secret"


@dataclass
class KvmDomainSettings:
    """Everything the domain XML depends on besides the VmSpec (from config and disk prep)."""
    domain_type: str = "qemu"            # "kvm" or "qemu" (TCG)
    cpus: int = 1
    virtio: bool = True
    bridge: str = "qvdnet"
    disk_path: str | None = None
    disk_format: str = "qcow2"
    disk_readonly: bool = False
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""
    serial_log: str | None = None
    overlay: str | None = None           # recorded in the metadata for cleanup after adoption
    home_disk: str | None = None         # the user's disk (kept: it is their home)


def kvm_domain_xml(spec: VmSpec, settings: KvmDomainSettings) -> str:
    """The libvirt domain XML of a VM. Pure: no I/O, no libvirt."""
    if settings.domain_type not in ("kvm", "qemu"):
        raise HypervisorError(f"kvm domain type must be kvm or qemu, not {settings.domain_type!r}")
    if spec.memory <= 0:
        raise HypervisorError(f"VM {spec.vm_id}: memory must be positive, not {spec.memory}")
    if not settings.kernel and not settings.disk_path:
        raise HypervisorError(f"VM {spec.vm_id}: neither a disk image nor vm.kvm.kernel to boot")
    domain = ET.Element("domain", type=settings.domain_type)
    _sub(domain, "name", domain_name(spec.vm_id))
    _sub(domain, "title", spec.name)
    add_metadata(domain, spec, overlay=settings.overlay)
    _sub(domain, "memory", spec.memory, unit="MiB")
    _sub(domain, "vcpu", max(1, settings.cpus))
    os_el = _sub(domain, "os")
    _sub(os_el, "type", "hvm")
    if settings.kernel:
        _sub(os_el, "kernel", settings.kernel)
        if settings.initrd:
            _sub(os_el, "initrd", settings.initrd)
        if settings.cmdline:
            _sub(os_el, "cmdline", settings.cmdline)
    else:
        _sub(os_el, "boot", dev="hd")
    features = _sub(domain, "features")
    _sub(features, "acpi")               # the ACPI power button is how shutdown() asks
    _sub(features, "apic")
    if settings.domain_type == "kvm":
        _sub(domain, "cpu", mode="host-passthrough")
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")
    if spec.agent_key:
        fw_cfg = _sub(domain, "sysinfo", type="fwcfg")
        _sub(fw_cfg, "entry", spec.agent_key, name=FW_CFG_AGENT_KEY)
    devices = _sub(domain, "devices")
    if settings.disk_path:
        disk = _sub(devices, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type=settings.disk_format)
        _sub(disk, "source", file=settings.disk_path)
        if settings.virtio:
            _sub(disk, "target", dev="vda", bus="virtio")
        elif settings.disk_readonly:
            _sub(disk, "target", dev="sda", bus="scsi")     # qemu's IDE disks cannot be read-only
        else:
            _sub(disk, "target", dev="hda", bus="ide")
        if settings.disk_readonly:
            _sub(disk, "readonly")
    if settings.home_disk:
        home = _sub(devices, "disk", type="file", device="disk")
        _sub(home, "driver", name="qemu", type="qcow2")
        _sub(home, "source", file=settings.home_disk)
        _sub(home, "target", dev="vdb" if settings.virtio else "hdb", bus="virtio" if settings.virtio else "ide")
    nic = _sub(devices, "interface", type="bridge")
    _sub(nic, "source", bridge=settings.bridge)
    if spec.mac:
        _sub(nic, "mac", address=spec.mac)
    if spec.port:
        _sub(nic, "target", dev=spec.port)      # the host side's name, which the network filter names
    _sub(nic, "model", type="virtio" if settings.virtio else "e1000")
    if settings.serial_log:
        serial = _sub(devices, "serial", type="file")
        _sub(serial, "source", path=settings.serial_log, append="on")
        _sub(serial, "target", port=0)
        console = _sub(devices, "console", type="file")
        _sub(console, "source", path=settings.serial_log, append="on")
        _sub(console, "target", type="serial", port=0)
    _sub(devices, "memballoon", model="none")
    return ET.tostring(domain, encoding="unicode")


# --- the /dev/kvm probe --------------------------------------------------------------
# Real-mode guest at 0x1000: `mov al, 0x2a; out 0x10, al; hlt`. A working KVM returns from
# KVM_RUN at once with an I/O exit on port 0x10; a broken nested setup hangs in KVM_RUN.
_PROBE_CODE = bytes([0xB0, 0x2A, 0xE6, 0x10, 0xF4])


def _kvm_probe_main():
    """Runs in a child process (it may hang): exit 0 when a vCPU really executed code."""
    import fcntl
    KVM_GET_API_VERSION, KVM_CREATE_VM, KVM_CREATE_VCPU = 0xAE00, 0xAE01, 0xAE41
    KVM_GET_VCPU_MMAP_SIZE, KVM_RUN = 0xAE04, 0xAE80
    KVM_SET_USER_MEMORY_REGION, KVM_GET_SREGS, KVM_SET_SREGS, KVM_SET_REGS = \
        0x4020AE46, 0x8138AE83, 0x4138AE84, 0x4090AE82
    KVM_EXIT_IO, KVM_GET_SUPPORTED_CPUID = 2, 0xC008AE05
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    if fcntl.ioctl(kvm, KVM_GET_API_VERSION) != 12:
        sys.exit(2)
    # Every CPU with hardware virtualisation has SSE3; a KVM that offers guests none is a
    # crippled nested setup (seen on our CI machines: SeaBIOS runs, Linux then hangs).
    cpuid = bytearray(8 + 40 * 256)
    cpuid[0:4] = (256).to_bytes(4, "little")
    fcntl.ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid)
    for i in range(int.from_bytes(cpuid[0:4], "little")):
        entry = cpuid[8 + 40 * i: 8 + 40 * (i + 1)]
        if int.from_bytes(entry[0:4], "little") == 1 and not int.from_bytes(entry[20:24], "little") & 1:
            print("KVM offers guests no SSE3 (CPUID 1 ECX bit 0): nested virtualisation is crippled",
                  file=sys.stderr)
            sys.exit(4)
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    mem = mmap.mmap(-1, 0x1000)
    mem[:len(_PROBE_CODE)] = _PROBE_CODE
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    region = ctypes.create_string_buffer(32)
    ctypes.memmove(region, (ctypes.c_uint32 * 2)(0, 0), 8)
    ctypes.memmove(ctypes.addressof(region) + 8, (ctypes.c_uint64 * 3)(0x1000, 0x1000, addr), 24)
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
    run = mmap.mmap(vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    sregs = bytearray(0x138)
    fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
    sregs[0:8] = (0).to_bytes(8, "little")          # cs.base
    sregs[12:14] = (0).to_bytes(2, "little")        # cs.selector
    fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
    regs = (ctypes.c_uint64 * 18)()
    regs[16], regs[17] = 0x1000, 0x2                # rip, rflags
    fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))
    fcntl.ioctl(vcpu, KVM_RUN, 0)
    exit_reason = int.from_bytes(run[8:12], "little")
    sys.exit(0 if exit_reason == KVM_EXIT_IO else 3)


def probe_kvm(timeout):
    """(works, reason). Blocking: call it from the threadpool or a child greenlet."""
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    code = "from qvd_gevent.hypervisors.kvm import _kvm_probe_main; _kvm_probe_main()"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except _std_subprocess.TimeoutExpired:
        return False, f"a probe guest on /dev/kvm did not run within {timeout} s (nested virtualisation broken?)"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return False, f"the /dev/kvm probe failed: {last}"
    return True, "a probe guest ran on /dev/kvm"


class KvmHypervisor(LibvirtHypervisor):
    name = "kvm"
    uri_key = "vm.libvirt.uri.kvm"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._domain_type = None

    # --- decisions ---
    def domain_type(self):
        if self._domain_type is None:
            accel = self.cfg.get_str("vm.kvm.accel").strip().lower()
            allow_tcg = self.cfg.get_bool("vm.kvm.allow_tcg")
            if accel == "kvm":
                self._domain_type = "kvm"
            elif accel == "tcg":
                if not allow_tcg:
                    raise HypervisorError("vm.kvm.accel = tcg but vm.kvm.allow_tcg is off")
                self._domain_type = "qemu"
            elif accel == "auto":
                works, reason = probe_kvm(self.cfg.get_int("internal.hkd.kvm.probe.timeout"))
                if works:
                    self._domain_type = "kvm"
                elif allow_tcg:
                    log.warning("KVM cannot run guests here (%s): using qemu TCG (vm.kvm.allow_tcg)", reason)
                    self._domain_type = "qemu"
                else:
                    raise HypervisorError(f"KVM cannot run guests here ({reason}) and vm.kvm.allow_tcg is off")
            else:
                raise HypervisorError(f"vm.kvm.accel must be kvm, tcg or auto, not {accel!r}")
            log.info("kvm VMs run as libvirt domain type %s", self._domain_type)
        return self._domain_type

    def check(self):
        super().check()
        self.domain_type()
        if not shutil.which("qemu-img"):
            raise HypervisorError("qemu-img is not installed (package qemu-utils)")

    def shutdown_flags(self):
        return require_libvirt().VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN

    # --- disks ---
    def overlay_path(self, spec):
        return os.path.join(self.cfg.get_str("path.storage.overlays"), f"{spec.di_id}-{spec.vm_id}-overlay.qcow2")

    def _image_format(self, image):
        proc = subprocess.run(["qemu-img", "info", "-U", "--output=json", image], capture_output=True, text=True,
                              timeout=60)
        if proc.returncode != 0:
            raise HypervisorError(f"qemu-img info {image}: {proc.stderr.strip()}")
        return json.loads(proc.stdout).get("format", "raw")

    def _prepare_disk(self, spec, settings):
        if settings.kernel and not spec.di_path:
            return
        image = spec.di_path
        if not os.path.isfile(image):
            raise HypervisorError(f"VM {spec.vm_id}: disk image {image} is not a regular file")
        image_format = self._image_format(image)
        if not spec.use_overlay:
            settings.disk_path, settings.disk_format, settings.disk_readonly = image, image_format, True
            return
        overlay = self.overlay_path(spec)
        persistent = self.cfg.get_bool("vm.overlay.persistent")
        if not (persistent and os.path.exists(overlay)):
            os.makedirs(os.path.dirname(overlay), exist_ok=True)
            _unlink(overlay)
            proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", image_format, "-b", image,
                                   overlay], capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                raise HypervisorError(f"qemu-img create {overlay}: {proc.stderr.strip()}")
        settings.disk_path, settings.disk_format, settings.overlay = overlay, "qcow2", overlay

    def _prepare_home(self, spec, settings):
        """As the original (docs/hkd.md#kvm): a user disk only when user_storage_size > 0, reused if present."""
        if not spec.user_storage_size or spec.user_storage_size <= 0:
            return
        home = os.path.join(self.cfg.get_str("path.storage.homes"), f"{spec.vm_id}-data.qcow2")
        if not os.path.exists(home):
            os.makedirs(os.path.dirname(home), exist_ok=True)
            proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", home,
                                   str(spec.user_storage_size * 1048576)], capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                raise HypervisorError(f"qemu-img create {home}: {proc.stderr.strip()}")
        settings.home_disk = home

    def settings_for(self, spec):
        captures = self.cfg.get_str("path.serial.captures")
        return KvmDomainSettings(
            domain_type=self.domain_type(),
            cpus=self.cfg.get_int("vm.kvm.cpus"),
            virtio=self.cfg.get_bool("vm.kvm.virtio"),
            bridge=self.cfg.get_str("vm.network.bridge"),
            kernel=self.cfg.get_str("vm.kvm.kernel"),
            initrd=self.cfg.get_str("vm.kvm.initrd"),
            cmdline=self.cfg.get_str("vm.kvm.cmdline"),
            serial_log=os.path.join(captures, f"qvd-{spec.vm_id}-serial.txt") if captures else None,
        )

    # --- LibvirtHypervisor hooks ---
    def prepare(self, spec):
        settings = self.settings_for(spec)
        self._prepare_disk(spec, settings)
        self._prepare_home(spec, settings)
        if settings.serial_log:
            os.makedirs(os.path.dirname(settings.serial_log), exist_ok=True)
        return dataclasses.asdict(settings)

    def domain_xml(self, spec, extras):
        return kvm_domain_xml(spec, KvmDomainSettings(**extras))

    def release(self, extras):
        overlay = extras.get("overlay")
        if overlay and not self.cfg.get_bool("vm.overlay.persistent"):
            _unlink(overlay)


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
