"""The chain of authentication plugins named by ``l7r.auth.plugins`` (with ``.head`` and
``.tail``), and how a basic login runs through it (base.py describes the steps).

Names are matched without regard to case (the original needed exactly ``TOTP`` and
upper-cased only the first letter of the others). An unknown name, or a plugin whose keys
are wrong, makes every basic login answer 503 with the reason in the log: a misspelt
``TOTP`` must not quietly switch a second factor off.
"""
import logging

from ...config import ConfigError
from .base import Attempt, AuthFailed, AuthUnavailable

log = logging.getLogger("qvd.l7r.auth")


def plugin_names(cfg):
    return (cfg.get_list("l7r.auth.plugins.head") + cfg.get_list("l7r.auth.plugins")
            + cfg.get_list("l7r.auth.plugins.tail"))


def _make(name, cfg, db, previous):
    key = name.lower()
    if key == "ldap":
        from .ldap import LdapPlugin
        old = next((p for p in previous if isinstance(p, LdapPlugin)), None)
        return LdapPlugin(cfg, old)
    if key == "auto":
        from .auto import AutoPlugin
        return AutoPlugin(cfg, db)
    if key == "totp":
        from .totp import TotpPlugin
        return TotpPlugin(cfg, db)
    raise ConfigError(f"authentication plugin {name!r} (l7r.auth.plugins) is not available in qvd-gevent")


class PluginChain:
    """The plugins in configuration order, rebuilt when the configuration changes."""

    def __init__(self, cfg, db, default_plugin):
        self.cfg = cfg
        self.db = db
        self.default_plugin = default_plugin
        self._generation = None
        self._plugins = []
        self._error = None

    def plugins(self):
        """The current chain; raises AuthUnavailable while the configuration is unusable."""
        if self._generation != self.cfg.generation:
            self._rebuild()
        if self._error is not None:
            raise AuthUnavailable("configuration")
        return self._plugins

    def _rebuild(self):
        previous = self._plugins
        self._generation = self.cfg.generation
        plugins, error = [], None
        try:
            for name in plugin_names(self.cfg):
                if name.lower() == "default":
                    plugins.append(self.default_plugin)
                else:
                    plugins.append(_make(name, self.cfg, self.db, previous))
        except (ConfigError, ValueError) as exc:
            error = str(exc)
            log.error("authentication refused until the configuration is fixed: %s", exc)
        for plugin in previous:
            if plugin not in plugins:
                plugin.close()
        self._plugins, self._error = (plugins, error) if error is None else ([], error)
        if error is not None:
            for plugin in plugins:
                if plugin not in previous:
                    plugin.close()

    def close(self):
        for plugin in self._plugins:
            plugin.close()
        self._plugins, self._generation = [], None

    def authenticate_basic(self, plugins, login, tenant, tenant_id, tenant_blocked, user, stored, password):
        """(user id, login, params) of the users row the chain accepts; raises AuthFailed (401)
        or AuthUnavailable (503: a plugin could not decide and none accepted).
        user: (id, blocked) of the row for login, or None; stored: its password hash."""
        code = None
        for plugin in plugins:
            split = plugin.split_password(Attempt(login, tenant, tenant_id, user, stored), password)
            if split is not None:
                password, code = split
                break
        failure = unavailable = None
        for plugin in plugins:
            attempt = Attempt(login, tenant, tenant_id, user, stored, refusal_is_503=unavailable is not None)
            try:
                if not plugin.authenticate_basic(attempt, password):
                    continue
            except AuthFailed as exc:
                failure = exc
                continue
            except AuthUnavailable as exc:
                unavailable = exc
                continue
            if attempt.login != login:           # the plugin named the user otherwise (ldap's uid)
                attempt.user = self._user_row(attempt.login, tenant_id)
            if code is not None and not any(p.authenticate_2f(attempt, code) for p in plugins):
                raise AuthFailed("bad_one_time_code", login)
            for hook in plugins:
                hook.after_authenticate_basic(attempt)
            if attempt.user is None:
                attempt.user = self._user_row(attempt.login, tenant_id)
            if attempt.user is None:             # as the original: the next plugin may know the user
                failure = AuthFailed("unknown_user", login)
                continue
            if tenant_blocked:
                raise AuthFailed("tenant_blocked", login)
            if attempt.user[1]:
                raise AuthFailed("user_blocked", login)
            params = {"qvd.vm.user.name": attempt.login}
            params.update(attempt.params)
            return attempt.user[0], attempt.login, params
        if unavailable is not None:
            raise unavailable
        raise failure or AuthFailed("unknown_user", login)

    def _user_row(self, login, tenant_id):
        return self.db.query_one("SELECT id, blocked FROM users WHERE login = %s AND tenant_id = %s",
                                 (login, tenant_id))
