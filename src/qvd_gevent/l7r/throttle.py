"""Throttling of failed logins (no I/O, clock passed in).

Three counters, each over the last ``window`` seconds:
- per source address, any login: ``max_failures`` (a guesser's address is stopped, as
  Guacamole's ban extension does);
- per login at one address: ``max_failures``;
- per login from all addresses: ``max_login_failures``, much higher, against guessing
  spread over many addresses. A stranger's failures at one address therefore never lock a
  user out at another, unless the stranger spreads more failures than that ceiling.

A failure is counted when the attempt starts, before the password is hashed, and taken
back when the attempt succeeds (``begin`` / ``succeeded`` / ``forget``): a flood of
concurrent wrong logins from one address is cut after ``max_failures`` of them, not after
all of them were hashed. The original client retries a failed connection five times at
once, so identical credentials from one address within ``burst`` seconds count once.

Credentials are remembered only as a keyed hash with a per-process random key.
"""
import hashlib
import hmac
import secrets
from collections import deque


class Ticket:
    """The failure entries one attempt counted: (key, time) pairs, and its burst key."""
    __slots__ = ("entries", "recent_key")

    def __init__(self, entries, recent_key):
        self.entries = entries
        self.recent_key = recent_key


class Throttle:
    def __init__(self, max_failures=5, window=300, burst=10, max_login_failures=50, max_keys=100000):
        self.max_failures = max_failures
        self.window = window
        self.burst = burst
        self.max_login_failures = max_login_failures
        self.max_keys = max_keys
        self._key = secrets.token_bytes(16)
        self._failures = {}        # ("addr", ip) / ("pair", ip, login) / ("login", login) -> deque of times
        self._recent = {}          # (ip, fingerprint) -> time of last counted attempt

    def fingerprint(self, *parts):
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(str(part).encode("utf-8", "surrogateescape") + b"\0")
        return mac.hexdigest()

    def _prune(self, now):
        horizon = now - self.window
        for key in list(self._failures):
            times = self._failures[key]
            while times and times[0] <= horizon:
                times.popleft()
            if not times:
                del self._failures[key]
        for key, when in list(self._recent.items()):
            if when <= now - self.burst:
                del self._recent[key]

    def _count(self, key, now):
        times = self._failures.get(key)
        if not times:
            return 0
        horizon = now - self.window
        while times and times[0] <= horizon:
            times.popleft()
        return len(times)

    @staticmethod
    def _keys(address, login):
        keys = []
        if address is not None:
            keys.append(("addr", address))
        if login:
            if address is not None:
                keys.append(("pair", address, login))
            keys.append(("login", login))
        return keys

    def blocked(self, address, login, now):
        """Return 'address' or 'login' when that one is throttled, else None."""
        if address is not None and self._count(("addr", address), now) >= self.max_failures:
            return "address"
        if login and address is not None and self._count(("pair", address, login), now) >= self.max_failures:
            return "login"
        if login and self._count(("login", login), now) >= self.max_login_failures:
            return "login"
        return None

    def begin(self, address, login, fingerprint, now):
        """Count this attempt as a failure until it succeeds. Returns its Ticket. Repeats of the
        same credentials from the same address within burst are not counted again."""
        if len(self._failures) > self.max_keys or len(self._recent) > self.max_keys:
            self._prune(now)
        recent_key = (address, fingerprint)
        last = self._recent.get(recent_key)
        if last is not None and now - last < self.burst:
            return Ticket([], None)
        self._recent[recent_key] = now
        entries = []
        for key in self._keys(address, login):
            self._failures.setdefault(key, deque()).append(now)
            entries.append((key, now))
        return Ticket(entries, recent_key)

    def forget(self, ticket):
        """The attempt is not held against anyone (blocked user, directory down...)."""
        for key, when in ticket.entries:
            times = self._failures.get(key)
            if times is not None:
                try:
                    times.remove(when)
                except ValueError:
                    pass
                if not times:
                    del self._failures[key]
        ticket.entries = []
        if ticket.recent_key is not None:
            self._recent.pop(ticket.recent_key, None)
            ticket.recent_key = None

    def succeeded(self, ticket, address, login):
        """A good login: its own entry goes, and that login's failures at this address and
        everywhere are cleared (the address keeps the failures of other logins)."""
        self.forget(ticket)
        if login:
            self._failures.pop(("login", login), None)
            if address is not None:
                self._failures.pop(("pair", address, login), None)
