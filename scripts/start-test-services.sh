#!/usr/bin/env bash
# Starts libvirt by hand (no systemd here; see docs/testing.md#libvirt-without-systemd) when it is installed.
set -uo pipefail
if command -v libvirtd >/dev/null 2>&1; then
  mkdir -p /var/log/libvirt /var/lib/libvirt /var/cache/libvirt /run/libvirt
  getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
  getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
  pgrep -x virtlogd >/dev/null || virtlogd -d
  pgrep -x libvirtd >/dev/null || libvirtd -d
  for _ in $(seq 1 50); do [ -S /run/libvirt/libvirt-sock ] && break; sleep 0.1; done
fi
exit 0
