"""Fault, cluster and concurrency tests: whole `qvd-node` processes, rows seeded by SQL,
sessions opened the way a client opens them, and bounded waits.

- ``node_values(tmp_path, nodename, **extra)``: node.conf values for a full node (process
  hypervisor on a private loopback /24, fast HKD timers, L7R on 127.0.0.1:<free port>).
- ``NodeProcess``: ``python -m qvd_gevent.node.main`` as a child (optionally wrapped, e.g.
  by ``TestNamespace.argv``), its log in a file; ``start()``, ``wait_running()``,
  ``kill9()``, ``terminate()``, ``cleanup()`` (always call it: kills what is left).
- ``Farm``: bench/farm.py as a child: one process standing in for many running VMs (VMA
  answers + an echo display port) on a loopback address of its own.
- ``seed_*``: rows (TLS material, hosts, users, VMs) by SQL, as the admin CLI leaves them.
- ``open_session(...)``: connect_to_vm over TLS up to the 101; returns the spliced socket.
"""
import base64
import json
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import gevent

from qvd_gevent.db import runtime
from qvd_gevent.db.passwords import legacy_token
from qvd_gevent.vma import display_gate

from .hkd_env import TINY_VM, fast_hkd_settings, pid_alive
from .l7r_env import Seed, make_cert  # noqa: F401 - make_cert: the cluster suites' certificate too

REPO = Path(__file__).resolve().parents[2]
# the node's own line (node/run.py), not an adopted VM's "still running (pid N)"
_NODE_RUNNING = re.compile(r" qvd\.node - node \S+ running \(pid \d+")


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def node_values(tmp_path, nodename, port=None, **extra):
    values = fast_hkd_settings(tmp_path, nodename=nodename)
    values.update({
        "l7r.port": port or free_port(),
        "l7r.address": "127.0.0.1",
        "l7r.metrics.address": "",
        "internal.hkd.address_check.enabled": 0,
        "vm.network.use_dhcp": 0,
        "log.preset": "stderr",
        "l7r.drain.grace": 1,
        "internal.hkd.lock.path": tmp_path / f"run-{nodename}" / "hkd.lock",
    })
    values.update(extra)
    return values


def write_conf(path, db_lines, nodename, values):
    """node.conf from database lines (host/port/name/user/password) and values."""
    lines = ["# written by the fault/cluster tests", f"nodename = {nodename}"] + list(db_lines)
    lines += [f"{k} = {v}" for k, v in values.items() if k != "nodename"]
    path.write_text("\n".join(lines) + "\n")
    return path


def pg_conf_lines(server, dbname):
    from .database import TEST_ROLE, TEST_ROLE_PASSWORD
    return [f"database.host = {server.host}", f"database.port = {server.port}", f"database.name = {dbname}",
            f"database.user = {TEST_ROLE}", f"database.password = {TEST_ROLE_PASSWORD}",
            "internal.database.pool.connection.timeout = 20"]


class NodeProcess:
    """A qvd-node child process. ``wrap`` turns an argv into the argv really run."""

    def __init__(self, conf, log_path, wrap=None):
        self.conf = Path(conf)
        self.log_path = Path(log_path)
        self.wrap = wrap or (lambda argv: argv)
        self.proc = None
        self._log = None

    def start(self):
        if self._log is not None:
            self._log.close()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it until cleanup()
        self._mark = self.log_path.stat().st_size
        argv = self.wrap([sys.executable, "-m", "qvd_gevent.node.main", "--config", str(self.conf)])
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def log_text(self, since_start=False):
        text = self.log_path.read_bytes()
        if since_start:
            text = text[self._mark:]
        return text.decode("utf-8", "replace")

    def wait_running(self, timeout=60):
        """Until the node logs that it runs; fails with the log's tail if it exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _NODE_RUNNING.search(self.log_text(since_start=True)):
                return time.monotonic()
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log_text(True)[-3000:]}")
            gevent.sleep(0.1)
        raise AssertionError(f"node not running after {timeout} s:\n{self.log_text(True)[-3000:]}")

    def kill9(self):
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout=60):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def cleanup(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None


class Farm:
    """bench/farm.py: many stand-in VMs in one process (VMA answers + echo display)."""

    def __init__(self, address=None):
        self.address = address or f"127.{random.randint(60, 99)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        self.key = display_gate.new_key()      # the agent key of every farm VM
        self.proc = None
        self.ports = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.farm", "--address", self.address],
                                     stdout=subprocess.PIPE, text=True, cwd=str(REPO),
                                     env=dict(os.environ, QVD_VMA_SECRET=self.key))
        self.ports = json.loads(self.proc.stdout.readline())
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --- rows -----------------------------------------------------------------------------------
def seed_ssl(db, cert, key):
    Seed(db).ssl(cert, key)


def seed_host(db, name, address="127.0.0.1", state="stopped", backend=True, ok_now=False):
    def run(cur):
        cur.execute("INSERT INTO hosts (name, address, frontend, backend) VALUES (%s, %s, true, %s) RETURNING id",
                    (name, address, backend))
        host_id = cur.fetchone()[0]
        cur.execute("INSERT INTO host_runtimes (host_id, state, blocked, usable_ram, usable_cpu, ok_ts) "
                    "VALUES (%s, %s, false, 1000, 1000, CASE WHEN %s THEN now() AT TIME ZONE 'UTC' END)",
                    (host_id, state, ok_now))
        cur.execute("INSERT INTO host_counters (host_id) VALUES (%s) ON CONFLICT DO NOTHING", (host_id,))
        return host_id
    return db.transaction(run)


def seed_users_and_vms(db, users, vms_per_user=1, di_path=TINY_VM):
    """users: list of (login, password). One OSF + DI for all; returns {login: [vm ids]}."""
    def run(cur):
        cur.execute("INSERT INTO osfs (tenant_id, name, memory, use_overlay) VALUES (1, %s, 64, false) RETURNING id",
                    (f"osf-{random.randint(0, 10**9)}",))
        osf_id = cur.fetchone()[0]
        cur.execute("INSERT INTO dis (osf_id, path, version) VALUES (%s, %s, '1') RETURNING id", (osf_id, di_path))
        di_id = cur.fetchone()[0]
        cur.execute("INSERT INTO di_tags (di_id, tag) VALUES (%s, 'default'), (%s, 'head')", (di_id, di_id))
        out = {}
        for login, password in users:
            cur.execute("INSERT INTO users (tenant_id, login, password) VALUES (1, %s, %s) RETURNING id",
                        (login, legacy_token(password)))
            user_id = cur.fetchone()[0]
            cur.execute("INSERT INTO vms (name, user_id, osf_id, di_tag) SELECT %s || '-' || g, %s, %s, 'default' "
                        "FROM generate_series(1, %s) g ORDER BY g RETURNING id", (login, user_id, osf_id, vms_per_user))
            ids = sorted(r[0] for r in cur.fetchall())
            cur.execute("INSERT INTO vm_runtimes (vm_id, vm_state, user_state, blocked) "
                        "SELECT id, 'stopped', 'disconnected', false FROM unnest(%s) id", (ids,))
            cur.execute("INSERT INTO vm_counters (vm_id) SELECT unnest(%s)", (ids,))
            out[login] = ids
        return out
    return db.transaction(run)


def place_on_farm(db, vm_ids, farm_host, farm):
    """The VMs run on the farm host (backend=false: never placed there by anyone else)."""
    for vm_id in vm_ids:
        db.transaction(runtime.set_vm_agent_key, vm_id, farm.key)
    db.execute("UPDATE vm_runtimes SET host_id = %s, vm_state = 'running', vm_state_ts = %s, vm_address = %s, "
               "vm_vma_port = %s, vm_x_port = %s WHERE vm_id = ANY(%s)",
               (farm_host, int(time.time()), farm.address, farm.ports["rpc"], farm.ports["echo"], list(vm_ids)))


# --- a client ---------------------------------------------------------------------------------
class SessionRefused(Exception):
    def __init__(self, status, body, infos):
        super().__init__(f"{status}: {body!r} after {infos}")
        self.status = status
        self.body = body
        self.infos = infos


def client_context(cert):
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    return ctx


def open_session(port, ctx, login, password, vm_id, timeout=60, host="127.0.0.1"):
    """connect_to_vm up to 101; returns (ssl socket now spliced to the VM, leftover bytes)."""
    from .l7r_env import Reader
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock = ctx.wrap_socket(sock, server_hostname="localhost")
        auth = base64.b64encode(f"{login}:{password}".encode()).decode()
        sock.sendall(f"GET /qvd/connect_to_vm?id={vm_id} HTTP/1.1\r\nHost: qvd\r\nAuthorization: Basic {auth}\r\n"
                     "Connection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n".encode())
        reader = Reader(sock)
        infos, final = reader.final()
        if final.status != 101:
            raise SessionRefused(final.status, final.body, infos)
        return sock, reader.buf
    except BaseException:
        sock.close()
        raise


def http_get(port, ctx, path, login, password, timeout=20, host="127.0.0.1"):
    """One GET with Basic auth; returns the Response."""
    from .l7r_env import Reader
    with socket.create_connection((host, port), timeout=timeout) as raw:
        sock = ctx.wrap_socket(raw, server_hostname="localhost")
        auth = base64.b64encode(f"{login}:{password}".encode()).decode()
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: qvd\r\nAuthorization: Basic {auth}\r\n"
                     "Connection: close\r\n\r\n".encode())
        return Reader(sock).final()[1]


def echo_roundtrip(sock, payload, timeout=20):
    sock.settimeout(timeout)
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(len(payload) - len(got))
        if not chunk:
            raise EOFError(f"session closed after {len(got)} of {len(payload)} echoed bytes")
        got += chunk
    return got



def vm_processes(node_run_dir):
    """{vm_id: pid} of live process-VM inits started by the node whose path.run is node_run_dir."""
    run = os.path.abspath(str(node_run_dir))
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if env.get(b"QVD_NODE_RUN", b"").decode() != run or b"QVD_VM_ID" not in env:
            continue
        pid = int(entry)
        try:
            if os.getpgid(pid) != pid or not pid_alive(pid):
                continue
        except OSError:
            continue
        found[int(env[b"QVD_VM_ID"])] = pid
    return found


def kill_vm_processes(node_run_dir):
    for pid in vm_processes(node_run_dir).values():
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
