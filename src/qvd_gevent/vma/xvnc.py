"""The x desktop: an X display that speaks VNC (RFB), for the browser client
(docs/protocol.md#the-x-desktop).

TigerVNC's ``Xvnc`` is the X server and the VNC server in one process. It runs on a free
local display and listens for RFB on a unix socket in the VMA's run folder only (mode
0600, no TCP port), so nothing but the VMA reaches it: the VMA hands it the one
connection its display port admitted (``serve``), as the echo and nx desktops do. Once
Xvnc answers, the root window is painted ``vma.x.background`` (xsetroot) and
``vma.x.session`` is started on the display (an xclock by default; ``command.x-session``
wins when set).

States follow the nx desktop's (docs/protocol.md#x-session-states): x_start -> starting
-> listening (Xvnc answers) -> connected (a client is relayed) -> suspended (it left; the
desktop and its programs keep running) -> listening again at the next x_start. Unlike
nxagent, a session left listening too long goes back to suspended instead of being
terminated: an X desktop costs nothing while nobody watches, and the user's programs
stay open. x_stop ends Xvnc and everything on its display.
"""
import logging
import os
import re
import shlex
import signal
import socket
import time

import gevent
from gevent import subprocess

from .desktop import DesktopError
from .nx import free_local_display
from .xstate import StateTracker

log = logging.getLogger("qvd.vma.x")

CHUNK = 65536
_GEOMETRY = re.compile(r"^(\d{3,4})x(\d{3,4})$")


def geometry(params, default):
    """WxH from qvd.client.geometry when it is a sane size, else default."""
    for value in (params.get("qvd.client.geometry"), default):
        match = _GEOMETRY.match(str(value or ""))
        if match and 320 <= int(match.group(1)) <= 7680 and 200 <= int(match.group(2)) <= 4320:
            return f"{match.group(1)}x{match.group(2)}"
    return "1024x768"


class XvncDesktop:
    kind = "x"

    def __init__(self, cfg, run_dir, timeouts, validate=None, clock=time.monotonic):
        self.cfg = cfg
        self.run_dir = run_dir
        self.validate = validate
        self.clock = clock
        self.tracker = StateTracker(timeouts, clock())
        self.display = None
        self.socket_path = None
        self.server = None          # the Xvnc process
        self.programs = []          # what runs on its display
        self.client = None
        self.sessions = 0
        self._watcher = None

    # --- the RPC side ------------------------------------------------------------------
    def _alive(self):
        return self.server is not None and self.server.poll() is None

    def x_state(self):
        state, expired = self.tracker.x_state(self.clock(), alive=self._alive())
        if expired:
            if self.tracker.current == "listening" and self._alive():
                log.info("x desktop: nobody connected in time; the desktop stays, suspended")
                self.tracker.set("suspended", self.clock())
                return "suspended"
            log.info("x desktop: %s timed out, stopping it", self.tracker.current)
            self._terminate()
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
            self._spawn(geometry(params, self.cfg.get("vma.x.geometry")))
        elif state == "suspended":
            self.tracker.set("resuming", self.clock())
        else:
            raise DesktopError(f"Unable to start/resume X session in state {state}, try again in a few minutes")
        return "starting"

    def x_suspend(self):
        if self.x_state() in ("listening", "connected"):
            self._drop_client()
            self.tracker.set("suspended", self.clock())
        return self.x_state()

    def x_stop(self):
        if not self._alive():
            return self.x_state()
        self._terminate()
        return "stopping"

    def close(self):
        self._drop_client()
        self._terminate(wait=True)

    # --- the display side: a connection the VMA admitted -------------------------------
    def serve(self, conn, ack):
        """Relay conn to Xvnc's RFB socket until either side ends."""
        if self.tracker.current != "listening" or not self._alive():
            return                  # no session waits for a client: closed unanswered
        vnc = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            vnc.connect(self.socket_path)
        except OSError as exc:
            vnc.close()
            log.warning("x desktop: Xvnc does not answer on %s: %s", self.socket_path, exc)
            return
        try:
            ack()
            self.client = conn
            self.sessions += 1
            self.tracker.set("started", self.clock())
            pumps = [gevent.spawn(_pump, conn, vnc), gevent.spawn(_pump, vnc, conn)]
            gevent.wait(pumps, count=1)
            gevent.wait(pumps, timeout=1)
            gevent.killall(pumps)
        finally:
            vnc.close()
            if self.client is conn:
                self.client = None
                if self.tracker.current == "connected":
                    self.tracker.set("suspended", self.clock())

    def _drop_client(self):
        client, self.client = self.client, None
        if client is not None:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # --- Xvnc and the programs on its display -------------------------------------------
    def _spawn(self, size):
        self._reap()
        self.display = free_local_display(self.cfg.get("vma.x.display.first"))
        self.socket_path = os.path.join(self.run_dir, f"vnc-{self.display}.sock")
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        # X clients only through /tmp/.X11-unix, which is in the VM's private /tmp: no TCP port
        # and no abstract-namespace socket (abstract names belong to the network namespace,
        # which `process` VMs share: docs/hkd.md#vm-confinement)
        argv = [self.cfg.get("command.xvnc"), f":{self.display}", "-geometry", size, "-depth", "24",
                "-rfbunixpath", self.socket_path, "-rfbunixmode", "0600", "-rfbport", "-1",
                "-SecurityTypes", "None", "-nolisten", "tcp", "-nolisten", "local", "-desktop", "QVD",
                "-NeverShared", "-DisconnectClients"]
        self.tracker.set("initiating", self.clock())
        try:
            with open(os.path.join(self.run_dir, "xvnc.log"), "ab") as out:
                self.server = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                               env=_env(None), close_fds=True)
        except OSError as exc:
            self.tracker.set("aborted", self.clock())
            raise DesktopError(f"cannot run {argv[0]}: {exc.strerror} (Debian: apt-get install "
                               "tigervnc-standalone-server)") from None
        log.info("Xvnc started, pid %d, display :%d, %s", self.server.pid, self.display, size)
        self._watcher = gevent.spawn(self._watch, self.server)

    def _watch(self, server):
        deadline = self.clock() + self.tracker.timeouts.get("starting", 20)
        while server.poll() is None and self.clock() < deadline and not _answers(self.socket_path):
            gevent.sleep(0.05)
        if server.poll() is None and self.server is server and _answers(self.socket_path):
            self._start_programs()
            if self.tracker.nx_state == "initiating":
                self.tracker.set("starting", self.clock())     # x_state: listening
        server.wait()
        if self.server is server:
            self.tracker.set("terminated", self.clock())
            self._stop_programs()
        log.info("Xvnc exited with %s", server.returncode)

    def _start_programs(self):
        env = _env(self.display)
        background = self.cfg.get("vma.x.background")
        commands = [["xsetroot", "-solid", background]] if background else []
        session = self.cfg.get("command.x-session") or self.cfg.get("vma.x.session")
        if session:
            commands.append(shlex.split(session))
        for argv in commands:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, env=env, close_fds=True)
            except OSError as exc:
                log.error("x desktop: cannot run %s: %s", argv[0], exc.strerror)
                continue
            if argv[0] == "xsetroot":
                proc.wait()
            else:
                self.programs.append(proc)
                log.info("x desktop: %s started on :%d, pid %d", argv[0], self.display, proc.pid)

    def _stop_programs(self):
        for proc in self.programs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.programs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.programs = []

    def _terminate(self, wait=False):
        server = self.server
        if server is not None and server.poll() is None:
            self.tracker.set("terminating", self.clock())
            server.send_signal(signal.SIGTERM)
            if wait:
                try:
                    server.wait(timeout=self.tracker.timeouts.get("stopping", 20))
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
        if wait:
            self._stop_programs()
            if self._watcher is not None:
                self._watcher.join(timeout=2)

    def _reap(self):
        if self.server is not None and self.server.poll() is None:
            self._terminate(wait=True)
        self._stop_programs()


def _env(display):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QVD_VMA_SECRET", "DISPLAY", "XAUTHORITY"))}
    if display is not None:
        env["DISPLAY"] = f":{display}"
    return env


def _answers(path):
    if not path or not os.path.exists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _pump(src, dst):
    try:
        while True:
            data = src.recv(CHUNK)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
