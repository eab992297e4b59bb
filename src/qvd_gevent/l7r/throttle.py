"""Throttling of failed logins per source address and per login (no I/O, clock passed in).

After ``max_failures`` failures within ``window`` seconds, further attempts from that
address, or for that login, are refused until the oldest failure ages out. The original
client retries a failed connection five times at once, so identical failed credentials
from one address within ``burst`` seconds count as ONE failure: a person who typed a
wrong password once is not locked out by their own client's retries.

Credentials are remembered only as a keyed hash with a per-process random key.
"""
import hashlib
import hmac
import secrets
from collections import deque


class Throttle:
    def __init__(self, max_failures=5, window=300, burst=10, max_keys=100000):
        self.max_failures = max_failures
        self.window = window
        self.burst = burst
        self.max_keys = max_keys
        self._key = secrets.token_bytes(16)
        self._failures = {}        # ("addr", ip) / ("login", name) -> deque of times
        self._recent = {}          # (ip, fingerprint) -> time of last counted failure

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

    def blocked(self, address, login, now):
        """Return 'address' or 'login' when that one is throttled, else None."""
        if address is not None and self._count(("addr", address), now) >= self.max_failures:
            return "address"
        if login and self._count(("login", login), now) >= self.max_failures:
            return "login"
        return None

    def record_failure(self, address, login, fingerprint, now):
        """Count one failure, unless it repeats the same credentials from the same address within burst."""
        if len(self._failures) > self.max_keys or len(self._recent) > self.max_keys:
            self._prune(now)
        recent_key = (address, fingerprint)
        last = self._recent.get(recent_key)
        if last is not None and now - last < self.burst:
            return False
        self._recent[recent_key] = now
        if address is not None:
            self._failures.setdefault(("addr", address), deque()).append(now)
        if login:
            self._failures.setdefault(("login", login), deque()).append(now)
        return True

    def record_success(self, address, login):
        """A good login clears that login's failures (the address keeps its own)."""
        if login:
            self._failures.pop(("login", login), None)
