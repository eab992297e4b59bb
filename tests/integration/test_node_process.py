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
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qvd_gevent.config import Config
from qvd_gevent.db import Database

from helpers.cluster import free_port
from helpers.nodes import provisioned_process_node, wait_for


DASHBOARD = pathlib.Path(__file__).resolve().parents[2] / "etc" / "grafana-qvd-node.json"


def _dashboard_queries():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs.append(dashboard["templating"]["list"][1]["definition"])
    return exprs


def _samples(body):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


@pytest.fixture
def provisioned(tmp_path, pg_server, fresh_db_name):
    return provisioned_process_node(tmp_path, pg_server, fresh_db_name)


def _start_node(conf, env=None):
    log = open(str(conf) + ".log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "qvd_gevent.node.main", "--config", str(conf)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=None if env is None else dict(os.environ, **env))
    return proc, log


class NotifySocket:
    """What systemd does for a Type=notify unit: a datagram socket whose messages we read."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def next(self, timeout):
        """The next message's fields, or None when none came within timeout seconds."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            return None
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    def wait_for(self, field, timeout, seen=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.next(max(0.01, deadline - time.monotonic()))
            if message is None:
                break
            if seen is not None:
                seen.append(message)
            if field in message:
                return message
        raise AssertionError(f"no {field} from the node within {timeout} s (got {seen})")

    def pings_within(self, seconds):
        count, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            message = self.next(max(0.01, deadline - time.monotonic()))
            if message is not None and message.get("WATCHDOG") == "1":
                count += 1
        return count

    def close(self):
        self.sock.close()


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
        # the session the drain ended was counted after the last periodic flush: the stop flushes it
        assert db.query("SELECT nx_ok, short_sessions FROM host_counters") == [(1, 1)]
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
    from helpers.cluster import make_cert, seed_ssl
    from helpers.database import write_node_conf
    conf = write_node_conf(tmp_path / "node.conf", pg_server, fresh_db_name,
                           {"l7r.port": free_port(), "l7r.metrics.address": "", "path.run": tmp_path / "run"})
    db = Database.from_config(Config.load(str(conf)))
    try:
        seed_ssl(db, *make_cert(tmp_path / "ssl"))
    finally:
        db.close()
    run = subprocess.run([sys.executable, "-m", "qvd_gevent.node.main", "--config", str(conf)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 78   # EX_CONFIG: the unit's RestartPreventExitStatus keeps systemd from retrying
    last = [line for line in run.stderr.splitlines() if line.startswith("qvd-node:")]
    assert len(last) == 1 and "test-node" in last[0], run.stderr
    assert "Traceback" not in run.stderr


def test_bad_config_is_one_line(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "qvd_gevent.node.main", "--config", str(tmp_path / "nope.conf")],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 78 and missing.stderr.strip().count("\n") == 0 and "does not exist" in missing.stderr
    conf = tmp_path / "node.conf"
    conf.write_text("database.port = 5432\n")
    unnamed = subprocess.run([sys.executable, "-m", "qvd_gevent.node.main", "--config", str(conf)],
                             capture_output=True, text=True, timeout=30)
    assert unnamed.returncode == 78 and "nodename" in unnamed.stderr and "Traceback" not in unnamed.stderr


def test_systemd_notify_ready_watchdog_and_stopping(provisioned, tmp_path, pg_server):
    """qvd-node under a Type=notify unit with WatchdogSec=2: READY=1 only once the L7R
    accepts and the HKD runs, WATCHDOG=1 every second while the process runs (none while it
    is frozen), STOPPING=1 when the drain begins, exit 0. Its stderr is "the journal", with
    log.format = json: each log line is <priority>{json}."""
    conf, port, _, _ = provisioned
    with open(conf, "a") as fh:
        fh.write("log.format = json\n")
    notify = NotifySocket(tmp_path / "notify.sock")
    log_file = pathlib.Path(str(conf) + ".log")
    log_file.touch()
    info = os.stat(log_file)     # the node's stderr is this file: to it, the journal
    proc, log = _start_node(conf, {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000",
                                   "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
    try:
        seen = []
        ready = notify.wait_for("READY", 60, seen)
        assert ready["READY"] == "1" and "serving on port" in ready.get("STATUS", ""), seen
        assert _port_open(port)         # the L7R listened before READY=1
        db = Database.from_config(Config.load(str(conf)))
        try:
            assert db.query("SELECT state FROM host_runtimes") == [("running",)]   # and the HKD ran
        finally:
            db.close()
        assert notify.pings_within(3.5) >= 2
        os.kill(proc.pid, signal.SIGSTOP)          # a hub that does not run sends no ping
        try:
            notify.pings_within(0.3)               # one may have been in flight
            assert notify.pings_within(2.5) == 0
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert notify.pings_within(2.5) >= 1
        proc.send_signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING", 30)
        assert stopping["STOPPING"] == "1"
        assert proc.wait(60) == 0
        entries = [(int(line[1]), json.loads(line[3:])) for line in log_file.read_text().splitlines()
                   if line.startswith("<") and line[3:4] == "{"]
        running = [e for p, e in entries if e["message"].startswith("node ") and " running " in e["message"]]
        assert len(running) == 1 and running[0]["level"] == "INFO" and running[0]["logger"] == "qvd.node"
        assert all(p == {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}[e["level"]]
                   for p, e in entries)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        notify.close()


def test_configuration_error_exits_78_without_notifying_ready(tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    conf = tmp_path / "node.conf"
    conf.write_text("nodename = n1\nl7r.port = eighty\n")
    try:
        run = subprocess.run([sys.executable, "-m", "qvd_gevent.node.main", "--config", str(conf)],
                             capture_output=True, text=True, timeout=30,
                             env=dict(os.environ, NOTIFY_SOCKET=notify.path))
        assert run.returncode == 78 and "l7r.port" in run.stderr
        assert notify.next(0.2) is None
        conf.write_text("nodename = n1\nlog.format = xml\n")
        run = subprocess.run([sys.executable, "-m", "qvd_gevent.node.main", "--config", str(conf)],
                             capture_output=True, text=True, timeout=30)
        assert run.returncode == 78 and run.stderr == "qvd-node: configuration key log.format: 'xml' is not one of " \
            "text, json\n"
    finally:
        notify.close()


def test_a_missing_certificate_stops_the_node_before_it_touches_the_host(provisioned, tmp_path):
    """The L7R's certificate and key are checked before the HKD starts: no heartbeat, no
    host row changed, nothing to tear down; one line and exit 78."""
    conf, _, _, _ = provisioned
    db = Database.from_config(Config.load(str(conf)))
    try:
        db.execute("DELETE FROM ssl_configs")
        before = db.query("SELECT state, ok_ts FROM host_runtimes")
        run = subprocess.run([sys.executable, "-m", "qvd_gevent.node.main", "--config", str(conf)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 78, run.stderr[-2000:]
        lines = [line for line in run.stderr.splitlines() if line.startswith("qvd-node:")]
        assert len(lines) == 1 and "qvd-admin config ssl" in lines[0], run.stderr[-2000:]
        assert "HKD" not in run.stderr and "host " not in run.stderr.replace("qvd-node:", "")
        assert db.query("SELECT state, ok_ts FROM host_runtimes") == before
    finally:
        db.close()


def test_a_login_with_line_breaks_forges_no_log_line(provisioned, tmp_path):
    """A login is the client's to choose: CR/LF, NEL, the Unicode line separator and ESC in it
    leave the node's log one line per record (as log shippers split it: str.splitlines)."""
    import base64
    conf, port, _, _ = provisioned
    forged = "2030-01-01 00.00.00,000 1 INFO qvd.l7r - session open (user admin, VM 1, from 10.9.9.9)"  # no ':'
    breaks = {"\r\n": "\\r\\n", "\x85": "\\x85", "\u2028": "\\u2028", "\x1b[2K\x1c": "\\x1b[2K\\x1c"}
    proc, log = _start_node(conf)
    try:
        wait_for(lambda: _port_open(port), 30, "the L7R port")
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ssl" / "cert.pem"))
        for n, line_break in enumerate(breaks):
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30),
                                 server_hostname="localhost") as sock:
                auth = base64.b64encode(f"mallory{n}{line_break}{forged}:wrong".encode()).decode()
                sock.sendall(f"GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: Basic {auth}\r\n\r\n".encode())
                assert sock.recv(4096).startswith(b"HTTP/1.1 401")
        wait_for(lambda: open(log.name).read().count("authentication failed") == len(breaks), 10, "four refusals")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    lines = open(log.name, encoding="utf-8").read().splitlines()
    # logins are folded to lower case (model.user.login.case-sensitive = 0)
    assert not [line for line in lines if forged[:30].lower() in line[:40].lower() or "\x1b" in line]
    for n, escaped in enumerate(breaks.values()):
        if n in (1, 2):     # C0 characters are refused before anything logs the login; these are logged
            assert [line for line in lines if f"mallory{n}{escaped}2030-01-01" in line.lower()], (escaped, lines[-8:])
