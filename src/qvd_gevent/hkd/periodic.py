"""The HKD's periodic agents besides the heartbeat: VM expirations and the token sweep."""
import logging
import random

import gevent

from ..db import runtime
from . import vm_machine as M
from .errors import DB_ERRORS as _DB_ERRORS, first_line as _first_line

log = logging.getLogger("qvd.hkd")


def check_expirations(hkd):
    rows = hkd.db.query(
        "SELECT vm_id, vm_expiration_soft, vm_expiration_hard, "
        "vm_expiration_hard IS NOT NULL AND vm_expiration_hard < now() AT TIME ZONE 'UTC' "
        "FROM vm_runtimes WHERE host_id = %s AND vm_state = 'running' "
        "AND (vm_expiration_soft < now() AT TIME ZONE 'UTC' OR vm_expiration_hard < now() AT TIME ZONE 'UTC')",
        (hkd.host_id,))
    for vm_id, soft, hard, hard_expired in rows:
        runner = hkd.vms.get(vm_id)
        if runner is None:
            continue
        if hard_expired:
            log.info("VM %s: hard expiration reached; stopping", vm_id)
            runner.send(M.CmdStop())
        else:
            log.info("VM %s: soft expiration reached; telling the VMA", vm_id)
            runner.send(M.Expired(soft=soft, hard=hard))


def token_sweeper(hkd):
    """Expired tokens and orphaned login parameters would grow without bound otherwise;
    every node sweeps (the deletes are idempotent)."""
    seen = None
    while True:
        gevent.sleep(hkd.cfg.get_float("internal.hkd.agent.token_sweep.delay") * random.uniform(0.9, 1.0))
        try:
            tokens, params, seen = runtime.purge_tokens(hkd.db, orphans_up_to=seen)
            if tokens or params:
                log.info("purged %d expired tokens and %d unused login parameter rows", tokens, params)
        except _DB_ERRORS as exc:
            log.warning("token sweep failed: %s", _first_line(exc))


def expiration_monitor(hkd):
    while True:
        gevent.sleep(hkd.cfg.get_float("internal.hkd.agent.expiration_monitor.delay") * random.uniform(0.95, 1.0))
        try:
            check_expirations(hkd)
        except _DB_ERRORS as exc:
            log.warning("expiration check failed: %s", _first_line(exc))
        except Exception:
            log.exception("expiration check crashed")
