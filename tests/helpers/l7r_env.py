"""Shared set-up for L7R integration tests: a seeded database, a running L7RService over
TLS on 127.0.0.1 (self-signed certificate made with `cryptography`), a FakeVma and a
TestHkd, and a small raw HTTP client that reads responses exactly as a client sees them.
"""
import base64
import os
import socket
import ssl
from pathlib import Path

from qvd_gevent.config import Config
from qvd_gevent.db import Database, runtime
from qvd_gevent.db.listen import Listener
from qvd_gevent.db.passwords import legacy_token
from qvd_gevent.l7r.server import L7RService
from qvd_gevent.node.certs import make_self_signed

from .fake_vma import FakeVma, TestHkd

FAST = {
    "internal.l7r.timeout.takeover": 5,
    "internal.l7r.poll_time.vm": 1,
    "internal.l7r.timeout.vm_start": 5,
    "internal.l7r.timeout.vm_stop": 5,
    "internal.l7r.poll_time.x": 0.05,
    "internal.l7r.timeout.x_start": 3,
    "internal.l7r.retry.x_start": 3,
    "internal.l7r.timeout.vma": 2,
    "l7r.port": 0,
    "l7r.address": "127.0.0.1",
    "l7r.metrics.address": "",
}


def make_cert(folder):
    """(cert, key) of a self-signed certificate for localhost in folder, made once."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    if not cert.exists():
        make_self_signed(str(cert), str(key))
    return cert, key


def write_conf(tmp_path, pg_server, dbname, nodename="test-node", extra=None):
    from .database import write_node_conf
    run = tmp_path / f"run-{nodename}"
    values = dict(FAST)
    values.update({"path.run": run, "path.storage.root": tmp_path / "storage"})
    values.update(extra or {})
    path = write_node_conf(tmp_path / f"node-{nodename}.conf", pg_server, dbname, values)
    text = path.read_text().replace("nodename = test-node", f"nodename = {nodename}")
    path.write_text(text)
    return path


class Seed:
    def __init__(self, db):
        self.db = db

    def ssl(self, cert, key, ca=None, crl=None):
        """The L7R's certificate and key (and a client CA and its CRL) as `qvd-admin config ssl` stores them."""
        rows = [("l7r.ssl.cert", cert), ("l7r.ssl.key", key), ("l7r.ssl.ca", ca), ("l7r.ssl.crl", crl)]
        for name, path in rows:
            if path is not None:
                self.db.execute("INSERT INTO ssl_configs (key, value) VALUES (%s, %s) "
                                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (name, Path(path).read_text()))

    def host(self, name, address="127.0.0.1", state="running", blocked=False):
        host_id = self.db.query_one("INSERT INTO hosts (name, address, frontend, backend) VALUES (%s, %s, true, true) "
                                    "RETURNING id", (name, address))[0]
        self.db.execute("INSERT INTO host_runtimes (host_id, state, blocked, usable_ram, usable_cpu) "
                        "VALUES (%s, %s, %s, 1000, 1000)", (host_id, state, blocked))
        self.db.execute("INSERT INTO host_counters (host_id) VALUES (%s)", (host_id,))
        return host_id

    def tenant(self, name, blocked=False):
        return self.db.query_one("INSERT INTO tenants (name, blocked) VALUES (%s, %s) RETURNING id", (name, blocked))[0]

    def user(self, login, password, tenant_id=1, blocked=False, stored=None):
        stored = stored if stored is not None else legacy_token(password)
        return self.db.query_one("INSERT INTO users (login, password, tenant_id, blocked) VALUES (%s, %s, %s, %s) "
                                 "RETURNING id", (login, stored, tenant_id, blocked))[0]

    def osf(self, name="osf1", is_application=False, tenant_id=1):
        return self.db.query_one("INSERT INTO osfs (name, memory, use_overlay, is_application, tenant_id) "
                                 "VALUES (%s, 256, false, %s, %s) RETURNING id", (name, is_application, tenant_id))[0]

    def vm(self, name, user_id, osf_id, state="stopped", host_id=None, blocked=False):
        vm_id = self.db.query_one("INSERT INTO vms (name, user_id, osf_id, di_tag) VALUES (%s, %s, %s, 'default') "
                                  "RETURNING id", (name, user_id, osf_id))[0]
        self.db.execute("INSERT INTO vm_runtimes (vm_id, vm_state, user_state, host_id, blocked) "
                        "VALUES (%s, %s, 'disconnected', %s, %s)", (vm_id, state, host_id, blocked))
        return vm_id

    def running_at(self, vm_id, host_id, vma):
        """As the HKD leaves a started VM: running at the VMA's ports, with its agent key (vma.key)."""
        self.db.transaction(runtime.set_vm_agent_key, vm_id, getattr(vma, "key", None))
        self.db.execute("UPDATE vm_runtimes SET vm_state = 'running', host_id = %s, vm_address = '127.0.0.1', "
                        "vm_vma_port = %s, vm_x_port = %s WHERE vm_id = %s", (host_id, vma.vma_port, vma.x_port, vm_id))

    def prop(self, kind, obj_id, key, value, tenant_id=1):
        table = {"vm": "vm_properties", "user": "user_properties", "osf": "osf_properties", "di": "di_properties"}[kind]
        col = {"vm": "vm_id", "user": "user_id", "osf": "osf_id", "di": "di_id"}[kind]

        def tx(cur):
            cur.execute("INSERT INTO properties_list (key, tenant_id) VALUES (%s, %s) ON CONFLICT (key, tenant_id) "
                        "DO UPDATE SET key = EXCLUDED.key RETURNING id", (key, tenant_id))
            pid = cur.fetchone()[0]
            cur.execute("INSERT INTO qvd_object_properties_list (property_id, qvd_object) VALUES (%s, %s) "
                        "ON CONFLICT (property_id, qvd_object) DO UPDATE SET qvd_object = EXCLUDED.qvd_object "
                        "RETURNING id", (pid, kind))
            qid = cur.fetchone()[0]
            cur.execute(f"INSERT INTO {table} ({col}, property_id, value) VALUES (%s, %s, %s)", (obj_id, qid, value))
        self.db.transaction(tx)


class Node:
    """One L7R 'node': config, pool, listener, service (and optionally a TestHkd + FakeVma)."""

    def __init__(self, conf_path, start=True, with_hkd=True, **vma_kw):
        self.cfg = Config.load(str(conf_path))
        self.db = Database.from_config(self.cfg)
        self.listener = Listener(self.db).start()
        assert self.listener.wait_connected(10)
        self.vma = FakeVma(**vma_kw).start()
        self.hkd = None
        self.svc = L7RService(self.cfg, self.db, self.listener)
        self.with_hkd = with_hkd
        if start:
            self.start()

    def start(self):
        self.svc.start()
        if self.with_hkd and self.svc.host_id is not None:
            self.hkd = TestHkd(self.db, self.listener, self.svc.host_id, self.vma).start()
        return self

    def close(self):
        try:
            self.svc.stop()
        finally:
            if self.hkd:
                self.hkd.stop()
            self.vma.stop()
            self.listener.stop()
            self.db.close()


# --- a raw client ----------------------------------------------------------------------------
def client_context(cert):
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    return ctx


def open_conn(port, cert=None, timeout=10):
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if cert is not None:
        sock = client_context(cert).wrap_socket(sock, server_hostname="localhost")
    return sock


def basic(login, password):
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()


AUTH = [("Authorization", basic("qvd", "qvd"))]        # the user a seeded node has (helpers.nodes.seeded_node)
UPGRADE = [("Connection", "Upgrade"), ("Upgrade", "QVD/1.0")]


def original_connect(vm_id):
    """The original client's connect_to_vm request, byte for byte."""
    return (b"GET /qvd/connect_to_vm?qvd.client.os=linux&qvd.client.audio.redirect.server=&qvd.client.fullscreen="
            b"&qvd.client.audio.compression.enable=1&qvd.client.audio.redirect.enable=0&qvd.client.link=adsl"
            b"&qvd.client.usb.implementation=USBIP&qvd.client.geometry=1024x768&qvd.client.audio.redirect.port="
            b"&id=" + str(vm_id).encode() + b"&qvd.client.nxagent.extra_args=&qvd.client.keyboard=pc105%2Fes"
            b"&qvd.client.printing.enabled=1&qvd.client.usb.enabled=0 HTTP/1.1\r\n"
            b"Authorization: Basic cXZkOnF2ZA==\r\n"
            b"Connection: Upgrade\r\n"
            b"Upgrade: QVD/1.0\r\n"
            b"User-Agent: QVD::HTTPC/0.01 (linux)\r\n\r\n")


def connect(node, vm_id=None, headers=None, extra=""):
    """connect_to_vm on a fresh connection, as the seeded user unless headers say otherwise:
    (socket, reader, the 102 infos, the final response)."""
    sock = open_conn(node.svc.port, node.cert)
    get(sock, f"/qvd/connect_to_vm?id={vm_id or node.vm_id}{extra}", AUTH + UPGRADE if headers is None else headers)
    reader = Reader(sock)
    infos, final = reader.final()
    return sock, reader, infos, final


def session_row(node, vm_id=None):
    """(user_state, l7r_host_id, l7r_pid, user_cmd, vm_state, real_user_id) of the VM's runtime row."""
    return node.db.query_one("SELECT user_state, l7r_host_id, l7r_pid, user_cmd, vm_state, real_user_id "
                             "FROM vm_runtimes WHERE vm_id = %s", (vm_id or node.vm_id,))


class Reader:
    """Reads HTTP responses off a socket, keeping bytes that follow them."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def response(self):
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        version, status, reason = lines[0].split(" ", 2)
        headers = {}
        raw_headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
            raw_headers.append(line)
        length = int(headers.get("content-length", "0")) if int(status) >= 200 else 0
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return Response(int(status), reason, headers, raw_headers, body, head + b"\r\n\r\n")

    def final(self):
        """All responses up to the first non-102: (list of 102 infos, final response)."""
        infos = []
        for _ in range(1000):
            resp = self.response()
            if resp.status != 102:
                return infos, resp
            infos.append(resp.headers.get("x-qvd-vm-info"))
        raise AssertionError("no final response")

    def recv_exact(self, n):
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data


class Response:
    def __init__(self, status, reason, headers, raw_headers, body, head):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.raw_headers = raw_headers
        self.body = body
        self.head = head

    @property
    def text(self):
        return self.body.decode()

    def __repr__(self):
        return f"<Response {self.status} {self.reason} {self.body[:200]!r}>"


def read_to_close(sock, timeout=5):
    """Every byte the peer sends until it closes the connection (end of stream, a reset, or
    a TLS close without close_notify). A receive that times out is not a close: it raises
    AssertionError, so a server that merely stops talking never passes for one that closed."""
    sock.settimeout(timeout)
    data = b""
    for _ in range(10000):
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"still open after {timeout} s (received {data[:200]!r})") from None
        except OSError:      # ConnectionResetError, ssl.SSLEOFError, ssl.SSLError...
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the peer kept sending ({len(data)} bytes) and never closed")


def get(sock, target, headers=()):
    lines = [f"GET {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())


def fds_open():
    return len(os.listdir("/proc/self/fd"))
