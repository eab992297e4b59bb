#!/usr/bin/env python3
"""A minimal VM init for `process` hypervisor tests (stands in for qvd-vm-init).

Serves the VMA's SimpleRPC calls the HKD and the L7R use on QVD_VM_ADDRESS:QVD_VMA_PORT
(GET /vma/ping, /vma/x_state, /vma/x_start, /vma/poweroff) and echoes lines on the
display port. Exits on SIGTERM and after answering poweroff.
With QVD_VMA_SECRET (the agent key the HKD made for this start) every call must carry
``Authorization: Bearer <key>`` (else 401, counted in the log as "refused"), and the
display admits only the connection presenting the key of the last x_start, as
qvd-vma's gate does (docs/protocol.md#display-gate): an x_start of an older claim
(qvd.display.generation) is refused, a new arming or admission closes the connection
before it, and the log says so ("display: admitted generation=G", "display: taken while
open", "display: stale x_start"), which is what the concurrency tests read. Without it (the node's
vm.vma.legacy_unauthenticated) it answers everyone, like the original VMA.
Env knobs for tests: TINY_VM_NO_VMA=1 (never answer: a VM whose agent is dead),
TINY_VM_IGNORE_TERM=1 (ignore SIGTERM: forces the HKD to SIGKILL).
"""
import hmac
import json
import os
import signal
import socketserver
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from qvd_gevent.vma import display_gate

ADDRESS = os.environ.get("QVD_VM_ADDRESS", "127.0.0.1")
VMA_PORT = int(os.environ.get("QVD_VMA_PORT", "3030"))
X_PORT = int(os.environ.get("QVD_X_PORT", "4100"))
SECRET = os.environ.pop("QVD_VMA_SECRET", None)
x_state = {"value": "stopped"}
armed = {"key": None, "generation": None, "current": None}
armed_lock = threading.Lock()


def _take_current(by):
    """Close the admitted connection for a newer session (armed_lock held); a connection
    whose L7R had not closed it yet is logged: two sessions would have overlapped."""
    conn, armed["current"] = armed["current"], None
    if conn is None:
        return
    if not display_gate.peer_closed(conn):
        sys.stderr.write(f"display: taken while open by generation={by}\n")
    try:
        conn.shutdown(2)
    except OSError:
        pass


class Vma(BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):
        sys.stderr.write("vma: " + (fmt % args) + "\n")

    def _error(self, message):
        body = ('"",' + json.dumps(message)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _answer(self, result):
        body = json.dumps(result).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        method, _, query = self.path.partition("?")
        if SECRET is not None and not hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                                          f"Bearer {SECRET}".encode()):
            sys.stderr.write(f"vma: refused {method}\n")
            self.send_error(401)
            return
        if method == "/vma/ping":
            self._answer(1)
        elif method == "/vma/x_state":
            self._answer(x_state["value"])
        elif method == "/vma/x_start":
            params = dict(urllib.parse.parse_qsl(query))
            generation = params.get(display_gate.GENERATION_PARAM)
            generation = int(generation) if generation is not None else None
            with armed_lock:
                if generation is not None and armed["generation"] is not None and generation < armed["generation"]:
                    sys.stderr.write(f"display: stale x_start generation={generation} "
                                     f"(holder {armed['generation']})\n")
                    self._error(f"a newer session (claim {armed['generation']}) holds the display")
                    return
                if generation is not None:
                    armed["generation"] = generation
                armed["key"] = params.get(display_gate.PARAM)
                if SECRET is not None:
                    _take_current(generation)
            x_state["value"] = "listening"
            self._answer(1)
        elif method == "/vma/poweroff":
            self._answer(1)
            threading.Timer(0.1, lambda: os._exit(0)).start()
        elif method == "/vma/expire":
            self._answer(1)
        else:
            self.send_error(404)


class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        if SECRET is not None:
            self.request.settimeout(5)
            try:
                key = display_gate.key_of_preamble(self.rfile.read(display_gate.PREAMBLE_LENGTH))
            except OSError:
                return
            with armed_lock:
                if key is None or armed["key"] is None or not hmac.compare_digest(key, armed["key"]):
                    return
                armed["key"] = None
                _take_current(armed["generation"])
                armed["current"] = self.request
                sys.stderr.write(f"display: admitted generation={armed['generation']}\n")
            self.request.settimeout(None)
            self.wfile.write(display_gate.ACK)
        try:
            for line in self.rfile:
                self.wfile.write(line)
        except OSError:
            pass
        finally:
            with armed_lock:
                if armed["current"] is self.request:
                    armed["current"] = None


class EchoServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main():
    if os.environ.get("TINY_VM_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    echo = EchoServer((ADDRESS, X_PORT), Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    if os.environ.get("TINY_VM_NO_VMA") == "1":
        threading.Event().wait()
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer((ADDRESS, VMA_PORT), Vma)
    print(f"tiny vm {os.environ.get('QVD_VM_ID')} on {ADDRESS}:{VMA_PORT}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    try:
        main()
    except OSError as exc:
        print(f"tiny vm: {exc}", file=sys.stderr)
        sys.exit(1)
