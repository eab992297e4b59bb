"""The ``ldap`` plugin: a login is accepted when the directory accepts the user's password.

The original's algorithm and keys (``auth.ldap.*``):
1. with ``userbindpattern``, bind as that DN (``%u`` = the login) with the password; success
   ends here;
2. otherwise bind as ``binddn`` (``%u`` substituted; with ``bindpass``, or the user's own
   password when bindpass is empty) or anonymously, search ``base`` with ``filter``
   (``%u`` substituted), ``scope`` and ``deref``; exactly one entry must match;
3. bind as that entry with the password; a refusal whose server message matches
   ``racf_allowregex`` still logs in (RACF reports expired passwords that way) and the
   message goes to the VM as ``qvd.auth.ldap.racf_detailed_error``;
4. the entry's uidNumber, gidNumber, uid and homeDirectory become ``qvd.vm.user.uid``,
   ``.gid``, ``.ldap.name`` and ``.ldap.home``; ``name.normalize`` makes uid the login,
   ``home.set`` makes homeDirectory ``qvd.vm.user.home``.

Deliberate differences: ``%u`` is escaped as a DN value in DNs and as a filter value in
the filter (the original DN-escaped both, leaving ``*``, ``(`` and ``)`` live in filters);
empty passwords never reach the directory (an empty simple bind is an anonymous bind);
certificates are always checked, for ``ldaps://`` and for StartTLS
(``auth.ldap.starttls``) alike, against ``auth.ldap.tls.ca`` or the system's CAs; no
referral is followed; a directory that is down, slow or misconfigured gives 503 "retry
later" (``AuthUnavailable``) within ``auth.ldap.timeout`` seconds, not a 401 or a hang.

ldap3 is pure Python: under gevent's monkey-patching its sockets (and the TLS on them)
wait on the hub, so a login waiting on the directory blocks only its own greenlet.
Connections are pooled (``auth.ldap.pool.size``, which also bounds the logins talking to
the directory at once); the password is handed to ldap3 for the one bind and removed
from the connection object right after it.
"""
import logging
import math
import re
import secrets
import ssl
import urllib.parse

import gevent
import gevent.lock
import ldap3
from ldap3.core import exceptions as ldap_errors
from ldap3.core.results import (RESULT_BUSY, RESULT_INVALID_CREDENTIALS, RESULT_SIZE_LIMIT_EXCEEDED, RESULT_SUCCESS,
                                RESULT_UNAVAILABLE)
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn

from ...config import ConfigError
from .base import AuthPlugin, AuthUnavailable

log = logging.getLogger("qvd.l7r.auth.ldap")

SCOPES = {"base": ldap3.BASE, "one": ldap3.LEVEL, "sub": ldap3.SUBTREE}
DEREFS = {"never": ldap3.DEREF_NEVER, "search": ldap3.DEREF_SEARCH, "find": ldap3.DEREF_BASE,
          "always": ldap3.DEREF_ALWAYS}
ATTRIBUTES = ["uid", "uidNumber", "gidNumber", "homeDirectory"]
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class DirectoryDown(Exception):
    """The directory cannot answer (refused, timed out, TLS failure, busy, misconfigured)."""


# --- pure helpers ----------------------------------------------------------------------------
def parse_host(text):
    """auth.ldap.host as Net::LDAP takes it -> (host, port, use_ssl). host, host:port,
    ldap://host[:port] or ldaps://host[:port]."""
    text = (text or "").strip()
    if not text:
        raise ConfigError("auth.ldap.host is empty")
    if "://" not in text:
        text = "ldap://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
        raise ConfigError(f"auth.ldap.host {text!r}: use host[:port], ldap://host[:port] or ldaps://host[:port]")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"auth.ldap.host {text!r}: bad port") from None
    use_ssl = parts.scheme == "ldaps"
    return parts.hostname, port or (636 if use_ssl else 389), use_ssl


def dn_value(login):
    """The login as an attribute value inside a DN (RFC 4514)."""
    return escape_rdn(login)


def filter_value(login):
    """The login as an assertion value inside a search filter (RFC 4515)."""
    return escape_filter_chars(login)


def racf_allows(regex, code, message):
    """A refused bind still logs in when its server message matches auth.ldap.racf_allowregex."""
    return regex is not None and code == RESULT_INVALID_CREDENTIALS and bool(message) and bool(regex.search(message))


def first_value(attributes, name):
    value = attributes.get(name)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return None if value in (None, "") else str(value)


class LdapSettings:
    """The auth.ldap.* keys, checked once when the chain is built."""

    FIELDS = ("host", "port", "use_ssl", "starttls", "ca", "connect_timeout", "timeout", "pool_size", "base",
              "filter", "scope", "deref", "binddn", "bindpass", "userbindpattern", "racf", "normalize", "home_set",
              "case_sensitive")

    def __init__(self, cfg):
        self.host, self.port, self.use_ssl = parse_host(cfg.get_str("auth.ldap.host"))
        self.starttls = cfg.get_bool("auth.ldap.starttls")
        self.ca = cfg.get_str("auth.ldap.tls.ca") or None
        self.connect_timeout = cfg.get_float("auth.ldap.timeout.connect")
        self.timeout = cfg.get_float("auth.ldap.timeout")
        self.pool_size = max(1, cfg.get_int("auth.ldap.pool.size"))
        self.base = cfg.get_str("auth.ldap.base")
        self.filter = cfg.get_str("auth.ldap.filter") or "(uid=%u)"
        scope = cfg.get_str("auth.ldap.scope") or "base"
        deref = cfg.get_str("auth.ldap.deref") or "never"
        if scope not in SCOPES:
            raise ConfigError(f"auth.ldap.scope {scope!r}: use base, one or sub")
        if deref not in DEREFS:
            raise ConfigError(f"auth.ldap.deref {deref!r}: use never, search, find or always")
        self.scope, self.deref = SCOPES[scope], DEREFS[deref]
        self.binddn = cfg.get_str("auth.ldap.binddn") or None
        self.bindpass = cfg.get_str("auth.ldap.bindpass") or None
        self.userbindpattern = cfg.get_str("auth.ldap.userbindpattern") or None
        racf = cfg.get_str("auth.ldap.racf_allowregex") or None
        try:
            self.racf = re.compile(racf) if racf else None
        except re.error as exc:
            raise ConfigError(f"auth.ldap.racf_allowregex: {exc}") from None
        self.normalize = cfg.get_bool("auth.ldap.name.normalize") or cfg.get_bool("auth.ldap.normalize.name")
        self.home_set = cfg.get_bool("auth.ldap.home.set")
        self.case_sensitive = cfg.get_bool("model.user.login.case-sensitive")
        if self.timeout <= 0 or self.connect_timeout <= 0:
            raise ConfigError("auth.ldap.timeout and auth.ldap.timeout.connect must be positive")

    def same(self, other):
        return other is not None and all(getattr(self, f) == getattr(other, f) for f in self.FIELDS)


# --- connections -----------------------------------------------------------------------------
class _CheckedTls(ldap3.Tls):
    """ldap3 switches off the standard library's host name check and does its own, which on
    newer Pythons cannot match IP addresses; this hands the socket to an SSLContext that
    checks chain and name itself (TLS 1.2 or newer)."""

    def __init__(self, hostname, ca_file):
        super().__init__(validate=ssl.CERT_REQUIRED)
        self._hostname = hostname
        self._context = ssl.create_default_context(cafile=ca_file)
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2

    def wrap_socket(self, connection, do_handshake=False):
        connection.socket = self._context.wrap_socket(connection.socket, server_hostname=self._hostname,
                                                      do_handshake_on_connect=do_handshake)


# Errors after which a connection is not reused; a pooled one gets one fresh retry.
_TRANSIENT = (ldap_errors.LDAPCommunicationError, ldap_errors.LDAPStartTLSError, OSError)


class DirectoryPool:
    """Open connections to one directory, at most ``size`` in use at once (the rest wait)."""

    def __init__(self, settings):
        self.settings = settings
        self._tls = _CheckedTls(settings.host, settings.ca) if settings.use_ssl or settings.starttls else None
        self._slots = gevent.lock.BoundedSemaphore(settings.pool_size)
        self._idle = []
        self._closed = False

    def _open(self):
        # ldap3 also sets SO_RCVTIMEO from receive_timeout, which must be a whole number; the
        # plugin's own deadline (a gevent.Timeout) keeps the fractional auth.ldap.timeout
        s = self.settings
        # one ldap3.Server per connection: a Server keeps the address it last connected to
        # and marks failed addresses unusable for some seconds, state that connections
        # sharing it would trip over (and a restarted directory would stay shunned)
        server = ldap3.Server(s.host, port=s.port, use_ssl=s.use_ssl, tls=self._tls, get_info=ldap3.NONE,
                              connect_timeout=s.connect_timeout)
        conn = ldap3.Connection(server, client_strategy=ldap3.SYNC, auto_bind=ldap3.AUTO_BIND_NONE,
                                raise_exceptions=False, receive_timeout=math.ceil(s.timeout), auto_referrals=False,
                                read_only=True, return_empty_attributes=True)
        try:
            conn.open(read_server_info=False)
            if s.starttls and not s.use_ssl:
                conn.start_tls(read_server_info=False)
        except BaseException:
            _close_quietly(conn)
            raise
        return conn

    def run(self, fn):
        """fn(connection) on a pooled connection. A pooled connection that fails at the
        transport level (the server closed it while idle) is replaced once."""
        self._slots.acquire()
        try:
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else self._open()
            try:
                result = fn(conn)
            except _TRANSIENT:
                _close_quietly(conn)
                if not reused:
                    raise
                conn = self._open()
                try:
                    result = fn(conn)
                except BaseException:
                    _close_quietly(conn)
                    raise
            except BaseException:
                _close_quietly(conn)
                raise
            if self._closed:
                _close_quietly(conn)
            else:
                self._idle.append(conn)
            return result
        finally:
            self._slots.release()

    def close(self):
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            _close_quietly(conn)


def _close_quietly(conn):
    try:
        conn.unbind()
    except Exception:  # a broken socket: nothing more to release
        pass


def _forget_secret(conn):
    """ldap3 keeps the last request (with a bind's password) and the password itself on the
    connection object; a pooled connection must not hold them until its next use."""
    conn.password = None
    conn.request = None


def bind(conn, dn, password):
    """Simple bind (anonymous when dn is None). Returns (result code, server message)."""
    try:
        if dn is None:
            conn.authentication, conn.user, conn.password = ldap3.ANONYMOUS, None, None
        else:
            conn.authentication, conn.user, conn.password = ldap3.SIMPLE, dn, password
        conn.bind(read_server_info=False)
    finally:
        _forget_secret(conn)
    result = conn.result or {}
    return result.get("result"), result.get("message") or ""


def _check_service_code(code, what):
    if code in (RESULT_BUSY, RESULT_UNAVAILABLE):
        raise DirectoryDown(f"{what}: the directory answered {'busy' if code == RESULT_BUSY else 'unavailable'}")


# --- the plugin ------------------------------------------------------------------------------
class LdapPlugin(AuthPlugin):
    name = "ldap"

    def __init__(self, cfg, previous=None):
        self.settings = LdapSettings(cfg)
        if previous is not None and self.settings.same(previous.settings):
            self.pool, previous.pool = previous.pool, None      # keep the open connections
        else:
            self.pool = DirectoryPool(self.settings)

    def close(self):
        if self.pool is not None:
            self.pool.close()

    def authenticate_basic(self, attempt, password):
        login = attempt.login
        if not password or not login or _CONTROL.search(login):
            return False
        s = self.settings
        # gevent.Timeout is a BaseException: ldap3, which wraps every Exception of its
        # socket code into its own errors, cannot swallow it and retry past the deadline
        deadline = gevent.Timeout(s.timeout)
        deadline.start()
        try:
            return self.pool.run(lambda conn: self._check(conn, attempt, password))
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            log.warning("ldap: directory %s:%s gave no answer for %r within %g s (auth.ldap.timeout)",
                        s.host, s.port, login, s.timeout)
            raise AuthUnavailable("directory") from None
        except DirectoryDown as exc:
            log.warning("ldap: directory %s:%s not usable for %r: %s", s.host, s.port, login, exc)
            raise AuthUnavailable("directory") from None
        except (ldap_errors.LDAPException, OSError) as exc:
            log.warning("ldap: directory %s:%s not usable for %r: %s: %s", s.host, s.port, login,
                        type(exc).__name__, exc)
            raise AuthUnavailable("directory") from None
        finally:
            deadline.close()

    def _check(self, conn, attempt, password):
        s = self.settings
        login = attempt.login
        if s.userbindpattern:
            dn = s.userbindpattern.replace("%u", dn_value(login))
            code, _ = bind(conn, dn, password)
            _check_service_code(code, "userbindpattern bind")
            if code == RESULT_SUCCESS:
                log.info("ldap: %r authenticated as %s (auth.ldap.userbindpattern)", login, dn)
                return True
        if s.binddn:
            code, message = bind(conn, s.binddn.replace("%u", dn_value(login)), s.bindpass or password)
            _check_service_code(code, "binddn bind")
            if code != RESULT_SUCCESS:
                if s.bindpass:   # the service account is refused: every login would fail
                    raise DirectoryDown(f"bind as auth.ldap.binddn refused ({conn.result.get('description')})")
                return False     # binddn with the user's own password: a wrong password
        else:
            code, _ = bind(conn, None, None)
            _check_service_code(code, "anonymous bind")
        search_filter = s.filter.replace("%u", filter_value(login))
        conn.search(s.base, search_filter, search_scope=s.scope, dereference_aliases=s.deref,
                    attributes=ATTRIBUTES, size_limit=2, time_limit=max(1, int(s.timeout)))
        code = (conn.result or {}).get("result")
        _check_service_code(code, "search")
        if code not in (RESULT_SUCCESS, RESULT_SIZE_LIMIT_EXCEEDED):
            log.warning("ldap: search under %s with %s: %s", s.base, search_filter, conn.result.get("description"))
        entries = [e for e in (conn.response or []) if e.get("type") == "searchResEntry"]
        if len(entries) != 1:
            if len(entries) > 1:
                log.error("ldap: filter %s under %s matches more than one entry", search_filter, s.base)
            # a bind that fails like a wrong password does, so that an unknown login
            # costs the directory round trips a known one does
            bind(conn, f"uid={secrets.token_hex(8)},{s.base}", password)
            return False
        entry = entries[0]
        code, message = bind(conn, entry["dn"], password)
        _check_service_code(code, "user bind")
        if code != RESULT_SUCCESS:
            if not racf_allows(s.racf, code, message):
                return False
            attempt.params["qvd.auth.ldap.racf_detailed_error"] = message
            log.info("ldap: %r refused by the directory with %r, allowed by auth.ldap.racf_allowregex", login, message)
        self._take_attributes(attempt, entry.get("attributes") or {})
        log.info("ldap: %r authenticated as %s", login, entry["dn"])
        return True

    def _take_attributes(self, attempt, attributes):
        params = attempt.params
        for attribute, param in (("uidNumber", "qvd.vm.user.uid"), ("gidNumber", "qvd.vm.user.gid")):
            value = first_value(attributes, attribute)
            if value is not None:
                params[param] = value
        uid = first_value(attributes, "uid")
        if uid is not None:
            params["qvd.vm.user.ldap.name"] = uid
            if self.settings.normalize:
                params["qvd.vm.user.name"] = uid
                uid = uid.strip()
                attempt.login = uid if self.settings.case_sensitive else uid.lower()
        home = first_value(attributes, "homeDirectory")
        if home is not None:
            params["qvd.vm.user.ldap.home"] = home
            if self.settings.home_set:
                params["qvd.vm.user.home"] = home
