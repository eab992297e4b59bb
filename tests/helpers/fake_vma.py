"""A stand-in VM for L7R integration tests: a SimpleRPC VMA, a byte echo display port,
and a test HKD greenlet that starts VMs by the database's rules.

- FakeVma: GET /vma/ping|x_state|x_start on 127.0.0.1:<port>, answered only with its
  agent key (``Authorization: Bearer <key>``, else 401) unless made with legacy=True;
  x_start records its params, arms the display with their one-time key and moves x_state
  from 'starting' to 'listening' after ``listen_delay``.
  The display port is the VMA's real gate (qvd_gevent.vma.display_gate) in front of an
  echo that returns bytes exactly; on EOF from the client it finishes echoing and
  half-closes its side, so half-close propagation can be observed.
- TestHkd: takes vm_cmd='start' rows for its host (NOTIFY qvd_cmd_for_vm_on_host<id> and
  a slow re-check), marks them starting, then running at the FakeVma's address with its
  agent key; 'stop' moves them to stopped. Only loopback addresses: nothing leaves the machine.
"""
import json
import socket
import urllib.parse

import gevent
import gevent.event
from gevent.server import StreamServer

from qvd_gevent.db import runtime
from qvd_gevent.vma import display_gate, rpc


class FakeVma:
    def __init__(self, listen_delay=0.05, x_start_failures=0, legacy=False):
        self.listen_delay = listen_delay
        self.x_start_failures = x_start_failures
        self.key = None if legacy else display_gate.new_key()
        self.state = "stopped"
        self.x_start_calls = []
        self.refused_calls = 0
        self.calls_with_authorization = 0
        self.echo_connections = 0
        self.rpc = StreamServer(("127.0.0.1", 0), self._rpc)
        self.gate = display_gate.DisplayGate("127.0.0.1", 0, self._echo, keyed=not legacy)

    def start(self):
        self.rpc.start()
        self.gate.start()
        return self

    def stop(self):
        self.rpc.stop(timeout=1)
        self.gate.stop()

    @property
    def vma_port(self):
        return self.rpc.server_port

    @property
    def x_port(self):
        return self.gate.port

    def _answer(self, sock, status, body):
        head = f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        sock.sendall(head.encode() + body)

    def _rpc(self, sock, addr):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return
            data += chunk
        request = rpc.parse_request_head(data.split(b"\r\n\r\n", 1)[0])
        self.calls_with_authorization += "authorization" in request.headers
        if self.key is not None and not rpc.bearer_matches(request.headers, self.key):
            self.refused_calls += 1
            self._answer(sock, 401, b"Unauthorized\r\n")
            return
        parts = urllib.parse.urlsplit(data.split(b"\r\n", 1)[0].decode().split(" ")[1])
        method = parts.path.rsplit("/", 1)[-1]
        params = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        if method == "ping":
            self._answer(sock, 200, b'"pong"\r\n')
        elif method == "x_state":
            self._answer(sock, 200, json.dumps(self.state).encode() + b"\r\n")
        elif method == "x_start":
            self.x_start_calls.append(params)
            if self.key is not None:
                self.gate.arm(params[display_gate.PARAM])
            if len(self.x_start_calls) <= self.x_start_failures:
                self._answer(sock, 200, b'"",' + json.dumps("not yet").encode() + b"\r\n")
                return
            self.state = "starting"
            gevent.spawn_later(self.listen_delay, setattr, self, "state", "listening")
            self._answer(sock, 200, b'"starting"\r\n')
        else:
            self._answer(sock, 200, b'"",' + json.dumps(f"unknown method {method}").encode() + b"\r\n")

    def _echo(self, sock, ack):
        ack()
        self.echo_connections += 1
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class TestHkd:
    """Starts and stops VMs of one host row at a FakeVma (a stand-in for the real HKD)."""

    __test__ = False

    def __init__(self, db, listener, host_id, vma, start_delay=0.1, fail_start=False):
        self.db = db
        self.listener = listener
        self.host_id = host_id
        self.vma = vma
        self.start_delay = start_delay
        self.fail_start = fail_start
        self.started = []
        self._wake = gevent.event.Event()
        self._greenlet = None
        self._unsub = None

    def start(self):
        self._unsub = self.listener.subscribe(f"qvd_cmd_for_vm_on_host{self.host_id}", lambda c, p: self._wake.set())
        self._greenlet = gevent.spawn(self._run)
        return self

    def stop(self):
        if self._unsub:
            self._unsub()
        if self._greenlet is not None:
            self._greenlet.kill()

    def _run(self):
        for _ in range(100000):
            self._wake.wait(1.0)
            self._wake.clear()
            rows = self.db.query(
                "UPDATE vm_runtimes SET vm_cmd = NULL, vm_state = 'starting' WHERE host_id = %s "
                "AND vm_cmd = 'start' AND vm_state = 'stopped' RETURNING vm_id", (self.host_id,))
            for (vm_id,) in rows:
                self.started.append(vm_id)
                gevent.spawn(self._bring_up, vm_id)
            rows = self.db.query(
                "UPDATE vm_runtimes SET vm_cmd = NULL, vm_state = 'stopping' WHERE host_id = %s "
                "AND vm_cmd = 'stop' RETURNING vm_id", (self.host_id,))
            for (vm_id,) in rows:
                gevent.spawn_later(self.start_delay, self.db.execute,
                                   "UPDATE vm_runtimes SET vm_state = 'stopped', host_id = NULL WHERE vm_id = %s", (vm_id,))

    def _bring_up(self, vm_id):
        gevent.sleep(self.start_delay)
        if self.fail_start:
            self.db.execute("UPDATE vm_runtimes SET vm_state = 'stopped', host_id = NULL WHERE vm_id = %s", (vm_id,))
            return
        self.db.transaction(runtime.set_vm_agent_key, vm_id, self.vma.key)
        self.db.execute("UPDATE vm_runtimes SET vm_state = 'running', vm_address = '127.0.0.1', vm_vma_port = %s, "
                        "vm_x_port = %s WHERE vm_id = %s", (self.vma.vma_port, self.vma.x_port, vm_id))
