"""The ``TOTP`` plugin: a time-based one-time code (RFC 6238) typed after the password.

As the original: the last ``l7r.auth.plugin.totp.token_size`` characters of the password
are the code; the rest goes to the password plugins. The user's secret is the base32 user
property ``l7r.auth.plugin.totp.secret32``; codes of the time steps from ``leeway`` steps
ago to ``leeway_before`` steps ahead are accepted (``interval`` seconds a step, counted
from ``t0``). The codes themselves come from pyotp.

Unlike the original, a code is accepted once (RFC 6238 section 5.2): the time step of the
last accepted code is kept in the user property ``l7r.auth.plugin.totp.last_counter``,
in the same transaction that accepts a code, so two nodes (or two connections) cannot
both accept it. A client retrying on a new connection therefore needs a fresh code.
"""
import binascii
import hmac
import logging
import time

import pyotp

from ...db.provision import set_user_property, user_property
from .base import AuthPlugin

log = logging.getLogger("qvd.l7r.auth.totp")

SECRET_KEY = "l7r.auth.plugin.totp.secret32"
LAST_COUNTER_KEY = "l7r.auth.plugin.totp.last_counter"
# Properties never handed to a VM (see l7r.vma_params.merge_vma_params).
PRIVATE_PREFIX = "l7r.auth.plugin.totp."


class TotpSettings:
    __slots__ = ("size", "interval", "t0", "leeway", "leeway_before")

    def __init__(self, cfg):
        self.size = cfg.get_int("l7r.auth.plugin.totp.token_size")
        self.interval = cfg.get_int("l7r.auth.plugin.totp.interval")
        self.t0 = cfg.get_int("l7r.auth.plugin.totp.t0")
        self.leeway = cfg.get_int("l7r.auth.plugin.totp.leeway")
        self.leeway_before = cfg.get_int("l7r.auth.plugin.totp.leeway_before")


def matching_step(secret32, code, settings, now):
    """The time step whose code equals code, newest first, or None. Pure: no I/O."""
    try:
        otp = pyotp.HOTP(secret32.replace(" ", "").upper(), digits=settings.size)
        otp.byte_secret()
    except (binascii.Error, ValueError):
        raise ValueError("not base32") from None
    current = int((now - settings.t0) // settings.interval)
    for step in range(current + settings.leeway_before, current - settings.leeway - 1, -1):
        if step >= 0 and hmac.compare_digest(otp.at(step), code):
            return step
    return None


class TotpPlugin(AuthPlugin):
    name = "TOTP"

    def __init__(self, cfg, db):
        self.db = db
        self.settings = TotpSettings(cfg)
        if not 1 <= self.settings.size <= 10 or self.settings.interval < 1:
            raise ValueError("l7r.auth.plugin.totp.token_size must be 1-10 and "
                             "l7r.auth.plugin.totp.interval at least 1")

    def split_password(self, attempt, password):
        size = self.settings.size
        return password[:-size], password[-size:]

    def authenticate_2f(self, attempt, code):
        if attempt.user is None:
            log.info("TOTP: user %s has no users row, so no secret", attempt.login)
            return False
        user_id = attempt.user[0]
        settings = self.settings

        def run(cur):
            secret = user_property(cur, user_id, SECRET_KEY)
            if secret is None:
                return "user has no property " + SECRET_KEY
            try:
                step = matching_step(secret, code, settings, time.time())
            except ValueError:
                return f"property {SECRET_KEY} of the user is not base32"
            if step is None:
                return "wrong or expired code"
            last = user_property(cur, user_id, LAST_COUNTER_KEY)
            if last is not None and last.isdigit() and step <= int(last):
                return "code already used"
            set_user_property(cur, user_id, attempt.tenant_id, LAST_COUNTER_KEY, str(step))
            return None
        refusal = self.db.transaction(run)
        if refusal:
            log.info("TOTP: refused for user %s: %s", attempt.login, refusal)
            return False
        return True
