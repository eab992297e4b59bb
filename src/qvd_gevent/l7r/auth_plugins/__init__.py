"""Authentication plugins of the L7R, by the names ``l7r.auth.plugins`` uses.

``default`` (the users table) lives in l7r.auth; ``ldap``, ``auto`` and ``TOTP`` here,
one module each, behind the interface in base.py, run in order by chain.py.
"""
from .base import Attempt, AuthFailed, AuthPlugin, AuthUnavailable
from .chain import PluginChain, plugin_names

__all__ = ["Attempt", "AuthFailed", "AuthPlugin", "AuthUnavailable", "PluginChain", "plugin_names"]
