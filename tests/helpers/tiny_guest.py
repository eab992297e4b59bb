"""A tiny KVM/TCG guest for the kvm system test, built once from Debian packages and cached.

What the guest is: Debian's own kernel (``apt-get download linux-image-6.1.0-N-amd64`` +
``dpkg-deb -x``) booted directly (vm.kvm.kernel/initrd), and an initramfs made of
busybox-static whose /init

- loads the virtio/e1000 NIC modules and the ACPI power button (so an ACPI shutdown from
  libvirt powers it off),
- takes eth0's address by DHCP (``udhcpc``; its script applies the address: udhcpc itself
  does not),
- reads its agent key from the fw_cfg entry ``opt/qvd/vma-secret`` the kvm hypervisor adds
  (module qemu_fw_cfg; /sys/firmware/qemu_fw_cfg/by_name/opt/qvd/vma-secret/raw, root only)
  into a root-only file, and prints ``QVD-GUEST-KEY yes`` (or ``no``; never the key),
- serves the VMA calls the HKD makes on port 3030 (busybox nc, a shell script per
  connection): ``/vma/ping`` and ``/vma/x_state`` with SimpleRPC JSON bodies, 401 without
  ``Authorization: Bearer <key>`` when it got a key (as qvd-vma; without one it answers
  everyone, like the original VMA), 404 for the rest,
- echoes lines on port 4100 (the "display" port; no display gate: no L7R connects here), and
- prints ``QVD-GUEST-LEASE <address>`` on the serial console once it has its lease (before
  the VMA serves) and ``QVD-GUEST-READY <address>`` when everything is up.

The result is cached in ``QVD_TEST_GUEST_CACHE`` (default /var/cache/qvd-test-guest), in a
folder per recipe version, so only the first run downloads (~70 MB) and builds (a few
seconds), and checkouts of different recipes on one machine do not rebuild each other's.
"""
import dataclasses
import fcntl
import os
import shutil
import subprocess
import tempfile

RECIPE_VERSION = "6"
CACHE_DIR = os.environ.get("QVD_TEST_GUEST_CACHE", "/var/cache/qvd-test-guest")
KERNEL_CMDLINE = "console=ttyS0 panic=-1 quiet loglevel=3"
READY_MARK = "QVD-GUEST-READY"

# Loaded in this order (dependencies first, as busybox depmod lists them for 6.1); a module
# missing from the kernel is skipped.
MODULES = [
    "drivers/virtio/virtio_ring.ko", "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko", "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko", "net/core/failover.ko", "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko", "drivers/net/ethernet/intel/e1000/e1000.ko",
    "drivers/input/evdev.ko", "drivers/acpi/button.ko", "drivers/firmware/qemu_fw_cfg.ko",
]

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod "/lib/modules/$m" 2>/dev/null; done
# ACPI shutdown from libvirt = a key press on the "Power Button" input device: power off.
for ev in /sys/class/input/event*; do
  case "$(cat $ev/device/name 2>/dev/null)" in
    *"Power Button"*) (dd if=/dev/input/${ev##*/} bs=24 count=1 >/dev/null 2>&1;
                       echo QVD-GUEST-POWEROFF; poweroff -f) & ;;
  esac
done
ip link set lo up
ip link set eth0 up
tries=0
until [ -s /tmp/address ] || [ $tries -ge 60 ]; do
  udhcpc -i eth0 -s /udhcpc.sh -f -q -t 5 -T 1 -A 1 >/dev/null 2>&1
  tries=$((tries + 1))
done
# the agent key the node made for this start (docs/hkd.md#vma-secret): root only, never printed
umask 077
if cat /sys/firmware/qemu_fw_cfg/by_name/opt/qvd/vma-secret/raw > /run/vma-secret 2>/dev/null \
   && [ -s /run/vma-secret ]; then echo "QVD-GUEST-KEY yes"; else rm -f /run/vma-secret; echo "QVD-GUEST-KEY no"; fi
umask 022
# printed before the VMA serves: whoever sees the VMA answer can already read this line
echo "QVD-GUEST-LEASE $(cat /tmp/address 2>/dev/null)"
nc -ll -p 3030 -e /vma.sh &
nc -ll -p 4100 -e /bin/cat &
echo "QVD-GUEST-READY $(cat /tmp/address 2>/dev/null)"
while true; do sleep 3600; done
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
case "$1" in
  deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip -4 addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via ${router%% *} dev "$interface"
    echo "$ip" > /tmp/address ;;
esac
exit 0
"""

VMA_SCRIPT = r"""#!/bin/sh
# One SimpleRPC call on stdin/stdout (busybox nc -e). The key in /run/vma-secret, if any,
# is required as in qvd-vma: Authorization: Bearer <key>, else 401.
read -r request
auth=""
while read -r line; do
  line=$(printf '%s' "$line" | tr -d '\r')
  [ -z "$line" ] && break
  case "$line" in [Aa]uthorization:*) auth="${line#*: }" ;; esac
done
answer() { printf 'HTTP/1.1 %s\r\nContent-Type: application/json-simplerpc\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' "$1" "${#2}" "$2"; }
if [ -s /run/vma-secret ] && [ "$auth" != "Bearer $(cat /run/vma-secret)" ]; then
  answer "401 Unauthorized" ""; exit 0
fi
path=$(echo "$request" | cut -d' ' -f2)
case "${path%%\?*}" in
  /vma/ping) answer "200 OK" "1" ;;
  /vma/x_state) answer "200 OK" '"stopped"' ;;
  *) answer "404 Not Found" "" ;;
esac
"""


@dataclasses.dataclass
class TinyGuest:
    kernel: str
    initrd: str
    cmdline: str = KERNEL_CMDLINE
    kernel_package: str = ""


def _run(argv, cwd=None, timeout=300):
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True, timeout=timeout)


def _kernel_package():
    out = ""
    for attempt in range(2):
        if attempt:                     # a fresh machine may have no package lists yet
            _run(["apt-get", "update", "-qq"], timeout=600)
        proc = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True,
                              timeout=120)
        out = proc.stdout
        for line in out.splitlines():
            word = line.split(":", 1)[-1].strip()
            if word.startswith("linux-image-6.1.0-") and word.endswith("-amd64"):
                return word
    raise RuntimeError(f"no linux-image-6.1.0-*-amd64 behind linux-image-amd64 in: {out!r}")


def _write(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _build_initramfs(kernel_root, release, out_path, work):
    root = os.path.join(work, "initramfs")
    for d in ("bin", "sbin", "proc", "sys", "dev", "tmp", "etc", "run", "lib/modules"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    busybox = shutil.which("busybox") or "/bin/busybox"
    shutil.copy2(busybox, os.path.join(root, "bin/busybox"))
    order = []
    module_dir = os.path.join(kernel_root, "lib/modules", release, "kernel")
    for rel in MODULES:
        src = os.path.join(module_dir, rel)
        if os.path.exists(src):
            shutil.copy2(src, os.path.join(root, "lib/modules", os.path.basename(rel)))
            order.append(os.path.basename(rel))
    _write(os.path.join(root, "modules.order"), "\n".join(order) + "\n")
    _write(os.path.join(root, "init"), INIT_SCRIPT, 0o755)
    _write(os.path.join(root, "udhcpc.sh"), UDHCPC_SCRIPT, 0o755)
    _write(os.path.join(root, "vma.sh"), VMA_SCRIPT, 0o755)
    files = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True, timeout=60).stdout
    with open(out_path + ".cpio", "wb") as cpio_out:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, stdout=cpio_out,
                       check=True, timeout=120)
    with open(out_path + ".cpio", "rb") as src, open(out_path, "wb") as dst:
        subprocess.run(["gzip", "-1", "-c"], stdin=src, stdout=dst, check=True, timeout=120)
    os.unlink(out_path + ".cpio")


def build_tiny_guest(cache_dir=CACHE_DIR) -> TinyGuest:
    """Return the cached guest, building it first if needed (process-safe: an flock guards it)."""
    cache_dir = os.path.join(cache_dir, f"recipe-{RECIPE_VERSION}")
    os.makedirs(cache_dir, exist_ok=True)
    kernel = os.path.join(cache_dir, "vmlinuz")
    initrd = os.path.join(cache_dir, "initrd.img")
    stamp = os.path.join(cache_dir, "recipe")
    with open(os.path.join(cache_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(stamp) as f:
                version, package = f.read().split()
            if version == RECIPE_VERSION and os.path.exists(kernel) and os.path.exists(initrd):
                return TinyGuest(kernel, initrd, KERNEL_CMDLINE, package)
        except (OSError, ValueError):
            pass
        for tool in ("apt-get", "dpkg-deb", "cpio", "gzip", "busybox"):
            if not shutil.which(tool):
                raise RuntimeError(f"building the tiny guest needs {tool} (scripts/install-test-deps.sh)")
        package = _kernel_package()
        release = package[len("linux-image-"):]
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix="build-") as work:
            os.chmod(work, 0o755)   # apt's sandbox user must be able to write the download here
            _run(["apt-get", "download", package], cwd=work)
            deb = next(f for f in os.listdir(work) if f.endswith(".deb"))
            kernel_root = os.path.join(work, "kernel")
            _run(["dpkg-deb", "-x", os.path.join(work, deb), kernel_root])
            shutil.copy2(os.path.join(kernel_root, "boot", f"vmlinuz-{release}"), kernel + ".new")
            _build_initramfs(kernel_root, release, initrd + ".new", work)
            os.replace(kernel + ".new", kernel)
            os.replace(initrd + ".new", initrd)
        with open(stamp, "w") as f:
            f.write(f"{RECIPE_VERSION} {package}\n")
        return TinyGuest(kernel, initrd, KERNEL_CMDLINE, package)


if __name__ == "__main__":
    print(build_tiny_guest())
