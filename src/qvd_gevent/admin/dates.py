"""expire-soft / expire-hard values: a small subset of GNU at(1) time specs, local time.

Accepted: ``now``, ``now + N minutes|hours|days|weeks``, ``YYYY-MM-DD``,
``YYYY-MM-DD HH:MM[:SS]`` (or with ``T``), ``HH:MM`` (today, or tomorrow when already
past, as at does), ``HH:MM YYYY-MM-DD``, ``midnight``, ``noon``, ``tomorrow``,
``teatime`` (16:00). The result is a naive UTC datetime, as vm_runtimes stores it.
"""
import datetime
import re

from .context import AdminError

_UNITS = {"min": 60, "minute": 60, "minutes": 60, "hour": 3600, "hours": 3600,
          "day": 86400, "days": 86400, "week": 604800, "weeks": 604800}
_REL = re.compile(r"^now\s*\+\s*(\d+)\s*([a-z]+)$")
_HM = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")


def _local_to_utc(local_naive):
    return local_naive.astimezone(datetime.UTC).replace(tzinfo=None)


def parse_when(text, now=None):
    spec = " ".join(str(text).strip().lower().split())
    now = now or datetime.datetime.now()
    bad = AdminError(f"invalid datetime specification '{text}'")
    if spec == "now":
        return _local_to_utc(now)
    match = _REL.match(spec)
    if match:
        unit = _UNITS.get(match.group(2))
        if unit is None:
            raise bad
        return _local_to_utc(now + datetime.timedelta(seconds=int(match.group(1)) * unit))
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    named = {"midnight": today + datetime.timedelta(days=1), "tomorrow": now + datetime.timedelta(days=1),
             "noon": today.replace(hour=12), "teatime": today.replace(hour=16)}
    if spec in named:
        value = named[spec]
        if spec in ("noon", "teatime") and value <= now:
            value += datetime.timedelta(days=1)
        return _local_to_utc(value)
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dt%H:%M:%S", "%Y-%m-%dt%H:%M", "%Y-%m-%d",
                "%H:%M %Y-%m-%d", "%H:%M:%S %Y-%m-%d"):
        try:
            return _local_to_utc(datetime.datetime.strptime(spec, fmt))
        except ValueError:
            pass
    match = _HM.match(spec)
    if match:
        hour, minute, second = int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)
        if hour > 23 or minute > 59 or second > 59:
            raise bad
        value = today.replace(hour=hour, minute=minute, second=second)
        if value <= now:
            value += datetime.timedelta(days=1)
        return _local_to_utc(value)
    raise bad


def expirations(ctx):
    """{'vm_expiration_soft': dt, 'vm_expiration_hard': dt} from expire-soft/expire-hard args."""
    out = {}
    for arg, column in (("expire-soft", "vm_expiration_soft"), ("expire-hard", "vm_expiration_hard")):
        if ctx.inv.has(arg):
            value = ctx.inv.arg(arg)
            out[column] = None if value in (None, "") else parse_when(value)
    return out
