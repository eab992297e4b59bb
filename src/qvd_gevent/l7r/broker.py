"""connect_to_vm after its pre-checks: claim the session, start the VM, start X, connect, splice.

The decisions are pure functions over a ``vm_runtimes`` row (``decide_claim``,
``vm_start_progress``, ``x_state_progress``), tested without sockets; ``ConnectRunner``
executes them with the database, LISTEN, the VMA and sockets, and streams the 102 lines
in the original's order (docs/protocol.md#connect-to-vm).

Waiting is by LISTEN on ``qvd_vm_runtime`` (payload vm_id) with a slow safety re-check,
never by sleep-polling alone. The session row is always left ``disconnected`` by us when
a session ends or its setup fails (docs/differences.md#release-after-setup-failure), guarded by l7r_host_id = this host
AND l7r_pid = this process.
"""
import logging
import secrets
import string
import time

import gevent
import gevent.socket
import h11

from ..common import metrics
from ..db import runtime
from ..db.placement import NoHostAvailable
from ..vma import display_gate
from ..vma.client import VmaClient, VmaError, legacy_unauthenticated, open_display
from .auth_plugins.totp import PRIVATE_PREFIX as PRIVATE_PROPERTY_PREFIX  # a user's TOTP secret stays off the VM
from .sessions import SessionAborted, shielded
from .splice import tune_socket

log = logging.getLogger("qvd.l7r.broker")

_ALNUM = string.ascii_letters + string.digits


def slave_key():
    """64 characters [A-Za-z0-9] from a CSPRNG (the original used Perl's rand: docs/differences.md#slave-key-csprng)."""
    return "".join(secrets.choice(_ALNUM) for _ in range(64))


class SetupFailed(Exception):
    """Session setup failed; the client gets 503 with this message."""


# --- pure decisions ------------------------------------------------------------------------
def vm_start_progress(vm_state, vm_cmd, user_cmd, now, deadline, vm_id):
    """While waiting for 'running': ('ready'|'wait', None) or ('fail', message) or ('aborted', msg)."""
    if user_cmd == "abort":
        return "aborted", f"Aborted by contending session VM_ID: {vm_id}"
    if vm_state == "running":
        return "ready", None
    if vm_state == "stopped" and vm_cmd is None:
        return "fail", f"Failed to start virtual machine {vm_id}"
    if now > deadline:
        return "fail", "VM didn't reach state 'running'. Timeout"
    return "wait", None


def x_state_progress(state, now, deadline, hard_deadline, vm_id):
    """While waiting for X: 'ready', 'wait' or ('fail', message)."""
    if state == "listening":
        return "ready", None
    if state == "provisioning":
        if now > hard_deadline:
            return "fail", f"Unable to start X session on VM {vm_id}: provisioning took too long"
        return "wait", None
    if state in (None, "starting", "stopped", "suspended", "initiating", "connected"):
        # stopped/suspended: x_start was just accepted and the desktop has not caught up
        if now > deadline:
            return "fail", f"Unable to start X session on VM {vm_id}: operation timed out!"
        return "wait", None
    return "fail", f"Unable to start X session on VM {vm_id}, state went to {state}"


def merge_vma_params(client_params, properties, auth_params, slave):
    """client < VM combined properties < auth params < qvd.slave.key (docs/protocol.md#vma-parameters).
    The TOTP plugin's user properties (secret, last code) are not the VM's business."""
    merged = dict(client_params)
    merged.update((k, v) for k, v in properties.items() if not k.startswith(PRIVATE_PROPERTY_PREFIX))
    merged.update(auth_params)
    merged["qvd.slave.key"] = slave
    return merged


_PROPS_SQL = ("SELECT l.key, p.value FROM {table} p JOIN qvd_object_properties_list q ON q.id = p.property_id "
              "JOIN properties_list l ON l.id = q.property_id WHERE p.{col} = %s")


def combined_properties(cur, vm_id):
    """OSF < current DI < user < VM properties."""
    cur.execute("SELECT v.osf_id, v.user_id, vr.current_di_id, v.di_tag FROM vms v "
                "JOIN vm_runtimes vr ON vr.vm_id = v.id WHERE v.id = %s", (vm_id,))
    row = cur.fetchone()
    if row is None:
        return {}
    osf_id, user_id, di_id, di_tag = row
    if di_id is None:
        cur.execute("SELECT d.id FROM dis d JOIN di_tags t ON t.di_id = d.id WHERE d.osf_id = %s AND t.tag = %s "
                    "ORDER BY d.id DESC LIMIT 1", (osf_id, di_tag))
        found = cur.fetchone()
        di_id = found[0] if found else None
    out = {}
    for table, col, value in (("osf_properties", "osf_id", osf_id), ("di_properties", "di_id", di_id),
                              ("user_properties", "user_id", user_id), ("vm_properties", "vm_id", vm_id)):
        if value is None:
            continue
        cur.execute(_PROPS_SQL.format(table=table, col=col), (value,))
        out.update(dict(cur.fetchall()))
    return out


class ConnectRunner:
    """Runs one connect_to_vm after its pre-checks. ``info(text)`` sends a 102 line."""

    def __init__(self, ctx, session, auth, client_params, info, auth_vars=None):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.db = ctx.db
        self.session = session
        self.vm_id = session.vm_id
        self.auth = auth
        self.client_params = client_params
        self.auth_vars = auth_vars or {}
        self.info = info
        self.host_id = ctx.host.id
        self.pid = ctx.sessions.pid

    # --- helpers -------------------------------------------------------------------------
    def _row(self):
        return runtime.session_row(self.db, self.vm_id)

    def _check_abort(self):
        row = self._row()
        if row is None or row[3] == "abort" or (row[5], row[6]) != (self.host_id, self.pid):
            raise SetupFailed(f"Aborted by contending session VM_ID: {self.vm_id}")

    # --- the sequence ----------------------------------------------------------------------
    def run(self, slave):
        self.claim()
        self.ensure_running()
        row = self._row()
        vm_address, vma_port, x_port = row[7], row[8], row[9]
        if not vm_address or not x_port:
            raise SetupFailed(f"VM {self.vm_id} has no address yet")
        params, agent_key = self.vma_params(slave)
        # a one-time key for this connect: the VM's display admits one connection with it,
        # and arming it ends the connection of the session before (docs/protocol.md#display-gate)
        display_key = None if agent_key is None else display_gate.new_key()
        if display_key is not None:
            params[display_gate.PARAM] = display_key
        self.start_x(vm_address, vma_port or self.cfg.get_int("internal.vm.port.vma"), params, agent_key)
        vm_sock = self.connect_x(vm_address, x_port, display_key)
        try:
            self.mark_connected()
        except BaseException:
            vm_sock.close()
            raise
        return vm_sock

    def claim(self):
        timeout = self.cfg.get_float("internal.l7r.timeout.takeover")
        poll = self.cfg.get_float("internal.l7r.poll_time.vm")
        deadline = time.monotonic() + timeout
        attempts = 0
        while True:
            attempts += 1
            outcome, holder = self.ctx.sessions.claim(self.session, self.auth.user_id)
            if outcome == "claim":
                self.info(f"Session acquired for VM_ID: {self.vm_id}")
                return
            if outcome == "gone":
                raise SetupFailed("The requested virtual machine does not exist")
            if attempts == 1 or outcome == "abort":
                log.info("VM %s: session held by host %s pid %s; asking it to let go", self.vm_id, holder[0], holder[1])
            self.info(f"Aborting contending session for VM_ID: {self.vm_id}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SetupFailed("Unable to acquire VM, close other clients")
            self.ctx.sessions.wait_vm_event(self.vm_id, min(poll, remaining))

    def ensure_running(self):
        row = self._row()
        if row is None:
            raise SetupFailed("The requested virtual machine does not exist")
        vm_state, host_id = row[0], row[4]
        if vm_state == "stopped":
            if host_id is None:
                self.info(f"Assigning VM {self.vm_id} to host")
            self.info("Starting virtual machine")
            try:
                self.db.transaction(runtime.request_start, self.cfg, self.vm_id, retries=runtime.CLAIM_RETRIES)
            except NoHostAvailable as exc:
                raise SetupFailed(str(exc)) from None
        elif host_id is None:
            raise SetupFailed(f"Unable to start VM {self.vm_id}, state changed unexpectedly")
        self.wait_running()

    def wait_running(self):
        poll = self.cfg.get_float("internal.l7r.poll_time.vm")
        deadline = time.monotonic() + self.cfg.get_float("internal.l7r.timeout.vm_start")
        for _ in range(100000):
            row = self._row()
            if row is None:
                raise SetupFailed("The requested virtual machine does not exist")
            if (row[5], row[6]) != (self.host_id, self.pid):
                raise SetupFailed(f"Aborted by contending session VM_ID: {self.vm_id}")
            verdict, message = vm_start_progress(row[0], row[1], row[3], time.monotonic(), deadline, self.vm_id)
            if verdict == "ready":
                return
            if verdict in ("fail", "aborted"):
                raise SetupFailed(message)
            self.info("Waiting for VM to reach state 'running'")
            self.ctx.sessions.wait_vm_event(self.vm_id, max(0.05, min(poll * 5, deadline - time.monotonic() + 0.05)))
        raise SetupFailed("VM didn't reach state 'running'. Timeout")

    def vma_params(self, slave):
        """(x_start parameters, the VM's agent key: None with vm.vma.legacy_unauthenticated)."""
        lifetime = self.cfg.get_int("l7r.token.lifetime")
        legacy = legacy_unauthenticated(self.cfg)

        def tx(cur):
            runtime.read_committed(cur)
            cur.execute("SELECT address FROM hosts WHERE id = %s", (self.host_id,))
            host_row = cur.fetchone()
            agent_key = None if legacy else runtime.read_vm_agent_key(cur, self.vm_id)
            if agent_key is None and not legacy:
                return None
            # the desktop's token opens this VM only and is revoked when the session row is released
            token, _ = runtime.issue_token(cur, self.auth.user_id, self.auth.params, lifetime, vm_id=self.vm_id)
            return host_row, token, combined_properties(cur, self.vm_id), agent_key
        found = self.db.transaction(tx)
        if found is None:
            raise SetupFailed(f"VM {self.vm_id} runs without an agent key (started with "
                              "vm.vma.legacy_unauthenticated on?); restart it")
        host_row, token, properties, agent_key = found
        client = dict(self.client_params)
        client.update({f"auth.{name}": value for name, value in self.auth_vars.items()})
        client["auth_token"] = token
        client["host_address"] = host_row[0] if host_row else ""
        return merge_vma_params(client, properties, self.auth.params, slave), agent_key

    def start_x(self, address, port, params, agent_key):
        vma = VmaClient(address, port, timeout=self.cfg.get_float("internal.l7r.timeout.vma"), key=agent_key)
        poll = self.cfg.get_float("internal.l7r.poll_time.x")
        self.info(f"Starting X session at VM {self.vm_id}")
        tries = self.cfg.get_int("internal.l7r.retry.x_start") + 1
        for attempt in range(1, tries + 1):
            try:
                vma.x_start(**params)
                break
            except VmaError as exc:
                if attempt == tries:
                    raise SetupFailed(f"Unable to start X session on VM {self.vm_id}: {exc}") from None
                gevent.sleep(poll)
                self._check_abort()
        self.info(f"Waiting for X session to come up on VM {self.vm_id}")
        start = time.monotonic()
        deadline = start + self.cfg.get_float("internal.l7r.timeout.x_start")
        hard = start + self.cfg.get_float("internal.l7r.timeout.vm_start")
        for _ in range(100000):
            try:
                state = vma.x_state()
            except VmaError:
                state = None
            verdict, message = x_state_progress(state, time.monotonic(), deadline, hard, self.vm_id)
            if verdict == "ready":
                return
            if verdict == "fail":
                raise SetupFailed(message)
            gevent.sleep(poll)
        raise SetupFailed(f"Unable to start X session on VM {self.vm_id}: operation timed out!")

    def connect_x(self, address, port, display_key):
        self.info(f"Connecting X session for VM_ID: {self.vm_id}")
        self.ctx.counters.count("nx_attempts")
        try:
            sock = open_display(address, port, display_key, timeout=self.cfg.get_float("internal.l7r.timeout.vma"))
        except OSError as exc:
            raise SetupFailed(f"Unable to connect X session for VM_ID: {self.vm_id}: {exc.strerror or exc}") from None
        tune_socket(sock)
        self.ctx.counters.count("nx_ok")
        return sock

    def mark_connected(self):
        error = runtime.mark_connected(self.db, self.vm_id, self.host_id, self.pid)
        if error:
            raise SetupFailed(error)


def open_session(ctx, conn, session, auth, client_params, auth_vars, began):
    """Set the session up (102 lines), then 101 and splice: True. On failure a 503 and the
    row released: False."""
    vm_id = session.vm_id
    key = slave_key()
    runner = ConnectRunner(ctx, session, auth, client_params, conn.send_info, auth_vars)
    vm_sock = None
    try:
        vm_sock = runner.run(key)
        conn.send_info("Connection established")
        conn.send_switch(key)
        metrics.observe("qvd_l7r_connect_to_vm_seconds", time.monotonic() - began)
        session.greenlet = None  # from here on an abort closes the splice instead
    except (SetupFailed, SessionAborted) as exc:
        session.greenlet = None
        message = str(exc) or f"Aborted by contending session VM_ID: {vm_id}"
        metrics.inc("qvd_l7r_connects_total", result="failed")
        log.info("connect_to_vm failed: user %s VM %s from %s: %s", auth.login, vm_id, session.peer, message)
        shielded(_fail_setup, ctx, conn, session, vm_sock,
                 f"The requested virtual machine is not available: {message}, retry later.")
        return False
    except BaseException:
        session.greenlet = None
        metrics.inc("qvd_l7r_connects_total", result="error")
        shielded(_fail_setup, ctx, None, session, vm_sock, None)
        raise
    leftover = conn.leftover()
    metrics.inc("qvd_l7r_connects_total", result="ok")
    log.info("session open: user %s VM %s from %s", auth.login, vm_id, session.peer)
    ctx.sessions.splice(session, conn.sock, vm_sock, leftover)
    return True


def _fail_setup(ctx, conn, session, vm_sock, answer):
    if vm_sock is not None:
        vm_sock.close()
    ctx.sessions.end_setup(session)
    if conn is not None and answer is not None and conn.h11.our_state is h11.SEND_RESPONSE:
        conn.send_error(503, answer)
