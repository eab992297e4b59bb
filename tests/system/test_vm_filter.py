"""The VM network filter (docs/hkd.md#firewall), with the whole HKD in a test namespace.

The node, its bridge, dnsmasq, the nftables tables and the VMs all live in a namespace the
test made, with no route out (docs/testing.md#network-safety): nftables rules belong to
the network namespace they are loaded in, so the machine's own rules are never touched.
What a VM reaches is tried from inside VM A (helpers/net_probe.py): TCP connections, and
raw frames whose arrival a tap on the node's bridge device records. For `process` VMs
(loopback) the node runs as root in the test namespace and another uid tries the VMs' ports.
"""
import json
import os
import subprocess
import sys

import gevent
import pytest
from helpers.hkd_env import add_host, add_vms, start_vm, stop_vm, wait_vm_state
from helpers.netns import VM_NET, hkd_node_conf, test_host, write_http_di  # noqa: F401

pytestmark = pytest.mark.root

PROBE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers", "net_probe.py")
GATEWAY = f"{VM_NET}.0.1"
L7R_PORT = 8443
OTHER_NODE_PORT = 2222
OTHER_NODE = f"{VM_NET}.0.2"          # in the node range (below vm.network.ip.start)
OTHER_NODES_VM = f"{VM_NET}.0.250"    # in the VM range, not one of this node's VMs

DRIVER = """
from qvd_gevent.config import Config
from qvd_gevent.db import Database, make_green
from qvd_gevent.db.listen import Listener
from qvd_gevent.hkd import HKD
make_green()
cfg = Config.load(os.environ["QVD_TEST_CONF"])
db = Database.from_config(cfg)
listener = Listener(db).start()
listener.wait_connected(10)
hkd = HKD(cfg, db, listener)
hkd.start()
open(os.environ["QVD_TEST_READY"], "w").write("ready")
deadline = time.monotonic() + 120
while not os.path.exists(os.environ["QVD_TEST_DONE"]) and time.monotonic() < deadline:
    gevent.sleep(0.1)
hkd.stop(timeout=10)
listener.stop()
db.close()
report(dict(stopped=True))
"""


def _nft(host, *args):
    return host.run(["nft", *args], check=True).stdout


def _qvd_tables(host):
    return [line for line in _nft(host, "list", "tables").splitlines() if line.split()[-1:] == ["qvd"]]


class Node:
    """An HKD running in the test namespace; the test drives VMs through the database."""

    def __init__(self, host, tmp_path, pg_server, dbname, address=GATEWAY, **conf):
        from qvd_gevent.config import Config
        from qvd_gevent.db import Database
        if pg_server.embedded is None:
            pytest.skip("needs the embedded PostgreSQL (its unix socket reaches into the test namespace)")
        self.host, self.tmp_path = host, tmp_path
        self.conf = hkd_node_conf(host, tmp_path, pg_server, dbname, **conf)
        self.db = Database.from_config(Config.load(str(self.conf)))
        self.host_id = add_host(self.db, "test-node", address)
        self.ready, self.done = tmp_path / "ready", tmp_path / "done"
        self.driver = None

    def start(self):
        self.driver = gevent.spawn(self.host.python, DRIVER, timeout=180,
                                   env={"QVD_TEST_CONF": str(self.conf), "QVD_TEST_READY": str(self.ready),
                                        "QVD_TEST_DONE": str(self.done)})
        for _ in range(300):
            if self.ready.exists() or self.driver.ready():
                break
            gevent.sleep(0.1)
        if self.driver.ready():
            self.driver.get()
        assert self.ready.exists(), "HKD did not start in the test namespace"

    def vms(self, ips, di=None):
        """Start one VM per address and wait until each runs; [(vm id, its address)]."""
        ids = add_vms(self.db, count=len(ips), di_path=di or write_http_di(self.tmp_path, echo=True))
        for vm_id, ip in zip(ids, ips):
            self.db.execute("UPDATE vms SET ip = %s WHERE id = %s", (ip, vm_id))
            start_vm(self.db, vm_id, self.host_id)
        return [(vm_id, wait_vm_state(self.db, vm_id, "running", timeout=40)["vm_address"]) for vm_id in ids]

    def stop(self, vm_ids):
        for vm_id in vm_ids:
            stop_vm(self.db, vm_id)
        for vm_id in vm_ids:
            wait_vm_state(self.db, vm_id, "stopped", timeout=30)
        self.done.write_text("1")
        self.driver.get(timeout=60)

    def close(self):
        self.done.write_text("1")
        if self.driver is not None and not self.driver.ready():
            self.driver.join(60)
        self.db.close()


def _probe(host, vm_namespace, spec, listen_ports):
    """(what VM A reached, what the node accepted and saw on its bridge)."""
    node = host.popen([sys.executable, PROBE, "node", "qvdbr0", ",".join(map(str, listen_ports))],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout.readline().strip() == "READY"
        vm = subprocess.run(["nsenter", f"--net=/run/netns/{vm_namespace}", "--", sys.executable, PROBE, "vm",
                             json.dumps(spec)], capture_output=True, text=True, timeout=30, check=True)
        gevent.sleep(0.3)                   # frames in flight reach the tap
        out, _ = node.communicate("", timeout=10)
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(5)
    return json.loads(vm.stdout)["reached"], json.loads(out.strip().splitlines()[-1])


class OtherNode:
    """Another node's machine on the VM network: a namespace of the test's own whose veth is
    a port of the node's bridge (an uplink, not a VM port), holding a node address and an
    address in the VM range (a VM of that node). Removed with the test namespace."""

    def __init__(self, host, addresses):
        self.host, self.addresses = host, addresses
        self.name = f"{host.vm_prefix}-peer"          # destroyed with the test's namespaces
        self.link = f"{host.vm_prefix}p0"             # not the VM port pattern (<prefix>v*)
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=30)
        host.run(["ip", "link", "add", self.link, "type", "veth", "peer", "name", "eth0", "netns", self.name],
                 check=True)
        host.run(["ip", "link", "set", self.link, "master", "qvdbr0", "up"], check=True)
        for argv in (["ip", "link", "set", "lo", "up"], ["ip", "link", "set", "eth0", "up"],
                     *(["ip", "addr", "add", f"{a}/16", "dev", "eth0"] for a in addresses)):
            subprocess.run(["ip", "netns", "exec", self.name, *argv], check=True, timeout=30)

    def accepted_while(self, ports, action):
        """The ports this machine accepted a connection on while action() ran."""
        listener = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.name}", "--", sys.executable, PROBE,
                                     "node", "eth0", ",".join(map(str, ports))],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout.readline().strip() == "READY"
            action()
            out, _ = listener.communicate("", timeout=10)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait(5)
        return json.loads(out.strip().splitlines()[-1])["accepted"]


def _node_reaches(host, address, port):
    """The node's side opens a connection and gets the VM's answer (VMA ping, or the display's echo)."""
    request, expect = (b"GET /vma/ping HTTP/1.0\r\n\r\n", "200") if port == 3030 else (b"hello\n", "hello")
    code = (f"import socket, sys\n"
            f"s = socket.create_connection(({address!r}, {port}), timeout=3)\n"
            f"s.sendall({request!r})\n"
            f"sys.stdout.write(s.recv(100).decode(errors='replace'))\n")
    result = host.run([sys.executable, "-c", code], timeout=10)
    return result.returncode == 0 and expect in result.stdout


def test_netns_vm_reaches_only_dhcp_cannot_spoof_and_the_node_reaches_every_vm(test_host, tmp_path, pg_server,  # noqa: F811
                                                                                fresh_db_name):
    a_ip, b_ip = f"{VM_NET}.0.150", f"{VM_NET}.0.151"
    node = Node(test_host, tmp_path, pg_server, fresh_db_name)
    try:
        node.start()
        assert len(_qvd_tables(test_host)) == 2, _nft(test_host, "list", "tables")   # inet qvd, bridge qvd
        (vm_a, leased_a), (vm_b, leased_b) = node.vms([a_ip, b_ip])
        assert (leased_a, leased_b) == (a_ip, b_ip)           # DHCP passes the filter
        elements = _nft(test_host, "list", "set", "bridge", "qvd", "vm_addresses")
        prefix = test_host.vm_prefix
        assert f'"{prefix}v{vm_a}" . 54:52:00:4d:00:96 . {a_ip}' in elements, elements
        a_mac, b_mac = "54:52:00:4d:00:96", "54:52:00:4d:00:97"
        spec = {
            "tcp": [[b_ip, 3030], [b_ip, 4100], [GATEWAY, L7R_PORT], [GATEWAY, OTHER_NODE_PORT]],
            "frames": [
                {"name": "own-ipv4", "kind": "ipv4", "src_mac": a_mac, "src_ip": a_ip, "dst_ip": GATEWAY},
                {"name": "own-arp", "kind": "arp", "src_mac": a_mac, "src_ip": a_ip, "dst_ip": GATEWAY},
                {"name": "other-vms-ip", "kind": "ipv4", "src_mac": a_mac, "src_ip": b_ip, "dst_ip": GATEWAY},
                {"name": "other-vms-mac", "kind": "ipv4", "src_mac": b_mac, "src_ip": a_ip, "dst_ip": GATEWAY},
                {"name": "made-up-mac", "kind": "ipv4", "src_mac": "02:00:00:00:00:01", "src_ip": a_ip,
                 "dst_ip": GATEWAY},
                {"name": "arp-for-other-vms-ip", "kind": "arp", "src_mac": a_mac, "src_ip": b_ip,
                 "dst_ip": GATEWAY},
                {"name": "ipv6", "kind": "ipv6", "src_mac": a_mac, "src_ip": a_ip, "dst_ip": GATEWAY},
            ],
        }
        reached, seen = _probe(test_host, f"{prefix}-vm{vm_a}", spec, [L7R_PORT, OTHER_NODE_PORT])
        assert reached == [], f"VM A reached {reached}"      # not B's VMA nor display, nothing on the node
        assert seen["accepted"] == []
        assert seen["seen"] == ["own-arp", "own-ipv4"], seen  # its own MAC and address only
        for address in (a_ip, b_ip):                          # replies to the node's connections pass
            for port in (3030, 4100):
                assert _node_reaches(test_host, address, port), f"node cannot reach {address}:{port}"
        # another node's machine on the VM network (a node address, and a VM of that node):
        # the node reaches it, VM A does not
        other = OtherNode(test_host, [OTHER_NODE, OTHER_NODES_VM])
        targets = [[address, port] for address in other.addresses for port in (L7R_PORT, OTHER_NODE_PORT)]

        def from_the_node():
            code = "import socket, sys\nfor a, p in " + repr(targets) + ":\n" \
                   "    socket.create_connection((a, p), timeout=3).close()\n"
            assert test_host.run([sys.executable, "-c", code], timeout=30).returncode == 0
        assert sorted(other.accepted_while([L7R_PORT, OTHER_NODE_PORT], from_the_node)) == \
            sorted([L7R_PORT, OTHER_NODE_PORT] * 2)          # the control: it listens and is reachable
        reached_from_vm = []

        def from_vm_a():
            reached_from_vm.extend(_probe(test_host, f"{prefix}-vm{vm_a}", {"tcp": targets}, [])[0])
        assert other.accepted_while([L7R_PORT, OTHER_NODE_PORT], from_vm_a) == []
        assert reached_from_vm == [], f"VM A reached {reached_from_vm}"
        node.stop([vm_a, vm_b])
        assert _qvd_tables(test_host) == []                   # deleted exactly at stop
    finally:
        node.close()


def test_allow_login_from_vm_opens_the_l7r_port_only(test_host, tmp_path, pg_server, fresh_db_name):  # noqa: F811
    node = Node(test_host, tmp_path, pg_server, fresh_db_name,
                **{"internal.vm.network.firewall.allow_login_from_vm": 1, "l7r.port": L7R_PORT})
    try:
        node.start()
        ((vm_a, _),) = node.vms([f"{VM_NET}.0.150"])
        spec = {"tcp": [[GATEWAY, L7R_PORT], [GATEWAY, OTHER_NODE_PORT]]}
        reached, seen = _probe(test_host, f"{test_host.vm_prefix}-vm{vm_a}", spec, [L7R_PORT, OTHER_NODE_PORT])
        assert reached == [f"{GATEWAY}:{L7R_PORT}"]
        assert seen["accepted"] == [L7R_PORT]
        node.stop([vm_a])
        assert _qvd_tables(test_host) == []
    finally:
        node.close()


# --- process VMs: loopback, no bridge ------------------------------------------------------------

PROCESS_CONF = {"vm.hypervisor": "process", "vm.process.address.base": "127.100.0.0/24", "vm.network.setup": 0,
                "vm.network.use_dhcp": 0, "internal.hkd.address_check.enabled": 0}


def _connects_as(host, uid, address, port):
    code = f"import socket; socket.create_connection(({address!r}, {port}), timeout=3).close()"
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"] if uid else []
    return host.run(drop + [sys.executable, "-c", code], timeout=10).returncode == 0


def test_process_vm_ports_open_only_to_the_node_uid(test_host, tmp_path, pg_server, fresh_db_name):  # noqa: F811
    from helpers.hkd_env import TINY_VM
    node = Node(test_host, tmp_path, pg_server, fresh_db_name, address="127.0.0.1", **PROCESS_CONF)
    try:
        node.start()
        tables = [line for line in _nft(test_host, "list", "tables").splitlines() if " qvd_lo_" in line]
        assert len(tables) == 1, tables
        ((vm_id, address),) = node.vms([None], di=TINY_VM)
        for port in (3030, 4100):
            assert _connects_as(test_host, 0, address, port)              # the node's uid (root here)
            assert not _connects_as(test_host, 65534, address, port)      # any other uid: refused
        node.stop([vm_id])
        assert " qvd_lo_" not in _nft(test_host, "list", "tables")
    finally:
        node.close()


def test_hkd_does_not_start_without_nft(test_host, tmp_path, pg_server, fresh_db_name):  # noqa: F811
    node = Node(test_host, tmp_path, pg_server, fresh_db_name, address="127.0.0.1",
                **dict(PROCESS_CONF, **{"command.nft": "/nonexistent/nft"}))
    try:
        with pytest.raises(AssertionError) as failed:
            node.start()
        assert "HkdError: command.nft '/nonexistent/nft' not found: install nftables" in str(failed.value)
    finally:
        node.close()
