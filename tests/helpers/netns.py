"""A test "host": a network namespace with no route out, and everything in it removed after.

docs/testing.md#network-safety: a test that gives anything a private-range address runs the bridge,
dnsmasq and the VMs inside a namespace it made, so a mistake fails with "network
unreachable" instead of leaving the machine. Usage:

    from helpers.netns import TestNamespace, test_host      # fixture

    def test_x(test_host):
        test_host.run(["ip", "link"])                       # runs inside the namespace
        out = test_host.python(code, timeout=60)            # a gevent driver inside it

``vm_prefix`` is a short random vm.network.netns.prefix: VM namespaces (``<prefix>-vm<id>``)
made by code running in the test namespace are found and removed by it too.
``destroy()`` kills every process in the test namespace and in those VM namespaces, then
deletes the namespaces; it is safe to call twice and runs from the fixture's finalizer
whether the test passed or not.
"""
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from .hkd_env import open_to_vms

NETNS_DIR = "/run/netns"
ROOT_REASON = "needs root (network namespaces); run the system tests as root (CI does)"

# Put in front of driver code: monkey patching first, the package and tests/ importable.
DRIVER_PROLOGUE = """\
from gevent import monkey
monkey.patch_all()
import json, logging, os, sys, time
import gevent
sys.path.insert(0, {tests_dir!r})
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
def report(value):
    print("DRIVER-RESULT " + json.dumps(value), flush=True)
"""


def require_root():
    if os.geteuid() != 0:
        print(f"SKIP: {ROOT_REASON}", file=sys.stderr)
        pytest.skip(ROOT_REASON)


def _inode(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pids_in(name):
    target = _inode(os.path.join(NETNS_DIR, name))
    if target is None:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _inode(f"/proc/{entry}/ns/net") == target and int(entry) != os.getpid():
            pids.append(int(entry))
    return pids


def list_netns():
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


class TestNamespace:
    __test__ = False        # not a test class for pytest

    def __init__(self):
        token = secrets.token_hex(3)
        self.name = f"qvdtest-{token}"
        self.vm_prefix = f"qt{token}"           # 8 characters: vm.network.netns.prefix
        self.created = False

    # --- lifecycle ---
    def create(self):
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=30)
        self.created = True
        self.run(["ip", "link", "set", "lo", "up"], check=True)
        routes = self.run(["ip", "-4", "route", "show"], check=True).stdout.strip()
        assert routes == "", f"a fresh test namespace must have no route out, it has: {routes}"
        return self

    def vm_namespaces(self):
        return [n for n in list_netns() if n.startswith(self.vm_prefix + "-")]

    def destroy(self):
        names = self.vm_namespaces() + ([self.name] if self.created else [])
        for _ in range(50):                     # bounded: SIGKILLed processes vanish quickly
            pids = [p for n in names for p in pids_in(n)]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        for name in names:
            subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL, timeout=30, check=False)
        self.created = False

    def __enter__(self):
        return self.create()

    def __exit__(self, *exc):
        self.destroy()

    # --- running things inside ---
    def argv(self, argv, mode="nsenter"):
        """argv run inside the namespace.

        mode "nsenter" enters only the network namespace, so namespaces made by the command
        are visible to everyone (and to destroy()); "exec" is ``ip netns exec``, which also
        gives the command a private mount namespace (see hypervisors/netns.py).
        """
        if mode == "exec":
            return ["ip", "netns", "exec", self.name] + list(argv)
        return ["nsenter", f"--net={NETNS_DIR}/{self.name}", "--"] + list(argv)

    def run(self, argv, check=False, timeout=60, **kwargs):
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.argv(argv), check=check, timeout=timeout, **kwargs)

    def popen(self, argv, **kwargs):
        return subprocess.Popen(self.argv(argv), **kwargs)

    def python(self, code, timeout=120, env=None, mode="nsenter"):
        """Run a gevent driver inside the namespace; returns (value given to report(), completed process).

        The driver gets DRIVER_PROLOGUE (monkey patching, report()). A non-zero exit or no
        report fails the test with the driver's output.
        """
        tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        source = DRIVER_PROLOGUE.format(tests_dir=tests_dir) + textwrap.dedent(code)
        full_env = dict(os.environ)
        full_env.update(env or {})
        proc = subprocess.run(self.argv([sys.executable, "-c", source], mode), capture_output=True, text=True,
                              timeout=timeout, env=full_env, check=False)
        value = None
        for line in proc.stdout.splitlines():
            if line.startswith("DRIVER-RESULT "):
                value = json.loads(line[len("DRIVER-RESULT "):])
        if proc.returncode != 0 or value is None:
            raise AssertionError(f"driver failed (exit {proc.returncode})\n--- stdout\n{proc.stdout[-4000:]}"
                                 f"\n--- stderr\n{proc.stderr[-8000:]}")
        return value, proc

    def links(self):
        return self.run(["ip", "-o", "link", "show"], check=True).stdout


@pytest.fixture
def test_host(tmp_path):
    """A TestNamespace, created for the test and destroyed after it (even on failure).

    Safety net: a process still mentioning the test's tmp_path after the namespaces are gone
    escaped the cleanup; it is killed and the test fails.
    """
    require_root()
    ns = TestNamespace()
    try:
        ns.create()
        yield ns
    finally:
        ns.destroy()
        escaped = processes_mentioning(str(tmp_path))
        for pid, _ in escaped:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        left = [n for n in list_netns() if n == ns.name or n.startswith(ns.vm_prefix + "-")]
        assert not left, f"namespaces left behind: {left}"
        assert not escaped, f"processes escaped the namespace cleanup: {escaped}"


# --- what the netns/dnsmasq system tests share -------------------------------------------------

VM_NET = "10.77"        # private range: lives only inside test namespaces


def node_settings(host, tmp_path, **extra):
    """Config values for a node whose network lives inside test namespace `host`."""
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    values = {
        "nodename": "test-node",
        "path.run": str(run),
        "vm.hypervisor": "netns",
        "vm.network.bridge": "qvdbr0",
        "vm.network.ip.start": f"{VM_NET}.0.100",
        "vm.network.netmask": "16",
        "vm.network.gateway": f"{VM_NET}.0.1",
        "vm.network.setup": "1",
        "vm.network.netns.prefix": host.vm_prefix,
        "vm.network.netns.dhcp_timeout": "15",
        "internal.hkd.agent.dhcpdhandler.delay": "1",
        "vm.environment.pass": "PYTHONPATH",     # a development checkout runs its own code in VMs
    }
    values.update({k: str(v) for k, v in extra.items()})
    return values


def hkd_node_conf(host, tmp_path, pg_server, dbname, **extra):
    """node.conf for an HKD inside test namespace `host`, with short timers; it reaches the
    test PostgreSQL through its unix socket (sockets cross network namespaces)."""
    from .database import TEST_ROLE, TEST_ROLE_PASSWORD
    values = node_settings(host, tmp_path)
    values.update({
        "database.host": str(pg_server.embedded.directory), "database.port": pg_server.port,
        "database.name": dbname, "database.user": TEST_ROLE, "database.password": TEST_ROLE_PASSWORD,
        "internal.hkd.vmhandler.vma_monitor.delay.starting": 0.2,
        "internal.hkd.agent.vm_command_handler.delay": 2,
        "internal.hkd.timeout.on_state.stopping.shutdown": 5,
        "internal.hkd.timeout.on_state.stopping.stop": 5,
    })
    values.update(extra)
    conf = tmp_path / "node.conf"
    conf.write_text("".join(f"{k} = {v}\n" for k, v in values.items()))
    return conf


VMA_CALL = """
import os, sys, urllib.error, urllib.request
request = urllib.request.Request(sys.argv[1])
if os.environ.get("VMA_KEY"):
    request.add_header("Authorization", "Bearer " + os.environ["VMA_KEY"])
try:
    print(urllib.request.urlopen(request, timeout=3).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
"""


def vma_status(run, address, method="ping", key=None):
    """HTTP status of a VMA call from wherever ``run`` runs its argv (a namespace's run());
    key: the agent key to present (given in the environment, never on a command line)."""
    env = dict(os.environ, VMA_KEY=key or "")
    done = run([sys.executable, "-c", VMA_CALL, f"http://{address}:3030/vma/{method}"], env=env)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def in_netns(name):
    """A run() for argv inside the network namespace ``name`` (a VM's)."""
    def run(argv, **kwargs):
        return subprocess.run(["nsenter", f"--net={NETNS_DIR}/{name}", "--"] + list(argv), capture_output=True,
                              text=True, timeout=60, check=False, **kwargs)
    return run


def write_http_di(tmp_path, echo=False):
    """A tiny VM init: busybox httpd on the leased address answering the VMA's ping.

    /vma/ping returns ``1`` and /vma/x_state ``"stopped"`` (valid SimpleRPC answers, so
    VmaClient and the HKD's VMA monitor accept them). With echo=True a busybox nc echo
    listens on the display port 4100 as well (docs/hkd.md#process-and-netns-vms: a density VM).
    A few hundred KB of memory per VM, against tens of MB for qvd-vm-init.
    """
    www = tmp_path / "www"
    (www / "vma").mkdir(parents=True, exist_ok=True)
    (www / "vma" / "ping").write_text("1\n")
    (www / "vma" / "x_state").write_text('"stopped"\n')
    di = tmp_path / ("echo-di.sh" if echo else "http-di.sh")
    # pid 1 of the VM's pid namespace, like a container's init: a signal it has no handler
    # for does not reach it, so it traps SIGTERM (the graceful stop) and ends the VM
    lines = ["#!/bin/sh", "# a netns VM's init: answers HTTP (and echo) on its own address",
             "trap 'exit 0' TERM"]
    if echo:
        lines.append('busybox nc -ll -p 4100 -e /bin/cat &')
    lines += [f'busybox httpd -f -p "$QVD_VM_ADDRESS:${{QVD_VMA_PORT:-3030}}" -h {www} &', "wait"]
    di.write_text("\n".join(lines) + "\n")
    di.chmod(0o755)
    open_to_vms(tmp_path)
    return str(di)


# Driver code: settings in $QVD_TEST_SETTINGS (JSON); network set up, dnsmasq up, hypervisor ready.
DRIVER_BOOT = """
from qvd_gevent.config import Config
from qvd_gevent.config.network import mac_for_ip
from qvd_gevent.hkd.dnsmasq import DnsmasqSupervisor, check_dhcp_ports
from qvd_gevent.hkd.network import NetworkSetup, check_network
from qvd_gevent.hypervisors.base import VmSpec
from qvd_gevent.hypervisors.netns import NetnsHypervisor, pids_in_netns

cfg = Config(json.loads(os.environ["QVD_TEST_SETTINGS"]))
DI = os.environ.get("QVD_TEST_DI", "")

def http_get(address, port, path, timeout=5):
    import socket
    with socket.create_connection((address, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\\r\\nHost: {address}\\r\\n\\r\\n".encode())
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    return int(head.split()[1]), body.decode(errors="replace")

def vm_spec(vm_id, ip, di=None):
    mac = mac_for_ip(ip, cfg.get_str("vm.network.mac.prefix"))
    return VmSpec(vm_id=vm_id, name=f"vm{vm_id}", ip=ip, mac=mac, memory=64, di_id=1, di_path=di or DI)

def boot(network=True, dhcp=True):
    global setup, dns, hv
    setup = NetworkSetup(cfg)
    if network:
        setup.apply()
    dns = None
    if dhcp:
        check_dhcp_ports(cfg)
        dns = DnsmasqSupervisor(cfg).start()
        assert dns.wait_started(10), "dnsmasq did not start"
    hv = NetnsHypervisor(cfg)
    hv.check()

def start_vm(vm_id, ip, di=None):
    spec = vm_spec(vm_id, ip, di)
    dns.add_host(spec.mac, spec.ip)
    return hv.start(spec)

def wait_http(address, port=3030, path="/vma/ping", timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http_get(address, port, path)
        except OSError:
            if time.monotonic() > deadline:
                raise
            gevent.sleep(0.05)
"""


def run_driver(host, tmp_path, code, settings=None, timeout=120, di=None, mode="nsenter"):
    env = {"QVD_TEST_SETTINGS": json.dumps(settings or node_settings(host, tmp_path))}
    if di:
        env["QVD_TEST_DI"] = di
    return host.python(DRIVER_BOOT + textwrap.dedent(code), timeout=timeout, env=env, mode=mode)


def processes_mentioning(text):
    """pids whose command line mentions text (leftover check)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append((int(entry), cmdline))
    return found
