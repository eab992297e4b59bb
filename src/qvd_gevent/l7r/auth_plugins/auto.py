"""The ``auto`` plugin: a user who logged in through another plugin (typically ldap) gets a
``users`` row and a VM at first login, as the original's Auto plugin.

After a password is accepted: the users row (login, tenant) is created when missing, with
no local password; if the user has no VM of the OSF ``auth.auto.osf_id``, one is created
named ``<login>-<i>`` for the first ``i`` in 1..``auth.auto.max_vms`` whose name no VM of
the tenant uses, with DI tag ``auth.auto.di_tag`` and the next free address, exactly as
``qvd-admin vm add`` would (db.provision). It all happens in one SERIALIZABLE transaction,
so two first logins at once make one user and one VM.
"""
import logging

from ...config import ConfigError
from ...config.network import NetworkError
from ...db.provision import add_user, add_vm, used_vm_addresses
from .base import AuthPlugin, AuthUnavailable

log = logging.getLogger("qvd.l7r.auth.auto")


class AutoPlugin(AuthPlugin):
    name = "auto"

    def __init__(self, cfg, db):
        self.db = db
        self.osf_id = cfg.get_int("auth.auto.osf_id")     # no default: ConfigError names the key
        self.di_tag = cfg.get_str("auth.auto.di_tag") or "default"
        self.max_vms = cfg.get_int("auth.auto.max_vms")
        self.network = cfg.vm_network()

    def after_authenticate_basic(self, attempt):
        try:
            made = self.db.transaction(self._provision, attempt.login, attempt.tenant_id)
        except (NetworkError, ConfigError) as exc:
            log.error("auto: cannot give user %s a VM: %s", attempt.login, exc)
            raise AuthUnavailable("auto-provisioning failed") from None
        if made:
            log.info("auto: provisioned %s for user %s", ", ".join(made), attempt.login)

    def _provision(self, cur, login, tenant_id):
        made = []
        cur.execute("SELECT id FROM users WHERE login = %s AND tenant_id = %s", (login, tenant_id))
        row = cur.fetchone()
        if row is None:
            user_id = add_user(cur, login, tenant_id)
            made.append("the user")
        else:
            user_id = row[0]
        cur.execute("SELECT tenant_id FROM osfs WHERE id = %s", (self.osf_id,))
        osf = cur.fetchone()
        if osf is None or osf[0] != tenant_id:
            log.warning("auto: OSF %s (auth.auto.osf_id) %s; user %s gets no VM", self.osf_id,
                        "does not exist" if osf is None else f"belongs to tenant {osf[0]}", login)
            return made
        cur.execute("SELECT 1 FROM vms WHERE user_id = %s AND osf_id = %s", (user_id, self.osf_id))
        if cur.fetchone() is not None:
            return made
        cur.execute("SELECT v.name FROM vms v JOIN users u ON u.id = v.user_id WHERE u.tenant_id = %s"
                    " AND v.name LIKE %s", (tenant_id, _like_prefix(login) + "-%"))
        taken = {r[0] for r in cur.fetchall()}
        for i in range(1, self.max_vms + 1):
            name = f"{login}-{i}"
            if name not in taken and len(name) <= 64:
                ip = self.network.free_vm_address(used_vm_addresses(cur))
                add_vm(cur, name, user_id, self.osf_id, self.di_tag, ip)
                made.append(f"VM {name}")
                return made
        raise NetworkError(f"no free VM name {login}-1 .. {login}-{self.max_vms} (auth.auto.max_vms)")


def _like_prefix(text):
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
