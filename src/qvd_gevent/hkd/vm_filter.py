"""The VM network filter: what a VM may reach, in nftables (docs/hkd.md#firewall).

With internal.vm.network.firewall.enable (on by default, as in the original) the HKD loads
its rules at start and deletes them exactly at stop:

- bridge hypervisors (netns, kvm, lxc): ``table inet qvd`` filters what VMs send to the
  node and through it (the original's global iptables rules: protect_host, protect_vms,
  allow_login_from_vm), and ``table bridge qvd`` filters what enters the bridge from a
  VM's port: its own MAC and IPv4 address only (the original's per-VM ebtables chains), and
  no frame from one VM's port to another's (protect_vms). A VM's port, MAC and address are
  one element of the sets ``vm_macs`` and ``vm_addresses``, added before the VM starts and
  deleted at its clean-up; a port named like a VM's but without an element passes nothing.
- ``process`` VMs (loopback, no bridge), node running as root: ``table inet
  qvd_lo_<hash of path.run>`` lets only the node's own uid open connections to a process
  VM's VMA and display ports (``loopback_ruleset``).

Both tables are loaded atomically by one ``nft -f`` that also replaces what a crashed
run left. The text is built here from the configuration alone (pure functions), so the
rules can be read in tests and in ``${path.run}/vm-filter.nft``.
"""
import hashlib
import logging
import os
import re
import shlex
from dataclasses import dataclass

from gevent import subprocess

from ..system.spawn import SpawnError, run_collect

log = logging.getLogger("qvd.hkd.vm_filter")

TABLE = "qvd"
NFT_TIMEOUT = 30
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,14}\*$")


class VmFilterError(Exception):
    """The filter could not be loaded or changed; one line for the operator."""


# --- pure parts -------------------------------------------------------------------------------

@dataclass(frozen=True)
class BridgeFilterSettings:
    vm_range: str               # "10.0.0.100-10.0.255.254"
    node_range: str             # "10.0.0.1-10.0.0.99"
    port_pattern: str           # "qvdv*": the bridge ports of this node's VMs
    l7r_port: int
    protect_host: bool
    protect_vms: bool
    allow_login_from_vm: bool
    use_dhcp: bool
    serve_dns: bool             # our dnsmasq answers DNS on the bridge


def bridge_filter_settings(cfg, port_pattern):
    from .dnsmasq import dns_mode
    net = cfg.vm_network()
    if not _PATTERN.match(port_pattern):
        raise VmFilterError(f"VM port pattern {port_pattern!r} is not an interface name prefix with '*'")
    use_dhcp = cfg.get_bool("vm.network.use_dhcp")
    return BridgeFilterSettings(
        vm_range=f"{net.start}-{net.broadcast - 1}",
        node_range=f"{net.network.network_address + 1}-{net.start - 1}",
        port_pattern=port_pattern,
        l7r_port=cfg.get_int("l7r.port"),
        protect_host=cfg.get_bool("internal.vm.network.firewall.protect_host"),
        protect_vms=cfg.get_bool("internal.vm.network.firewall.protect_vms"),
        allow_login_from_vm=cfg.get_bool("internal.vm.network.firewall.allow_login_from_vm"),
        use_dhcp=use_dhcp,
        serve_dns=use_dhcp and dns_mode(cfg)[0] == "self",
    )


def _rules(lines):
    return "".join(f"\t\t{line}\n" for line in lines)


def bridge_ruleset(s: BridgeFilterSettings):
    """The two tables of a bridge node, as ``nft -f`` text (without the replace preamble)."""
    vms, nodes, ports = s.vm_range, s.node_range, f'"{s.port_pattern}"'
    # what VMs send to the node itself (the original's INPUT rules)
    to_node = ["ct state established,related accept"]
    if s.use_dhcp:
        to_node.append("udp dport 67 accept")                     # DHCP renewals, unicast
    if s.serve_dns:
        to_node += ["udp dport 53 accept", "tcp dport 53 accept"]
    if s.allow_login_from_vm:
        to_node += [f"ip daddr {nodes} tcp dport {s.l7r_port} accept",
                    f"ip daddr {nodes} icmp type echo-request accept"]
    if s.protect_host:
        to_node.append("counter drop")
    # what VMs send through the node (routed; bridged too where br_netfilter passes it here)
    through = ["ct state established,related accept"]
    if s.allow_login_from_vm:
        through.append(f"ip daddr {nodes} tcp dport {s.l7r_port} accept")
    if s.protect_host:
        through.append(f"ip daddr {nodes} counter drop")
    if s.protect_vms:
        through.append(f"ip daddr {vms} counter drop")
    # what enters the bridge from a VM's port: its own MAC and address only
    from_port = [
        "iifname . ether saddr != @vm_macs counter drop",
        "ether type arp iifname . arp saddr ether . arp saddr ip @vm_addresses accept",
        "ether type arp arp saddr ip 0.0.0.0 iifname . arp saddr ether @vm_macs accept",
        "ether type ip iifname . ether saddr . ip saddr @vm_addresses accept",
    ]
    if s.use_dhcp:
        from_port.append("ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept")
    from_port.append("counter drop")
    # frames bridged from a VM's port to another port (no conntrack here: stateless, as the original)
    bridged = ["ether type ip udp dport 67 counter drop"]          # DHCP goes to this node only
    if s.protect_vms:
        bridged += [f"oifname {ports} counter drop", f"ether type ip ip daddr {vms} counter drop"]
    if s.allow_login_from_vm:
        bridged.append(f"ether type ip ip daddr {nodes} tcp dport {s.l7r_port} accept")
    if s.protect_host:
        bridged += [f"ether type ip ip daddr {nodes} tcp flags & (syn | ack) == syn counter drop",
                    f"ether type ip ip daddr {nodes} ip protocol != tcp counter drop"]
    return (
        f"table inet {TABLE} {{\n"
        "\tchain input {\n"
        "\t\ttype filter hook input priority filter; policy accept;\n"
        f"\t\tip saddr {vms} jump vm_to_node\n"
        "\t}\n"
        "\tchain vm_to_node {\n" + _rules(to_node) + "\t}\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority filter; policy accept;\n"
        f"\t\tip saddr {vms} jump vm_through_node\n"
        "\t}\n"
        "\tchain vm_through_node {\n" + _rules(through) + "\t}\n"
        "}\n"
        f"table bridge {TABLE} {{\n"
        "\tset vm_macs {\n\t\ttype ifname . ether_addr\n\t}\n"
        "\tset vm_addresses {\n\t\ttype ifname . ether_addr . ipv4_addr\n\t}\n"
        "\tchain prerouting {\n"
        "\t\ttype filter hook prerouting priority filter; policy accept;\n"
        f"\t\tiifname {ports} jump from_vm_port\n"
        "\t}\n"
        "\tchain from_vm_port {\n" + _rules(from_port) + "\t}\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority filter; policy accept;\n"
        f"\t\tiifname {ports} jump vm_port_bridged\n"
        "\t}\n"
        "\tchain vm_port_bridged {\n" + _rules(bridged) + "\t}\n"
        "}\n"
    )


def loopback_table(run_dir):
    """Per node (several may share a machine): named after its path.run, which its lock makes unique."""
    digest = hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:8]
    return f"{TABLE}_lo_{digest}"


def loopback_ruleset(table, address_base, ports, node_uid):
    """process VMs: only node_uid may open TCP connections to the VMs' VMA and display ports."""
    port_set = ", ".join(str(int(p)) for p in sorted(set(ports)))
    return (
        f"table inet {table} {{\n"
        "\tchain output {\n"
        "\t\ttype filter hook output priority filter; policy accept;\n"
        f"\t\tip daddr {address_base} tcp dport {{ {port_set} }} tcp flags & (syn | ack) == syn "
        f"meta skuid != {int(node_uid)} counter reject with tcp reset\n"
        "\t}\n"
        "}\n"
    )


def replace_script(tables, ruleset):
    """Delete what a previous run left (declaring a table first makes the delete never fail), then load."""
    head = "".join(f"table {family} {name}\ndelete table {family} {name}\n" for family, name in tables)
    return head + ruleset


def delete_script(tables):
    return "".join(f"table {family} {name}\ndelete table {family} {name}\n" for family, name in tables)


def vm_element_script(verb, port, mac, ip):
    """``add``/``delete`` a VM's anti-spoofing elements (port . MAC, port . MAC . IPv4), one batch."""
    import ipaddress
    if verb not in ("add", "delete"):
        raise ValueError(verb)
    if not _IFNAME.match(port or ""):
        raise VmFilterError(f"{port!r} is not an interface name")
    mac = (mac or "").lower()
    if not _MAC.match(mac):
        raise VmFilterError(f"{mac!r} is not a MAC address")
    address = ipaddress.IPv4Address(ip)
    return (f'{verb} element bridge {TABLE} vm_macs {{ "{port}" . {mac} }}; '
            f'{verb} element bridge {TABLE} vm_addresses {{ "{port}" . {mac} . {address} }}')


def nft_error_line(output):
    """nft's first 'Error: ...' (its other lines echo the rule and point at it), else its first line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if "Error:" in line:
            return line[line.index("Error:") + len("Error:"):].strip()
    return lines[0] if lines else "no output"


# --- running nft ------------------------------------------------------------------------------

class NftFilter:
    """Tables loaded by one nft -f, deleted by one nft call; subclasses say which."""

    tables = ()

    def __init__(self, cfg, ruleset):
        self.nft = shlex.split(cfg.get_str("command.nft"))
        self.ruleset = ruleset
        self.path = os.path.join(cfg.get_str("path.run"), "vm-filter.nft")
        self.installed = False

    def _nft(self, args):
        env = {"PATH": os.environ.get("PATH", DEFAULT_PATH)}
        try:
            code, out = run_collect(self.nft + list(args), env, NFT_TIMEOUT)
        except (SpawnError, FileNotFoundError):
            raise VmFilterError(f"command.nft {self.nft[0]!r} not found: install nftables (Debian package "
                                "nftables), or set internal.vm.network.firewall.enable=0") from None
        except OSError as exc:
            raise VmFilterError(f"command.nft {self.nft[0]!r} cannot be run: {exc.strerror}") from None
        except subprocess.TimeoutExpired:
            raise VmFilterError(f"{self.nft[0]} did not answer within {NFT_TIMEOUT} s") from None
        return code, out.decode("utf-8", "replace")

    def install(self):
        """Replace any leftover tables of this node by fresh ones, atomically."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(replace_script(self.tables, self.ruleset))
        os.replace(tmp, self.path)
        code, out = self._nft(["-f", self.path])
        if code != 0:
            raise VmFilterError(f"the VM network filter could not be loaded: {nft_error_line(out)} (it needs "
                                f"nftables with the kernel's nf_tables {self.needs}; rules in {self.path}; "
                                "or set internal.vm.network.firewall.enable=0)")
        self.installed = True
        log.info("VM network filter loaded: %s", ", ".join(f"table {f} {n}" for f, n in self.tables))

    def remove(self):
        """Delete this node's tables (and nothing else)."""
        if not self.installed:
            return
        code, out = self._nft([delete_script(self.tables)])
        if code != 0:
            raise VmFilterError(f"deleting the VM network filter failed: {nft_error_line(out)}")
        self.installed = False
        log.info("VM network filter removed")

    def add_vm(self, port, mac, ip):
        """Let a VM's port carry its own MAC and address (nothing for filters without ports)."""

    def remove_vm(self, port, mac, ip):
        pass


class BridgeFilter(NftFilter):
    tables = (("inet", TABLE), ("bridge", TABLE))
    needs = "inet and bridge families"

    def __init__(self, cfg, port_pattern):
        super().__init__(cfg, bridge_ruleset(bridge_filter_settings(cfg, port_pattern)))

    def _elements(self, verb, port, mac, ip):
        code, out = self._nft([vm_element_script(verb, port, mac, ip)])
        if code != 0:
            raise VmFilterError(f"VM port {port}: {verb} of its filter elements failed: {nft_error_line(out)}")

    def add_vm(self, port, mac, ip):
        self._elements("add", port, mac, ip)

    def remove_vm(self, port, mac, ip):
        self._elements("delete", port, mac, ip)


class LoopbackFilter(NftFilter):
    needs = "inet family"

    def __init__(self, cfg, ports, node_uid, address_range):
        self.tables = (("inet", loopback_table(cfg.get_str("path.run"))),)
        super().__init__(cfg, loopback_ruleset(self.tables[0][1], address_range, ports, node_uid))


def vm_filter_for(cfg, hypervisor):
    """The filter this node loads, or None (with a warning saying what is not separated)."""
    if not cfg.get_bool("internal.vm.network.firewall.enable"):
        log.warning("internal.vm.network.firewall.enable is off: VMs can reach this node's services, each "
                    "other's VMA and display ports, and use each other's addresses")
        return None
    if hypervisor.uses_bridge:
        return BridgeFilter(cfg, hypervisor.port_pattern())
    if os.geteuid() != 0:
        log.warning("process VMs: the node does not run as root, so no rule keeps other local users "
                    "(or the VMs, which run as this node's user) from the VMs' VMA and display ports")
        return None
    ports = (cfg.get_int("internal.vm.port.vma"), cfg.get_int("internal.nxagent.display") + 4000)
    return LoopbackFilter(cfg, ports, os.getuid(), hypervisor.address_range)
