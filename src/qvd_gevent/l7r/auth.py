"""Authentication of L7R requests (docs/protocol.md#authentication).

Basic ``login@tenant`` / ``login#tenant`` against ``users.password`` (the original's
salted SHA-256 form, upgraded to scrypt on the next good login, or scrypt), bearer tokens
from ``user_tokens`` (expiry, ``multi_use`` honoured), ``Auth-<hex>`` extra variables,
blocked tenants and users, and throttling of failures. Password hashing runs in gevent's
threadpool (scrypt takes tens of milliseconds and releases the GIL), never on the hub.

Deliberate differences from the original: tokens honour ``multi_use``; the tenant is
validated by its normalised name; a throttled login gets 429 (docs/differences.md).
"""
import base64
import binascii
import contextvars
import logging
import re
import secrets
import time

import gevent.event
import gevent.lock
import gevent.threadpool
import psycopg2

from ..db import DatabaseUnavailable, runtime
from ..db.passwords import hash_password, is_legacy, verify_password
from ..common import metrics
from .auth_plugins import AuthFailed, AuthPlugin, PluginChain
from .throttle import Ticket

log = logging.getLogger("qvd.l7r.auth")
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


class Throttled(Exception):
    """429: too many failures (what = 'address' or 'login'), or too many logins at once
    from one address (what = 'concurrent')."""

    def __init__(self, what):
        super().__init__(what)
        self.what = what


class LoginsBusy(Exception):
    """503: the node's password-hashing queue is full; the client should retry later."""


class AuthResult:
    __slots__ = ("user_id", "login", "tenant_id", "params", "token_vm_id", "by_token")

    def __init__(self, user_id, login, tenant_id, params, token_vm_id=None, by_token=False):
        self.user_id = user_id
        self.login = login
        self.tenant_id = tenant_id
        self.params = params
        self.token_vm_id = token_vm_id
        self.by_token = by_token


# --- pure parsing ---------------------------------------------------------------------
def parse_authorization(value):
    """('basic', login, password) | ('bearer', token) | None."""
    if not value:
        return None
    scheme, _, rest = value.strip().partition(" ")
    rest = rest.strip()
    scheme = scheme.lower()
    if scheme == "basic":
        try:
            decoded = base64.b64decode(rest, validate=False).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        login, sep, password = decoded.partition(":")
        if not sep or not login:
            return None
        return ("basic", login, password)
    if scheme == "bearer":
        # create_auth_token's value may come back with or without its trailing newline
        try:
            token = base64.b64decode(rest.strip(), validate=False).decode("utf-8").strip()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        return ("bearer", token) if token else None
    return None


def parse_auth_headers(headers):
    """Auth-<hex name>: <base64 value> headers -> {name: value} (bad ones skipped)."""
    out = {}
    for name, value in headers:
        if name.lower().startswith("auth-"):
            try:
                key = bytes.fromhex(name[5:]).decode("utf-8")
                out[key] = base64.b64decode(value.strip()).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                continue
    return out


def split_tenant(login, separators, default_tenant):
    """The default plugin's find_tenant: split at the first separator character."""
    for i, ch in enumerate(login):
        if ch in separators:
            return login[:i], login[i + 1:]
    return login, default_tenant


def normalize(name, case_sensitive):
    name = name.strip()
    return name if case_sensitive else name.lower()


def encode_token_for_client(token):
    """What create_auth_token returns: base64 of the raw token with Perl's trailing newline."""
    return base64.b64encode(token.encode("ascii")).decode("ascii") + "\n"


# --- the authenticator -------------------------------------------------------------------
_hash_pool = None
_dummy_hash = None
_hash_jobs = 0                 # hashes waiting for or running in the pool
HASH_THREADS = 2
HASH_QUEUE = 32
PER_SOURCE = 1                 # hashes one source address may have in the pool at once
WAITING_PER_SOURCE = 100       # ... and waiting for that
_by_source = {}                # source address -> [Semaphore(PER_SOURCE), users]
# the login being checked in this greenlet (an AttemptCount, set by the Authenticator)
current_attempt = contextvars.ContextVar("current_attempt", default=None)


class AttemptCount:
    """How one login is held against its address and login by the throttle: as a failure
    from the moment its password hash starts (so concurrent wrong guesses from one address
    stop at the threshold instead of all being hashed), taken back if it succeeds. An
    attempt that needs no hash (a remembered password, a token) is counted only if it fails.
    Hashes of one address run one at a time (in_threadpool), so concurrent good logins from
    one address never block each other with failures that are only provisional."""
    __slots__ = ("throttle", "address", "login", "fingerprint", "ticket")

    def __init__(self, throttle, address, login, fingerprint):
        self.throttle = throttle
        self.address = address
        self.login = login
        self.fingerprint = fingerprint
        self.ticket = None

    def before_hash(self):
        """Called with the address's hashing slot held: refuse if the failures of the attempts
        ahead throttled us meanwhile, else count this one."""
        if self.ticket is None:
            what = self.throttle.blocked(self.address, self.login, time.monotonic())
            if what:
                metrics.inc("qvd_l7r_auth_failures_total", reason="throttled")
                raise Throttled(what)
            self.ticket = self.throttle.begin(self.address, self.login, self.fingerprint, time.monotonic())

    def failed(self):
        if self.ticket is None:
            self.ticket = self.throttle.begin(self.address, self.login, self.fingerprint, time.monotonic())

    def not_held_against(self):
        if self.ticket is not None:
            self.throttle.forget(self.ticket)

    def succeeded(self):
        self.throttle.succeeded(self.ticket or Ticket([], None), self.address, self.login)


def dummy_hash():
    """A scrypt hash of a random secret: unknown logins are checked against it so that a 401
    takes as long whether or not the login exists (no user enumeration by timing)."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = in_threadpool(hash_password, secrets.token_urlsafe(24))
    return _dummy_hash


def configure_hashing(threads, queue, per_source, waiting_per_source):
    """l7r.auth.hash.threads, l7r.auth.hash.queue, l7r.auth.concurrent_per_address and
    l7r.auth.waiting_per_address (read at L7R start)."""
    global HASH_THREADS, HASH_QUEUE, PER_SOURCE, WAITING_PER_SOURCE, _hash_pool
    HASH_THREADS, HASH_QUEUE = max(1, threads), max(1, queue)
    PER_SOURCE, WAITING_PER_SOURCE = max(1, per_source), max(0, waiting_per_source)
    _by_source.clear()
    if _hash_pool is not None and _hash_pool.maxsize != HASH_THREADS:
        _hash_pool.maxsize = HASH_THREADS


def in_threadpool(fn, *args):
    """Password hashing off the hub, in a small pool of threads: scrypt uses 16 MB per call
    and each thread keeps its own malloc arena, so a small pool bounds that memory (and the
    CPU spent on hashing during a login storm). At most HASH_QUEUE hashes wait or run: past
    that, LoginsBusy (503) at once instead of a queue that grows with the storm. The hashes
    of one source address (login_source) run PER_SOURCE at a time, so a flood from one
    address never holds every thread; more than WAITING_PER_SOURCE waiting get 429."""
    global _hash_pool, _hash_jobs
    if _hash_pool is None:
        _hash_pool = gevent.threadpool.ThreadPool(HASH_THREADS)
    attempt = current_attempt.get()
    source = attempt.address if attempt is not None else None
    entry = None
    if source is not None:
        entry = _by_source.get(source)
        if entry is None:
            entry = _by_source[source] = [gevent.lock.Semaphore(PER_SOURCE), 0]
        if entry[1] >= PER_SOURCE + WAITING_PER_SOURCE:
            metrics.inc("qvd_l7r_auth_failures_total", reason="concurrent")
            raise Throttled("concurrent")
        entry[1] += 1
    try:
        if entry is not None:
            entry[0].acquire()
        try:
            if attempt is not None:
                attempt.before_hash()
            if _hash_jobs >= HASH_QUEUE:
                metrics.inc("qvd_l7r_auth_failures_total", reason="hash_queue_full")
                raise LoginsBusy()
            _hash_jobs += 1
            try:
                return _hash_pool.apply(fn, args)
            finally:
                _hash_jobs -= 1
        finally:
            if entry is not None:
                entry[0].release()
    finally:
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0 and _by_source.get(source) is entry:
                del _by_source[source]


class VerifiedCache:
    """Remembers (keyed hash of login+password) -> the stored hash it matched, so a client
    that reconnects (the original does per attempt) is not re-hashed with scrypt. A change
    of the stored password invalidates the entry by itself."""

    def __init__(self, throttle, size=10000, ttl=300):
        self.throttle = throttle
        self.size = size
        self.ttl = ttl
        self._items = {}

    def _key(self, login, tenant, password):
        return self.throttle.fingerprint("verified", login, tenant, password)

    def matches(self, login, tenant, password, stored, now):
        hit = self._items.get(self._key(login, tenant, password))
        return hit is not None and hit[0] == stored and now - hit[1] < self.ttl

    def remember(self, login, tenant, password, stored, now):
        if len(self._items) >= self.size:
            self._items.clear()
        self._items[self._key(login, tenant, password)] = (stored, now)


class DefaultPlugin(AuthPlugin):
    """The ``default`` plugin: the password stored in the users row."""

    name = "default"

    def __init__(self, authenticator):
        self.authenticator = authenticator

    def authenticate_basic(self, attempt, password):
        return self.authenticator.check_stored_password(attempt, password)


class Authenticator:
    def __init__(self, cfg, db, throttle, host_id_fn, counters):
        self.cfg = cfg
        self.db = db
        self.throttle = throttle
        self.host_id_fn = host_id_fn
        self.counters = counters
        self.verified = VerifiedCache(throttle)
        self.chain = PluginChain(cfg, db, DefaultPlugin(self))
        self._verifying = {}       # credentials being hashed now -> AsyncResult (one hash for all)
        self._upgrading = set()    # user ids whose legacy hash is being replaced by scrypt
        configure_hashing(cfg.get_int("l7r.auth.hash.threads"), cfg.get_int("l7r.auth.hash.queue"),
                          cfg.get_int("l7r.auth.concurrent_per_address"), cfg.get_int("l7r.auth.waiting_per_address"))

    def close(self):
        self.chain.close()

    def authenticate(self, request, peer_ip, cache):
        """Return AuthResult or raise AuthFailed / Throttled. cache: per-connection dict."""
        creds = parse_authorization(request.header("authorization"))
        if creds is None:
            metrics.inc("qvd_l7r_auth_failures_total", reason="no_credentials")
            raise AuthFailed("no_credentials")
        fp = self.throttle.fingerprint(*creds)
        cached = cache.get("auth")
        if cached is not None and cached[0] == fp:
            return cached[1]
        now = time.monotonic()
        login_key = None
        if creds[0] == "basic":
            login, tenant = split_tenant(creds[1], self.cfg.get_str("l7r.auth.plugin.default.separators"),
                                         self.cfg.get_str("l7r.auth.plugin.default.tenant"))
            cs = self.cfg.get_bool("model.user.login.case-sensitive")
            login, tenant = normalize(login, cs), normalize(tenant, cs)
            login_key = f"{login}@{tenant}"
        if creds[0] == "basic" and not creds[2]:
            # costs no hash and guesses nothing: refused, not counted against anyone
            metrics.inc("qvd_l7r_auth_failures_total", reason="empty_password")
            raise AuthFailed("empty_password", login)
        self._refuse_if_throttled(peer_ip, login_key, now)
        attempt = AttemptCount(self.throttle, peer_ip, login_key, fp)
        token = current_attempt.set(attempt)
        try:
            if creds[0] == "basic":
                result = self._counted(attempt, self._basic, login, tenant, creds[2])
            else:
                result = self._counted(attempt, self._bearer, creds[1])
        finally:
            current_attempt.reset(token)
        cache["auth"] = (fp, result)
        self.counters("auth_ok")
        return result

    def _refuse_if_throttled(self, peer_ip, login_key, now):
        what = self.throttle.blocked(peer_ip, login_key, now)
        if what:
            metrics.inc("qvd_l7r_auth_failures_total", reason="throttled")
            raise Throttled(what)

    def _counted(self, attempt, check, *args):
        """Run check(*args); the throttle holds it against the address and login as
        AttemptCount says."""
        self.counters("auth_attempts")
        try:
            result = check(*args)
        except AuthFailed as exc:
            metrics.inc("qvd_l7r_auth_failures_total", reason=exc.reason)
            if exc.reason in ("user_blocked", "tenant_blocked"):
                attempt.not_held_against()
            else:
                attempt.failed()
            raise
        except BaseException:
            attempt.not_held_against()      # directory down, queue full, database: nobody's fault
            raise
        attempt.succeeded()
        return result

    def _basic(self, login, tenant, password):
        if not password:
            raise AuthFailed("empty_password", login)
        if _CONTROL_CHARACTERS.search(login) or _CONTROL_CHARACTERS.search(tenant):
            raise AuthFailed("control_characters")   # no such login, and nothing a DB or directory should see
        plugins = self.chain.plugins()
        row = self.db.query_one(
            "SELECT t.id, t.blocked, u.id, u.password, u.blocked FROM tenants t "
            "LEFT JOIN users u ON u.tenant_id = t.id AND u.login = %s WHERE t.name = %s",
            (login, tenant))
        if row is None or row[0] in (0, -1):
            in_threadpool(verify_password, password, dummy_hash(), self.cfg.get_str("l7r.auth.plugin.default.salt"))
            raise AuthFailed("unknown_tenant", login)  # same cost as a wrong password
        tenant_id, tenant_blocked, user_id, stored, user_blocked = row
        user = None if user_id is None else (user_id, user_blocked)
        user_id, login, params = self.chain.authenticate_basic(plugins, login, tenant, tenant_id, tenant_blocked,
                                                               user, stored, password)
        return AuthResult(user_id, login, tenant_id, params)

    def _verify_once(self, login, tenant, password, stored, salt):
        """verify_password, but concurrent checks of the same credentials against the same
        stored hash share one hash (a client's parallel connections, a launcher's burst)."""
        key = (self.verified._key(login, tenant, password), stored)
        pending = self._verifying.get(key)
        if pending is not None:
            return pending.get()
        pending = self._verifying[key] = gevent.event.AsyncResult()
        try:
            ok = in_threadpool(verify_password, password, stored, salt)
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        finally:
            if self._verifying.get(key) is pending:
                del self._verifying[key]
        pending.set(ok)
        return ok

    def check_stored_password(self, attempt, password):
        """The default plugin: the password against users.password (scrypt, or the
        original's salted SHA-256, upgraded here to scrypt)."""
        login, tenant, stored = attempt.login, attempt.tenant, attempt.stored_password
        salt = self.cfg.get_str("l7r.auth.plugin.default.salt")
        if not password:
            raise AuthFailed("empty_password", login)
        if attempt.user is None or not stored:
            if not attempt.refusal_is_503:   # a directory outage must not queue 100s of dummy hashes
                in_threadpool(verify_password, password, dummy_hash(), salt)  # same cost either way
            raise AuthFailed("unknown_user", login)
        now = time.monotonic()
        if not self.verified.matches(login, tenant, password, stored, now):
            if not self._verify_once(login, tenant, password, stored, salt):
                if is_legacy(stored):
                    # the original's SHA-256 fails in microseconds: pay what a scrypt user or an
                    # unknown login pays, or timing tells which logins exist and how they are stored
                    in_threadpool(verify_password, password, dummy_hash(), salt)
                raise AuthFailed("bad_password", login)
            self.verified.remember(login, tenant, password, stored, now)
        if is_legacy(stored) and attempt.user[0] not in self._upgrading:
            # off the login's path and once per user: a burst of logins of one user must not
            # queue one scrypt each (nor count against its address's share of the hashing)
            self._upgrading.add(attempt.user[0])
            gevent.spawn(self._upgrade, attempt.user[0], login, password, stored)
        return True

    def _upgrade(self, user_id, login, password, stored):
        """Replace the original's salted SHA-256 by scrypt, unless the password changed meanwhile."""
        try:
            fresh = in_threadpool(hash_password, password)
            self.db.execute("UPDATE users SET password = %s WHERE id = %s AND password = %s", (fresh, user_id, stored))
            log.info("password hash of user %s upgraded to scrypt", login)
        except (LoginsBusy, DatabaseUnavailable, psycopg2.Error) as exc:
            log.info("password hash of user %s not upgraded yet (%s); next login", login, type(exc).__name__)
        finally:
            self._upgrading.discard(user_id)

    def _bearer(self, token):
        error, grant = runtime.redeem_token(self.db, token)
        if error:
            raise AuthFailed(error)
        params = {"qvd.vm.user.name": grant.login}
        params.update(grant.params)
        return AuthResult(grant.user_id, grant.login, grant.tenant_id, params, grant.vm_id, by_token=True)
