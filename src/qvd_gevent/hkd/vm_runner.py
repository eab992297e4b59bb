"""Runs one VM's state machine with real I/O: DB rows, the hypervisor, the VMA.

One greenlet per VM consumes events from a queue, asks the pure VmMachine for actions and
executes them; steps run in their own greenlet and report back as StepDone/StepFailed.
Every write to vm_runtimes is guarded by ``host_id = me``: a write that hits no row means
the cluster gave the VM away (this node was marked lost), and the VM is killed at once.
"""
import logging
import os
import secrets
import time

import gevent
import gevent.event
import gevent.queue

from ..db import runtime
from ..hypervisors.base import HypervisorError, VmHandle, VmSpec
from ..common import metrics
from ..vma.client import VmaClient, VmaError
from . import vm_machine as M

log = logging.getLogger("qvd.hkd.vm")


class RowLostError(Exception):
    pass


def di_full_path(cfg, di_path):
    """dis.path is relative to path.storage.images unless absolute."""
    if os.path.isabs(di_path):
        return di_path
    return os.path.join(cfg.get_str("path.storage.images"), di_path)


def mac_from_ip(prefix, ip):
    octets = [int(x) for x in ip.split(".")]
    return prefix.lower() + ":" + ":".join(f"{o:02x}" for o in octets[1:])


class VmRunner:
    def __init__(self, hkd, vm_id):
        self.hkd = hkd
        self.cfg = hkd.cfg
        self.db = hkd.db
        self.vm_id = vm_id
        # settings are read per VM, so a config change (NOTIFY qvd_config_changed) applies to new VMs
        settings = M.settings_from_config(hkd.cfg, hkd.hypervisor.name) if hkd.hypervisor else hkd.vm_settings
        self.machine = M.VmMachine(vm_id, settings)
        self.events = gevent.queue.Queue()
        self.spec = None
        self.handle = None
        self._start_began = None   # monotonic time of this start's first step, for the histogram
        self.dhcp_registered = None
        self.filter_entry = None            # (port, mac, ip) given to the network filter
        self.agent_key = None               # the secret of this start's VMA (docs/hkd.md#vma-secret)
        self.holds_heavy = False
        self._timer = None
        self._monitor = None
        self._exit_watch = None
        self._steps = set()
        self._launching = None
        self.finished = gevent.event.Event()
        self._greenlet = gevent.spawn(self._run)

    # --- public ----------------------------------------------------------------------
    @property
    def state(self):
        return self.machine.main_state

    def send(self, event):
        self.events.put(event)

    def kill_greenlets(self):
        for g in [self._timer, self._monitor, self._exit_watch, self._greenlet, *self._steps]:
            if g is not None:
                g.kill(block=False)

    # --- loop ------------------------------------------------------------------------
    def _run(self):
        try:
            while not self.finished.is_set():
                event = self.events.get()
                for action in self.machine.handle(event):
                    self._execute(action)
        except gevent.GreenletExit:
            raise
        except Exception:
            log.exception("VM %s: runner crashed", self.vm_id)
        finally:
            self._release_heavy()
            for g in (self._timer, self._monitor, self._exit_watch):
                if g is not None:
                    g.kill(block=False)
            self.finished.set()
            self.hkd._runner_finished(self)

    def _execute(self, action):
        if isinstance(action, M.Step):
            g = gevent.spawn(self._run_step, action)
            g.serial = action.serial
            self._steps.add(g)
            g.link(lambda g: self._steps.discard(g))
        elif isinstance(action, M.CancelStep):
            for g in list(self._steps):
                if getattr(g, "serial", None) == action.serial:
                    g.kill(block=False)
        elif isinstance(action, M.Log):
            log.info("%s", action.text)
        elif isinstance(action, M.ArmTimer):
            self._cancel_timer()
            self._timer = gevent.spawn_later(action.seconds, self.send, M.Timeout(action.name))
        elif isinstance(action, M.CancelTimer):
            self._cancel_timer()
        elif isinstance(action, M.StartMonitor):
            self._stop_monitor()
            self._monitor = gevent.spawn(self._vma_monitor, action.mode)
        elif isinstance(action, M.StopMonitor):
            self._stop_monitor()
        elif isinstance(action, M.WatchExit):
            if self._exit_watch is None:
                self._exit_watch = gevent.spawn(self._watch_exit)
        elif isinstance(action, M.ReleaseHeavy):
            self._release_heavy()
        elif isinstance(action, M.Finished):
            self.finished.set()

    def _cancel_timer(self):
        if self._timer is not None:
            self._timer.kill(block=False)
            self._timer = None

    def _stop_monitor(self):
        if self._monitor is not None:
            self._monitor.kill(block=False)
            self._monitor = None

    def _release_heavy(self):
        if self.holds_heavy:
            self.holds_heavy = False
            self.hkd.heavy.release()

    def _run_step(self, step):
        method = getattr(self, "_step_" + type(step).__name__)
        try:
            result = method(step)
        except RowLostError:
            self.send(M.RowLost())          # preempts; this step's outcome is dropped
            return
        except gevent.GreenletExit:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is an event for the machine
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if not isinstance(exc, (HypervisorError, VmaError)):
                log.warning("VM %s: step %s failed: %s", self.vm_id, type(step).__name__, reason)
            self.send(M.StepFailed(step.serial, reason))
            return
        self.send(M.StepDone(step.serial, result))

    # --- steps -----------------------------------------------------------------------
    def _step_Prepare(self, step):
        self._start_began = time.monotonic()
        cfg = self.cfg

        def load(cur):
            cur.execute("SELECT v.name, v.user_id, v.osf_id, v.di_tag, v.ip, v.storage, u.login "
                        "FROM vms v JOIN users u ON u.id = v.user_id WHERE v.id = %s", (self.vm_id,))
            row = cur.fetchone()
            if row is None:
                raise HypervisorError(f"VM {self.vm_id} does not exist")
            name, _user_id, osf_id, di_tag, ip, _storage, login = row
            cur.execute("SELECT d.id, d.path, o.use_overlay, o.user_storage_size, o.memory "
                        "FROM di_tags t JOIN dis d ON d.id = t.di_id JOIN osfs o ON o.id = d.osf_id "
                        "WHERE d.blocked = false AND o.id = %s AND t.tag = %s", (osf_id, di_tag))
            dis = cur.fetchall()
            if len(dis) != 1:
                raise HypervisorError(f"VM {self.vm_id}: {len(dis)} usable DIs with tag {di_tag!r} in OSF {osf_id}")
            di_id, di_path, use_overlay, user_storage, memory = dis[0]
            cur.execute("SELECT p.key, v.value FROM vm_properties v "
                        "JOIN qvd_object_properties_list q ON q.id = v.property_id "
                        "JOIN properties_list p ON p.id = q.property_id WHERE v.vm_id = %s", (self.vm_id,))
            props = dict(cur.fetchall())
            vma_port = cfg.get_int("internal.vm.port.vma")
            x_port = cfg.get_int("internal.nxagent.display") + 4000
            ssh_port = cfg.get_int("internal.vm.port.ssh")
            if not runtime.prepare_vm(cur, self.vm_id, self.hkd.host_id, ip, vma_port, x_port, ssh_port, di_id):
                raise RowLostError()
            # a new secret at every start: whoever learnt an earlier one can do nothing with it
            agent_key = None if cfg.get_bool("vm.vma.legacy_unauthenticated") else secrets.token_urlsafe(32)
            runtime.set_vm_agent_key(cur, self.vm_id, agent_key)
            mac = mac_from_ip(cfg.get_str("vm.network.mac.prefix"), ip) if ip else None
            return VmSpec(vm_id=self.vm_id, name=name, ip=ip, mac=mac, memory=memory, di_id=di_id,
                          di_path=di_full_path(cfg, di_path), use_overlay=use_overlay,
                          user_storage_size=user_storage, login=login, vma_port=vma_port, x_port=x_port,
                          properties=props, port=self.hkd.hypervisor.port_name(self.vm_id),
                          agent_key=agent_key)
        self.spec = self.db.transaction(load)
        self.agent_key = self.spec.agent_key
        log.info("VM %s (%s): starting with DI %s", self.vm_id, self.spec.name, self.spec.di_path)

    def _step_AcquireHeavy(self, step):
        if not self.holds_heavy:
            self.hkd.heavy.acquire()
            self.holds_heavy = True

    def _step_StartVm(self, step):
        self._launching = gevent.event.Event()
        try:
            self._launch()
        finally:
            self._launching.set()

    def _launch(self):
        spec = self.spec
        hv = self.hkd.hypervisor
        if hv.uses_bridge and self.hkd.dnsmasq is not None and spec.mac and spec.ip:
            self.hkd.dnsmasq.add_host(spec.mac, spec.ip)
            self.dhcp_registered = spec.mac
        # before the port exists: until then a port with the VM's name passes nothing
        self.allow_in_filter(spec.port, spec.mac, spec.ip)
        try:
            self.handle = hv.start(spec)
        except Exception:
            metrics.inc("qvd_hkd_vm_starts_total", result="error")
            raise
        if not runtime.set_vm_launched(self.db, self.vm_id, self.hkd.host_id, self.handle.address, self.handle.pid):
            raise RowLostError()
        log.info("VM %s: launched (pid %s, address %s)", self.vm_id, self.handle.pid, self.handle.address)

    def _step_WriteState(self, step):
        if not runtime.set_vm_state(self.db, self.vm_id, self.hkd.host_id, step.state, run_ok=step.run_ok):
            raise RowLostError()
        if step.run_ok:
            metrics.inc("qvd_hkd_vm_starts_total", result="ok")
            if self._start_began is not None:
                metrics.observe("qvd_hkd_vm_start_seconds", time.monotonic() - self._start_began)
                self._start_began = None

    def _vma(self):
        address = self.handle.address if self.handle else (self.spec.ip if self.spec else None)
        return VmaClient(address, self.cfg.get_int("internal.vm.port.vma"),
                         timeout=self.cfg.get_float("internal.hkd.agent.rpc.timeout"), key=self.agent_key)

    def _step_Poweroff(self, step):
        try:
            self._vma().call("poweroff")
            log.info("VM %s: VMA poweroff sent", self.vm_id)
        except VmaError as exc:
            log.info("VM %s: VMA poweroff failed (%s); asking the hypervisor", self.vm_id, exc)
            self.hkd.hypervisor.shutdown(self._handle())

    def _handle(self):
        return self.handle or VmHandle(vm_id=self.vm_id, address="", pid=None)

    def _step_Shutdown(self, step):
        self.hkd.hypervisor.shutdown(self._handle())

    def _step_Kill(self, step):
        if self._launching is not None:
            self._launching.wait(60)        # a launch in flight must not leave an orphan
        if self.handle is not None:
            self.hkd.hypervisor.kill(self.handle)

    def allow_in_filter(self, port, mac, ip):
        """Let the VM's bridge port carry its own MAC and address (docs/hkd.md#firewall)."""
        vm_filter = self.hkd.vm_filter
        if vm_filter is None or not (port and mac and ip):
            return
        vm_filter.add_vm(port, mac, ip)
        self.filter_entry = (port, mac, ip)

    def _forget_in_filter(self):
        if self.filter_entry is None or self.hkd.vm_filter is None:
            return
        try:
            self.hkd.vm_filter.remove_vm(*self.filter_entry)
        except Exception as exc:  # noqa: BLE001 - the same VM id gets the same elements next time
            log.warning("VM %s: %s", self.vm_id, exc)
        self.filter_entry = None

    def _step_Cleanup(self, step):
        if self.dhcp_registered and self.hkd.dnsmasq is not None:
            self.hkd.dnsmasq.remove_host(self.dhcp_registered)
            self.dhcp_registered = None
        self._forget_in_filter()
        self.hkd.hypervisor.cleanup(self._handle())

    def _step_ClearRuntimeRow(self, step):
        # exactly the original's columns (docs/schema.md#vm-runtimes)
        runtime.clear_vm(self.db, self.vm_id, self.hkd.host_id)

    def _step_ExpireVma(self, step):
        params = {}
        if step.soft is not None:
            params["vm.expiration.soft"] = str(step.soft)
        if step.hard is not None:
            params["vm.expiration.hard"] = str(step.hard)
        try:
            self._vma().call("expire", **params)
        except VmaError as exc:
            log.info("VM %s: VMA expire failed: %s", self.vm_id, exc)

    # --- watchers --------------------------------------------------------------------
    def _watch_exit(self):
        handle = self.handle
        if handle is None:
            return
        try:
            self.hkd.hypervisor.wait_exit(handle)
        except Exception as exc:  # noqa: BLE001 - any failure to watch is logged
            log.warning("VM %s: cannot watch the hypervisor: %s", self.vm_id, exc)
            return
        details = ", ".join(f"{k} {handle.extra[k]}" for k in ("exit_status", "log") if handle.extra.get(k) is not None)
        log.info("VM %s: hypervisor reports the VM exited%s", self.vm_id, f" ({details})" if details else "")
        self.send(M.VmExited())

    def _vma_monitor(self, mode):
        """Ping the VMA; VmaAlive on success, VmaFailed(count, since) on failure."""
        cfg = self.cfg
        client = self._vma()
        failures = 0
        last_ok = started = time.monotonic()
        fast = cfg.get_float("internal.hkd.vmhandler.vma_monitor.delay.starting.fast")
        fast_period = cfg.get_float("internal.hkd.vmhandler.vma_monitor.starting.fast_period")
        while True:
            try:
                client.ping()
                ok = True
            except VmaError:
                ok = False
            if ok:
                failures = 0
                last_ok = time.monotonic()
                self.send(M.VmaAlive())
                if mode == "starting":
                    mode = "running"       # the machine switches us anyway; avoid double alive
                delay = cfg.get_float("internal.hkd.vmhandler.vma_monitor.delay.after.ok")
            else:
                failures += 1
                self.send(M.VmaFailed(failures, time.monotonic() - last_ok))
                if mode != "starting":
                    delay = cfg.get_float("internal.hkd.vmhandler.vma_monitor.delay.after.error")
                elif time.monotonic() - started < fast_period:
                    # most VMs answer within a second or two: a refused connect costs little,
                    # and every poll period here is added to the user's wait for the 101
                    delay = fast
                else:
                    delay = cfg.get_float("internal.hkd.vmhandler.vma_monitor.delay.starting")
            gevent.sleep(delay)
