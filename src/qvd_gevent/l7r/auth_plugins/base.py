"""The interface every authentication plugin implements (docs: README "Directory login").

A basic login runs through the chain ``l7r.auth.plugins.head`` + ``l7r.auth.plugins`` +
``l7r.auth.plugins.tail``, as the original's Authenticator does:

1. the first plugin whose ``split_password`` returns a pair splits off a one-time code;
2. each plugin in order may accept the password (``authenticate_basic``); on the first
   that does, a one-time code (if any) must be accepted by some ``authenticate_2f``,
   then every ``after_authenticate_basic`` runs (e.g. auto-provisioning), and the
   ``users`` row (login, tenant) must exist; if it does not, the next plugin is tried.

A plugin that cannot reach what it depends on raises ``AuthUnavailable``: the login then
gets 503 "retry later" unless a later plugin accepts it, and the failure is not held
against the user by the throttle.
"""
from ..http import HttpError


class AuthFailed(Exception):
    """401. reason is a metrics label; never contains a secret."""

    def __init__(self, reason, login=None):
        super().__init__(reason)
        self.reason = reason
        self.login = login


class AuthUnavailable(HttpError):
    """A plugin's back end (the directory) is down, slow or misconfigured: 503, not 401."""

    def __init__(self, what):
        super().__init__(503, "The authentication service is not available, retry later",
                         headers=[("Retry-After", "5")])
        self.what = what   # for the log only: the client is told no more than "retry later"


class Attempt:
    """One basic login on its way through the chain.

    login: normalised login (a plugin may replace it, e.g. by the directory's uid);
    tenant_id: the tenant's id; params: authentication parameters handed to the VM
    (``qvd.vm.user.*``); user: (id, blocked) of the users row once known, else None;
    stored_password: that row's password hash (the default plugin's business only);
    refusal_is_503: an earlier plugin could not decide, so a refusal now ends in 503 for
    any login, and work done only to make refusals take equally long can be skipped.
    Each plugin gets a fresh Attempt, so one that fails leaves nothing to the next.
    """

    __slots__ = ("login", "tenant", "tenant_id", "params", "user", "stored_password", "refusal_is_503")

    def __init__(self, login, tenant, tenant_id, user=None, stored_password=None, refusal_is_503=False):
        self.login = login
        self.tenant = tenant
        self.tenant_id = tenant_id
        self.params = {}
        self.user = user
        self.stored_password = stored_password
        self.refusal_is_503 = refusal_is_503


class AuthPlugin:
    """Every hook does nothing by default; a plugin overrides the ones it needs."""

    name = "base"

    def split_password(self, attempt, password):
        """(password, one-time code) when this plugin takes a code off the password, else None."""
        return None

    def authenticate_basic(self, attempt, password):
        """True when this plugin accepts the password. May raise AuthUnavailable."""
        return False

    def authenticate_2f(self, attempt, code):
        """True when this plugin accepts the one-time code."""
        return False

    def after_authenticate_basic(self, attempt):
        """Runs after a plugin accepted the password (and the code)."""

    def close(self):
        """Release what the plugin holds (connections); called when the chain is rebuilt."""
