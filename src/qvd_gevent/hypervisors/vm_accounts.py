"""The uids that `process` and `netns` VMs run as: one per VM, from a range no account uses.

VM n runs as uid and gid ``vm.uid.base + n`` (docs/hkd.md#vm-confinement). One uid per VM,
rather than one shared VM user, because a uid is what the kernel separates by: VMs of one
uid could signal and ptrace each other, read each other's /proc/<pid>/environ (where the
agent's secret is) and each other's files. A range needs no accounts to be made (a process
may run as a uid that /etc/passwd does not name); it must only be free. At start the
range is checked against every user and group the system knows and against the
subordinate ranges of /etc/subuid and /etc/subgid (a user's own user namespaces run as
those uids, so an overlap would let that user act as a VM).
"""
import grp
import pwd

from .base import HypervisorError

TOP = 2 ** 31           # uids at or above it are negative as C ints in too many programs
SUBORDINATE_FILES = (("/etc/subuid", "subordinate uids"), ("/etc/subgid", "subordinate gids"))


def subordinate_ranges(path):
    """[(name, first, count)] from /etc/subuid or /etc/subgid ([] when the file is missing)."""
    ranges = []
    try:
        with open(path) as fh:
            for line in fh:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    ranges.append((parts[0], int(parts[1]), int(parts[2])))
    except OSError:
        pass
    return ranges


class VmUids:
    def __init__(self, cfg):
        self.base = cfg.get_int("vm.uid.base")
        self.count = cfg.get_int("vm.uid.count")

    def describe(self):
        return f"vm.uid.base {self.base} .. {self.base + self.count - 1} (vm.uid.count {self.count})"

    def uid_for(self, vm_id):
        vm_id = int(vm_id)
        if not 0 <= vm_id < self.count:
            raise HypervisorError(f"VM {vm_id} has no uid: VM ids must be below vm.uid.count ({self.count})")
        return self.base + vm_id

    def check(self, users=None, groups=None, subordinates=None):
        """Raise HypervisorError (one line) unless the range is free. The arguments replace the
        system's lists in tests: [(name, id)] and [(file label, name, first, count)]."""
        if self.base < 1 or self.count < 1 or self.base + self.count > TOP:
            raise HypervisorError(f"{self.describe()} must lie within 1 .. {TOP - 1}: VMs run as uid base + VM id")
        top = self.base + self.count
        users = [(u.pw_name, u.pw_uid) for u in pwd.getpwall()] if users is None else users
        groups = [(g.gr_name, g.gr_gid) for g in grp.getgrall()] if groups is None else groups
        for kind, entries in (("user", users), ("group", groups)):
            for name, number in entries:
                if self.base <= number < top:
                    raise HypervisorError(f"{self.describe()} holds the {kind} {name} ({number}): VMs need a uid "
                                          "range no account uses")
        if subordinates is None:
            subordinates = [(label, *entry) for path, label in SUBORDINATE_FILES for entry in subordinate_ranges(path)]
        for label, name, first, count in subordinates:
            if first < top and self.base < first + count:
                raise HypervisorError(f"{self.describe()} overlaps the {label} of {name} ({first} .. "
                                      f"{first + count - 1}): that user could act as a VM")
