"""qvd-node with two L7R workers (l7r.workers = 2): one port, sessions and takeover across
the workers as across nodes, /metrics adding up both, signals reaching both, a worker
that dies released and started again. A real node process, the demo's VM (process
hypervisor, its VMA and display gate), real TLS clients."""
import base64
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qvd_gevent.config import Config
from qvd_gevent.db import Database
from qvd_gevent.node import demo

from helpers.nodes import l7r_workers, provisioned_process_node, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def node(tmp_path, pg_server, fresh_db_name):
    conf, port, metrics_port, vm_id = provisioned_process_node(tmp_path, pg_server, fresh_db_name,
                                                               **{"l7r.workers": 2})
    log = open(str(conf) + ".log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "qvd_gevent.node.main", "--config", str(conf)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    db = Database.from_config(Config.load(str(conf)))
    node = Node(proc, log, db, port, metrics_port, vm_id, str(tmp_path / "ssl" / "cert.pem"))
    try:
        yield node
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        db.close()


class Node:
    def __init__(self, proc, log, db, port, metrics_port, vm_id, cafile):
        self.proc, self.log, self.db = proc, log, db
        self.port, self.metrics_port, self.vm_id, self.cafile = port, metrics_port, vm_id, cafile

    def workers(self):
        """pids of the node's L7R workers."""
        return l7r_workers(self.proc.pid)

    def holder(self):
        return self.db.query_one("SELECT user_state, l7r_pid FROM vm_runtimes WHERE vm_id = %s", (self.vm_id,))

    def connect(self):
        """A session on the demo VM: the TLS socket after its 101."""
        ctx = ssl.create_default_context(cafile=self.cafile)
        sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.port), timeout=30),
                               server_hostname="localhost")
        auth = base64.b64encode(f"{demo.DEMO_USER}:{demo.DEMO_PASSWORD}".encode()).decode()
        sock.sendall(f"GET /qvd/connect_to_vm?id={self.vm_id} HTTP/1.1\r\nAuthorization: Basic {auth}\r\n"
                     "Connection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n".encode())
        head = b""
        while not re.search(rb"HTTP/1.1 101[^\r]*\r\n(?:[^\r]+\r\n)*\r\n", head):
            chunk = sock.recv(1)
            assert chunk, head
            head += chunk
        return sock

    def metrics(self):
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(body) for s in family.samples}

    def log_text(self):
        with open(self.log.name) as fh:
            return fh.read()


def echo(sock, data=b"ping\n"):
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(100)
        assert chunk, got
        got += chunk
    return got


def closed(sock, timeout=10):
    sock.settimeout(timeout)
    try:
        return sock.recv(100) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True
    finally:
        sock.close()


def _port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_two_workers_share_sessions_takeover_metrics_signals_and_a_restart(node):
    wait_for(lambda: _port_open(node.port) and len(node.workers()) == 2, 60, "two L7R workers")
    workers = node.workers()

    # takeover from one worker to the other: a new connect to the VM, until the kernel
    # hands one to the worker that does not hold the session
    sock = node.connect()
    assert echo(sock) == b"ping\n"
    state, first = node.holder()
    assert state == "connected" and first in workers
    connects = 1
    for _ in range(30):
        newer = node.connect()
        connects += 1
        assert closed(sock), "the older session of the VM was not closed by the takeover"
        sock = newer
        assert echo(sock) == b"ping\n"
        state, holder = node.holder()
        assert state == "connected" and holder in workers
        if holder != first:
            break
    else:
        pytest.fail("30 connects never reached the other worker")

    # /metrics: both workers' samples, added up, beside the node process's own
    samples = node.metrics()
    assert samples[("qvd_l7r_sessions_open", ())] == 1
    assert samples[("qvd_l7r_connects_total", (("result", "ok"),))] == connects
    assert samples[("qvd_l7r_tls_handshake_seconds_count", ())] >= connects
    assert samples[("qvd_hkd_vms", (("state", "running"),))] == 1

    # SIGHUP reaches the node and both workers
    node.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(set(re.findall(r" (\d+) INFO qvd\.node - configuration file re-read",
                                         node.log_text()))) == 3, 10, "the re-read line of all three processes")

    # the worker holding the session dies: its row is released, it is started again
    os.kill(holder, signal.SIGKILL)
    assert closed(sock)
    wait_for(lambda: node.holder() == ("disconnected", None), 20, "the dead worker's row released")
    wait_for(lambda: "L7R worker 1 serving again" in node.log_text() or "L7R worker 0 serving again" in
             node.log_text(), 60, "the worker started again")
    assert len(node.workers()) == 2 and holder not in node.workers()
    sock = node.connect()
    assert echo(sock) == b"ping\n"

    # SIGTERM drains every worker: the session closes, the node exits 0, the rows end released
    node.proc.send_signal(signal.SIGTERM)
    assert closed(sock, 30), "the session was not closed by the drain"
    assert node.proc.wait(60) == 0
    assert node.workers() == []
    assert node.db.query("SELECT user_state, l7r_host_id FROM vm_runtimes") == [("disconnected", None)]
    assert "Traceback" not in node.log_text()


def test_signals_while_the_workers_start_reload_or_drain_the_node(node):
    """The port serves from the first worker on, seconds before the second serves: a SIGHUP
    then re-reads node.conf (Python's default would end the node), and a SIGTERM then stops
    the node cleanly (exit 0, no worker left, no row held)."""
    wait_for(lambda: _port_open(node.port), 60, "the first L7R worker")
    node.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration file re-read" in node.log_text(), 10, "the node's re-read line")
    wait_for(lambda: "node " in node.log_text() and " running (pid" in node.log_text(), 60, "the node running")
    assert node.proc.poll() is None and len(node.workers()) == 2
    sock = node.connect()
    assert echo(sock) == b"ping\n"
    sock.close()
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(60) == 0
    assert node.workers() == []
    assert "Traceback" not in node.log_text()


def test_sigterm_while_the_workers_start_stops_the_node_cleanly(node):
    wait_for(lambda: _port_open(node.port), 60, "the first L7R worker")
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(60) == 0, node.log_text()[-3000:]
    assert node.workers() == []
    assert "cannot start" not in node.log_text() and "Traceback" not in node.log_text()
    assert node.db.query("SELECT user_state, l7r_host_id FROM vm_runtimes") == [("disconnected", None)]


def test_sigint_stops_every_worker_at_once(node):
    """SIGINT: no drain; the workers close their sessions now and the node exits 0 with the
    rows released."""
    wait_for(lambda: " running (pid" in node.log_text() and len(node.workers()) == 2, 60, "the node running")
    sock = node.connect()
    assert echo(sock) == b"ping\n"
    node.proc.send_signal(signal.SIGINT)
    assert closed(sock, 10), "the session was not closed at once"
    assert node.proc.wait(30) == 0
    assert node.workers() == []
    assert node.db.query("SELECT user_state, l7r_host_id FROM vm_runtimes") == [("disconnected", None)]
    assert "draining sessions (grace 0 s)" in node.log_text() and "Traceback" not in node.log_text()
