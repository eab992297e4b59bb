#!/usr/bin/env bash
# System packages and Python packages the test suite and benchmarks use.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
APT_PACKAGES=(
  dnsmasq-base busybox-static iproute2 iptables nftables procps psmisc   # netns VMs, DHCP, NAT, VM filter
  nxagent nxproxy x11-apps x11-utils xauth xvfb                  # the NX desktop test (Xvfb: the user's screen)
  haproxy socat                                                  # benchmark references
  postgresql                                                     # the failover test: primary + streaming standby
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-driver-lxc libvirt-clients
  libvirt-dev pkg-config gcc qemu-system-x86 qemu-utils cpio     # kvm/lxc hypervisors
  libconfig-properties-perl                                      # node.conf read as the original reads it
  slapd ldap-utils                                               # directory login tests (their own slapd)
  chromium chromium-driver                                       # the browser client's test (headless, Selenium)
  tigervnc-standalone-server x11-xserver-utils                   # the x desktop: Xvnc, xsetroot (xclock: x11-apps)
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  # the tests run their own slapd: the package must not set up and start a system one
  echo "slapd slapd/no_configuration boolean true" | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test,libvirt,bench,pex]'
