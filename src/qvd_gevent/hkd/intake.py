"""Command intake: host commands (host_runtimes.cmd) and VM commands (vm_runtimes.vm_cmd),
woken by NOTIFY on this host's channels, with the original's slow polls as a safety net
(docs/hkd.md#host-commands, docs/hkd.md#vm-commands).
"""
import logging

import gevent

from ..db import runtime
from . import vm_machine as M
from .errors import DB_ERRORS as _DB_ERRORS, first_line as _first_line
from .vm_runner import VmRunner

log = logging.getLogger("qvd.hkd")


def host_command_handler(hkd):
    """Host commands: host_runtimes.cmd, woken by NOTIFY qvd_cmd_for_host<id>, polled as safety net."""
    hkd.cmd_wake.set()
    while True:
        hkd.cmd_wake.wait(hkd.cfg.get_float("internal.hkd.agent.command_handler.delay"))
        hkd.cmd_wake.clear()
        try:
            cmd = runtime.take_host_command(hkd.db, hkd.host_id)
            if cmd is None:
                continue
        except _DB_ERRORS as exc:
            log.warning("host command check failed: %s", _first_line(exc))
            continue
        if cmd == "stop":
            log.info("host command stop received")
            if hkd.on_stop_command is not None:
                gevent.spawn(hkd.on_stop_command)
            else:
                gevent.spawn(hkd.stop)
            return
        log.warning("unknown host command %r ignored", cmd)


def new_runner(hkd, vm_id):
    runner = VmRunner(hkd, vm_id)
    hkd.vms[vm_id] = runner
    return runner


def process_vm_commands(hkd):
    """The original's atomic UPDATE ... RETURNING: stops first, then starts."""
    hid = hkd.host_id
    stops, starts = runtime.take_vm_commands(hkd.db, hid)
    for vm_id in stops:
        log.info("VM %s: stop command", vm_id)
        runner = hkd.vms.get(vm_id) or new_runner(hkd, vm_id)
        runner.send(M.CmdStop())
    for vm_id in starts:
        log.info("VM %s: start command", vm_id)
        existing = hkd.vms.get(vm_id)
        if existing is not None:
            # the row is 'stopped' again, so the old handler is finishing (cleared row,
            # or a lost VM being killed): start once it is gone, never two at once
            gevent.spawn(start_after, hkd, existing, vm_id)
            continue
        dispatch_start(hkd, new_runner(hkd, vm_id))
    # a runner whose row went to another node (or none) must not keep its VM
    # (a runner clearing its own row, stopping.db, is not a loss)
    ids = [vm_id for vm_id, r in hkd.vms.items()
           if r.state not in ("new", "stopped", "lost") and r.machine.state != "stopping.db"]
    if ids:
        mine = runtime.vms_assigned(hkd.db, ids, hid)
        for vm_id in ids:
            if vm_id not in mine and vm_id in hkd.vms:
                hkd.vms[vm_id].send(M.RowLost())


def dispatch_start(hkd, runner):
    if hkd.machine.state == "running" and not hkd.lost:
        runner.send(M.CmdStart())
    else:
        runner.send(M.CmdStop())        # as the original: no starts unless the host runs


def start_after(hkd, old, vm_id):
    bound = hkd.vm_settings.timeouts["stopping.stop"] + hkd.vm_settings.timeouts["zombie.reap"]
    if not old.finished.wait(bound):
        log.error("VM %s: previous handler still busy after %.0f s; start refused", vm_id, bound)
        old = None
    if hkd.vms.get(vm_id) not in (None, old):
        return
    hkd.vms.pop(vm_id, None)
    runner = new_runner(hkd, vm_id)
    if old is None:
        runner.send(M.CmdStop())
    else:
        dispatch_start(hkd, runner)


def vm_command_handler(hkd):
    hkd.vm_wake.set()
    while True:
        hkd.vm_wake.wait(hkd.cfg.get_float("internal.hkd.agent.vm_command_handler.delay"))
        hkd.vm_wake.clear()
        try:
            process_vm_commands(hkd)
        except _DB_ERRORS as exc:
            log.warning("VM command intake failed: %s", _first_line(exc))
        except Exception:
            log.exception("VM command intake crashed; retrying at the next poll")
