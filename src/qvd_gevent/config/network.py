"""VM network arithmetic (QVD::Config::Network): node range, VM range, MACs."""
import ipaddress


class NetworkError(ValueError):
    pass


def parse_netmask(value):
    """Dotted mask or prefix length -> prefix length."""
    text = str(value).strip()
    if text.isdigit():
        length = int(text)
        if not 0 <= length <= 32:
            raise NetworkError(f"netmask {text!r} is not a prefix length 0-32")
        return length
    try:
        return ipaddress.IPv4Network(f"0.0.0.0/{text}").prefixlen
    except ValueError:
        raise NetworkError(f"netmask {text!r} is neither dotted nor a prefix length") from None


def parse_ip(value, what="address"):
    try:
        return ipaddress.IPv4Address(str(value).strip())
    except ValueError:
        raise NetworkError(f"{what} {value!r} is not an IPv4 address") from None


class VmNetwork:
    """network = start & mask; nodes = network+1 .. start-1; VMs = start .. broadcast-1."""

    def __init__(self, ip_start, netmask):
        self.start = parse_ip(ip_start, "vm.network.ip.start")
        self.prefixlen = parse_netmask(netmask)
        self.network = ipaddress.IPv4Network(f"{self.start}/{self.prefixlen}", strict=False)
        self.broadcast = self.network.broadcast_address
        if not (self.network.network_address < self.start < self.broadcast):
            raise NetworkError(f"vm.network.ip.start {self.start} leaves no VM range in {self.network}")

    @property
    def netmask(self):
        return str(self.network.netmask)

    def is_vm_address(self, ip):
        ip = parse_ip(ip)
        return self.start <= ip < self.broadcast

    def is_node_address(self, ip):
        ip = parse_ip(ip)
        return self.network.network_address < ip < self.start

    def vm_addresses_top_down(self):
        ip = self.broadcast - 1
        while ip >= self.start:
            yield ip
            ip -= 1

    def free_vm_address(self, used):
        """Highest free VM address, as the original hands them out."""
        used = {str(u) for u in used if u}
        for ip in self.vm_addresses_top_down():
            if str(ip) not in used:
                return str(ip)
        raise NetworkError("No free IP addresses")


def mac_for_ip(ip, prefix="54:52:00"):
    """prefix + the 2nd, 3rd and 4th octets in lowercase hex: 10.0.1.100 -> 54:52:00:00:01:64."""
    octets = parse_ip(ip).packed
    return prefix.lower() + "".join(f":{b:02x}" for b in octets[1:])
