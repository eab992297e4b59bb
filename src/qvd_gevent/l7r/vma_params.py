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


class SessionParams:
    """What one connect hands its VM: the x_start parameters, the VM's agent key (None with
    vm.vma.legacy_unauthenticated) and the one-time display key (docs/protocol.md#display-gate)."""
    __slots__ = ("params", "agent_key", "display_key")

    def __init__(self, params, agent_key, display_key):
        self.params = params
        self.agent_key = agent_key
        self.display_key = display_key


def session_vma_params(db, host_id, vm_id, auth, client_params, auth_vars, lifetime, slave, legacy, front_params=None,
                       generation=None):
    """The SessionParams of one connect, or None when the VM runs without the agent key it
    needs. Issues the session's token (bound to the VM, revoked when the session row is
    released) in the same round trip (db/runtime.py session_params). front_params: the client
    end's own, the last word."""
    found = runtime.session_params(db, vm_id, host_id, auth.user_id, auth.login, auth.params, lifetime,
                                   with_key=not legacy)
    if found is None:
        return None
    host_address, agent_key, properties, token = found
    client = dict(client_params)
    client.update({f"auth.{name}": value for name, value in auth_vars.items()})
    client["auth_token"] = token
    client["host_address"] = host_address or ""
    params = merge_vma_params(client, properties, auth.params, slave)
    params.update(front_params or {})
    # a one-time key for this connect: the VM's display admits one connection with it, and
    # arming it ends the connection of the session before
    display_key = None if agent_key is None else display_gate.new_key()
    if display_key is not None:
        params[display_gate.PARAM] = display_key
        if generation is not None:
            # the gate serves the newest claim only: an x_start of an older one is refused
            params[display_gate.GENERATION_PARAM] = str(generation)
    return SessionParams(params, agent_key, display_key)
