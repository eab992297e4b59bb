"""The HKD: the host's lifecycle, run as the pure HostMachine (host_machine.py) drives it.

This module holds the HKD's state and its loop: events in, the machine's actions executed;
the steps of the start and stop sequences are in startup.py, the heartbeat and fencing in
heartbeat.py, the command intake in intake.py, the periodic agents in periodic.py. Per-VM
work is done by VmRunner (vm_runner.py), lost-node detection by ClusterMonitor
(cluster.py). Everything is driven by LISTEN/NOTIFY with the original's slow polls as a
safety net (docs/hkd.md#host-commands to docs/hkd.md#cluster-monitor).
"""
import logging
import os

import gevent
import gevent.event
import gevent.lock
import gevent.queue

from ..common import metrics
from ..hypervisors import HypervisorError
from ..hypervisors.base import VmHandle
from ..vma.client import legacy_unauthenticated
from . import heartbeat, intake
from . import host_machine as H
from . import vm_machine as M
from .errors import DB_ERRORS, HkdConfigError, HkdError, check_cluster_timers, first_line
from .startup import STEPS

log = logging.getLogger("qvd.hkd")

class HKD:
    def __init__(self, cfg, db, listener):
        self.cfg = cfg
        self.db = db.with_retries(cfg.get_int("internal.hkd.db.retries"))
        self.listener = listener
        self.nodename = cfg.get_str("nodename")
        self.host_id = None
        self.address = None
        self.vms = {}                       # vm_id -> VmRunner
        self.hypervisor = None
        self.dnsmasq = None
        self.network_setup = None
        self.vm_filter = None
        self.vm_settings = M.Settings()
        self.heavy_size = max(1, cfg.get_int("internal.hkd.max_heavy"))
        self.heavy = gevent.lock.Semaphore(self.heavy_size)
        self.machine = H.HostMachine(cfg.get_float("internal.hkd.stopping.vms.timeout"),
                                     cfg.get_float("internal.hkd.killing.vms.retry.timeout"))
        self.stopped = gevent.event.Event()     # set when the host reached stopped (or never started)
        self.lost = False
        self.fenced = False
        self.on_stop_command = None         # the node sets this to stop L7R and HKD together
        self._ready = gevent.event.AsyncResult()
        self._start_failure = None
        self.events = gevent.queue.Queue()
        self._loop = None
        self.lock_fd = None
        self.agents = []                   # greenlets to kill at stop_agents
        self.unsubscribers = []
        self.vm_wake = gevent.event.Event()
        self.cmd_wake = gevent.event.Event()
        self.intake = None
        self.cluster = None
        self._timer = None
        self.last_tick = None

    # --- public API ----------------------------------------------------------------------
    def start(self):
        """Run the startup sequence; return once the host is running, else raise HkdError."""
        check_cluster_timers(self.cfg)
        legacy_unauthenticated(self.cfg, "HKD")
        self._loop = gevent.spawn(self._run_loop)
        self._loop.link_exception(self._loop_crashed)
        self.events.put(H.Run())
        reason = self._ready.get()
        if reason is not True:
            raise (HkdConfigError if isinstance(self._start_failure, HkdConfigError) else HkdError)(reason)
        metrics.register_gauge_function("qvd_hkd_vms", self._vm_gauge)
        return self

    def stop(self, timeout=None):
        """Graceful stop: VMs stopped by the original's rules, host stopping -> stopped."""
        if self._loop is None or self.machine.state in ("new", "failed", "stopped"):
            self._release_everything()
            self.stopped.set()
            return
        if timeout is not None:
            self.machine.stopping_vms_timeout = timeout
        self.events.put(H.CmdStop("stop requested"))
        bound = (self.machine.stopping_vms_timeout + 3 * self.machine.killing_retry_timeout
                 + self.vm_settings.timeouts["zombie.reap"] + 60)
        if not self.stopped.wait(bound):
            log.error("HKD did not reach stopped within %.0f s; giving up", bound)
            self._release_everything()

    def on_config_changed(self, cfg):
        """ConfigWatcher callback: resize the heavy semaphore (the original does it on reload)."""
        size = max(1, cfg.get_int("internal.hkd.max_heavy"))
        delta, self.heavy_size = size - self.heavy_size, size
        for _ in range(delta):
            self.heavy.release()
        for _ in range(-delta):
            gevent.spawn(self.heavy.acquire)        # shrinks as running starts finish
        if delta:
            log.info("internal.hkd.max_heavy is now %d", size)

    # --- host loop -----------------------------------------------------------------------
    def _loop_crashed(self, greenlet):
        log.error("HKD loop crashed: %s", greenlet.exception)
        if not self._ready.ready():
            self._ready.set(f"HKD crashed: {first_line(greenlet.exception)}")
        self._release_everything()
        self.stopped.set()

    def _run_loop(self):
        while True:
            event = self.events.get()
            for action in self.machine.handle(event):
                self._execute(action)
            if self.machine.state in ("stopped", "failed"):
                break

    def _execute(self, action):
        if isinstance(action, H.Step):
            gevent.spawn(self._run_step, action.name)
        elif isinstance(action, H.Log):
            log.info("%s", action.text)
        elif isinstance(action, H.Ready):
            log.info("host %s (id %s) running with hypervisor %s, %d VMs adopted",
                     self.nodename, self.host_id, self.hypervisor.name, len(self.vms))
            self._ready.set(True)
        elif isinstance(action, H.Fail):
            log.error("HKD start failed: %s", action.reason)
            if not self._ready.ready():
                self._ready.set(action.reason)
            if self.machine.state == "failed":
                self._release_everything()
                self.stopped.set()
        elif isinstance(action, H.StopAllVms):
            for runner in list(self.vms.values()):
                runner.send(M.HkdStop())
            self._check_all_stopped()
        elif isinstance(action, H.KillAllVms):
            for runner in list(self.vms.values()):
                runner.send(M.HkdKill())
        elif isinstance(action, H.ArmTimer):
            if self._timer is not None:
                self._timer.kill(block=False)
            self._timer = gevent.spawn_later(action.seconds, self.events.put, H.Timeout(action.name))
        elif isinstance(action, H.Stopped):
            if self._timer is not None:
                self._timer.kill(block=False)
            self._release_everything()
            log.info("HKD stopped")
            self.stopped.set()

    def _run_step(self, name):
        try:
            STEPS[name](self)
        except gevent.GreenletExit:
            raise
        except Exception as exc:
            if not isinstance(exc, (HkdError, HypervisorError) + DB_ERRORS):
                log.exception("HKD step %s crashed", name)
            self._start_failure = exc
            self.events.put(H.StepFailed(name, first_line(exc)))
            return
        self.events.put(H.StepDone(name))

    def _check_all_stopped(self):
        if not self.vms and self.machine.state == "stopping" and self.machine.phase == "vms":
            self.events.put(H.AllVmsStopped())

    def _runner_finished(self, runner):
        if self.vms.get(runner.vm_id) is runner:
            del self.vms[runner.vm_id]
        self._check_all_stopped()

    def _vm_gauge(self):
        counts = {}
        for runner in list(self.vms.values()):
            key = (("state", runner.state),)
            counts[key] = counts.get(key, 0) + 1
        return counts

    # --- startup checks ------------------------------------------------------------------







    # --- setup -------------------------------------------------------------------------









    # --- stopping ------------------------------------------------------------------------




    def stop_agents(self):
        for unsubscribe in self.unsubscribers:
            unsubscribe()
        self.unsubscribers = []
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        for g in self.agents:
            g.kill(block=True, timeout=5)
        self.agents = []
        if self.dnsmasq is not None:
            try:
                self.dnsmasq.stop()
            except Exception as exc:  # noqa: BLE001 - reported, then the agent goes on
                log.warning("dnsmasq stop: %s", first_line(exc))
            self.dnsmasq = None
        if self.vm_filter is not None:
            try:
                self.vm_filter.remove()
            except Exception as exc:  # noqa: BLE001 - reported, then the agent goes on
                log.warning("VM network filter: %s", first_line(exc))
            self.vm_filter = None
        if self.network_setup is not None:
            try:
                self.network_setup.remove()
            except Exception as exc:  # noqa: BLE001 - reported, then the agent goes on
                log.warning("network teardown: %s", first_line(exc))
            self.network_setup = None
        if self.hypervisor is not None:
            self.hypervisor.close()

    def tick(self):
        """One heartbeat now (heartbeat.tick): True when it was written."""
        return heartbeat.tick(self)

    def process_vm_commands(self):
        """Take the pending VM commands now (intake.process_vm_commands)."""
        intake.process_vm_commands(self)

    def _release_everything(self):
        """Last resort on failed start or stuck stop: agents down, lock released."""
        if self.intake is not None:
            self.intake.kill(block=False)
            self.intake = None
        self.stop_agents()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    # --- agents --------------------------------------------------------------------------














__all__ = ["HKD", "HkdError", "VmHandle"]
