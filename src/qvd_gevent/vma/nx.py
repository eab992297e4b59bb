"""The nx desktop: Debian's nxagent on display :<internal.nxagent.display> (reference 3.5).

nxagent listens for the client's nxproxy on TCP 4000+display. Its session state is
learnt from its own log lines (``Session: ...``) and mapped per reference 3.4. Unlike
the original, nxagent runs as the VMA's own user (no user provisioning, no xinit): the
optional X session command (``command.x-session``) is started with DISPLAY=:<display>
once nxagent announces its session.

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
import time

import gevent
from gevent import subprocess

from .desktop import DesktopError
from .xstate import InvalidOption, StateTracker, nxagent_options

log = logging.getLogger("qvd.vma.nx")


class NxDesktop:
    kind = "nx"

    def __init__(self, cfg, run_dir, display, timeouts, clock=time.monotonic):
        self.cfg = cfg
        self.run_dir = run_dir
        self.display = display
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
            line = nxagent_options(params, self.cfg.get, self.display)
        except InvalidOption as exc:
            raise DesktopError(str(exc)) from None
        tmp = self.options_path + ".tmp"
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(line + "\n")
        os.replace(tmp, self.options_path)

    def _spawn_agent(self):
        d = self.display
        argv = [self.cfg.get("command.nxagent"), f":{d}", "-ac", "-name", "QVD", "-nolisten", "tcp",
                "-display", f"nx/nx,options={self.options_path}:{d}"]
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
        env = dict(os.environ, DISPLAY=f":{self.display}")
        try:
            self.session = subprocess.Popen(shlex.split(command), stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            env=env, close_fds=True)
            log.info("X session %r started, pid %d", command, self.session.pid)
        except OSError as exc:
            log.error("cannot start X session %r: %s", command, exc.strerror)

    def _signal(self, signum):
        if self._alive():
            try:
                self.agent.send_signal(signum)
            except OSError:
                pass
