"""The nx desktop: Debian's nxagent on display :<internal.nxagent.display> (docs/protocol.md#x-start).

nxagent listens for the client's nxproxy on TCP 4000+display. Its session state is
learnt from its own log lines (``Session: ...``) and mapped per docs/protocol.md#x-session-states. Unlike
the original, nxagent runs as the VMA's own user (no user provisioning, no xinit): the
optional X session command (``command.x-session``) is started with DISPLAY=:<display>
once nxagent announces its session.

Ports: by default nxagent runs on a free local display and listens only on a unix socket
in the VMA's run folder (``listen=unix:<run dir>/nxagent.sock``); the VMA's display gate
on <address>:4000+display admits the armed connection and relays it there
(vma/display_gate.py). So no other process reaches nxagent over the network, not even
another `process` VM on the same loopback, and VMs of the `process` and `netns`
hypervisors, which share one /tmp/.X11-unix, do not fight over display :100.
``vma.nxagent.direct`` restores the original layout (nxagent itself on :display,
listening on *:4000+display) for an unauthenticated VMA only, as it bypasses the gate.

Invocation found by experiment (nx-libs 3.5.99.26):
    nxagent :100 -ac -name QVD -nolisten tcp -display nx/nx,options=<file>:100
with <file> holding one line ``nx/nx,keyboard=...,link=...,geometry=...:100``; it logs
``Session: Starting session at`` and waits on tcp:*:4100; the client side is
``DISPLAY=<real X> nxproxy -S <host>:100`` (connects to <host>:4100).
"""
import logging
import os
import shlex
import signal
import socket
import time

import gevent
from gevent import subprocess

from .desktop import DesktopError
from .xstate import InvalidOption, StateTracker, nxagent_options

log = logging.getLogger("qvd.vma.nx")


class NxDesktop:
    kind = "nx"

    def __init__(self, cfg, run_dir, display, timeouts, address="0.0.0.0", clock=time.monotonic):
        self.cfg = cfg
        self.run_dir = run_dir
        self.display = display  # the public one: clients reach it on port 4000+display
        self.address = address
        self.relayed = not cfg.get("vma.nxagent.direct")
        self.agent_display = None  # where nxagent runs; chosen at the first start
        self.socket_path = os.path.join(run_dir, "nxagent.sock")
        self.clock = clock
        self.tracker = StateTracker(timeouts, clock())
        self.options_path = os.path.join(run_dir, "nxagent.conf")
        self.log_path = os.path.join(run_dir, "nxagent.log")
        self.agent = None
        self.session = None
        self.monitor = None

    # --- RPC side --------------------------------------------------------------------
    def _alive(self):
        return self.agent is not None and self.agent.poll() is None

    def x_state(self):
        state, expired = self.tracker.x_state(self.clock(), alive=self._alive())
        if expired:
            log.info("nxagent state %s timed out, terminating it", self.tracker.current)
            self._signal(signal.SIGTERM)
            self.tracker.set("terminating", self.clock())
        return state

    def x_start(self, params):
        state = self.x_state()
        if state == "connected":
            self._signal(signal.SIGHUP)  # forces a suspend; the L7R retries and resumes
            raise DesktopError("Can't connect to X session in state connected, suspending it, retry later")
        if state == "suspended":
            self._write_options(params)
            self.tracker.set("initiating", self.clock())
            self._signal(signal.SIGHUP)  # resume with the new options
            return "starting"
        if state != "stopped":
            raise DesktopError(f"Unable to start/resume X session in state {state}, try again in a few minutes")
        if self.agent_display is None:
            self.agent_display = free_local_display(self.cfg.get("vma.nxagent.display.first")) \
                if self.relayed else self.display
        self._write_options(params)
        self.tracker.set("initiating", self.clock())
        self._spawn_agent()
        return "starting"

    def x_suspend(self):
        state = self.x_state()
        if state in ("listening", "connected"):
            self._signal(signal.SIGHUP)
        return self.x_state()

    def x_stop(self):
        if not self._alive():
            return self.x_state()
        self._signal(signal.SIGTERM)
        self.tracker.set("terminating", self.clock())
        return "stopping"

    def close(self):
        grace = self.tracker.timeouts.get("stopping", 20)
        for proc in (self.session, self.agent):
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.monitor is not None:
            self.monitor.join(timeout=1)

    # --- nxagent ---------------------------------------------------------------------
    def _write_options(self, params):
        try:
            line = nxagent_options(params, self.cfg.get, self.agent_display,
                                   listen_socket=self.socket_path if self.relayed else None)
        except InvalidOption as exc:
            raise DesktopError(str(exc)) from None
        tmp = self.options_path + ".tmp"
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(line + "\n")
        os.replace(tmp, self.options_path)

    def _spawn_agent(self):
        if self.session is not None and self.session.poll() is not None:
            self.session = None  # the previous session's X client is gone; start a new one
        d = self.agent_display
        if self.relayed:
            try:
                os.unlink(self.socket_path)     # a previous nxagent's: the relay must not dial it
            except FileNotFoundError:
                pass
        # -ac lets every X client in: no TCP port, and no abstract-namespace socket either
        # (abstract names belong to the network namespace, which `process` VMs share; the
        # socket in /tmp/.X11-unix is in the VM's private /tmp, docs/hkd.md#vm-confinement)
        argv = [self.cfg.get("command.nxagent"), f":{d}", "-ac", "-name", "QVD", "-nolisten", "tcp",
                "-nolisten", "local", "-display", f"nx/nx,options={self.options_path}:{d}"]
        env = dict(os.environ, NX_HOME=self.run_dir, HOME=os.environ.get("HOME", self.run_dir))
        env.pop("DISPLAY", None)
        try:
            self.agent = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, env=env, close_fds=True)
        except OSError as exc:
            self.tracker.set("aborted", self.clock())
            raise DesktopError(f"cannot run {argv[0]}: {exc.strerror}") from None
        log.info("nxagent started, pid %d, display :%d", self.agent.pid, d)
        self.monitor = gevent.spawn(self._watch, self.agent)

    def _watch(self, agent):
        """Follow nxagent's log: state from `Session:` lines, a copy in nxagent.log."""
        with open(self.log_path, "ab") as copy:
            for raw in agent.stdout:
                copy.write(raw)
                copy.flush()
                line = raw.decode("utf-8", "replace")
                nx_state = self.tracker.feed_line(line, self.clock())
                if nx_state is not None:
                    log.info("nxagent session %s", nx_state)
                    if nx_state == "starting" and self.session is None:
                        self._spawn_session()
        agent.wait()
        if self.agent is agent:
            self.tracker.set("terminated", self.clock())
        log.info("nxagent exited with %s", agent.returncode)

    def _spawn_session(self):
        command = self.cfg.get("command.x-session")
        if not command:
            return
        env = dict(os.environ, DISPLAY=f":{self.agent_display}")
        try:
            self.session = subprocess.Popen(shlex.split(command), stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            env=env, close_fds=True)
            log.info("X session %r started, pid %d", command, self.session.pid)
        except OSError as exc:
            log.error("cannot start X session %r: %s", command, exc.strerror)

    # --- the display side: a connection the gate admitted, relayed to nxagent's socket ----
    def serve(self, conn, ack):
        """Relay conn to nxagent until either side leaves (runs in the gate's greenlet)."""
        # nxagent logs "Starting session" (x_state listening) a moment before it listens,
        # so a client quick off the mark may arrive first: retry for a while.
        deadline = self.clock() + self.tracker.timeouts.get("listening", 10)
        while True:
            agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                agent.settimeout(5)
                agent.connect(self.socket_path)
                break
            except OSError as exc:
                agent.close()
                if self.clock() > deadline or not self._alive():
                    log.info("display relay: nxagent not reachable: %s", exc)
                    return
                gevent.sleep(0.05)
        agent.settimeout(None)
        try:
            ack()
            pumps = [gevent.spawn(_pump, conn, agent), gevent.spawn(_pump, agent, conn)]
            # either side gone (the client, or a new arming closing it) ends the relay; the
            # other direction gets a moment to drain its last bytes
            gevent.wait(pumps, count=1)
            gevent.wait(pumps, timeout=1)
            gevent.killall(pumps)
        finally:
            agent.close()

    def _signal(self, signum):
        if self._alive():
            try:
                self.agent.send_signal(signum)
            except OSError:
                pass


def _pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def free_local_display(first, tries=200):
    """A display number with no X lock file and its NX port free on 127.0.0.1."""
    for display in range(first, first + tries):
        if os.path.exists(f"/tmp/.X{display}-lock") or os.path.exists(f"/tmp/.X11-unix/X{display}"):
            continue
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.bind(("127.0.0.1", 4000 + display))
        except OSError:
            continue
        finally:
            probe.close()
        return display
    raise DesktopError(f"no free X display in {first}..{first + tries - 1}")
