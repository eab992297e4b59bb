"""The line-echo desktop (docs/hkd.md#process-and-netns-vms): what a client sends on the display port
comes back unchanged, byte for byte.

It behaves like an nxagent session to the L7R: x_start moves it from stopped to
listening, a connected client makes it connected, the client leaving makes it
suspended, the next x_start resumes (listening again). Connections are served one after
another; a second one waits in the listen backlog until the first has gone.
"""
import logging
import socket
import time

import gevent
from gevent.server import StreamServer

from .xstate import StateTracker

log = logging.getLogger("qvd.vma.echo")

CHUNK = 16384


class DesktopError(Exception):
    """An x_* call that fails; the message goes back to the caller as the RPC error."""


class EchoDesktop:
    kind = "echo"

    def __init__(self, address, port, timeouts, validate=None, clock=time.monotonic):
        self.address = address
        self.validate = validate  # params -> None or raises DesktopError (same checks as nx)
        self.port = port
        self.clock = clock
        self.tracker = StateTracker(timeouts, clock())
        self.server = None
        self.client = None
        self.sessions = 0

    # --- the RPC side ------------------------------------------------------------------
    def x_state(self):
        state, expired = self.tracker.x_state(self.clock(), alive=self.server is not None)
        if expired:
            log.info("echo desktop: %s timed out, stopping it", self.tracker.current)
            self._shutdown()
        return state

    def x_start(self, params):
        if self.validate is not None:
            self.validate(params)
        state = self.x_state()
        if state == "connected":
            self._drop_client()
            self.tracker.set("suspended", self.clock())
            raise DesktopError("Can't connect to X session in state connected, suspending it, retry later")
        if state == "stopped":
            self.tracker.set("initiating", self.clock())
            self._listen()
            self.tracker.set("starting", self.clock())
        elif state == "suspended":
            self.tracker.set("resuming", self.clock())
        elif state != "listening":
            raise DesktopError(f"Unable to start/resume X session in state {state}, try again in a few minutes")
        return "starting"

    def x_suspend(self):
        state = self.x_state()
        if state in ("listening", "connected"):
            self._drop_client()
            self.tracker.set("suspended", self.clock())
        return self.x_state()

    def x_stop(self):
        if self.server is None:
            return self.x_state()
        self._shutdown()
        return "stopping"

    def close(self):
        self._shutdown()

    # --- the display port ----------------------------------------------------------------
    def _listen(self):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.address, self.port))
            listener.listen(8)
        except OSError as exc:
            listener.close()
            self.tracker.set("aborted", self.clock())
            raise DesktopError(f"cannot listen on display port {self.address}:{self.port}: {exc.strerror}") from None
        # One connection at a time: the handler runs in the accept loop's own greenlet
        # through a pool of size 1, so the next accept waits for the previous client.
        self.server = StreamServer(listener, self._serve, spawn=1)
        self.server.start()

    def _serve(self, conn, peer):
        self.client = conn
        self.sessions += 1
        self.tracker.set("started", self.clock())
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                data = conn.recv(CHUNK)
                if not data:
                    break
                conn.sendall(data)
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        except OSError:
            pass
        finally:
            conn.close()
            if self.client is conn:
                self.client = None
                if self.server is not None:
                    self.tracker.set("suspended", self.clock())

    def _drop_client(self):
        client, self.client = self.client, None
        if client is not None:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            client.close()

    def _shutdown(self):
        self.tracker.set("terminating", self.clock())
        server, self.server = self.server, None
        self._drop_client()
        if server is not None:
            server.stop(timeout=1)
        self.tracker.set("terminated", self.clock())
        gevent.sleep(0)
