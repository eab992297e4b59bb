"""docs/config-keys.md, generated from the defaults table: ``python -m qvd_gevent.config.reference``.

The page is a view of ``defaults.py`` and nothing else, so it cannot drift from the code:
tests/unit/test_config_reference.py fails when the committed page differs from what this
prints. Regenerate with ``python -m qvd_gevent.config.reference > docs/config-keys.md``.
"""
import sys

from . import is_file_only_key
from .defaults import DEFAULTS

COMMAND = "python -m qvd_gevent.config.reference > docs/config-keys.md"

# Sections by the key's first word (after a leading "internal."), in reading order.
SECTIONS = [
    ("Node identity and database", ("nodename", "database")),
    ("Paths", ("path",)),
    ("Logging", ("log",)),
    ("L7R", ("l7r",)),
    ("Directory login plugins (ldap, auto)", ("auth",)),
    ("HKD", ("hkd",)),
    ("VMs, hypervisors and network", ("vm",)),
    ("External commands", ("command",)),
    ("VMA and nxagent (inside a VM)", ("vma", "nxagent")),
    ("Admin defaults", ("osf", "model", "wat")),
    ("qvd-client", ("client",)),
]
OTHER = "Other keys"

HEADER = f"""# Configuration keys

<!-- Generated from src/qvd_gevent/config/defaults.py; do not edit by hand.
     Regenerate: {COMMAND} -->

Every key of the node's defaults table, with its built-in default. A value is looked up
in this order, the first that has it wins: the `configs` table (tenant -1, changed live with
`qvd-admin config set`, announced by NOTIFY `qvd_config_changed`), then `node.conf`, then
the default below. Keys marked *file only* are read from `node.conf` and the defaults,
never from the `configs` table: the node needs them before it can reach the database, or
they name a program or a file the node uses as root (`command.*`, paths), which whoever can
write the database must not be able to choose.
`${{other.key}}` in a value is replaced by that key's value when the value is read.

*Origin* says whether the key is the original QVD's (same name and meaning) or one this
project adds. Types: `str`; `int`; `float`; `bool` (`1`/`0`, `yes`/`no`, `true`/`false`);
`list` (comma separated); `ip` (dotted IPv4); `netmask` (dotted or a prefix length);
`path`; `octal`. A default of *(required)* means the key has no default: reading it
unset is an error naming the key.

The VM state timeouts `internal.hkd.timeout.on_state.<state>` may also be spelled per
hypervisor, as the original did (`internal.hkd.<hypervisor>.timeout.on_state.<state>`);
the per-hypervisor spelling wins.
"""


def section_of(key):
    word = key.removeprefix("internal.").split(".", 1)[0]
    for title, words in SECTIONS:
        if word in words:
            return title
    return OTHER


def format_default(value):
    if value is None:
        return "*(required)*"
    if isinstance(value, bool):
        return "`1`" if value else "`0`"
    if value == "":
        return "*(empty)*"
    return f"`{value}`"


def _cell(text):
    return str(text).replace("|", "\\|")


def render():
    """The whole Markdown page."""
    grouped = {}
    for key in sorted(DEFAULTS):
        grouped.setdefault(section_of(key), []).append(DEFAULTS[key])
    out = [HEADER]
    for title in [t for t, _ in SECTIONS] + [OTHER]:
        keys = grouped.get(title)
        if not keys:
            continue
        out += [f"## {title}", "", "| key | default | type | file only | origin | meaning |",
                "|---|---|---|---|---|---|"]
        for k in keys:
            ours = k.meaning.startswith("ours:")
            meaning = k.meaning.removeprefix("ours:").strip()
            out.append(f"| `{k.name}` | {_cell(format_default(k.default))} | {k.type} | "
                       f"{'yes' if is_file_only_key(k.name) else 'no'} | {'ours' if ours else 'QVD'} | "
                       f"{_cell(meaning)} |")
        out.append("")
    return "\n".join(out)


def main():
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
