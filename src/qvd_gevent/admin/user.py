"""user add / del / list / passwd / block / unblock.

New passwords are stored with scrypt (db.passwords.hash_password); the L7R still accepts
the original's salted SHA-256 tokens and upgrades them at the next login.
"""
import getpass

from ..db import runtime
from ..db.passwords import hash_password
from ..db.provision import add_user
from .common import confirmed, matching_ids, text_arg
from .context import AdminError
from .objects import USER
from .registry import verb

FILTER_USAGE = "[-f id=,login=,blocked=] [-t tenant]"


def normalise_login(cfg, login):
    login = login.strip()
    if not cfg.get_bool("model.user.login.case-sensitive"):
        login = login.lower()
    return login


def _check_password(password):
    if not password:
        raise AdminError("the password must not be empty")
    return password


@verb("user", "add", "login=<login> password=<password> [-t tenant]", "Adds a user.",
      mandatory=("login", "password"), allowed=("description",))
def user_add(ctx):
    login = normalise_login(ctx.cfg, text_arg(ctx, "login", "login", 64, required=True))
    if not login:
        raise AdminError("login must not be empty")
    stored = hash_password(_check_password(ctx.inv.arg("password")))
    tenant = ctx.tenant(1)
    description = ctx.inv.arg("description")

    def run(cur):
        cur.execute("SELECT 1 FROM tenants WHERE id = %s", (tenant,))
        if cur.fetchone() is None:
            raise AdminError(f"tenant {tenant} does not exist")
        return add_user(cur, login, tenant, stored, description)
    ctx.say(f"User added with id {ctx.tx(run)}")


@verb("user", "del", FILTER_USAGE, "Deletes users (who own no VM).")
def user_del(ctx):
    if not confirmed(ctx, "Are you sure you want to delete all users?"):
        return 0

    def run(cur):
        ids = matching_ids(cur, ctx, USER)
        cur.execute("""SELECT u.login, count(*) FROM users u JOIN vms v ON v.user_id = u.id
                        WHERE u.id = ANY(%s) GROUP BY u.login ORDER BY u.login""", (ids,))
        owners = cur.fetchall()
        if owners:
            login, count = owners[0]
            raise AdminError(f"user {login!r} still owns {count} VM(s); delete them first")
        cur.execute("DELETE FROM users WHERE id = ANY(%s)", (ids,))
        return len(ids)
    count = ctx.tx(run)
    ctx.say(f"Deleting {count} user(s)")


@verb("user", "list", FILTER_USAGE, "Lists users.")
def user_list(ctx):
    def run(cur):
        ids = matching_ids(cur, ctx, USER)
        cur.execute("SELECT id, login FROM users WHERE id = ANY(%s) ORDER BY id", (ids,))
        return cur.fetchall()
    ctx.table(["Id", "Login"], ctx.tx(run))


def _read_new_password(ctx, login):
    """Twice with no echo on a terminal; one line from a pipe (scripts, tests)."""
    isatty = getattr(ctx.stdin, "isatty", None)
    if isatty and isatty():
        first = getpass.getpass(f"New password for {login}: ", stream=ctx.err)
        second = getpass.getpass("Again: ", stream=ctx.err)
        if first != second:
            raise AdminError("Entered passwords don't match")
        return first
    line = ctx.stdin.readline()
    return line.rstrip("\r\n")


@verb("user", "passwd", "user=<login> [password=<password>] [-t tenant]",
      "Sets a user's password (prompted twice, or from a pipe).",
      mandatory=("user",), allowed=("password",), bare="user")
def user_passwd(ctx):
    login = normalise_login(ctx.cfg, ctx.inv.arg("user"))
    tenant = ctx.tenant(1)

    def find(cur):
        cur.execute("SELECT id FROM users WHERE login = %s AND tenant_id = %s", (login, tenant))
        row = cur.fetchone()
        if row is None:
            raise AdminError(f"user {login!r} not found in tenant {tenant}")
        return row[0]
    user_id = ctx.tx(find)
    password = ctx.inv.arg("password")
    if password is None:
        password = _read_new_password(ctx, login)
    stored = hash_password(_check_password(password))

    def run(cur):
        cur.execute("UPDATE users SET password = %s WHERE id = %s", (stored, user_id))
        if cur.rowcount != 1:
            raise AdminError(f"user {login!r} not found in tenant {tenant}")
        return runtime.revoke_user_tokens(cur, [user_id])
    revoked = ctx.tx(run)
    ctx.say(f"Password changed for user {login}")
    if revoked:
        ctx.say(f"{revoked} token(s) of user {login} revoked")


def _set_blocked(ctx, blocked):
    action = "block" if blocked else "unblock"
    if not confirmed(ctx, f"Are you sure you want to {action} all users?"):
        return 0

    def run(cur):
        ids = matching_ids(cur, ctx, USER)
        cur.execute("UPDATE users SET blocked = %s WHERE id = ANY(%s)", (blocked, ids))
        if blocked:
            runtime.revoke_user_tokens(cur, ids)     # unblocking must not bring old tokens back
    ctx.tx(run)
    return 0


@verb("user", "block", FILTER_USAGE, "Blocks users: the L7R refuses them.")
def user_block(ctx):
    return _set_blocked(ctx, True)


@verb("user", "unblock", FILTER_USAGE, "Unblocks users.")
def user_unblock(ctx):
    return _set_blocked(ctx, False)
