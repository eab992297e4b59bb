"""qvd-node as an operator runs it: a process with signals, logs and /metrics."""
import json
import os
import pathlib
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

from helpers.hkd_env import fast_hkd_settings
from helpers.nodes import wait_for


DASHBOARD = pathlib.Path(__file__).resolve().parents[2] / "etc" / "grafana-qvd-node.json"


def _dashboard_queries():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs.append(dashboard["templating"]["list"][1]["definition"])
    return exprs


def _samples(body):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def provisioned(tmp_path, pg_server, fresh_db_name):
    from conftest import write_node_conf
    port, metrics_port = _free_port(), _free_port()
    values = fast_hkd_settings(tmp_path)
    values.pop("nodename")
    values.update({"l7r.port": port, "l7r.address": "127.0.0.1", "l7r.metrics.address": f"127.0.0.1:{metrics_port}",
                   "internal.hkd.address_check.enabled": 0, "vm.network.use_dhcp": 0, "l7r.drain.grace": 2,
                   "log.preset": "stderr"})
    conf = write_node_conf(tmp_path / "node.conf", pg_server, fresh_db_name, values)
    demo.provision(tmp_path, conf, "echo")
    return conf, port, metrics_port, demo.demo_vm_id(conf)


def _start_node(conf):
    log = open(str(conf) + ".log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "qvd_gevent.node.main", "--config", str(conf)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _connect_session(port, cafile, vm_id):
    ctx = ssl.create_default_context(cafile=cafile)
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="localhost")
    import base64
    auth = base64.b64encode(b"demo:demo").decode()
    sock.sendall(f"GET /qvd/connect_to_vm?id={vm_id} HTTP/1.1\r\nAuthorization: Basic {auth}\r\n"
                 "Connection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n".encode())
    buf = b""
    while b"HTTP/1.1 101" not in buf:
        chunk = sock.recv(4096)
        assert chunk, buf
        buf += chunk
    while not buf.endswith(b"\r\n\r\n"):
        buf += sock.recv(1)
    return sock


def test_node_serves_metrics_and_drains_sessions_on_sigterm(provisioned, tmp_path):
    conf, port, metrics_port, vm_id = provisioned
    proc, log = _start_node(conf)
    try:
        wait_for(lambda: _port_open(port), 30, "the L7R port")
        sock = _connect_session(port, str(tmp_path / "ssl" / "cert.pem"), vm_id)
        sock.sendall(b"ping\n")
        assert sock.recv(100) == b"ping\n"
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        samples = _samples(body)
        assert samples[("qvd_l7r_sessions_open", ())] == 1
        assert samples[("qvd_hkd_vms", (("state", "running"),))] == 1
        assert samples[("qvd_l7r_connects_total", (("result", "ok"),))] == 1
        for histogram in ("qvd_l7r_tls_handshake_seconds", "qvd_l7r_connect_to_vm_seconds", "qvd_hkd_vm_start_seconds"):
            assert samples[(histogram + "_count", ())] >= 1, histogram
        assert samples[("process_resident_memory_bytes", ())] > 10e6
        assert samples[("process_open_fds", ())] > 5
        names = {name for name, _ in samples}
        queried = {name for expr in _dashboard_queries() for name in re.findall(r"\b(?:qvd|process)_\w+", expr)}
        assert len(queried) >= 15
        assert queried <= names, f"the dashboard queries metrics the node does not serve: {queried - names}"
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration file re-read" in open(log.name).read(), 10, "the SIGHUP log line")
        proc.send_signal(signal.SIGTERM)
        sock.settimeout(30)
        assert sock.recv(100) == b"", "the session was not closed by the drain"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    db = Database.from_config(Config.load(str(conf)))
    try:
        assert db.query("SELECT user_state, l7r_host_id, vm_state, host_id FROM vm_runtimes") == \
            [("disconnected", None, "stopped", None)]
        assert db.query("SELECT state FROM host_runtimes") == [("stopped",)]
    finally:
        db.close()
    text = open(log.name).read()
    assert "demo:demo" not in text and "password" not in text.lower().replace("password=****", "")


def _port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_unregistered_node_refuses_to_start_with_one_line(tmp_path, pg_server, fresh_db_name):
    from conftest import write_node_conf
    conf = write_node_conf(tmp_path / "node.conf", pg_server, fresh_db_name,
                           {"l7r.port": _free_port(), "l7r.metrics.address": "", "path.run": tmp_path / "run"})
    run = subprocess.run([sys.executable, "-m", "qvd_gevent.node.main", "--config", str(conf)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    last = [line for line in run.stderr.splitlines() if line.startswith("qvd-node:")]
    assert len(last) == 1 and "test-node" in last[0], run.stderr
    assert "Traceback" not in run.stderr


def test_bad_config_is_one_line(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "qvd_gevent.node.main", "--config", str(tmp_path / "nope.conf")],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0 and "does not exist" in missing.stderr
    conf = tmp_path / "node.conf"
    conf.write_text("database.port = 5432\n")
    unnamed = subprocess.run([sys.executable, "-m", "qvd_gevent.node.main", "--config", str(conf)],
                             capture_output=True, text=True, timeout=30)
    assert unnamed.returncode == 1 and "nodename" in unnamed.stderr and "Traceback" not in unnamed.stderr
