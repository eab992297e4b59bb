"""A VM init that tries, from inside the VM, what a desktop user could try against the node
and the other VMs, prints what it got, then waits (tests read its log)."""
import os

from .hkd_env import open_to_vms

DONE = "PROBE-DONE"


def write_probe_di(folder, files, folders, pids):
    """files: paths it tries to read; folders: paths it lists; pids: processes it signals
    (numbers, or words that the caller replaces in the file before the VM starts)."""
    lines = ["#!/bin/sh", 'echo "ME $(id -u) $(id -g) $(id -G)"']
    for path in files:
        lines.append(f'if cat "{path}" >/dev/null 2>&1; then echo "READ {path}"; else echo "DENIED {path}"; fi')
    for path in folders:
        lines.append(f'echo "LIST {path} $(ls -A "{path}" 2>/dev/null | tr "\\n" " ")"')
    for pid in pids:
        lines.append(f'if kill -0 {pid} 2>/dev/null; then echo "SIGNALLED {pid}"; else echo "UNREACHED {pid}"; fi')
    lines += [
        'echo "PROCS $(ls /proc | grep -c "^[0-9]")"',
        'echo "ENV $(env | cut -d= -f1 | sort | tr "\\n" " ")"',
        'if touch ./own-file; then echo "HOME $(pwd) writable"; fi',
        f'echo {DONE}',
        "exec sleep 300",
    ]
    di = folder / "probe-di.sh"
    di.write_text("\n".join(lines) + "\n")
    di.chmod(0o755)
    open_to_vms(folder)
    return str(di)


def probe_report(log_text):
    """{"ME": [...], "READ": {paths}, "DENIED": {paths}, "LIST": {path: [entries]}, ...}."""
    report = {"READ": set(), "DENIED": set(), "LIST": {}, "SIGNALLED": set(), "UNREACHED": set()}
    for line in log_text.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("READ", "DENIED", "SIGNALLED", "UNREACHED"):
            report[word].add(rest.strip())
        elif word == "LIST":
            path, _, entries = rest.partition(" ")
            report["LIST"][path] = entries.split()
        elif word in ("ME", "ENV"):
            report[word] = rest.split()
        elif word in ("PROCS", "HOME"):
            report[word] = rest.strip()
    return report


def process_uids(pid):
    """(real, effective, saved, filesystem) uids of pid, from /proc."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("Uid:"):
                return tuple(int(x) for x in line.split()[1:5])
    return None


def pids_in_group(pgid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def descendants(pid):
    """{pid: command name} of every process below pid, from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat = fh.read()
            except OSError:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            parent = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(parent, []).append((int(entry), name))
    found, todo = {}, [pid]
    while todo:
        for child, name in children.get(todo.pop(), ()):
            found[child] = name
            todo.append(child)
    return found
