"""How tests run nodes and wait for them: one place.

- ``wait_for(predicate, timeout, ...)``: a bounded wait on the gevent hub.
- ``HkdProcess``: the HKD alone (``python -m qvd_gevent.node.hkd_only``) as a child, inside a
  test namespace when given one; started and stopped by node/run.py as qvd-node is.
- ``start_node(conf, parts)``: the parts of a node in the test process (node/run.py's Node).
- ``seeded_node(...)`` / ``seeded_nodes(...)``: an L7R node with its fake HKD and VMA over a
  seeded database (certificate, host, user qvd/qvd and a VM), the set-up of every L7R suite.
"""
import contextlib
import os
import subprocess
import sys
import time

import gevent

from qvd_gevent.config import Config
from qvd_gevent.node.run import ALL, Node

from .l7r_env import Node as L7rNode
from .l7r_env import Seed, make_cert, write_conf


def wait_for(predicate, timeout=10.0, what="condition", interval=0.1):
    """predicate's first truthy value, asked every interval seconds; AssertionError (naming what,
    with the last value) after timeout seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        gevent.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def start_node(conf, parts=ALL):
    """A started node.run.Node for node.conf `conf`; the caller stops it (node.stop(0))."""
    return Node(Config.load(str(conf)), parts).start()


class HkdProcess:
    """The HKD alone as a child process; ``host``: a helpers.netns.TestNamespace to run it in.

    start() returns once it printed READY (the host is running); every start is a new
    process (a restart after kill9()); cleanup() ends whatever still runs, gracefully first.
    """

    ARGV = [sys.executable, "-m", "qvd_gevent.node.hkd_only", "--config"]

    def __init__(self, conf, log_path, host=None):
        self.conf = conf
        self.log_path = log_path
        self.host = host
        self.proc = None
        self._all = []

    def start(self):
        popen = self.host.popen if self.host is not None else subprocess.Popen
        with open(self.log_path, "ab") as log:
            self.proc = popen(self.ARGV + [str(self.conf)], stdout=subprocess.PIPE, stderr=log)
        self._all.append(self.proc)
        line = self.proc.stdout.readline()
        assert line.strip() == b"READY", f"HKD did not start: {line!r}; log: {self.log_tail()}"
        return self

    @property
    def pid(self):
        return self.proc.pid

    def log_tail(self, chars=3000):
        return self.log_path.read_text(errors="replace")[-chars:]

    def kill9(self):
        self.proc.kill()
        return self.proc.wait(10)

    def terminate(self, timeout=30):
        """SIGTERM (graceful stop); the exit code."""
        self.proc.terminate()
        return self.proc.wait(timeout)

    def cleanup(self, grace=20):
        for proc in self._all:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            proc.stdout.close()


def seeded_node(tmp_path, pg_server, dbname, nodename="test-node", address="127.0.0.1", extra=None, users=True,
                start=True, certificate=None, client_ca=None, crl=None, trust=None, **node_kw):
    """An L7R node (helpers.l7r_env.Node: FakeVma, TestHkd unless with_hkd=False) over database
    dbname, seeded as the L7R suites need it: node.conf with short timers (node.conf_path),
    the server certificate in ssl_configs (a self-signed one unless certificate=(cert, key);
    client_ca and crl stored too), this host registered (node.host_id). users=True adds an
    OSF, user qvd/qvd (l7r_env.AUTH) and VM qvd-vm1 (node.osf, node.user, node.vm_id).
    node.cert is what a client trusts (trust, else the certificate); node.seed adds rows.
    start=False: the caller seeds more, then calls node.start(); the caller closes the node."""
    conf = write_conf(tmp_path, pg_server, dbname, nodename, extra)
    certificate = certificate or make_cert(tmp_path / "certs")
    node = L7rNode(conf, start=False, **node_kw)
    node.conf_path = conf
    node.cert = trust or certificate[0]
    node.seed = Seed(node.db)
    node.seed.ssl(*certificate, ca=client_ca, crl=crl)
    node.host_id = node.seed.host(nodename, address)
    if users:
        node.osf = node.seed.osf()
        node.user = node.seed.user("qvd", "qvd")
        node.vm_id = node.seed.vm("qvd-vm1", node.user, node.osf)
    if start:
        node.start()
    return node


@contextlib.contextmanager
def seeded_nodes(tmp_path, pg_server, dbname):
    """make(extra=None, **seeded_node's keywords) -> a seeded node; every node made is closed at the end."""
    made = []

    def make(extra=None, **kw):
        node = seeded_node(tmp_path, pg_server, dbname, extra=extra, **kw)
        made.append(node)
        return node
    try:
        yield make
    finally:
        for node in made:
            node.close()


def provisioned_process_node(tmp_path, pg_server, dbname, **extra):
    """node.conf of a node to run as `qvd-node` in a subprocess: the demo's provisioning
    (echo desktop, `process` VMs), the HKD's fast test timers, the L7R and /metrics on free
    loopback ports; extra settings on top. Returns (conf, port, metrics_port, vm_id)."""
    from qvd_gevent.node import demo

    from .cluster import free_port
    from .database import write_node_conf
    from .hkd_env import fast_hkd_settings
    port, metrics_port = free_port(), free_port()
    values = fast_hkd_settings(tmp_path)
    values.pop("nodename")
    values.update({"l7r.port": port, "l7r.address": "127.0.0.1", "l7r.metrics.address": f"127.0.0.1:{metrics_port}",
                   "internal.hkd.address_check.enabled": 0, "vm.network.use_dhcp": 0, "l7r.drain.grace": 2,
                   "log.preset": "stderr", **extra})
    conf = write_node_conf(tmp_path / "node.conf", pg_server, dbname, values)
    demo.provision(tmp_path, conf, "echo")
    return conf, port, metrics_port, demo.demo_vm_id(conf)


def l7r_workers(node_pid):
    """pids of the L7R worker processes of a node (l7r.workers), sorted."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if ppid == node_pid and b"l7r_worker" in fh.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return sorted(found)
