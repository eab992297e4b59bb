"""The table of verbs: which object/verb pairs exist, their keys and their usage line."""
from collections import namedtuple

VerbSpec = namedtuple("VerbSpec", "obj verb fn usage mandatory allowed bare summary")

VERBS = {}

OBJECTS = ("config", "host", "user", "osf", "di", "vm")


def verb(obj, name, usage, summary, mandatory=(), allowed=(), bare=None):
    """Register fn as `qvd-admin obj name`.

    mandatory: groups of keys, each group satisfied by any one of its keys.
    allowed: the other keys accepted; None accepts any key (config set, vm edit, prop*).
    bare: None rejects a bare word; "keys" takes bare words as keys (config get k);
    "user" takes a bare word as user=<word> (user passwd guest).
    """
    def register(fn):
        groups = tuple((g,) if isinstance(g, str) else tuple(g) for g in mandatory)
        ok = None if allowed is None else frozenset(allowed) | {k for g in groups for k in g}
        VERBS[(obj, name)] = VerbSpec(obj, name, fn, usage, groups, ok, bare, summary)
        return fn
    return register


def verbs_of(obj=None):
    return sorted(f"{o} {v}" for (o, v) in VERBS if obj is None or o == obj)
