"""dnsmasq as a supervised child of the node: DHCP (static leases) for the VMs on the bridge.

docs/hkd.md#dnsmasq. The command line is QVD's:

    dnsmasq -k --log-dhcp --bind-interfaces --interface <bridge> --except-interface lo
            --dhcp-range interface:<bridge>,<vm.network.ip.start>,static
            --dhcp-option option:router,<vm.network.gateway>
            --dhcp-hostsfile <internal.vm.network.dhcp-hostsfile> -X 50000 [--domain=<d>]

plus our additions, each for a reason:
  --log-facility=-         dnsmasq's log goes to its stderr, which we copy into our log
                           (machines without syslog would otherwise lose every error line);
  --pid-file, --dhcp-leasefile under path.run
                           several nodes/tests on one machine must not share
                           /var/run/dnsmasq.pid or /var/lib/misc/dnsmasq.leases;
  --conf-file=/dev/null    a system /etc/dnsmasq.conf must not leak into the VM network
                           (put what you need in command.dhcpd.args.extra);
  DNS: vm.network.dns_server decides.
      empty                  -> --port=0: DHCP only, VMs get no DNS server from us;
      "self" or the gateway  -> dnsmasq also serves DNS on the bridge (the original's
                                behaviour) and hands itself out as DNS server;
      another address        -> --port=0 and --dhcp-option option:dns-server,<address>;
  --user=root              only when dnsmasq's unprivileged user could not read the hosts
                           file (its folder is not searchable by others); logged as a warning.

Hosts file: one ``<mac>,<ip>`` line per registered VM, sorted by MAC, written to a temporary
file and renamed over the old one, then SIGHUP. Writes are coalesced: many VMs starting at
once share one write and one SIGHUP (so registering n VMs is not O(n^2) file work).
"""
import logging
import os
import shlex
import shutil
import signal
import stat
import tempfile
import time

import gevent
import gevent.event
import gevent.lock
from gevent import subprocess

from ..config.network import parse_ip
from ..system import procfs

log = logging.getLogger("qvd.hkd.dnsmasq")

MAX_RESTART_DELAY = 60
# A dnsmasq that stayed up this long is healthy again: the next crash restarts after the base delay.
STABLE_SECONDS = 60


class DnsmasqError(Exception):
    """dnsmasq cannot run (port taken, binary missing); the message is one line."""


# --- pure parts ----------------------------------------------------------------------------

def hosts_file_text(hosts):
    """{mac: ip} -> the hosts file text, one '<mac>,<ip>' per line sorted by MAC."""
    return "".join(f"{mac},{ip}\n" for mac, ip in sorted(hosts.items()))


def dns_mode(cfg):
    """('none'|'self'|'other', address) from vm.network.dns_server (see module doc)."""
    value = (cfg.get_str("vm.network.dns_server") or "").strip()
    gateway = (cfg.get_str("vm.network.gateway") or "").strip()
    if not value:
        return "none", None
    if value.lower() == "self" or value == gateway:
        return "self", gateway or None
    return "other", str(parse_ip(value, "vm.network.dns_server"))


def dnsmasq_argv(cfg, run_as_root=False):
    """The full dnsmasq command line for cfg (pure; no file system access)."""
    bridge = cfg.get_str("vm.network.bridge")
    start = cfg.get_str("vm.network.ip.start")
    gateway = (cfg.get_str("vm.network.gateway") or "").strip()
    run_dir = cfg.get_str("path.run")
    argv = shlex.split(cfg.get_str("command.dhcpd"))
    argv += ["-k", "--log-dhcp", "--bind-interfaces", "--interface", bridge, "--except-interface", "lo",
             "--dhcp-range", f"interface:{bridge},{start},static"]
    if gateway:
        argv += ["--dhcp-option", f"option:router,{gateway}"]
    argv += ["--dhcp-hostsfile", cfg.get_str("internal.vm.network.dhcp-hostsfile"), "-X", "50000"]
    domain = (cfg.get_str("vm.network.domain") or "").strip()
    if domain:
        argv.append(f"--domain={domain}")
    mode, address = dns_mode(cfg)
    if mode != "self":
        argv.append("--port=0")
    if mode == "other":
        argv += ["--dhcp-option", f"option:dns-server,{address}"]
    argv += ["--log-facility=-", f"--pid-file={os.path.join(run_dir, 'dnsmasq.pid')}",
             f"--dhcp-leasefile={os.path.join(run_dir, 'dnsmasq.leases')}", "--conf-file=/dev/null"]
    if run_as_root:
        argv.append("--user=root")
    argv += shlex.split(cfg.get_str("command.dhcpd.args.extra") or "")
    return argv


def next_delay(current, base):
    """Restart back-off: base, 2*base, 4*base ... capped at MAX_RESTART_DELAY."""
    if current is None:
        return max(base, 0)
    return min(max(current * 2, base, 1), MAX_RESTART_DELAY)


# --- listeners on the DHCP/DNS ports ---------------------------------------------------------

def port_conflicts(listeners, network, ports):
    """Listeners on one of ports bound to a wildcard or to an address inside network."""
    bad = []
    for proto, addr, port in listeners:
        if port not in ports:
            continue
        if addr in ("0.0.0.0", "::"):
            bad.append((proto, addr, port))
            continue
        try:
            if parse_ip(addr) in network:
                bad.append((proto, addr, port))
        except ValueError:
            continue
    return bad


def check_dhcp_ports(cfg, listeners=None):
    """Raise DnsmasqError when something already listens where our dnsmasq must bind.

    UDP 67 (DHCP) always; port 53 (TCP or UDP) only when our dnsmasq serves DNS
    (vm.network.dns_server 'self' or the gateway) - with --port=0 port 53 is not ours to take.
    A listener counts when bound to 0.0.0.0/:: or to an address inside the VM network
    (docs/hkd.md#start-up-checks). Typical culprit: the system dnsmasq the QVD manual says to disable.
    """
    network = cfg.vm_network().network
    listeners = procfs.listening_sockets() if listeners is None else listeners
    checks = [("udp", 67)]
    if dns_mode(cfg)[0] == "self":
        checks += [("udp", 53), ("tcp", 53)]
    for proto, port in checks:
        found = [c for c in port_conflicts(listeners, network, {port}) if c[0] == proto]
        if found:
            _, addr, _ = found[0]
            raise DnsmasqError(
                f"{proto.upper()} port {port} is already in use on {addr} (a system dnsmasq? stop and "
                f"disable it as the QVD manual says); the node's dnsmasq needs it for the VMs on "
                f"{cfg.get_str('vm.network.bridge')}")


def _others_can_reach(path):
    """True when an unprivileged user may read path (every folder searchable, file readable)."""
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            mode = os.stat(folder).st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(folder)
        if parent == folder:
            return True
        folder = parent


# --- a previous run's dnsmasq ------------------------------------------------------------------

def kill_leftover_dnsmasq(hosts_file, wait=5.0):
    """A node killed with SIGKILL leaves its dnsmasq running, holding UDP 67: it would block the
    restart. Ours is recognised by our hosts file on its command line; end it."""
    pids = procfs.pids_with_argument(os.path.abspath(hosts_file))
    for pid in pids:
        log.warning("stopping dnsmasq (pid %d) left by a previous run of this node", pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + wait
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if procfs.is_alive(p)]
        gevent.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


# --- the supervisor ---------------------------------------------------------------------------

class DnsmasqSupervisor:
    """Runs dnsmasq as a child, keeps its hosts file, restarts it with back-off when it dies."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.hosts_path = cfg.get_str("internal.vm.network.dhcp-hostsfile")
        self.base_delay = cfg.get_int("internal.hkd.agent.dhcpdhandler.delay")
        self.hosts = {}                 # mac -> ip
        self.restarts = 0
        self.proc = None
        self._greenlet = None
        self._stopping = False
        self._write_lock = gevent.lock.Semaphore()
        self._dirty = 0                 # generation of self.hosts
        self._written = 0               # generation on disk
        self._started_event = gevent.event.Event()
        self._stderr_greenlet = None
        self.run_as_root = False

    @property
    def pid(self):
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    # --- hosts --------------------------------------------------------------------------------
    def add_host(self, mac, ip):
        """Register a VM's static lease; returns once the file is written and dnsmasq told."""
        mac = mac.lower()
        if self.hosts.get(mac) == ip:
            return
        self.hosts[mac] = ip
        self._dirty += 1
        self._flush()

    def remove_host(self, mac):
        if self.hosts.pop(mac.lower(), None) is None:
            return
        self._dirty += 1
        self._flush()

    def _flush(self):
        # Coalescing: whoever holds the lock writes every change made so far; the greenlets
        # queued behind it find their generation already on disk and return.
        wanted = self._dirty
        with self._write_lock:
            if self._written >= wanted:
                return
            generation = self._dirty
            self._write_hosts_file()
            self._written = generation
            self._hup()

    def _write_hosts_file(self):
        folder = os.path.dirname(os.path.abspath(self.hosts_path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".dhcp-hosts.", dir=folder)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(hosts_file_text(self.hosts))
            os.chmod(tmp, 0o644)    # dnsmasq reads it after dropping privileges
            os.replace(tmp, self.hosts_path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _hup(self):
        pid = self.pid
        if pid is None:
            return          # written before the next (re)start anyway
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as exc:
            log.warning("cannot SIGHUP dnsmasq (pid %s): %s", pid, exc)

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self):
        """Start supervising (returns at once; see wait_started)."""
        if self._greenlet is not None:
            return self
        argv0 = shlex.split(self.cfg.get_str("command.dhcpd"))[0]
        if shutil.which(argv0) is None:
            raise DnsmasqError(f"dnsmasq executable {argv0!r} (command.dhcpd) not found")
        os.makedirs(self.cfg.get_str("path.run"), exist_ok=True)
        os.makedirs(os.path.dirname(os.path.abspath(self.hosts_path)), exist_ok=True)
        extra = self.cfg.get_str("command.dhcpd.args.extra") or ""
        if os.geteuid() == 0 and not _others_can_reach(self.hosts_path) and "--user" not in extra \
                and "-u" not in shlex.split(extra):
            self.run_as_root = True
            log.warning("dnsmasq would drop privileges and then fail to read %s (a folder on the way is not "
                        "searchable by others); running it with --user=root. Put "
                        "internal.vm.network.dhcp-hostsfile in a world-searchable folder to avoid this.",
                        self.hosts_path)
        self._stopping = False
        with self._write_lock:
            self._write_hosts_file()
            self._written = self._dirty
        self._greenlet = gevent.spawn(self._supervise)
        return self

    def wait_started(self, timeout):
        """True once dnsmasq has reported it serves DHCP (its 'DHCP, ...' log line)."""
        return self._started_event.wait(timeout)

    def _spawn(self):
        with self._write_lock:
            self._write_hosts_file()
            self._written = self._dirty
        argv = dnsmasq_argv(self.cfg, self.run_as_root)
        log.info("starting dnsmasq: %s", " ".join(shlex.quote(a) for a in argv))
        self._started_event.clear()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, close_fds=True)
        self._stderr_greenlet = gevent.spawn(self._copy_log, proc)
        return proc

    def _copy_log(self, proc):
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if "DHCP, static leases" in line or "DHCP, IP range" in line:
                self._started_event.set()
            if "failed" in line or "cannot" in line or "unknown" in line or "bad " in line:
                log.warning("%s", line)
            else:
                log.debug("%s", line)
        proc.stderr.close()

    def _supervise(self):
        delay = None
        while not self._stopping:
            try:
                self.proc = self._spawn()
            except OSError as exc:
                log.error("cannot start dnsmasq: %s", exc)
                self.proc = None
            started_at = time.monotonic()
            code = self.proc.wait() if self.proc is not None else None
            if self._stopping:
                break
            if time.monotonic() - started_at >= STABLE_SECONDS:
                delay = None
            delay = next_delay(delay, self.base_delay)
            self.restarts += 1
            log.warning("dnsmasq exited (status %s); restarting in %s s (restart %d)", code, delay, self.restarts)
            gevent.sleep(delay)

    def stop(self, timeout=10):
        """SIGTERM dnsmasq, wait for it (SIGKILL after timeout), stop supervising."""
        self._stopping = True
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.terminate()
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
            except OSError:
                pass
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=timeout)
            self._greenlet = None
        if self._stderr_greenlet is not None:
            self._stderr_greenlet.join(timeout=1)
            self._stderr_greenlet.kill(block=False)
            self._stderr_greenlet = None
