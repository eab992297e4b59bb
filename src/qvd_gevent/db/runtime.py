"""The rows every part of a cluster shares, and the only code that writes them.

``vm_runtimes`` (a VM's state, its commands and its user session), ``host_runtimes`` (a
node's state, heartbeat and commands), ``user_tokens``, ``user_auth_parameters`` and
``vm_agent_keys`` (ours: the secret of each running VM's agent) are written by the L7R, the HKD, the cluster monitor and ``qvd-admin`` of every node at once.
Their rules live here, once: each function below is one step of the cluster's protocol
(see docs/schema.md for the columns and docs/hkd.md for the state machines). Nothing else
in the code base INSERTs, UPDATEs or DELETEs these tables (tests/unit/test_layers.py).

Two kinds of function:
- ``fn(db, ...)`` runs its own transaction, with the isolation level and retries the step
  needs (the session claim and the start request are SERIALIZABLE; guarded single-row
  writes are READ COMMITTED, exact there and free of the coarse predicate locks
  SERIALIZABLE takes on a small table under load);
- ``fn(cur, ...)`` is a fragment that runs inside the caller's transaction (qvd-admin's
  verbs, the HKD's VM preparation), named so in its docstring.

Guards: a session row is only released by the process that holds it (``l7r_host_id`` and
``l7r_pid``); a VM row is only written by the node it is assigned to (``host_id``). A
guarded write that hits no row returns False: the caller lost the row to the cluster.
"""
import hashlib
import json
from importlib import resources
import secrets
import string
import time

from . import notify
from .placement import pick_host

# --- NOTIFY channels (payloads as the original's) -------------------------------------------
VM_RUNTIME_CHANNEL = "qvd_vm_runtime"      # payload: vm_id; sent by a trigger on every state change


def vm_commands_channel(host_id):
    """The HKD of host_id takes vm_cmd start/stop on this channel."""
    return f"qvd_cmd_for_vm_on_host{host_id}"


def user_commands_channel(host_id):
    """The L7R of host_id takes user_cmd abort (takeover, disconnect) on this channel."""
    return f"qvd_cmd_for_user_on_host{host_id}"


def host_commands_channel(host_id):
    """The HKD of host_id takes host_runtimes.cmd on this channel."""
    return f"qvd_cmd_for_host{host_id}"


# serialization failures are expected when many clients claim at once; each retry backs off
CLAIM_RETRIES = 30

_ALNUM = string.ascii_letters + string.digits


def now_epoch():
    return int(time.time())


def read_committed(cur):
    """First statement of a transaction that only does guarded single-row writes."""
    cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")


# --- sessions: the user side of vm_runtimes --------------------------------------------------
_RELEASE = ("UPDATE vm_runtimes SET user_state = 'disconnected', user_state_ts = %s, user_cmd = NULL, "
            "l7r_host_id = NULL, l7r_pid = NULL")


def decide_claim(row, me_host, me_pid, live_here, live_pids=()):
    """row = (user_state, l7r_host_id, l7r_pid, user_cmd). Returns 'claim', 'abort' or 'wait'.

    'claim' also when the holder is provably dead: this host held it from a process that is
    none of its live L7R processes (an earlier run, a worker that died; live_pids names the
    node's other live L7R workers, empty for a node of one process), or from this process
    with no live session (a lost greenlet).
    """
    user_state, holder_host, holder_pid, user_cmd = row
    if user_state == "disconnected":
        return "claim"
    if holder_host == me_host and holder_pid != me_pid and holder_pid not in live_pids:
        return "claim"
    if holder_host == me_host and holder_pid == me_pid and not live_here:
        return "claim"
    if holder_host is None:
        return "claim"
    if user_cmd == "abort":
        return "wait"
    return "abort"


ACCESS_DENIED = {
    "gone": (404, "The requested virtual machine does not exist"),
    "forbidden": (403, "You are not allowed to access requested virtual machine"),
    "blocked": (403, "The requested virtual machine is offline for maintenance"),
}


def claim_session(db, vm_id, host_id, pid, user_id, live_here, live_pids=()):
    """Take the VM's session for (host_id, pid), or ask its holder to let go, in one round
    trip (functions.sql, qvd_claim_session_v3: decide_claim's rule, with the access check;
    live_pids: the node's other live L7R processes).

    Returns (outcome, (holder_host, holder_pid), row, generation): outcome 'claim' (ours
    now, user_state 'connecting'; row is session_row's columns after the claim; generation
    grows with every claim in the cluster, and orders the sessions of a VM at its display
    gate), 'abort' (the holder was asked to let go: wait and retry), 'wait' (it was asked
    already), or a refusal of ACCESS_DENIED ('gone', 'forbidden': not user_id's VM,
    'blocked'); row and generation are None then."""
    rows = db.statement("SELECT * FROM qvd_claim_session_v3(%s, %s, %s, %s, %s, %s, %s::integer[])",
                        (vm_id, host_id, pid, user_id, live_here, now_epoch(), sorted(live_pids)),
                        retries=CLAIM_RETRIES)
    outcome, holder_host, holder_pid, generation, *row = rows[0]
    claimed = outcome == "claim"
    return outcome, (holder_host, holder_pid), (tuple(row) if claimed else None), (generation if claimed else None)


_RELEASED_TOKENS = "DELETE FROM user_tokens WHERE vm_id IN (SELECT vm_id FROM released)"


def release_session(db, vm_id, host_id, pid, older_than=None):
    """Back to 'disconnected', only while (host_id, pid) still holds it (and, for a sweep,
    only a claim older than older_than: never one made a moment ago), with the session's
    tokens, in one round trip. Returns rows released."""
    sql = _RELEASE + " WHERE vm_id = %s AND l7r_host_id = %s AND l7r_pid = %s"
    params = [now_epoch(), vm_id, host_id, pid]
    if older_than is not None:
        sql += " AND coalesce(user_state_ts, 0) < %s"
        params.append(older_than)
    rows = db.statement(f"WITH released AS ({sql} RETURNING vm_id), gone AS ({_RELEASED_TOKENS}) "
                        "SELECT count(*) FROM released", params)
    return rows[0][0]


def _release_aborted_tx(cur, vm_id, host_id, pid):
    read_committed(cur)
    cur.execute(_RELEASE + " WHERE vm_id = %s AND l7r_host_id = %s AND l7r_pid = %s AND user_cmd = 'abort'",
                (now_epoch(), vm_id, host_id, pid))
    released = cur.rowcount
    if released:
        _revoke_session_tokens(cur, [vm_id])
    return released


def release_aborted_session(db, vm_id, host_id, pid):
    """Release a row another client asked us to let go of, only while that request stands."""
    return db.transaction(_release_aborted_tx, vm_id, host_id, pid)


def release_host_sessions(db, host_id, except_pid=None, keep_pids=()):
    """Release every session row held by host_id but those of except_pid and keep_pids (the
    node's live L7R processes): rows left by an earlier run of that node, or by a worker
    that died, which no process holds any more. Returns rows released."""
    sql = _RELEASE + " WHERE l7r_host_id = %s"
    params = [now_epoch(), host_id]
    keep = sorted(set(keep_pids) | ({except_pid} if except_pid is not None else set()))
    if keep:
        sql += " AND NOT coalesce(l7r_pid = ANY(%s::integer[]), false)"
        params.append(keep)

    def tx(cur):
        cur.execute(sql + " RETURNING vm_id", params)
        released = [r[0] for r in cur.fetchall()]
        _revoke_session_tokens(cur, released)
        return len(released)
    return db.transaction(tx)


def release_process_sessions(db, host_id, pid):
    """Release the session rows of one process of host_id that died (an L7R worker the node
    restarts): no live session is behind them. Returns rows released."""
    def tx(cur):
        read_committed(cur)
        cur.execute(_RELEASE + " WHERE l7r_host_id = %s AND l7r_pid = %s RETURNING vm_id", (now_epoch(), host_id, pid))
        released = [r[0] for r in cur.fetchall()]
        _revoke_session_tokens(cur, released)
        return len(released)
    return db.transaction(tx)


def sessions_held(db, host_id, pid):
    """vm_ids whose session row names (host_id, pid)."""
    return [r[0] for r in db.query("SELECT vm_id FROM vm_runtimes WHERE l7r_host_id = %s AND l7r_pid = %s",
                                   (host_id, pid))]


def sessions_to_abort(db, host_id, pid):
    """vm_ids held by (host_id, pid) that another client or an admin asked to let go."""
    return [r[0] for r in db.query("SELECT vm_id FROM vm_runtimes WHERE l7r_host_id = %s AND l7r_pid = %s "
                                   "AND user_cmd = 'abort'", (host_id, pid))]


def mark_connected(db, vm_id, host_id, pid):
    """'connecting' -> 'connected' while (host_id, pid) holds the row and no abort stands,
    in one round trip. Returns None, or why not (the client's 503 text)."""
    rows = db.statement(
        "WITH done AS (UPDATE vm_runtimes SET user_state = 'connected', user_state_ts = %s "
        "WHERE vm_id = %s AND l7r_host_id = %s AND l7r_pid = %s AND user_state = 'connecting' "
        "AND user_cmd IS DISTINCT FROM 'abort' RETURNING 1) "
        "SELECT (SELECT count(*) FROM done), user_state, user_cmd, l7r_host_id, l7r_pid "
        "FROM vm_runtimes WHERE vm_id = %s", (now_epoch(), vm_id, host_id, pid, vm_id))
    if rows and rows[0][0] == 1:
        return None
    if not rows or rows[0][2] == "abort" or (rows[0][3], rows[0][4]) != (host_id, pid):
        return f"Aborted by contending session VM_ID: {vm_id}"
    return f"User state unexpectedly went to {rows[0][1]}"


def _access_tx(cur, vm_id, user_id, claim_user):
    read_committed(cur)
    cur.execute("SELECT v.user_id, vr.blocked FROM vms v JOIN vm_runtimes vr ON vr.vm_id = v.id WHERE v.id = %s",
                (vm_id,))
    row = cur.fetchone()
    if row is None:
        return 404, "The requested virtual machine does not exist"
    if row[0] != user_id:
        return 403, "You are not allowed to access requested virtual machine"
    if row[1] and claim_user:
        return 403, "The requested virtual machine is offline for maintenance"
    if claim_user:
        cur.execute("UPDATE vm_runtimes SET real_user_id = %s WHERE vm_id = %s", (user_id, vm_id))
    return None


def check_vm_access(db, vm_id, user_id, claim_user):
    """None when user_id owns the VM (and, to connect, it is not blocked; the VM then records
    user_id as its real user); else (status, message) for the client."""
    return db.transaction(_access_tx, vm_id, user_id, claim_user)


def request_disconnect(cur, vm_ids):
    """Fragment: ask the L7Rs holding these VMs' sessions to end them. Returns how many."""
    cur.execute("UPDATE vm_runtimes SET user_cmd = 'abort' WHERE vm_id = ANY(%s) "
                "AND user_state IN ('connecting', 'connected') RETURNING l7r_host_id", (list(vm_ids),))
    hosts = [r[0] for r in cur.fetchall()]
    for host_id in sorted({h for h in hosts if h is not None}):
        notify(cur, user_commands_channel(host_id))
    return len(hosts)


def session_row(db, vm_id):
    """The row a connect waits on: (vm_state, vm_cmd, user_state, user_cmd, host_id, l7r_host_id,
    l7r_pid, vm_address, vm_vma_port, vm_x_port), or None."""
    return db.query_one(
        "SELECT vm_state, vm_cmd, user_state, user_cmd, host_id, l7r_host_id, l7r_pid, vm_address, "
        "vm_vma_port, vm_x_port FROM vm_runtimes WHERE vm_id = %s", (vm_id,))


# --- VM commands: requests from the L7R and qvd-admin ------------------------------------------
def request_start(cur, cfg, vm_id):
    """Fragment: place a stopped VM on a host (if not placed yet) and command its start, in
    one transaction. Returns (host_id, outcome): 'commanded', 'pending' (its start was
    commanded before and is re-announced) or 'not_stopped' (starting or running already).
    None when the VM does not exist. Raises placement.NoHostAvailable."""
    cur.execute("SELECT vm_state, vm_cmd, host_id FROM vm_runtimes WHERE vm_id = %s FOR UPDATE", (vm_id,))
    row = cur.fetchone()
    if row is None:
        return None
    vm_state, vm_cmd, host_id = row
    if vm_state != "stopped":
        return host_id, "not_stopped"
    if host_id is None:
        host_id = pick_host(cur, cfg)
    cur.execute("UPDATE vm_runtimes SET host_id = %s, vm_cmd = 'start' WHERE vm_id = %s", (host_id, vm_id))
    notify(cur, vm_commands_channel(host_id), str(vm_id))
    return host_id, ("pending" if vm_cmd == "start" else "commanded")


def request_stop(cur, vm_id):
    """Fragment: command a VM's stop. Returns 'commanded', 'cancelled' (a start the node had
    not taken yet was withdrawn), 'stopping' or 'stopped' (nothing to do), 'gone', or the
    state the VM is in when it cannot be stopped now (e.g. 'zombie')."""
    cur.execute("SELECT vm_state, vm_cmd, host_id FROM vm_runtimes WHERE vm_id = %s FOR UPDATE", (vm_id,))
    row = cur.fetchone()
    if row is None:
        return "gone"
    state, cmd, host_id = row
    if state in ("starting", "running", "debugging") and host_id is not None:
        cur.execute("UPDATE vm_runtimes SET vm_cmd = 'stop' WHERE vm_id = %s", (vm_id,))
        notify(cur, vm_commands_channel(host_id), str(vm_id))
        return "commanded"
    if state == "stopped" and cmd == "start":
        cur.execute("UPDATE vm_runtimes SET vm_cmd = NULL, host_id = NULL WHERE vm_id = %s", (vm_id,))
        if host_id is not None:
            notify(cur, vm_commands_channel(host_id), str(vm_id))
        return "cancelled"
    return state


def vm_state(db, vm_id):
    """vm_state of the VM, or None when it does not exist."""
    row = db.query_one("SELECT vm_state FROM vm_runtimes WHERE vm_id = %s", (vm_id,))
    return row[0] if row else None


# --- VM rows: written by the node the VM is assigned to ------------------------------------
def create_vm_runtime(cur, vm_id):
    """Fragment: the runtime and counters row of a new VM (stopped, nobody connected)."""
    cur.execute("INSERT INTO vm_runtimes (vm_id, vm_state, user_state, blocked) "
                "VALUES (%s, 'stopped', 'disconnected', false)", (vm_id,))
    cur.execute("INSERT INTO vm_counters (vm_id) VALUES (%s)", (vm_id,))


def set_vms_blocked(cur, vm_ids, blocked):
    """Fragment: block or unblock VMs (a blocked VM takes no new session)."""
    cur.execute("UPDATE vm_runtimes SET blocked = %s WHERE vm_id = ANY(%s)", (blocked, list(vm_ids)))


def set_vm_expirations(cur, vm_ids, expiry):
    """Fragment: expiry = {'vm_expiration_soft'|'vm_expiration_hard': datetime or None}."""
    for column, value in expiry.items():
        if column not in ("vm_expiration_soft", "vm_expiration_hard"):
            raise ValueError(f"not an expiration column: {column}")
        cur.execute(f"UPDATE vm_runtimes SET {column} = %s WHERE vm_id = ANY(%s)", (value, list(vm_ids)))


def take_vm_commands(db, host_id):
    """The HKD's intake, as the original's atomic UPDATE ... RETURNING: stop commands
    (cleared), then start commands of stopped VMs (cleared, state 'starting').
    Returns (stop vm_ids, start vm_ids)."""
    stops = db.query("UPDATE vm_runtimes SET vm_cmd = NULL WHERE host_id = %s AND vm_cmd = 'stop' "
                     "RETURNING vm_id", (host_id,))
    starts = db.query("UPDATE vm_runtimes SET vm_cmd = NULL, vm_state = 'starting', vm_state_ts = %s "
                      "WHERE host_id = %s AND vm_cmd = 'start' AND vm_state = 'stopped' RETURNING vm_id",
                      (now_epoch(), host_id))
    return [r[0] for r in stops], [r[0] for r in starts]


def vms_assigned(db, vm_ids, host_id):
    """The subset of vm_ids the database still assigns to host_id."""
    return {r[0] for r in db.query("SELECT vm_id FROM vm_runtimes WHERE vm_id = ANY(%s) AND host_id = %s",
                                   (list(vm_ids), host_id))}


def prepare_vm(cur, vm_id, host_id, address, vma_port, x_port, ssh_port, di_id):
    """Fragment: record the ports and DI of a VM about to start on host_id, and count the
    attempt. False when the VM is no longer assigned to host_id."""
    cur.execute("UPDATE vm_runtimes SET vm_address = %s, vm_vma_port = %s, vm_x_port = %s, vm_ssh_port = %s, "
                "vm_vnc_port = 0, vm_serial_port = 0, vm_mon_port = 0, vm_pid = NULL, current_di_id = %s "
                "WHERE vm_id = %s AND host_id = %s",
                (address, vma_port, x_port, ssh_port, di_id, vm_id, host_id))
    if cur.rowcount != 1:
        return False
    cur.execute("INSERT INTO vm_counters (vm_id, run_attempts, run_ok) VALUES (%s, 1, 0) "
                "ON CONFLICT (vm_id) DO UPDATE SET run_attempts = vm_counters.run_attempts + 1", (vm_id,))
    return True


def set_vm_launched(db, vm_id, host_id, address, pid):
    """Record where the launched VM lives. False when the row went to another node."""
    return db.execute("UPDATE vm_runtimes SET vm_address = %s, vm_pid = %s WHERE vm_id = %s AND host_id = %s",
                      (address, pid, vm_id, host_id)) == 1


def _set_state_tx(cur, vm_id, host_id, state, run_ok):
    cur.execute("UPDATE vm_runtimes SET vm_state = %s, vm_state_ts = %s WHERE vm_id = %s AND host_id = %s",
                (state, now_epoch(), vm_id, host_id))
    if cur.rowcount != 1:
        return False
    if run_ok:
        cur.execute("UPDATE vm_counters SET run_ok = run_ok + 1 WHERE vm_id = %s", (vm_id,))
    return True


def set_vm_state(db, vm_id, host_id, state, run_ok=False):
    """vm_state of a VM on host_id (run_ok: count a successful start). False when the row
    went to another node."""
    return db.transaction(_set_state_tx, vm_id, host_id, state, run_ok)


_CLEARED_VM = ("vm_state = 'stopped', host_id = NULL, vm_vma_port = NULL, vm_x_port = NULL, vm_ssh_port = NULL, "
               "vm_vnc_port = NULL, vm_serial_port = NULL, vm_mon_port = NULL, vm_address = NULL, "
               "vm_expiration_soft = NULL, vm_expiration_hard = NULL, current_di_id = NULL")


def _clear_vm_tx(cur, vm_id, host_id):
    read_committed(cur)
    cur.execute("UPDATE vm_runtimes SET " + _CLEARED_VM + ", vm_cmd = NULL WHERE vm_id = %s AND host_id = %s",
                (vm_id, host_id))
    cleared = cur.rowcount
    if cleared:
        _forget_agent_keys(cur, [vm_id])
    return cleared


def clear_vm(db, vm_id, host_id):
    """A VM that stopped on host_id: 'stopped', unassigned, no ports, no pending command,
    its agent's secret forgotten. Returns the rows cleared (0: the row went elsewhere)."""
    return db.transaction(_clear_vm_tx, vm_id, host_id)


# --- VM agent secrets (ours, docs/hkd.md#vma-secret) ---------------------------------------
# A new secret is made at each start of a VM, by the node that starts it, and is gone when
# the VM's row is cleared: the L7R of any node reads it to call that VM's agent.
def set_vm_agent_key(cur, vm_id, secret):
    """Fragment (the HKD preparing a start, after prepare_vm succeeded): the secret the VM's
    agent requires from now on; None: it runs without one (vm.vma.legacy_unauthenticated)."""
    if secret is None:
        _forget_agent_keys(cur, [vm_id])
        return
    cur.execute("INSERT INTO vm_agent_keys (vm_id, secret, created) VALUES (%s, %s, %s) "
                "ON CONFLICT (vm_id) DO UPDATE SET secret = EXCLUDED.secret, created = EXCLUDED.created",
                (vm_id, secret, now_epoch()))


def read_vm_agent_key(cur, vm_id):
    """Fragment: the secret of the VM's agent, or None (not running, or running without one)."""
    cur.execute("SELECT secret FROM vm_agent_keys WHERE vm_id = %s", (vm_id,))
    row = cur.fetchone()
    return row[0] if row else None


def vm_agent_key(db, vm_id):
    """The secret of the VM's agent, or None (not running, or running without one)."""
    return db.transaction(read_vm_agent_key, vm_id)


def vm_agent_keys(db, vm_ids):
    """{vm_id: secret} of those VMs that have one."""
    return dict(db.query("SELECT vm_id, secret FROM vm_agent_keys WHERE vm_id = ANY(%s)", (list(vm_ids),)))


def _forget_agent_keys(cur, vm_ids):
    if vm_ids:
        cur.execute("DELETE FROM vm_agent_keys WHERE vm_id = ANY(%s)", (list(vm_ids),))


# --- hosts ---------------------------------------------------------------------------------
def create_host_runtime(cur, host_id):
    """Fragment: the runtime and counters rows of a new host (stopped, unblocked)."""
    ensure_host_runtime(cur, host_id)
    cur.execute("INSERT INTO host_counters (host_id) VALUES (%s) ON CONFLICT (host_id) DO NOTHING", (host_id,))


def ensure_host_runtime(cur, host_id):
    """Fragment: a host_runtimes row for host_id, stopped and unblocked unless it exists."""
    cur.execute("INSERT INTO host_runtimes (host_id, state, blocked) VALUES (%s, 'stopped', false) "
                "ON CONFLICT (host_id) DO NOTHING", (host_id,))


def set_hosts_blocked(cur, host_ids, blocked):
    """Fragment: block or unblock hosts (a blocked host gets no new VM)."""
    cur.execute("UPDATE host_runtimes SET blocked = %s WHERE host_id = ANY(%s)", (blocked, list(host_ids)))


def host_starting(db, host_id, pid):
    """The node's HKD starts: state 'starting', its pid; a stale command of an earlier run dropped."""
    db.execute("UPDATE host_runtimes SET state = 'starting', pid = %s, cmd = NULL WHERE host_id = %s", (pid, host_id))


def set_host_state(db, host_id, state):
    """The node's own state; never over 'lost' (only a restart, host_starting, leaves that)."""
    db.execute("UPDATE host_runtimes SET state = %s WHERE host_id = %s AND state <> 'lost'", (state, host_id))


def set_host_capacity(db, host_id, ram_mb, cpu):
    """What the load balancer places by (usable_ram, usable_cpu)."""
    db.execute("UPDATE host_runtimes SET usable_ram = %s, usable_cpu = %s WHERE host_id = %s", (ram_mb, cpu, host_id))


def host_state(db, host_id):
    """(state, blocked) of the host, or None without a runtime row (one round trip)."""
    rows = db.statement("SELECT state, blocked FROM host_runtimes WHERE host_id = %s", (host_id,))
    return rows[0] if rows else None


def heartbeat(db, host_id, pid):
    """ok_ts = now. False when the cluster marked this host lost (its VMs were released)."""
    return db.query_one("UPDATE host_runtimes SET ok_ts = now() AT TIME ZONE 'UTC', pid = %s "
                        "WHERE host_id = %s AND state <> 'lost' RETURNING 1", (pid, host_id)) is not None


def _take_host_command_tx(cur, host_id):
    cur.execute("SELECT cmd FROM host_runtimes WHERE host_id = %s", (host_id,))
    row = cur.fetchone()
    cmd = row[0] if row else None
    if cmd is not None:
        cur.execute("UPDATE host_runtimes SET cmd = NULL WHERE host_id = %s AND cmd = %s", (host_id, cmd))
    return cmd


def take_host_command(db, host_id):
    """The pending host command (e.g. 'stop'), cleared; None without one."""
    return db.transaction(_take_host_command_tx, host_id)


def mark_lost_hosts(cur, my_host_id, node_timeout):
    """Fragment, one pass of the cluster monitor: hosts whose heartbeat is older than
    node_timeout become 'lost'; their VMs are cleared and their sessions released; sessions
    still connected to a stopped VM are told to end (the original wrote user_cmd = NULL there
    and notified nobody: docs/differences.md). Returns (lost host ids, freed vm ids, hosts
    notified)."""
    cur.execute("UPDATE host_runtimes SET state = 'lost' "
                "WHERE state NOT IN ('stopped', 'starting', 'lost') AND host_id <> %s "
                "AND (ok_ts IS NULL OR extract(epoch FROM (now() AT TIME ZONE 'UTC') - ok_ts) > %s) "
                "RETURNING host_id", (my_host_id, node_timeout))
    lost = [r[0] for r in cur.fetchall()]
    cur.execute("UPDATE vm_runtimes SET " + _CLEARED_VM + ", vma_ok_ts = NULL "
                "WHERE vm_state <> 'stopped' AND host_id IN (SELECT host_id FROM host_runtimes WHERE state = 'lost') "
                "RETURNING vm_id")
    freed = [r[0] for r in cur.fetchall()]
    _forget_agent_keys(cur, freed)
    cur.execute(_RELEASE + " WHERE user_state <> 'disconnected' "
                "AND l7r_host_id IN (SELECT host_id FROM host_runtimes WHERE state = 'lost') RETURNING vm_id",
                (now_epoch(),))
    _revoke_session_tokens(cur, [r[0] for r in cur.fetchall()])
    cur.execute("UPDATE vm_runtimes SET user_cmd = 'abort' WHERE user_state = 'connected' "
                "AND vm_state = 'stopped' AND user_cmd IS NULL AND l7r_host_id IS NOT NULL "
                "RETURNING l7r_host_id")
    hosts = sorted({r[0] for r in cur.fetchall()})
    for host_id in hosts:
        notify(cur, user_commands_channel(host_id), "")
    return lost, freed, hosts


# --- tokens and stored authentication parameters ---------------------------------------------
# A token is stored as its SHA-256 (a token has ~256 bits of entropy, so a plain hash is
# enough: nothing to brute-force); whoever reads the table learns no usable token.
# A token bound to a VM is a session credential: it is handed to that VM's desktop and is
# revoked whenever that VM's session row is released (every release path below does it).
def new_token():
    """~256 bits in base62, like the original's Session::Token."""
    return "".join(secrets.choice(_ALNUM) for _ in range(43))


def token_digest(token):
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def store_auth_params(cur, params):
    """Fragment: keep a login's parameters for later (authenticate_user?store_auth); its id."""
    cur.execute("INSERT INTO user_auth_parameters (parameters) VALUES (%s) RETURNING id", (json.dumps(params),))
    return cur.fetchone()[0]


def session_params(db, vm_id, host_id, user_id, login, params, lifetime, with_key):
    """What x_start needs from the database, and the session's token stored, in one round
    trip (functions.sql, qvd_session_params_v1): (host address, agent key, the VM's combined
    properties, token), or None when with_key and the VM has no agent key (nothing written).
    The token's login parameters are stored only when they say more than the login, which
    redeem_token adds by itself."""
    token = new_token()
    extra = None if params == {"qvd.vm.user.name": login} else json.dumps(params)
    rows = db.statement("SELECT * FROM qvd_session_params_v1(%s, %s, %s, %s, %s, %s, %s)",
                        (vm_id, host_id, user_id, token_digest(token), now_epoch() + lifetime, extra, with_key))
    address, agent_key, properties = rows[0]
    if with_key and agent_key is None:
        return None
    return address, agent_key, properties or {}, token


def functions_sql():
    return resources.files("qvd_gevent.db").joinpath("functions.sql").read_text()


def install_functions_tx(cur):
    """Fragment, alone in its transaction: install_functions' work."""
    sql = functions_sql()
    digest = "sha256:" + hashlib.sha256(sql.encode("utf-8")).hexdigest()
    cur.execute("SELECT pg_advisory_xact_lock(hashtext('qvd_gevent functions.sql'))")
    cur.execute("SELECT obj_description(p.oid, 'pg_proc') FROM pg_proc p WHERE p.proname = 'qvd_claim_session_v2'")
    row = cur.fetchone()
    if row is not None and row[0] == digest:
        return False
    cur.execute(sql)
    cur.execute("COMMENT ON FUNCTION qvd_claim_session_v2(integer, integer, integer, integer, boolean, integer) "
                "IS %s", (digest,))
    return True


def install_functions(db):
    """Create or replace the server-side steps of functions.sql unless the database has this
    very version already (its digest is the comment of qvd_claim_session_v2). Nodes starting
    together take turns (an advisory lock): concurrent CREATE OR REPLACE of one function
    fails with "tuple concurrently updated". Returns whether it installed.
    READ COMMITTED: the digest is read after the lock is ours, so it shows what the one
    before us installed (a SERIALIZABLE snapshot would be as old as the wait for the lock,
    and a second installer would install again)."""
    def tx(cur):
        read_committed(cur)
        return install_functions_tx(cur)
    return db.transaction(tx)


def issue_token(cur, user_id, params, lifetime, vm_id=None, multi_use=True):
    """Fragment: a new bearer token for user_id, valid lifetime seconds, carrying params
    (bound to vm_id when given). Returns (token, auth_params_id); only its digest is stored."""
    params_id = store_auth_params(cur, params)
    token = new_token()
    cur.execute("INSERT INTO user_tokens (token, user_id, vm_id, expiration, auth_params_id, multi_use) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (token_digest(token), user_id, vm_id, now_epoch() + lifetime, params_id, multi_use))
    return token, params_id


class TokenGrant:
    """What a valid token stands for."""
    __slots__ = ("user_id", "vm_id", "login", "tenant_id", "params")

    def __init__(self, user_id, vm_id, login, tenant_id, params):
        self.user_id = user_id
        self.vm_id = vm_id
        self.login = login
        self.tenant_id = tenant_id
        self.params = params


def redeem_token(db, token):
    """(None, TokenGrant) for a valid token (a single-use one is spent by this, atomically),
    else (reason, None) with reason unknown_token / expired_token (deleted) / user_blocked /
    tenant_blocked. A valid multi-use token costs one round trip."""
    digest = token_digest(token)
    rows = db.statement("SELECT t.user_id, t.vm_id, t.expiration, t.multi_use, p.parameters, "
                        "u.login, u.tenant_id, u.blocked, tn.blocked "
                        "FROM user_tokens t JOIN users u ON u.id = t.user_id JOIN tenants tn ON tn.id = u.tenant_id "
                        "LEFT JOIN user_auth_parameters p ON p.id = t.auth_params_id WHERE t.token = %s", (digest,))
    if not rows:
        return "unknown_token", None
    user_id, vm_id, expiration, multi_use, params, login, tenant_id, user_blocked, tenant_blocked = rows[0]
    now = now_epoch()
    if now > expiration:
        db.statement("DELETE FROM user_tokens WHERE token = %s AND expiration < %s", (digest, now))
        return "expired_token", None
    if tenant_blocked:
        return "tenant_blocked", None
    if user_blocked:
        return "user_blocked", None
    if not multi_use and not db.statement("UPDATE user_tokens SET expiration = 0 WHERE token = %s "
                                          "AND expiration >= %s RETURNING 1", (digest, now)):
        return "expired_token", None            # spent by a concurrent use a moment ago
    if isinstance(params, str):
        params = json.loads(params)
    return None, TokenGrant(user_id, vm_id, login, tenant_id, params or {})


def revoke_token(db, token):
    """The token stops working at once. Returns whether it existed."""
    return db.execute("DELETE FROM user_tokens WHERE token = %s", (token_digest(token),)) == 1


def revoke_user_tokens(cur, user_ids):
    """Fragment: every token of these users stops working (password change, block)."""
    cur.execute("DELETE FROM user_tokens WHERE user_id = ANY(%s)", (list(user_ids),))
    return cur.rowcount


def _revoke_session_tokens(cur, vm_ids):
    if vm_ids:
        cur.execute("DELETE FROM user_tokens WHERE vm_id = ANY(%s)", (list(vm_ids),))


def purge_tokens(db, orphans_up_to=None):
    """The sweep: expired tokens go, and stored parameters that no token refers to, if their
    id is at most orphans_up_to (the highest id seen by the previous sweep: a row just stored
    by authenticate_user?store_auth is left one sweep period). Returns (tokens, parameters,
    highest parameters id now)."""
    def tx(cur):
        read_committed(cur)
        cur.execute("DELETE FROM user_tokens WHERE expiration < %s", (now_epoch(),))
        tokens = cur.rowcount
        params = 0
        if orphans_up_to is not None:
            cur.execute("DELETE FROM user_auth_parameters p WHERE p.id <= %s AND NOT EXISTS "
                        "(SELECT 1 FROM user_tokens t WHERE t.auth_params_id = p.id)", (orphans_up_to,))
            params = cur.rowcount
        cur.execute("SELECT coalesce(max(id), 0) FROM user_auth_parameters")
        return tokens, params, cur.fetchone()[0]
    return db.transaction(tx)
