"""Everything the node reads in /proc: processes (state, environment, command line, network
namespace, mounts), the listening sockets of the current network namespace, and the host's
RAM and CPU as the original's load balancer counts them.

Plain reads of small files rather than psutil: psutil would replace only the process part
(state, environ, cmdline), not bogomips, network-namespace identity or mount propagation;
its socket listing maps every process's fds where we need one read of /proc/net; and it is
a compiled dependency that the single-file build would have to carry for each target.
"""
import os

PROC = "/proc"


# --- processes --------------------------------------------------------------------------------

def pids():
    """Every pid in /proc (this process included)."""
    return [int(entry) for entry in os.listdir(PROC) if entry.isdigit()]


def process_state(pid):
    """The one-letter state from /proc/<pid>/stat, or None if the process is gone."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as fh:
            data = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    return data[data.rfind(")") + 2:].split(" ", 1)[0]


def is_alive(pid):
    """pid exists and is neither a zombie nor dead."""
    return process_state(pid) not in (None, "Z", "X")


def read_environ(pid):
    """The environment pid started with, as a dict; {} when the process is gone or not ours to read."""
    try:
        with open(f"{PROC}/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return env


def read_cmdline(pid):
    """pid's argv; [] when the process is gone."""
    try:
        with open(f"{PROC}/{pid}/cmdline", "rb") as fh:
            return fh.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return []


def pids_with_argument(value):
    """pids other than ours whose command line has `value` as an argument (or as --opt=value)."""
    me = os.getpid()
    return [pid for pid in pids() if pid != me
            and any(arg == value or arg.endswith("=" + value) for arg in read_cmdline(pid))]


def network_namespace(pid):
    """The identity (device, inode) of pid's network namespace, or None if the process is gone."""
    try:
        st = os.stat(f"{PROC}/{pid}/ns/net")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pids_in_network_namespace(namespace):
    """Every pid whose network namespace is `namespace` (a network_namespace() identity)."""
    return [pid for pid in pids() if network_namespace(pid) == namespace]


def mount_tags(mount_point):
    """The optional fields (``shared:N``, ``master:N`` ...) of mount_point in this process's
    mount namespace, or None when it is not a mount point here."""
    try:
        with open(f"{PROC}/self/mountinfo") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) > 6 and fields[4] == mount_point:
                    return fields[6:fields.index("-")]
    except (OSError, ValueError):
        pass
    return None


# --- sockets ----------------------------------------------------------------------------------

def _hex_to_ipv4(hex_addr):
    raw = bytes.fromhex(hex_addr)
    return ".".join(str(b) for b in reversed(raw))


def parse_proc_net(text, family, proto):
    """Rows of /proc/net/{tcp,udp}{,6} -> [(proto, address, port)] of listening sockets.

    TCP: state 0A (LISTEN). UDP: every socket without a remote peer (state 07) is a listener.
    IPv6 addresses are returned as '::' (wildcard), '::ffff:a.b.c.d' mapped as 'a.b.c.d', or
    the compressed hex form.
    """
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        local, state = fields[1], fields[3]
        if proto == "tcp" and state != "0A":
            continue
        if proto == "udp" and state != "07":
            continue
        addr_hex, port_hex = local.split(":")
        port = int(port_hex, 16)
        if family == 4:
            addr = _hex_to_ipv4(addr_hex)
        else:
            words = [addr_hex[i:i + 8] for i in range(0, 32, 8)]
            raw = b"".join(bytes.fromhex(w)[::-1] for w in words)
            if raw == bytes(16):
                addr = "::"
            elif raw[:12] == bytes(10) + b"\xff\xff":
                addr = ".".join(str(b) for b in raw[12:])
            else:
                addr = raw.hex()
        out.append((proto, addr, port))
    return out


def listening_sockets():
    """[(proto, address, port)] listening in the current network namespace (/proc/net is per namespace)."""
    found = []
    for name, family, proto in (("tcp", 4, "tcp"), ("udp", 4, "udp"), ("tcp6", 6, "tcp"), ("udp6", 6, "udp")):
        try:
            with open(f"{PROC}/net/{name}") as fh:
                found += parse_proc_net(fh.read(), family, proto)
        except OSError:
            continue
    return found


# --- the host's capacity, as the original's load balancer counts it ---------------------------

def usable_ram_mb(meminfo=f"{PROC}/meminfo"):
    """MemTotal in kB / 1000, as the original."""
    with open(meminfo) as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1000
    return 0.0


def usable_cpu(cpuinfo=f"{PROC}/cpuinfo"):
    """0.8 x the sum of bogomips; cpu count x 1000 where the kernel shows no bogomips."""
    total = 0.0
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                if line.lower().startswith("bogomips"):
                    total += float(line.split(":", 1)[1])
    except (OSError, ValueError):
        total = 0.0
    if total <= 0:
        return float((os.cpu_count() or 1) * 1000)
    return 0.8 * total
