"""qvd-admin (also installed as qvd-admin.pl): the operator's CLI, straight to QVD-DB.

    qvd-admin [--config FILE] OBJECT VERB [-f k=v,...] [-t TENANT] [--force] [-q] [key=value ...]

Options may appear anywhere (as Getopt's permute). Each verb runs in one transaction:
a failure prints one line ``Error: <message>`` on stderr (also under ``-q``), exits 1 and leaves the
database as it was. Exit 0 on success and when a confirmation is not given.
"""
import sys

import psycopg2

from ..config import Config, ConfigError
from ..db import Database, DatabaseError

# Importing the verb modules fills the registry.
from . import config_verbs, di, host, osf, props, user, vm  # noqa: F401
from .context import AdminError, Context, Invocation
from .errors import describe
from .registry import OBJECTS, VERBS, verbs_of

_VALUE_OPTIONS = {"-f": "filter", "--filter": "filter", "-t": "tenant", "--tenant": "tenant",
                  "--config": "config", "-c": "config"}
_FLAG_OPTIONS = {"--force": "force", "-q": "quiet", "--quiet": "quiet", "-h": "help", "--help": "help",
                 "-d": "debug", "--debug": "debug"}


def _split_pairs(text, what):
    pairs = []
    for item in text.split(","):
        if not item:
            continue
        if "=" not in item:
            raise AdminError(f"Syntax error: {what} '{item}' is not key=value")
        key, value = item.split("=", 1)
        if not key:
            raise AdminError(f"Syntax error: {what} '{item}' has no key")
        pairs.append((key, value))
    return pairs


def parse_argv(argv):
    inv = Invocation()
    positional = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok == "--":
            positional.extend(argv[i:])
            break
        name, eq, inline = tok.partition("=")
        if name in _VALUE_OPTIONS and tok.startswith("-"):
            if eq:
                value = inline
            else:
                if i >= len(argv):
                    raise AdminError(f"Syntax error: option {tok} needs a value")
                value = argv[i]
                i += 1
            target = _VALUE_OPTIONS[name]
            if target == "filter":
                inv.filters.extend(_split_pairs(value, "filter"))
            elif target == "tenant":
                try:
                    inv.tenant = int(value)
                except ValueError:
                    raise AdminError(f"Syntax error: tenant must be a numeric id, not {value!r}") from None
            else:
                inv.config = value
            continue
        if tok in _FLAG_OPTIONS:
            setattr(inv, _FLAG_OPTIONS[tok], True)
            continue
        if tok.startswith("-") and len(tok) > 1 and "=" not in tok:
            raise AdminError(f"Syntax error: unknown option {tok}")
        positional.append(tok)
    if positional:
        inv.obj = positional.pop(0)
    if positional:
        inv.verb = positional.pop(0)
    for tok in positional:
        if "=" in tok:
            key, value = tok.split("=", 1)
            inv.args.append((key, value))
        else:
            inv.args.append((tok, None))
    return inv


def check_syntax(spec, inv):
    """Mandatory keys, allowed keys and bare words, per verb (AdminCLI _syntax_check)."""
    if spec.bare == "user":
        inv.args = [("user", k) if v is None and k != "user" else (k, v) for k, v in inv.args]
    for key, value in inv.args:
        if value is None and spec.bare != "keys":
            raise AdminError(f"Syntax error: undefined value for key: '{key}' (usage: {spec.usage})")
        if not key:
            raise AdminError(f"Syntax error: empty key (usage: {spec.usage})")
    for group in spec.mandatory:
        if not any(inv.has(k) for k in group):
            names = " or ".join(f"'{k}'" for k in group)
            which = "either parameter" if len(group) > 1 else "parameter"
            raise AdminError(f"Syntax error: {which} {names} is mandatory (usage: {spec.usage})")
    if spec.allowed is not None:
        extra = sorted({k for k, _ in inv.args if k not in spec.allowed})
        if extra:
            shown = "', '".join(extra)
            raise AdminError(f"Syntax error: too many arguments: '{shown}' (usage: {spec.usage})")


def _subcommands(obj=None):
    listing = verbs_of(obj if obj in OBJECTS else None)
    return "available subcommands:\n   " + "\n   ".join(listing) + "\n"


def _help_text(spec):
    return (f"{spec.obj} {spec.verb}: {spec.summary}\nusage: {spec.obj} {spec.verb} {spec.usage}\n\n"
            "Valid options:\n"
            "    -f [--filter] k=v,... : act only on the objects matched by the filter\n"
            "    -t [--tenant] ID      : tenant of users, OSFs, VMs, DIs (default 1) and config (default -1)\n"
            "    --force               : do not ask for confirmation\n"
            "    -q [--quiet]          : no headers, rules or messages (errors are still shown)\n"
            "    --config FILE         : node.conf (default $QVD_CONFIG or /etc/qvd/node.conf)\n")


def open_database(inv):
    """Configuration (node.conf + the configs table) and a small pool for one command."""
    cfg = Config.load(inv.config)
    db = Database(cfg.dsn_kwargs(), size=2,
                  acquire_timeout=cfg.get_int("internal.database.pool.connection.timeout"),
                  statement_timeout=cfg.get_int("internal.database.client.statement.timeout"),
                  retries=cfg.get_int("internal.database.transaction.retries"))
    try:
        rows = db.query("SELECT key, value FROM configs WHERE tenant_id = -1")
    except psycopg2.errors.UndefinedTable:
        db.close()
        raise AdminError("the database has no QVD schema; run qvd-deploy-db first") from None
    except BaseException:
        db.close()
        raise
    cfg.set_db_overrides(rows)
    return cfg, db


def run(argv, out, err, stdin):
    try:
        inv = parse_argv(argv)
    except AdminError as exc:
        err.write(f"Error: {exc}\n")
        return 1
    if inv.obj is None:
        out.write("Valid command expected, " + _subcommands())
        return 1
    if inv.verb is None:
        out.write(f"{inv.obj}: Valid command expected, " + _subcommands(inv.obj))
        return 1
    spec = VERBS.get((inv.obj, inv.verb))
    if spec is None:
        what = f"unknown object '{inv.obj}'" if inv.obj not in OBJECTS else f"{inv.obj}: '{inv.verb}' not implemented"
        err.write(f"Error: {what}\n")
        out.write(f"{inv.obj}: '{inv.verb}' not implemented, " + _subcommands(inv.obj))
        return 1
    if inv.help:
        out.write(_help_text(spec))
        return 0
    ctx = Context(inv, out=out, err=err, stdin=stdin)
    try:
        check_syntax(spec, inv)
        ctx.cfg, ctx.db = open_database(inv)
        try:
            result = spec.fn(ctx)
        finally:
            ctx.db.close()
        return result or 0
    except (AdminError, ConfigError, DatabaseError) as exc:
        message = str(exc)
    except psycopg2.Error as exc:
        message = describe(exc)
    except KeyboardInterrupt:
        message = "interrupted"
    except BrokenPipeError:
        return 1
    except Exception as exc:  # a bug of ours, not the operator's mistake: one line unless --debug
        if inv.debug:
            raise
        message = f"internal error ({type(exc).__name__}: {exc}); run again with --debug for details"
    # -q quiets what a script parses (stdout); a failure is always said (the original
    # dropped the line too: docs/differences.md#admin-quiet-errors).
    err.write(f"Error: {message}\n")
    err.flush()
    return 1


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    return run(list(argv), sys.stdout, sys.stderr, sys.stdin)


if __name__ == "__main__":
    sys.exit(main())
