"""The HKD's start-up and stop steps: the actions Step(name) of the host machine
(host_machine.py) run with real I/O, one function each, looked up in STEPS.

Start: checks first (schema and lock, host row, hypervisor, address, tools, network and
VM filter) so that a configuration error is one line before anything on the host is
touched; then the row says starting, the heartbeat starts, sessions left by an earlier run
are released, running VMs are adopted or cleaned up, agents and the VM command intake start
(docs/hkd.md#host-state-machine, docs/hkd.md#start-up-checks). Stop: the reverse.
"""
import fcntl
import logging
import os
import shlex
import shutil
import socket

import gevent

from ..db import SCHEMA_VERSION, runtime
from ..hypervisors import HypervisorError, get_hypervisor
from ..system.procfs import usable_cpu, usable_ram_mb
from . import heartbeat, intake, periodic
from . import vm_machine as M
from .cluster import ClusterMonitor
from .errors import HkdConfigError, HkdError, first_line as _first_line
from .vm_runner import VmRunner

log = logging.getLogger("qvd.hkd")


def check_bridge_network(hkd):
    from .network import NetworkSetup, check_network
    if hkd.cfg.get_bool("vm.network.setup"):
        setup = NetworkSetup(hkd.cfg)
        try:
            setup.apply()
        except Exception as exc:  # noqa: BLE001 - reported, then the agent goes on
            raise HkdError(f"network setup failed: {_first_line(exc)}") from None
        hkd.network_setup = setup
    for warning in check_network(hkd.cfg):
        log.warning("network: %s", warning)
    if hkd.cfg.get_bool("vm.network.use_dhcp"):
        from .dnsmasq import DnsmasqError, check_dhcp_ports, kill_leftover_dnsmasq
        kill_leftover_dnsmasq(hkd.cfg.get_str("internal.vm.network.dhcp-hostsfile"))
        try:
            check_dhcp_ports(hkd.cfg)
        except DnsmasqError as exc:
            raise HkdError(str(exc)) from None


def save_host_state(hkd, state):
    if hkd.fenced:
        # the row must keep its stale heartbeat and state: the cluster monitor calls this
        # node lost and releases the rows of the VMs it killed (a 'stopped' host is skipped)
        return
    runtime.set_host_state(hkd.db, hkd.host_id, state)


def check_schema(hkd):
    lock_path = hkd.cfg.get_str("internal.hkd.lock.path")
    os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise HkdError(f"another HKD holds {lock_path}") from None
    hkd.lock_fd = fd
    row = hkd.db.query_one("SELECT version FROM versions WHERE component = 'schema'")
    if row is None or row[0] != SCHEMA_VERSION:
        found = row[0] if row else "none"
        raise HkdConfigError(f"database schema version is {found}, this node needs {SCHEMA_VERSION} (run qvd-deploy-db)")
    if hkd.db.query_one("SELECT to_regclass('vm_agent_keys')")[0] is None:
        raise HkdConfigError("table vm_agent_keys is missing (it came after this database was deployed): "
                             "create it as src/qvd_gevent/db/schema.sql does (docs/schema.md#vm-agent-keys)")


def load_host(hkd):
    row = hkd.db.query_one("SELECT id, address FROM hosts WHERE name = %s", (hkd.nodename,))
    if row is None:
        raise HkdConfigError(f"node {hkd.nodename!r} is not registered in hosts "
                       f"(qvd-admin host add name={hkd.nodename} address=<its address>)")
    hkd.host_id, hkd.address = row
    hkd.db.transaction(runtime.ensure_host_runtime, hkd.host_id)


def check_hypervisor(hkd):
    name = hkd.cfg.get_str("vm.hypervisor")
    allowed = hkd.cfg.get_list("internal.hkd.hypervisor_list")
    if name not in allowed:
        raise HkdConfigError(f"vm.hypervisor {name!r} is not in internal.hkd.hypervisor_list ({', '.join(allowed)})")
    try:
        hv = get_hypervisor(name, hkd.cfg)
        hv.check()
    except HypervisorError as exc:
        raise HkdConfigError(f"hypervisor check failed: {exc}") from None
    hkd.hypervisor = hv
    hkd.vm_settings = M.settings_from_config(hkd.cfg, name)


def check_address(hkd):
    if not hkd.cfg.get_bool("internal.hkd.address_check.enabled"):
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((hkd.address, 0))
    except OSError:
        raise HkdConfigError(f"host address {hkd.address} (hosts.address of {hkd.nodename}) is not an address "
                       "of this machine") from None
    finally:
        sock.close()
    if hkd.hypervisor.uses_bridge:
        net = hkd.cfg.vm_network()
        if not net.is_node_address(hkd.address):
            raise HkdConfigError(f"host address {hkd.address} is outside the node range of the VM network "
                           f"({net.network.network_address} < address < {net.start})")


def check_tools(hkd):
    """The programs this node will run, found before it touches the host (the bridge,
    iptables, dnsmasq): a missing one is one line now, not a half-built network later."""
    needed = []
    if hkd.hypervisor.uses_bridge and hkd.cfg.get_bool("vm.network.use_dhcp"):
        needed.append(("command.dhcpd", "dnsmasq"))
    if hkd.hypervisor.uses_bridge and hkd.cfg.get_bool("vm.network.setup") \
            and hkd.cfg.get_str("vm.network.firewall.nat.iface"):
        needed.append(("command.iptables", "iptables"))
    for key, what in needed:
        argv = shlex.split(hkd.cfg.get_str(key) or "")
        if not argv or shutil.which(argv[0]) is None:
            raise HkdConfigError(f"{what} executable {argv[0] if argv else ''!r} ({key}) not found; install it "
                           f"or set {key}")


def check_network(hkd):
    if hkd.hypervisor.uses_bridge:
        check_bridge_network(hkd)
    from .vm_filter import VmFilterError, vm_filter_for
    try:
        vm_filter = vm_filter_for(hkd.cfg, hkd.hypervisor)
        if vm_filter is not None:
            vm_filter.install()
    except VmFilterError as exc:
        raise HkdError(str(exc)) from None
    hkd.vm_filter = vm_filter


def save_starting(hkd):
    # a stale `stop` left from an earlier run must not stop this one
    runtime.host_starting(hkd.db, hkd.host_id, os.getpid())


def save_loadbal(hkd):
    ram, cpu = usable_ram_mb(), usable_cpu()
    runtime.set_host_capacity(hkd.db, hkd.host_id, ram, cpu)
    log.info("host %s: usable_ram %.0f MB, usable_cpu %.0f", hkd.nodename, ram, cpu)


def first_tick(hkd):
    if not heartbeat.tick(hkd):
        raise HkdError("first heartbeat failed")
    hkd.agents.append(gevent.spawn(heartbeat.ticker, hkd))
    hkd.agents.append(gevent.spawn(heartbeat.fence_watch, hkd))


def reset_sessions(hkd):
    count = runtime.release_host_sessions(hkd.db, hkd.host_id)
    if count:
        log.info("reset %d sessions left by this node", count)


def reconcile(hkd):
    rows = hkd.db.query("SELECT r.vm_id, r.vm_state, v.ip FROM vm_runtimes r JOIN vms v ON v.id = r.vm_id "
                         "WHERE r.host_id = %s AND r.vm_state <> 'stopped'", (hkd.host_id,))
    running = hkd.hypervisor.list_running()
    agent_keys = runtime.vm_agent_keys(hkd.db, [row[0] for row in rows])
    zombies = []
    for vm_id, state, ip in rows:
        runner = VmRunner(hkd, vm_id)
        hkd.vms[vm_id] = runner
        if vm_id in running:
            runner.handle = running[vm_id]
            runner.adopted_ip = ip
            if ip and hkd.hypervisor.uses_bridge:
                from .vm_runner import mac_from_ip
                try:
                    runner.allow_in_filter(hkd.hypervisor.port_name(vm_id),
                                           mac_from_ip(hkd.cfg.get_str("vm.network.mac.prefix"), ip), ip)
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
                hkd.hypervisor.kill(handle)
                hkd.hypervisor.wait_exit(handle, timeout=hkd.vm_settings.timeouts["zombie.reap"])
                hkd.hypervisor.cleanup(handle)
            except HypervisorError as exc:
                log.error("VM %s: cannot kill: %s", vm_id, exc)
    bound = hkd.vm_settings.timeouts["zombie.reap"] + hkd.vm_settings.timeouts["zombie.delaying"]
    for runner in zombies:
        if not runner.finished.wait(bound):
            log.warning("VM %s: zombie not cleaned up yet; continuing", runner.vm_id)
    # what a crashed node left without any row (a namespace whose init is gone, ...)
    cleanup_leftovers = getattr(hkd.hypervisor, "cleanup_leftovers", None)
    if cleanup_leftovers is not None:
        removed = cleanup_leftovers()
        if removed:
            log.info("removed leftovers of VMs that no longer run: %s", ", ".join(map(str, removed)))


def start_agents(hkd):
    hid = hkd.host_id
    if hkd.hypervisor.uses_bridge and hkd.cfg.get_bool("vm.network.use_dhcp"):
        from .dnsmasq import DnsmasqSupervisor
        hkd.dnsmasq = DnsmasqSupervisor(hkd.cfg)
        hkd.dnsmasq.start()
        from .vm_runner import mac_from_ip
        prefix = hkd.cfg.get_str("vm.network.mac.prefix")
        for runner in list(hkd.vms.values()):
            ip = getattr(runner, "adopted_ip", None)
            if ip and runner.handle is not None:
                runner.dhcp_registered = mac_from_ip(prefix, ip)
                hkd.dnsmasq.add_host(runner.dhcp_registered, ip)
    hkd.unsubscribers.append(hkd.listener.subscribe(runtime.host_commands_channel(hid), lambda c, p: hkd.cmd_wake.set()))
    hkd.listener.on_reconnect(hkd.cmd_wake.set)
    hkd.listener.on_reconnect(hkd.vm_wake.set)
    hkd.agents.append(gevent.spawn(intake.host_command_handler, hkd))
    hkd.agents.append(gevent.spawn(periodic.expiration_monitor, hkd))
    hkd.agents.append(gevent.spawn(periodic.token_sweeper, hkd))
    hkd.cluster = ClusterMonitor(hkd.cfg, hkd.db, hid).start()


def save_running(hkd):
    save_host_state(hkd, "running")


def start_vm_intake(hkd):
    hkd.unsubscribers.append(hkd.listener.subscribe(runtime.vm_commands_channel(hkd.host_id),
                                                     lambda c, p: hkd.vm_wake.set()))
    hkd.intake = gevent.spawn(intake.vm_command_handler, hkd)


def stop_vm_intake(hkd):
    if hkd.intake is not None:
        hkd.intake.kill(block=True, timeout=5)
        hkd.intake = None


def save_stopping(hkd):
    save_host_state(hkd, "stopping")


def stop_agents(hkd):
    hkd.stop_agents()


def save_stopped(hkd):
    save_host_state(hkd, "stopped")


STEPS = {name: globals()[name] for name in (
    "check_schema", "load_host", "check_hypervisor", "check_address", "check_tools", "check_network",
    "save_starting", "save_loadbal", "first_tick", "reset_sessions", "reconcile", "start_agents", "save_running",
    "start_vm_intake", "stop_vm_intake", "save_stopping", "stop_agents", "save_stopped")}
