"""osf add / del / list (Operating System Flavours)."""
import re

from .common import bool_arg, confirmed, int_arg, matching_ids, text_arg
from .context import AdminError
from .objects import OSF
from .registry import verb

FILTER_USAGE = "[-f id=,name=,memory=,use_overlay=,user_storage_size=] [-t tenant]"
_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)\s*$")


def parse_size(text):
    """N[k|m|g]: the suffix multiplies by 1024^n; a bare number is kept as given (MB)."""
    if text is None or text == "":
        return None
    match = _SIZE.match(text)
    if not match:
        raise AdminError(f"user_storage_size: malformed size {text!r} (use N, Nk, Nm or Ng)")
    number, suffix = int(match.group(1)), match.group(2).lower()
    number *= {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[suffix]
    if number > 2 ** 31 - 1:
        raise AdminError(f"user_storage_size: {text} is too large")
    return number


@verb("osf", "add", "name=<name> [memory=MB] [use_overlay=0/1] [user_storage_size=N[k|m|g]] "
      "[is_application=0/1] [-t tenant]", "Adds an Operating System Flavour.",
      mandatory=("name",), allowed=("memory", "use_overlay", "user_storage_size", "is_application", "description"))
def osf_add(ctx):
    name = text_arg(ctx, "name", "OSF name", 64, required=True)
    memory = int_arg(ctx, "memory", "memory", ctx.cfg.get_int("osf.default.memory"), minimum=1)
    overlay = bool_arg(ctx, "use_overlay", ctx.cfg.get_bool("osf.default.overlay"))
    is_app = bool_arg(ctx, "is_application", ctx.cfg.get_bool("osf.default.is_application"))
    storage = parse_size(ctx.inv.arg("user_storage_size"))
    tenant = ctx.tenant(1)

    def run(cur):
        cur.execute("SELECT 1 FROM tenants WHERE id = %s", (tenant,))
        if cur.fetchone() is None:
            raise AdminError(f"tenant {tenant} does not exist")
        cur.execute("""INSERT INTO osfs (name, memory, use_overlay, is_application, user_storage_size,
                                         tenant_id, description)
                       VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id""",
                    (name, memory, overlay, is_app, storage, tenant, ctx.inv.arg("description")))
        return cur.fetchone()[0]
    ctx.say(f"OSF added with id {ctx.tx(run)}")


@verb("osf", "del", FILTER_USAGE, "Deletes OSFs that have no VMs and no DIs.")
def osf_del(ctx):
    if not confirmed(ctx, "Are you sure you want to delete all osfs?"):
        return 0

    def run(cur):
        ids = matching_ids(cur, ctx, OSF)
        cur.execute("""SELECT id, name FROM osfs o WHERE id = ANY(%s)
                          AND (EXISTS (SELECT 1 FROM vms WHERE vms.osf_id = o.id)
                               OR EXISTS (SELECT 1 FROM dis WHERE dis.osf_id = o.id)) ORDER BY id""", (ids,))
        kept = cur.fetchall()
        kept_ids = [k[0] for k in kept]
        doomed = [i for i in ids if i not in kept_ids]
        cur.execute("DELETE FROM osfs WHERE id = ANY(%s)", (doomed,))
        return len(ids), cur.rowcount, kept
    matched, deleted, kept = ctx.tx(run)
    ctx.say(f"Deleting {matched} osf(s)")
    for _, name in kept:
        ctx.warn(f"OSF {name!r} kept: it still has VMs or DIs")
    ctx.say(f"{deleted} OSFs deleted.")


def _yes_no(value):
    return None if value is None else ("yes" if value else "no")


@verb("osf", "list", FILTER_USAGE, "Lists OSFs.")
def osf_list(ctx):
    def run(cur):
        ids = matching_ids(cur, ctx, OSF)
        cur.execute("""SELECT id, name, memory, use_overlay, user_storage_size, is_application
                         FROM osfs WHERE id = ANY(%s) ORDER BY id""", (ids,))
        return cur.fetchall()
    rows = [[r[0], r[1], r[2], _yes_no(r[3]), r[4], _yes_no(r[5])] for r in ctx.tx(run)]
    ctx.table(["Id", "Name", "RAM", "Overlay", "UserHD", "IsApplication"], rows)
