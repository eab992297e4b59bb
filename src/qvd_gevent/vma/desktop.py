"""The line-echo desktop (docs/hkd.md#process-and-netns-vms): what a client sends on the display port
comes back unchanged, byte for byte.

It behaves like an nxagent session to the L7R: x_start moves it from stopped to
listening, a connected client makes it connected, the client leaving makes it
suspended, the next x_start resumes (listening again). It has no socket of its own: the
VMA's display gate (vma/display_gate.py) hands it each admitted connection, in the gate's
greenlet, so nothing but the gate reaches it.
"""
import logging
import socket
import time

import gevent

from .xstate import StateTracker

log = logging.getLogger("qvd.vma.echo")

CHUNK = 16384


class DesktopError(Exception):
    """An x_* call that fails; the message goes back to the caller as the RPC error."""


class EchoDesktop:
    kind = "echo"

    def __init__(self, timeouts, validate=None, clock=time.monotonic):
        self.validate = validate  # params -> None or raises DesktopError (same checks as nx)
        self.clock = clock
        self.tracker = StateTracker(timeouts, clock())
        self.running = False
        self.client = None
        self.sessions = 0

    # --- the RPC side ------------------------------------------------------------------
    def x_state(self):
        state, expired = self.tracker.x_state(self.clock(), alive=self.running)
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
            self.running = True
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
        if not self.running:
            return self.x_state()
        self._shutdown()
        return "stopping"

    def close(self):
        self._shutdown()

    # --- the display side: a connection the gate admitted ------------------------------
    def serve(self, conn, ack):
        """Echo until the client leaves (runs in the gate's greenlet)."""
        if not self.running:
            return                  # no session: the connection is closed unanswered
        ack()
        self.client = conn
        self.sessions += 1
        self.tracker.set("started", self.clock())
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
            if self.client is conn:
                self.client = None
                if self.running:
                    self.tracker.set("suspended", self.clock())

    def _drop_client(self):
        client, self.client = self.client, None
        if client is not None:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _shutdown(self):
        self.tracker.set("terminating", self.clock())
        self.running = False
        self._drop_client()
        self.tracker.set("terminated", self.clock())
        gevent.sleep(0)
