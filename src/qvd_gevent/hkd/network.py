"""The node's VM network: startup checks, and (vm.network.setup=1) the seed's network setup.

Everything here acts on the network namespace the node process runs in, so a test can run
the node under ``ip netns exec <test namespace>`` and nothing reaches the machine's own
network.

``check_network(cfg)`` returns precise warnings (the original HKD only noticed a missing
bridge when dnsmasq or brctl failed, docs/hkd.md#networking).

``NetworkSetup(cfg).apply()`` automates the seed's "Networking Requirements" for a
mononode installation, where the operator opts in with vm.network.setup=1:
  1. bridge vm.network.bridge (created if missing) carrying vm.network.gateway with the
     VM network's prefix length, up;
  2. net.ipv4.ip_forward=1;
  3. iptables rules, appended in this order (``nat_rules``):
     - when vm.network.nat.public_address is set, the seed's two rules
         -t nat POSTROUTING -o <bridge> -j SNAT --to-source <public_address>
         -t nat PREROUTING -d <public_address> -p tcp --dport <l7r.port>
                -j DNAT --to-destination <gateway>
       (the seed writes "to-source"; iptables needs "--to-source");
     - when vm.network.firewall.nat.iface is set, the original's (docs/hkd.md#firewall)
         -t nat POSTROUTING -m iprange --src-range <first VM>-<last VM> -o <iface> -j MASQUERADE
The original's filter rules (docs/hkd.md#firewall) are not applied here.
It remembers exactly what it changed (a rule that already existed, a bridge that was there,
forwarding that was already on are left alone) and ``remove()`` undoes exactly that, in
reverse order.
"""
import logging
import shlex

from gevent import subprocess

from ..system.netlink import shared_netlink

log = logging.getLogger("qvd.hkd.network")

IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"


class NetworkSetupError(Exception):
    """The network could not be set up; one line."""


# --- pure parts -------------------------------------------------------------------------------

def vm_range(cfg):
    net = cfg.vm_network()
    return f"{net.start}-{net.broadcast - 1}"


def nat_rules(cfg):
    """[(table, chain, [args...])] this node adds (see module doc), in order."""
    rules = []
    bridge = cfg.get_str("vm.network.bridge")
    public = (cfg.get_str("vm.network.nat.public_address") or "").strip()
    gateway = (cfg.get_str("vm.network.gateway") or "").strip()
    if public:
        if not gateway:
            raise NetworkSetupError("vm.network.nat.public_address is set but vm.network.gateway is empty: "
                                    "the DNAT rule needs the gateway")
        rules.append(("nat", "POSTROUTING", ["-o", bridge, "-j", "SNAT", "--to-source", public]))
        rules.append(("nat", "PREROUTING", ["-d", public, "-p", "tcp", "--dport", str(cfg.get_int("l7r.port")),
                                            "-j", "DNAT", "--to-destination", gateway]))
    iface = (cfg.get_str("vm.network.firewall.nat.iface") or "").strip()
    if iface:
        rules.append(("nat", "POSTROUTING", ["-m", "iprange", "--src-range", vm_range(cfg), "-o", iface,
                                             "-j", "MASQUERADE"]))
    return rules


def network_warnings(cfg, ip_forward, bridge_link):
    """The warnings of check_network from facts: ip_forward text, bridge link dict or None."""
    warnings = []
    bridge = cfg.get_str("vm.network.bridge")
    net = cfg.vm_network()
    gateway = (cfg.get_str("vm.network.gateway") or "").strip()
    if ip_forward is not None and ip_forward.strip() != "1":
        warnings.append("net.ipv4.ip_forward is off: VMs cannot be reached through this node from other "
                        "networks; set net.ipv4.ip_forward=1 in /etc/sysctl.conf (or vm.network.setup=1)")
    if not gateway:
        warnings.append("vm.network.gateway is empty: VMs get no router by DHCP")
    else:
        try:
            if not net.is_node_address(gateway):
                warnings.append(f"vm.network.gateway {gateway} is not in the node range "
                                f"{net.network.network_address + 1}-{net.start - 1} of {net.network}")
        except ValueError:
            warnings.append(f"vm.network.gateway {gateway!r} is not an IPv4 address")
    if bridge_link is None:
        warnings.append(f"bridge {bridge} (vm.network.bridge) does not exist: create it as the QVD manual's "
                        f"'Configure a Network Bridge' says, or set vm.network.setup=1")
        return warnings
    if bridge_link["kind"] != "bridge":
        warnings.append(f"interface {bridge} (vm.network.bridge) is not a bridge (kind {bridge_link['kind']})")
    if not bridge_link["up"]:
        warnings.append(f"bridge {bridge} is down")
    if gateway:
        wanted = (gateway, net.prefixlen)
        if wanted not in [(a, p) for a, p in bridge_link["addresses"]]:
            have = ", ".join(f"{a}/{p}" for a, p in bridge_link["addresses"]) or "no IPv4 address"
            warnings.append(f"bridge {bridge} does not carry the gateway address {gateway}/{net.prefixlen} "
                            f"(vm.network.gateway; it has {have})")
    return warnings


def _read(path):
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def check_network(cfg, netlink=None):
    """Precise warnings about the VM network of the current namespace ([] when all is well)."""
    netlink = netlink or shared_netlink()
    return network_warnings(cfg, _read(IP_FORWARD), netlink.link(cfg.get_str("vm.network.bridge")))


# --- setup ------------------------------------------------------------------------------------

def _run(argv, check=True):
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=30)
    if check and proc.returncode != 0:
        raise NetworkSetupError(f"{' '.join(shlex.quote(a) for a in argv)} failed: "
                                f"{proc.stderr.decode(errors='replace').strip()}")
    return proc


class NetworkSetup:
    """vm.network.setup=1: make the bridge, forwarding and NAT; undo exactly that later."""

    def __init__(self, cfg, netlink=None):
        self.cfg = cfg
        self.netlink = netlink or shared_netlink()
        self.iptables = shlex.split(cfg.get_str("command.iptables")) + ["-w", "10"]
        self.changes = []       # what apply() did, in order: ('link'|'addr'|'up'|'sysctl'|'rule', ...)

    def apply(self):
        """Create what is missing; on failure undo the part already done and raise."""
        try:
            self._apply()
        except BaseException:
            self.remove()
            raise
        return list(self.changes)

    def _apply(self):
        cfg = self.cfg
        bridge = cfg.get_str("vm.network.bridge")
        gateway = (cfg.get_str("vm.network.gateway") or "").strip()
        if not gateway:
            raise NetworkSetupError("vm.network.setup=1 needs vm.network.gateway (the bridge's address)")
        net = cfg.vm_network()
        if not net.is_node_address(gateway):
            raise NetworkSetupError(f"vm.network.gateway {gateway} is not in the node range of {net.network}")
        rules = nat_rules(cfg)
        link = self.netlink.link(bridge)
        with self.netlink as ipr:
            if link is None:
                ipr.link("add", ifname=bridge, kind="bridge")
                self.changes.append(("link", bridge))
                log.info("created bridge %s", bridge)
            elif link["kind"] != "bridge":
                raise NetworkSetupError(f"interface {bridge} (vm.network.bridge) exists and is not a bridge")
            index = ipr.link_lookup(ifname=bridge)[0]
            have = link["addresses"] if link else []
            if (gateway, net.prefixlen) not in have:
                ipr.addr("add", index=index, address=gateway, prefixlen=net.prefixlen)
                self.changes.append(("addr", bridge, gateway, net.prefixlen))
                log.info("added %s/%s to %s", gateway, net.prefixlen, bridge)
            if link is None or not link["up"]:
                ipr.link("set", index=index, state="up")
                if link is not None:
                    self.changes.append(("up", bridge))
        old = (_read(IP_FORWARD) or "").strip()
        if old != "1":
            with open(IP_FORWARD, "w") as fh:
                fh.write("1\n")
            self.changes.append(("sysctl", IP_FORWARD, old or "0"))
            log.info("enabled net.ipv4.ip_forward")
        for table, chain, spec in rules:
            if _run(self.iptables + ["-t", table, "-C", chain] + spec, check=False).returncode == 0:
                log.info("iptables rule already present, left alone: -t %s %s %s", table, chain, " ".join(spec))
                continue
            _run(self.iptables + ["-t", table, "-A", chain] + spec)
            self.changes.append(("rule", table, chain, spec))
            log.info("added iptables rule -t %s -A %s %s", table, chain, " ".join(spec))

    def remove(self):
        """Undo what apply() did, newest first; errors are logged and the rest still undone."""
        while self.changes:
            change = self.changes.pop()
            try:
                self._undo(change)
            except Exception as exc:     # keep undoing the rest
                log.warning("could not undo %s: %s", change, exc)

    def _undo(self, change):
        kind = change[0]
        if kind == "rule":
            _, table, chain, spec = change
            _run(self.iptables + ["-t", table, "-D", chain] + spec)
        elif kind == "sysctl":
            with open(change[1], "w") as fh:
                fh.write(change[2] + "\n")
        elif kind in ("addr", "up", "link"):
            bridge = change[1]
            index = self.netlink.index(bridge)
            if index is None:
                return
            with self.netlink as ipr:
                if kind == "addr":
                    ipr.addr("del", index=index, address=change[2], prefixlen=change[3])
                elif kind == "up":
                    ipr.link("set", index=index, state="down")
                else:
                    ipr.link("del", index=index)

