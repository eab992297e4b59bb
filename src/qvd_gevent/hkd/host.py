"""The HKD: host lifecycle, heartbeat, host and VM command intake, reconcile, agents.

The lifecycle is the pure HostMachine (host_machine.py); this module runs its steps with
real I/O. Per-VM work is done by VmRunner (vm_runner.py), lost-node detection by
ClusterMonitor (cluster.py). Everything is driven by LISTEN/NOTIFY with the original's
slow polls as a safety net (docs/hkd.md#host-commands to docs/hkd.md#cluster-monitor).
"""
import fcntl
import logging
import os
import random
import shlex
import shutil
import socket
import time

import gevent
import gevent.event
import gevent.lock
import gevent.queue
import psycopg2

from ..db import SCHEMA_VERSION, DatabaseError, runtime
from ..hypervisors import HypervisorError, get_hypervisor
from ..hypervisors.base import VmHandle
from ..common import metrics
from ..system.procfs import usable_cpu, usable_ram_mb
from ..vma.client import legacy_unauthenticated
from . import host_machine as H
from . import vm_machine as M
from .cluster import ClusterMonitor
from .vm_runner import VmRunner

log = logging.getLogger("qvd.hkd")

_DB_ERRORS = (DatabaseError, psycopg2.Error)


class HkdError(Exception):
    """The HKD cannot start; one line for the operator."""


class HkdConfigError(HkdError):
    """The HKD cannot start until the operator changes something (configuration, the hosts
    row, a missing program): restarting it as it is would fail the same way."""


def check_cluster_timers(cfg):
    """The heartbeat, fencing and lost-node timers must keep one VM from running on two
    nodes, and a node from fencing itself between two heartbeats; one line otherwise."""
    delay = cfg.get_float("internal.hkd.agent.ticker.delay")
    fence_after = cfg.get_float("internal.hkd.agent.ticker.timeout")
    lost_after = cfg.get_float("internal.hkd.cluster.node.timeout")
    kill_time = cfg.get_float("internal.hkd.fence.kill_time")
    if delay <= 0 or 2 * delay > fence_after:
        raise HkdConfigError(f"internal.hkd.agent.ticker.delay ({delay:g}) must be more than 0 and at most half of "
                       f"internal.hkd.agent.ticker.timeout ({fence_after:g}), or one late heartbeat fences the node")
    if lost_after < fence_after + kill_time:
        raise HkdConfigError(f"internal.hkd.cluster.node.timeout ({lost_after:g}) must be at least "
                       f"internal.hkd.agent.ticker.timeout + internal.hkd.fence.kill_time ({fence_after:g} + "
                       f"{kill_time:g}), or other nodes may start VMs that a fencing node still runs")


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
        self._events = gevent.queue.Queue()
        self._loop = None
        self._lock_fd = None
        self._agents = []                   # greenlets to kill at stop_agents
        self._unsubscribe = []
        self._vm_wake = gevent.event.Event()
        self._cmd_wake = gevent.event.Event()
        self._intake = None
        self._cluster = None
        self._timer = None
        self._last_tick = None

    # --- public API ----------------------------------------------------------------------
    def start(self):
        """Run the startup sequence; return once the host is running, else raise HkdError."""
        check_cluster_timers(self.cfg)
        legacy_unauthenticated(self.cfg, "HKD")
        self._loop = gevent.spawn(self._run_loop)
        self._loop.link_exception(self._loop_crashed)
        self._events.put(H.Run())
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
        self._events.put(H.CmdStop("stop requested"))
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
            self._ready.set(f"HKD crashed: {_first_line(greenlet.exception)}")
        self._release_everything()
        self.stopped.set()

    def _run_loop(self):
        while True:
            event = self._events.get()
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
            self._timer = gevent.spawn_later(action.seconds, self._events.put, H.Timeout(action.name))
        elif isinstance(action, H.Stopped):
            if self._timer is not None:
                self._timer.kill(block=False)
            self._release_everything()
            log.info("HKD stopped")
            self.stopped.set()

    def _run_step(self, name):
        try:
            getattr(self, "_step_" + name)()
        except gevent.GreenletExit:
            raise
        except Exception as exc:
            if not isinstance(exc, (HkdError, HypervisorError) + _DB_ERRORS):
                log.exception("HKD step %s crashed", name)
            self._start_failure = exc
            self._events.put(H.StepFailed(name, _first_line(exc)))
            return
        self._events.put(H.StepDone(name))

    def _check_all_stopped(self):
        if not self.vms and self.machine.state == "stopping" and self.machine.phase == "vms":
            self._events.put(H.AllVmsStopped())

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
    def _step_check_schema(self):
        lock_path = self.cfg.get_str("internal.hkd.lock.path")
        os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise HkdError(f"another HKD holds {lock_path}") from None
        self._lock_fd = fd
        row = self.db.query_one("SELECT version FROM versions WHERE component = 'schema'")
        if row is None or row[0] != SCHEMA_VERSION:
            found = row[0] if row else "none"
            raise HkdConfigError(f"database schema version is {found}, this node needs {SCHEMA_VERSION} (run qvd-deploy-db)")
        if self.db.query_one("SELECT to_regclass('vm_agent_keys')")[0] is None:
            raise HkdConfigError("table vm_agent_keys is missing (it came after this database was deployed): "
                                 "create it as src/qvd_gevent/db/schema.sql does (docs/schema.md#vm-agent-keys)")

    def _step_load_host(self):
        row = self.db.query_one("SELECT id, address FROM hosts WHERE name = %s", (self.nodename,))
        if row is None:
            raise HkdConfigError(f"node {self.nodename!r} is not registered in hosts "
                           f"(qvd-admin host add name={self.nodename} address=<its address>)")
        self.host_id, self.address = row
        self.db.transaction(runtime.ensure_host_runtime, self.host_id)

    def _step_check_hypervisor(self):
        name = self.cfg.get_str("vm.hypervisor")
        allowed = self.cfg.get_list("internal.hkd.hypervisor_list")
        if name not in allowed:
            raise HkdConfigError(f"vm.hypervisor {name!r} is not in internal.hkd.hypervisor_list ({', '.join(allowed)})")
        try:
            hv = get_hypervisor(name, self.cfg)
            hv.check()
        except HypervisorError as exc:
            raise HkdConfigError(f"hypervisor check failed: {exc}") from None
        self.hypervisor = hv
        self.vm_settings = M.settings_from_config(self.cfg, name)

    def _step_check_address(self):
        if not self.cfg.get_bool("internal.hkd.address_check.enabled"):
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((self.address, 0))
        except OSError:
            raise HkdConfigError(f"host address {self.address} (hosts.address of {self.nodename}) is not an address "
                           "of this machine") from None
        finally:
            sock.close()
        if self.hypervisor.uses_bridge:
            net = self.cfg.vm_network()
            if not net.is_node_address(self.address):
                raise HkdConfigError(f"host address {self.address} is outside the node range of the VM network "
                               f"({net.network.network_address} < address < {net.start})")

    def _step_check_tools(self):
        """The programs this node will run, found before it touches the host (the bridge,
        iptables, dnsmasq): a missing one is one line now, not a half-built network later."""
        needed = []
        if self.hypervisor.uses_bridge and self.cfg.get_bool("vm.network.use_dhcp"):
            needed.append(("command.dhcpd", "dnsmasq"))
        if self.hypervisor.uses_bridge and self.cfg.get_bool("vm.network.setup") \
                and self.cfg.get_str("vm.network.firewall.nat.iface"):
            needed.append(("command.iptables", "iptables"))
        for key, what in needed:
            argv = shlex.split(self.cfg.get_str(key) or "")
            if not argv or shutil.which(argv[0]) is None:
                raise HkdConfigError(f"{what} executable {argv[0] if argv else ''!r} ({key}) not found; install it "
                               f"or set {key}")

    def _step_check_network(self):
        if self.hypervisor.uses_bridge:
            self._check_bridge_network()
        from .vm_filter import VmFilterError, vm_filter_for
        try:
            vm_filter = vm_filter_for(self.cfg, self.hypervisor)
            if vm_filter is not None:
                vm_filter.install()
        except VmFilterError as exc:
            raise HkdError(str(exc)) from None
        self.vm_filter = vm_filter

    def _check_bridge_network(self):
        from .network import NetworkSetup, check_network
        if self.cfg.get_bool("vm.network.setup"):
            setup = NetworkSetup(self.cfg)
            try:
                setup.apply()
            except Exception as exc:  # noqa: BLE001 - reported, then the agent goes on
                raise HkdError(f"network setup failed: {_first_line(exc)}") from None
            self.network_setup = setup
        for warning in check_network(self.cfg):
            log.warning("network: %s", warning)
        if self.cfg.get_bool("vm.network.use_dhcp"):
            from .dnsmasq import DnsmasqError, check_dhcp_ports, kill_leftover_dnsmasq
            kill_leftover_dnsmasq(self.cfg.get_str("internal.vm.network.dhcp-hostsfile"))
            try:
                check_dhcp_ports(self.cfg)
            except DnsmasqError as exc:
                raise HkdError(str(exc)) from None

    # --- setup -------------------------------------------------------------------------
    def _save_host_state(self, state):
        if self.fenced:
            # the row must keep its stale heartbeat and state: the cluster monitor calls this
            # node lost and releases the rows of the VMs it killed (a 'stopped' host is skipped)
            return
        runtime.set_host_state(self.db, self.host_id, state)

    def _step_save_starting(self):
        # a stale `stop` left from an earlier run must not stop this one
        runtime.host_starting(self.db, self.host_id, os.getpid())

    def _step_save_loadbal(self):
        ram, cpu = usable_ram_mb(), usable_cpu()
        runtime.set_host_capacity(self.db, self.host_id, ram, cpu)
        log.info("host %s: usable_ram %.0f MB, usable_cpu %.0f", self.nodename, ram, cpu)

    def _step_first_tick(self):
        if not self._tick():
            raise HkdError("first heartbeat failed")
        self._agents.append(gevent.spawn(self._ticker))
        self._agents.append(gevent.spawn(self._fence_watch))

    def _step_reset_sessions(self):
        count = runtime.release_host_sessions(self.db, self.host_id)
        if count:
            log.info("reset %d sessions left by this node", count)

    def _step_reconcile(self):
        rows = self.db.query("SELECT r.vm_id, r.vm_state, v.ip FROM vm_runtimes r JOIN vms v ON v.id = r.vm_id "
                             "WHERE r.host_id = %s AND r.vm_state <> 'stopped'", (self.host_id,))
        running = self.hypervisor.list_running()
        agent_keys = runtime.vm_agent_keys(self.db, [row[0] for row in rows])
        zombies = []
        for vm_id, state, ip in rows:
            runner = VmRunner(self, vm_id)
            self.vms[vm_id] = runner
            if vm_id in running:
                runner.handle = running[vm_id]
                runner.adopted_ip = ip
                if ip and self.hypervisor.uses_bridge:
                    from .vm_runner import mac_from_ip
                    try:
                        runner.allow_in_filter(self.hypervisor.port_name(vm_id),
                                               mac_from_ip(self.cfg.get_str("vm.network.mac.prefix"), ip), ip)
                    except Exception as exc:  # noqa: BLE001 - its port stays closed; the VMA monitor acts
                        log.error("VM %s: %s", vm_id, _first_line(exc))
                runner.agent_key = agent_keys.get(vm_id)     # the secret its VMA was started with
                log.info("VM %s: still running (pid %s), adopted in state %s", vm_id, runner.handle.pid, state)
                runner.send(M.Adopt(state))
            else:
                log.info("VM %s: was %s here but is not running; cleaning up", vm_id, state)
                runner.send(M.CatchZombie())
                zombies.append(runner)
        known = {row[0] for row in rows}
        for vm_id, handle in running.items():
            if vm_id not in known:
                log.warning("VM %s runs here but the database no longer assigns it to this node; killing it", vm_id)
                try:
                    self.hypervisor.kill(handle)
                    self.hypervisor.wait_exit(handle, timeout=self.vm_settings.timeouts["zombie.reap"])
                    self.hypervisor.cleanup(handle)
                except HypervisorError as exc:
                    log.error("VM %s: cannot kill: %s", vm_id, exc)
        bound = self.vm_settings.timeouts["zombie.reap"] + self.vm_settings.timeouts["zombie.delaying"]
        for runner in zombies:
            if not runner.finished.wait(bound):
                log.warning("VM %s: zombie not cleaned up yet; continuing", runner.vm_id)
        # what a crashed node left without any row (a namespace whose init is gone, ...)
        cleanup_leftovers = getattr(self.hypervisor, "cleanup_leftovers", None)
        if cleanup_leftovers is not None:
            removed = cleanup_leftovers()
            if removed:
                log.info("removed leftovers of VMs that no longer run: %s", ", ".join(map(str, removed)))

    def _step_start_agents(self):
        hid = self.host_id
        if self.hypervisor.uses_bridge and self.cfg.get_bool("vm.network.use_dhcp"):
            from .dnsmasq import DnsmasqSupervisor
            self.dnsmasq = DnsmasqSupervisor(self.cfg)
            self.dnsmasq.start()
            from .vm_runner import mac_from_ip
            prefix = self.cfg.get_str("vm.network.mac.prefix")
            for runner in list(self.vms.values()):
                ip = getattr(runner, "adopted_ip", None)
                if ip and runner.handle is not None:
                    runner.dhcp_registered = mac_from_ip(prefix, ip)
                    self.dnsmasq.add_host(runner.dhcp_registered, ip)
        self._unsubscribe.append(self.listener.subscribe(runtime.host_commands_channel(hid), lambda c, p: self._cmd_wake.set()))
        self.listener.on_reconnect(self._cmd_wake.set)
        self.listener.on_reconnect(self._vm_wake.set)
        self._agents.append(gevent.spawn(self._command_handler))
        self._agents.append(gevent.spawn(self._expiration_monitor))
        self._agents.append(gevent.spawn(self._token_sweeper))
        self._cluster = ClusterMonitor(self.cfg, self.db, hid).start()

    def _step_save_running(self):
        self._save_host_state("running")

    def _step_start_vm_intake(self):
        self._unsubscribe.append(self.listener.subscribe(runtime.vm_commands_channel(self.host_id),
                                                         lambda c, p: self._vm_wake.set()))
        self._intake = gevent.spawn(self._vm_command_handler)

    # --- stopping ------------------------------------------------------------------------
    def _step_stop_vm_intake(self):
        if self._intake is not None:
            self._intake.kill(block=True, timeout=5)
            self._intake = None

    def _step_save_stopping(self):
        self._save_host_state("stopping")

    def _step_stop_agents(self):
        self._stop_agents()

    def _step_save_stopped(self):
        self._save_host_state("stopped")

    def _stop_agents(self):
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        if self._cluster is not None:
            self._cluster.stop()
            self._cluster = None
        for g in self._agents:
            g.kill(block=True, timeout=5)
        self._agents = []
        if self.dnsmasq is not None:
            try:
                self.dnsmasq.stop()
            except Exception as exc:  # noqa: BLE001 - reported, then the agent goes on
                log.warning("dnsmasq stop: %s", _first_line(exc))
            self.dnsmasq = None
        if self.vm_filter is not None:
            try:
                self.vm_filter.remove()
            except Exception as exc:  # noqa: BLE001 - reported, then the agent goes on
                log.warning("VM network filter: %s", _first_line(exc))
            self.vm_filter = None
        if self.network_setup is not None:
            try:
                self.network_setup.remove()
            except Exception as exc:  # noqa: BLE001 - reported, then the agent goes on
                log.warning("network teardown: %s", _first_line(exc))
            self.network_setup = None
        if self.hypervisor is not None:
            self.hypervisor.close()

    def _release_everything(self):
        """Last resort on failed start or stuck stop: agents down, lock released."""
        if self._intake is not None:
            self._intake.kill(block=False)
            self._intake = None
        self._stop_agents()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- agents --------------------------------------------------------------------------
    def _tick(self):
        """Heartbeat. True on success; on `lost`, kills the VMs the cluster released."""
        sent = time.monotonic()     # the row's ok_ts is written no earlier than this
        try:
            alive = runtime.heartbeat(self.db, self.host_id, os.getpid())
        except _DB_ERRORS as exc:
            metrics.inc("qvd_hkd_heartbeats_total", result="error")
            log.warning("heartbeat failed: %s", _first_line(exc))
            return False
        if not alive:
            metrics.inc("qvd_hkd_heartbeats_total", result="lost")
            if not self.lost:
                self.lost = True
                log.error("this node (host %s) was marked lost by the cluster, which released its VMs: "
                          "killing the %d VMs still running here; restart the node to rejoin", self.host_id, len(self.vms))
                for runner in list(self.vms.values()):
                    runner.send(M.RowLost())
            return False
        metrics.inc("qvd_hkd_heartbeats_total", result="ok")
        self._last_tick = max(self._last_tick or sent, sent)
        return True

    def _fence_watch(self):
        """Fencing, on a clock of its own (a heartbeat stuck in a dead connection must not
        delay it): ticker.timeout after the last heartbeat that was written, kill every VM
        here and stop. The other nodes call this node lost only node.timeout after that
        heartbeat, and node.timeout >= ticker.timeout + fence.kill_time (checked at start),
        so no VM ever runs here and elsewhere at once (docs/hkd.md#fencing)."""
        while True:
            deadline = self._last_tick + self.cfg.get_float("internal.hkd.agent.ticker.timeout")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            gevent.sleep(min(remaining, 1.0))      # a newer heartbeat moves the deadline
        self._fence()

    def _fence(self):
        timeout = self.cfg.get_float("internal.hkd.agent.ticker.timeout")
        log.error("no heartbeat written for %.0f s (internal.hkd.agent.ticker.timeout): fencing this node: killing "
                  "its %d VMs and stopping; the other nodes start them after internal.hkd.cluster.node.timeout",
                  timeout, len(self.vms))
        self.fenced = True
        runners = list(self.vms.values())
        for runner in runners:
            runner.send(M.Fence())
        kill_time = self.cfg.get_float("internal.hkd.fence.kill_time")
        gevent.joinall([gevent.spawn(r.finished.wait, kill_time) for r in runners], timeout=kill_time)
        alive = [r.vm_id for r in runners if not r.finished.is_set()]
        if alive:
            log.error("fencing: VMs %s not confirmed dead within %.0f s", ", ".join(map(str, alive)), kill_time)
        dead = [r.vm_id for r in runners if r.finished.is_set()]
        if dead:
            # if the database still takes writes (only our heartbeat row failing), the users
            # need not wait for node.timeout: these VMs are gone, their rows can say so
            try:
                with gevent.Timeout(2):
                    for vm_id in dead:
                        runtime.clear_vm(self.db, vm_id, self.host_id)
            except (gevent.Timeout, *_DB_ERRORS):
                log.info("fencing: VM rows left for the cluster monitor to release")
        if self.on_stop_command is not None and self.machine.state == "running":
            # the whole node stops, as the original HKD exits when it loses the database
            gevent.spawn(self.on_stop_command, fence=True)
        else:
            self._events.put(H.TickerDead())

    def _ticker(self):
        while True:
            gevent.sleep(self.cfg.get_float("internal.hkd.agent.ticker.delay"))
            try:
                self._tick()
            except Exception:
                log.exception("heartbeat crashed")

    def _command_handler(self):
        """Host commands: host_runtimes.cmd, woken by NOTIFY qvd_cmd_for_host<id>, polled as safety net."""
        self._cmd_wake.set()
        while True:
            self._cmd_wake.wait(self.cfg.get_float("internal.hkd.agent.command_handler.delay"))
            self._cmd_wake.clear()
            try:
                cmd = runtime.take_host_command(self.db, self.host_id)
                if cmd is None:
                    continue
            except _DB_ERRORS as exc:
                log.warning("host command check failed: %s", _first_line(exc))
                continue
            if cmd == "stop":
                log.info("host command stop received")
                if self.on_stop_command is not None:
                    gevent.spawn(self.on_stop_command)
                else:
                    gevent.spawn(self.stop)
                return
            log.warning("unknown host command %r ignored", cmd)

    def _new_runner(self, vm_id):
        runner = VmRunner(self, vm_id)
        self.vms[vm_id] = runner
        return runner

    def process_vm_commands(self):
        """The original's atomic UPDATE ... RETURNING: stops first, then starts."""
        hid = self.host_id
        stops, starts = runtime.take_vm_commands(self.db, hid)
        for vm_id in stops:
            log.info("VM %s: stop command", vm_id)
            runner = self.vms.get(vm_id) or self._new_runner(vm_id)
            runner.send(M.CmdStop())
        for vm_id in starts:
            log.info("VM %s: start command", vm_id)
            existing = self.vms.get(vm_id)
            if existing is not None:
                # the row is 'stopped' again, so the old handler is finishing (cleared row,
                # or a lost VM being killed): start once it is gone, never two at once
                gevent.spawn(self._start_after, existing, vm_id)
                continue
            self._dispatch_start(self._new_runner(vm_id))
        # a runner whose row went to another node (or none) must not keep its VM
        # (a runner clearing its own row, stopping.db, is not a loss)
        ids = [vm_id for vm_id, r in self.vms.items()
               if r.state not in ("new", "stopped", "lost") and r.machine.state != "stopping.db"]
        if ids:
            mine = runtime.vms_assigned(self.db, ids, hid)
            for vm_id in ids:
                if vm_id not in mine and vm_id in self.vms:
                    self.vms[vm_id].send(M.RowLost())

    def _dispatch_start(self, runner):
        if self.machine.state == "running" and not self.lost:
            runner.send(M.CmdStart())
        else:
            runner.send(M.CmdStop())        # as the original: no starts unless the host runs

    def _start_after(self, old, vm_id):
        bound = self.vm_settings.timeouts["stopping.stop"] + self.vm_settings.timeouts["zombie.reap"]
        if not old.finished.wait(bound):
            log.error("VM %s: previous handler still busy after %.0f s; start refused", vm_id, bound)
            old = None
        if self.vms.get(vm_id) not in (None, old):
            return
        self.vms.pop(vm_id, None)
        runner = self._new_runner(vm_id)
        if old is None:
            runner.send(M.CmdStop())
        else:
            self._dispatch_start(runner)

    def _vm_command_handler(self):
        self._vm_wake.set()
        while True:
            self._vm_wake.wait(self.cfg.get_float("internal.hkd.agent.vm_command_handler.delay"))
            self._vm_wake.clear()
            try:
                self.process_vm_commands()
            except _DB_ERRORS as exc:
                log.warning("VM command intake failed: %s", _first_line(exc))
            except Exception:
                log.exception("VM command intake crashed; retrying at the next poll")

    def check_expirations(self):
        rows = self.db.query(
            "SELECT vm_id, vm_expiration_soft, vm_expiration_hard, "
            "vm_expiration_hard IS NOT NULL AND vm_expiration_hard < now() AT TIME ZONE 'UTC' "
            "FROM vm_runtimes WHERE host_id = %s AND vm_state = 'running' "
            "AND (vm_expiration_soft < now() AT TIME ZONE 'UTC' OR vm_expiration_hard < now() AT TIME ZONE 'UTC')",
            (self.host_id,))
        for vm_id, soft, hard, hard_expired in rows:
            runner = self.vms.get(vm_id)
            if runner is None:
                continue
            if hard_expired:
                log.info("VM %s: hard expiration reached; stopping", vm_id)
                runner.send(M.CmdStop())
            else:
                log.info("VM %s: soft expiration reached; telling the VMA", vm_id)
                runner.send(M.Expired(soft=soft, hard=hard))

    def _token_sweeper(self):
        """Expired tokens and orphaned login parameters would grow without bound otherwise;
        every node sweeps (the deletes are idempotent)."""
        seen = None
        while True:
            gevent.sleep(self.cfg.get_float("internal.hkd.agent.token_sweep.delay") * random.uniform(0.9, 1.0))
            try:
                tokens, params, seen = runtime.purge_tokens(self.db, orphans_up_to=seen)
                if tokens or params:
                    log.info("purged %d expired tokens and %d unused login parameter rows", tokens, params)
            except _DB_ERRORS as exc:
                log.warning("token sweep failed: %s", _first_line(exc))

    def _expiration_monitor(self):
        while True:
            gevent.sleep(self.cfg.get_float("internal.hkd.agent.expiration_monitor.delay") * random.uniform(0.95, 1.0))
            try:
                self.check_expirations()
            except _DB_ERRORS as exc:
                log.warning("expiration check failed: %s", _first_line(exc))
            except Exception:
                log.exception("expiration check crashed")


__all__ = ["HKD", "HkdError", "VmHandle"]
