"""`lxc` hypervisor: a VM is a container on libvirt's lxc driver (vm.libvirt.uri.lxc).

The original drove lxc-start itself (docs/hkd.md#lxc); here libvirt's lxc driver
does the cgroups, the veth pair on vm.network.bridge (MAC from the VM's IP) and the init.
What stays ours is the root filesystem:

- the DI (spec.di_path) is a directory holding a root filesystem, or a tarball
  (.tar, .tar.gz/.tgz, .tar.bz2/.tbz, .tar.xz/.txz) unpacked once, under a lock, into
  ``<path.storage.basefs>/<name without extension>`` (via a temporary folder and a rename,
  as the original);
- with an overlay (the OSF's use_overlay): an overlayfs at
  ``<path.storage.rootfs>/<vm_id>-fs`` whose upper dir is
  ``<path.storage.overlayfs>/<di_id>-<vm_id>-overlayfs`` (kept only with
  vm.overlay.persistent) and work dir ``<path.storage.overlayfs>/<vm_id>-overlayfs-work``;
  without one, the container runs on the base directly;
- the container's init is vm.lxc.init inside that root.

Domain ``qvd-<vm_id>`` (transient), shutdown = SIGTERM to the container's init (libvirt's
``signal`` method), kill = destroy; the rest is LibvirtHypervisor's. With a ``test:`` URI
(libvirt's test driver) the domain type is ``test`` and shutdown uses the default method:
that is how this code path is exercised on machines whose lxc driver cannot run containers.
"""
import fcntl
import logging
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET

import gevent.lock
from gevent import subprocess

from .base import HypervisorError, VmSpec, agent_key_environment
from .libvirt_common import LibvirtHypervisor, add_metadata, domain_name, require_libvirt
from .libvirt_common import xml_sub as _sub

log = logging.getLogger("qvd.hypervisors.lxc")

_UNPACK_LOCKS = {}          # basefs -> gevent lock: greenlets of this process queue here, not on flock
TAR_SUFFIXES = {".tar": "", ".tar.gz": "-z", ".tgz": "-z", ".tar.bz2": "-j", ".tbz": "-j",
                ".tar.xz": "-J", ".txz": "-J"}


def lxc_domain_xml(spec: VmSpec, *, rootfs, bridge, init="/sbin/init", domain_type="lxc", extras=None) -> str:
    """The libvirt domain XML of a container. Pure: no I/O, no libvirt."""
    if domain_type not in ("lxc", "test"):
        raise HypervisorError(f"lxc domain type must be lxc (or test), not {domain_type!r}")
    if spec.memory <= 0:
        raise HypervisorError(f"VM {spec.vm_id}: memory must be positive, not {spec.memory}")
    if not rootfs or not init:
        raise HypervisorError(f"VM {spec.vm_id}: a container needs a root filesystem and an init")
    domain = ET.Element("domain", type=domain_type)
    _sub(domain, "name", domain_name(spec.vm_id))
    _sub(domain, "title", spec.name)
    add_metadata(domain, spec, **(extras or {}))
    _sub(domain, "memory", spec.memory, unit="MiB")
    _sub(domain, "vcpu", 1)
    os_el = _sub(domain, "os")
    _sub(os_el, "type", "exe")
    _sub(os_el, "init", init)
    for name, value in agent_key_environment(spec).items():
        _sub(os_el, "initenv", value, name=name)     # the init's environment (docs/hkd.md#vma-secret)
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")
    devices = _sub(domain, "devices")
    fs = _sub(devices, "filesystem", type="mount", accessmode="passthrough")
    _sub(fs, "source", dir=rootfs)
    _sub(fs, "target", dir="/")
    nic = _sub(devices, "interface", type="bridge")
    _sub(nic, "source", bridge=bridge)
    if spec.mac:
        _sub(nic, "mac", address=spec.mac)
    if spec.port:
        _sub(nic, "target", dev=spec.port)      # the host side's name, which the network filter names
    _sub(devices, "console", type="pty")
    return ET.tostring(domain, encoding="unicode")


def basefs_name(di_path):
    name = os.path.basename(di_path.rstrip("/"))
    for suffix in sorted(TAR_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class LxcHypervisor(LibvirtHypervisor):
    name = "lxc"
    uri_key = "vm.libvirt.uri.lxc"

    @property
    def is_test_driver(self):
        return self.uri.startswith("test:")

    def shutdown_flags(self):
        if self.is_test_driver:
            return 0
        return require_libvirt().VIR_DOMAIN_SHUTDOWN_SIGNAL

    # --- root filesystem ---
    def _basefs(self, spec):
        image = spec.di_path
        if os.path.isdir(image):
            return image
        if not os.path.isfile(image):
            raise HypervisorError(f"VM {spec.vm_id}: image {image} is neither a directory nor a file")
        flag = next((f for s, f in sorted(TAR_SUFFIXES.items(), key=lambda i: -len(i[0])) if image.endswith(s)),
                    None)
        if flag is None:
            raise HypervisorError(f"VM {spec.vm_id}: image {image} is not a tarball ({', '.join(TAR_SUFFIXES)})")
        root = self.cfg.get_str("path.storage.basefs")
        basefs = os.path.join(root, basefs_name(image))
        os.makedirs(root, exist_ok=True)
        # flock keeps other processes out; it would block the whole hub, so greenlets of this
        # process first queue on a gevent lock and only one of them ever waits on the flock.
        with _UNPACK_LOCKS.setdefault(basefs, gevent.lock.Semaphore()), \
                open(os.path.join(root, f"lock.{basefs_name(image)}"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.isdir(basefs):
                tmp = tempfile.mkdtemp(prefix=f"untar-{os.getpid()}-", dir=root)
                argv = ["tar", "x", "-f", image, "-C", tmp, "--numeric-owner"] + ([flag] if flag else [])
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
                if proc.returncode != 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise HypervisorError(f"unpacking {image}: {proc.stderr.strip()[-300:]}")
                os.rename(tmp, basefs)
        return basefs

    def prepare(self, spec):
        basefs = self._basefs(spec)
        if not spec.use_overlay:
            return {"rootfs": basefs, "upper": "", "work": "", "mounted": ""}
        overlays = self.cfg.get_str("path.storage.overlayfs")
        rootfs = os.path.join(self.cfg.get_str("path.storage.rootfs"), f"{spec.vm_id}-fs")
        upper = os.path.join(overlays, f"{spec.di_id}-{spec.vm_id}-overlayfs")
        work = os.path.join(overlays, f"{spec.vm_id}-overlayfs-work")
        if not self.cfg.get_bool("vm.overlay.persistent"):
            shutil.rmtree(upper, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        for folder in (rootfs, upper, work):
            os.makedirs(folder, exist_ok=True)
        _umount(rootfs)
        proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                               f"lowerdir={basefs},upperdir={upper},workdir={work}", rootfs],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise HypervisorError(f"VM {spec.vm_id}: mounting the overlay on {rootfs}: {proc.stderr.strip()}")
        return {"rootfs": rootfs, "upper": upper, "work": work, "mounted": rootfs}

    def domain_xml(self, spec, extras):
        return lxc_domain_xml(spec, rootfs=extras["rootfs"], bridge=self.cfg.get_str("vm.network.bridge"),
                              init=self.cfg.get_str("vm.lxc.init"),
                              domain_type="test" if self.is_test_driver else "lxc", extras=extras)

    def release(self, extras):
        mounted = extras.get("mounted")
        if mounted:
            _umount(mounted)
            try:
                os.rmdir(mounted)
            except OSError:
                pass
        if extras.get("work"):
            shutil.rmtree(extras["work"], ignore_errors=True)
        if extras.get("upper") and not self.cfg.get_bool("vm.overlay.persistent"):
            shutil.rmtree(extras["upper"], ignore_errors=True)


def _umount(path):
    """Unmount path if something is mounted there (bounded: a stacked mount is undone a few times)."""
    for _ in range(5):
        if not os.path.ismount(path):
            return
        proc = subprocess.run(["umount", path], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise HypervisorError(f"umount {path}: {proc.stderr.strip()}")
