"""What a VM's agent gets at ``x_start`` (docs/protocol.md#vma-parameters), and the slave key.

Later sources override earlier ones: the client's ``qvd.client.*``/``custom.*`` values
(plus ``auth.<name>`` from ``Auth-<hex>`` headers, the session's token and this node's
address) < the VM's combined properties (OSF < DI < user < VM) < the login's parameters
< ``qvd.slave.key`` < the client end's own (a browser session's ``qvd.display.protocol``).
So a client cannot set ``qvd.vm.user.name`` or the slave key.
"""
import secrets
import string

from ..db import runtime
from ..vma import display_gate
from .auth_plugins.totp import PRIVATE_PREFIX as PRIVATE_PROPERTY_PREFIX  # a user's TOTP secret stays off the VM

_ALNUM = string.ascii_letters + string.digits


def slave_key():
    """64 characters [A-Za-z0-9] from a CSPRNG (the original used Perl's rand: docs/differences.md#slave-key-csprng)."""
    return "".join(secrets.choice(_ALNUM) for _ in range(64))


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


class SessionParams:
    """What one connect hands its VM: the x_start parameters, the VM's agent key (None with
    vm.vma.legacy_unauthenticated) and the one-time display key (docs/protocol.md#display-gate)."""
    __slots__ = ("params", "agent_key", "display_key")

    def __init__(self, params, agent_key, display_key):
        self.params = params
        self.agent_key = agent_key
        self.display_key = display_key


def session_vma_params(db, host_id, vm_id, auth, client_params, auth_vars, lifetime, slave, legacy, front_params=None):
    """The SessionParams of one connect, or None when the VM runs without the agent key it
    needs. Issues the session's token (bound to the VM, revoked when the session row is
    released) in the same transaction. front_params: the client end's own, the last word."""
    def tx(cur):
        runtime.read_committed(cur)
        cur.execute("SELECT address FROM hosts WHERE id = %s", (host_id,))
        host_row = cur.fetchone()
        agent_key = None if legacy else runtime.read_vm_agent_key(cur, vm_id)
        if agent_key is None and not legacy:
            return None
        token, _ = runtime.issue_token(cur, auth.user_id, auth.params, lifetime, vm_id=vm_id)
        return host_row, token, combined_properties(cur, vm_id), agent_key
    found = db.transaction(tx)
    if found is None:
        return None
    host_row, token, properties, agent_key = found
    client = dict(client_params)
    client.update({f"auth.{name}": value for name, value in auth_vars.items()})
    client["auth_token"] = token
    client["host_address"] = host_row[0] if host_row else ""
    params = merge_vma_params(client, properties, auth.params, slave)
    params.update(front_params or {})
    # a one-time key for this connect: the VM's display admits one connection with it, and
    # arming it ends the connection of the session before
    display_key = None if agent_key is None else display_gate.new_key()
    if display_key is not None:
        params[display_gate.PARAM] = display_key
    return SessionParams(params, agent_key, display_key)
