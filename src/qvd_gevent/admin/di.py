"""di add / del / list / tag / untag (Disk Images).

`di add` copies the image into path.storage.images as ``<id>-<basename>`` keeping its
mode (for the process and netns hypervisors a DI is an executable such as qvd-vm-init),
gives it a version (``YYYY-MM-DD-NNN`` unless given) tagged as a fixed tag, moves
``head`` to it, tags it ``default`` when its OSF has no default yet, and publishes it
(a di_runtimes row in state 'published', which QVD 4's ORM requires).
"""
import datetime
import os
import secrets
import shutil

from .common import confirmed, int_arg, matching_ids
from .context import AdminError
from ..db import runtime
from .dates import expirations
from .objects import DI
from .registry import verb

FILTER_USAGE = "[-f id=,osf_id=,osf=,path=,version=,tag=] [-t tenant]"
EXPIRE_USAGE = "[expire-soft=DATE] [expire-hard=DATE]"


def resolve_osf(cur, ctx, osf_id=None, osf_name=None):
    """(id, tenant_id) of the OSF named by id or by name within the tenant."""
    if osf_id is not None:
        cur.execute("SELECT id, tenant_id FROM osfs WHERE id = %s", (osf_id,))
        row = cur.fetchone()
        if row is None:
            raise AdminError(f"OSF {osf_id} does not exist")
        return row
    tenant = ctx.tenant(1)
    cur.execute("SELECT id, tenant_id FROM osfs WHERE name = %s AND tenant_id = %s", (osf_name, tenant))
    row = cur.fetchone()
    if row is None:
        raise AdminError(f"OSF {osf_name!r} not found in tenant {tenant}")
    return row


def osf_args(ctx):
    if ctx.inv.has("osf") and ctx.inv.has("osf_id"):
        raise AdminError("Syntax error: parameters 'osf_id' and 'osf' are mutually exclusive")
    return int_arg(ctx, "osf_id", "osf_id"), ctx.inv.arg("osf")


def _auto_version(cur, osf_id, today=None):
    today = today or datetime.date.today()
    cur.execute("SELECT t.tag FROM di_tags t JOIN dis d ON d.id = t.di_id WHERE d.osf_id = %s", (osf_id,))
    taken = {r[0] for r in cur.fetchall()}
    cur.execute("SELECT version FROM dis WHERE osf_id = %s", (osf_id,))
    taken |= {r[0] for r in cur.fetchall()}
    for n in range(1000):
        version = f"{today:%Y-%m-%d}-{n:03d}"
        if version not in taken:
            return version
    raise AdminError(f"no free version left for today ({today:%Y-%m-%d}-000 to -999 are taken)")


def _check_source(path):
    if not os.path.exists(path):
        raise AdminError(f"{path}: Unable to read disk image: no such file")
    if not os.path.isfile(path):
        raise AdminError(f"{path}: Unable to read disk image: not a regular file")
    if not os.access(path, os.R_OK):
        raise AdminError(f"{path}: Unable to read disk image: permission denied")


@verb("di", "add", f"path=<file> (osf_id=<id> | osf=<name>) [version=<v>] {EXPIRE_USAGE}",
      "Adds a disk image: copies it to the image store and tags it.",
      mandatory=("path", ("osf_id", "osf")), allowed=("version", "expire-soft", "expire-hard"))
def di_add(ctx):
    source = ctx.inv.arg("path")
    osf_id, osf_name = osf_args(ctx)
    version = ctx.inv.arg("version")
    if version is not None and (not version.strip() or len(version) > 64):
        raise AdminError("version must be 1 to 64 characters")
    expiry = expirations(ctx)
    _check_source(source)
    images = ctx.cfg.get_str("path.storage.images")
    basename = os.path.basename(source.rstrip("/"))
    try:
        os.makedirs(images, exist_ok=True)
        tmp = os.path.join(images, f"{basename}.tmp-{secrets.token_hex(4)}")
        shutil.copy2(source, tmp)
    except OSError as exc:
        raise AdminError(f"cannot copy {source} into {images}: {exc.strerror}") from None

    def run(cur):
        osf, _ = resolve_osf(cur, ctx, osf_id, osf_name)
        ver = version or _auto_version(cur, osf)
        cur.execute("SELECT 1 FROM dis WHERE osf_id = %s AND version = %s", (osf, ver))
        if cur.fetchone():
            raise AdminError(f"the OSF already has a DI with version {ver!r}")
        cur.execute("""DELETE FROM di_tags t USING dis d
                        WHERE d.id = t.di_id AND d.osf_id = %s AND t.tag IN ('head', %s)""", (osf, ver))
        cur.execute("INSERT INTO dis (osf_id, path, version, blocked) VALUES (%s, '', %s, false) RETURNING id",
                    (osf, ver))
        di_id = cur.fetchone()[0]
        cur.execute("INSERT INTO di_tags (di_id, tag, fixed) VALUES (%s, %s, true), (%s, 'head', false)",
                    (di_id, ver, di_id))
        cur.execute("""SELECT 1 FROM di_tags t JOIN dis d ON d.id = t.di_id
                        WHERE d.osf_id = %s AND t.tag = 'default'""", (osf,))
        if cur.fetchone() is None:
            cur.execute("INSERT INTO di_tags (di_id, tag, fixed) VALUES (%s, 'default', false)", (di_id,))
        name = f"{di_id}-{basename}"
        cur.execute("UPDATE dis SET path = %s WHERE id = %s", (name, di_id))
        cur.execute("INSERT INTO di_runtimes (di_id, state, state_ts) VALUES (%s, 'published', %s)",
                    (di_id, int(datetime.datetime.now().timestamp())))
        if expiry:
            cur.execute("""SELECT vr.vm_id FROM vm_runtimes vr JOIN vms v ON v.id = vr.vm_id
                            WHERE v.osf_id = %s AND v.di_tag = 'head' AND vr.vm_state = 'running'""", (osf,))
            runtime.set_vm_expirations(cur, [r[0] for r in cur.fetchall()], expiry)
        return di_id, name

    try:
        di_id, name = ctx.tx(run)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    try:
        os.rename(tmp, os.path.join(images, name))
    except OSError as exc:
        _unlink_quietly(tmp)
        ctx.tx(lambda cur: cur.execute("DELETE FROM dis WHERE id = %s", (di_id,)))
        raise AdminError(f"cannot move the image into place as {name}: {exc.strerror}") from None
    ctx.say(f"DI added with id {di_id}")


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


@verb("di", "del", FILTER_USAGE, "Deletes DIs no VM is running (the image file is kept).")
def di_del(ctx):
    if not confirmed(ctx, "Are you sure you want to delete all dis?"):
        return 0

    def run(cur):
        ids = matching_ids(cur, ctx, DI)
        cur.execute("""SELECT id FROM dis WHERE id = ANY(%s)
                          AND NOT EXISTS (SELECT 1 FROM vm_runtimes vr WHERE vr.current_di_id = dis.id)
                        ORDER BY id""", (ids,))
        doomed = [r[0] for r in cur.fetchall()]
        cur.execute("SELECT DISTINCT osf_id FROM dis WHERE id = ANY(%s)", (doomed,))
        for (osf,) in cur.fetchall():
            cur.execute("SELECT max(id) FROM dis WHERE osf_id = %s AND NOT (id = ANY(%s))", (osf, doomed))
            survivor = cur.fetchone()[0]
            if survivor is None:
                continue
            for tag in ("default", "head"):
                cur.execute("""SELECT 1 FROM di_tags WHERE tag = %s AND di_id = ANY(%s)""", (tag, doomed))
                if cur.fetchone():
                    cur.execute("""DELETE FROM di_tags t USING dis d WHERE d.id = t.di_id AND d.osf_id = %s
                                   AND t.tag = %s""", (osf, tag))
                    cur.execute("INSERT INTO di_tags (di_id, tag, fixed) VALUES (%s, %s, false)", (survivor, tag))
        cur.execute("DELETE FROM dis WHERE id = ANY(%s)", (doomed,))
        return len(ids), cur.rowcount
    matched, deleted = ctx.tx(run)
    ctx.say(f"Deleting {matched} di(s)")
    ctx.say(f"{deleted} DIs deleted.")


@verb("di", "list", FILTER_USAGE, "Lists DIs.")
def di_list(ctx):
    def run(cur):
        ids = matching_ids(cur, ctx, DI)
        cur.execute("""SELECT d.id, d.osf_id, d.version, d.path,
                              coalesce((SELECT string_agg(t.tag, ', ' ORDER BY t.tag)
                                          FROM di_tags t WHERE t.di_id = d.id), '')
                         FROM dis d WHERE d.id = ANY(%s) ORDER BY d.id""", (ids,))
        return cur.fetchall()
    ctx.table(["Id", "OSF", "Version", "Path", "Tags"], ctx.tx(run))


def _di_and_tag(ctx):
    di_id = int_arg(ctx, "di_id", "di_id")
    if di_id is None:
        raise AdminError("di_id must be a DI id")
    tag = ctx.inv.arg("tag")
    if not tag or not tag.strip():
        raise AdminError("tag must not be empty")
    if len(tag) > 1024:
        raise AdminError("tag is longer than 1024 characters")
    return di_id, tag


def _load_di(cur, di_id):
    cur.execute("SELECT osf_id FROM dis WHERE id = %s", (di_id,))
    row = cur.fetchone()
    if row is None:
        raise AdminError(f"DI {di_id} does not exist")
    return row[0]


@verb("di", "tag", f"di_id=<id> tag=<tag> {EXPIRE_USAGE}", "Moves a tag of the DI's OSF to this DI.",
      mandatory=("di_id", "tag"), allowed=("expire-soft", "expire-hard"))
def di_tag(ctx):
    di_id, tag = _di_and_tag(ctx)
    expiry = expirations(ctx)

    def run(cur):
        osf = _load_di(cur, di_id)
        cur.execute("""SELECT t.di_id FROM di_tags t JOIN dis d ON d.id = t.di_id
                        WHERE d.osf_id = %s AND t.tag = %s AND t.fixed""", (osf, tag))
        fixed = cur.fetchone()
        if fixed and fixed[0] != di_id:
            raise AdminError(f"tag {tag!r} is fixed on DI {fixed[0]} and cannot be moved")
        cur.execute("""DELETE FROM di_tags t USING dis d WHERE d.id = t.di_id AND d.osf_id = %s
                          AND t.tag = %s AND t.di_id <> %s""", (osf, tag, di_id))
        cur.execute("SELECT 1 FROM di_tags WHERE di_id = %s AND tag = %s", (di_id, tag))
        if cur.fetchone() is None:
            cur.execute("INSERT INTO di_tags (di_id, tag, fixed) VALUES (%s, %s, false)", (di_id, tag))
        if expiry:
            cur.execute("""SELECT vr.vm_id FROM vm_runtimes vr JOIN vms v ON v.id = vr.vm_id
                            WHERE v.osf_id = %s AND v.di_tag = %s AND vr.vm_state = 'running'
                              AND vr.current_di_id IS DISTINCT FROM %s""", (osf, tag, di_id))
            runtime.set_vm_expirations(cur, [r[0] for r in cur.fetchall()], expiry)
    ctx.tx(run)
    ctx.say("DI tagged")


@verb("di", "untag", f"di_id=<id> tag=<tag> {EXPIRE_USAGE}", "Removes a (not fixed) tag from a DI.",
      mandatory=("di_id", "tag"), allowed=("expire-soft", "expire-hard"))
def di_untag(ctx):
    di_id, tag = _di_and_tag(ctx)
    expiry = expirations(ctx)

    def run(cur):
        osf = _load_di(cur, di_id)
        cur.execute("SELECT fixed FROM di_tags WHERE di_id = %s AND tag = %s", (di_id, tag))
        row = cur.fetchone()
        if row is None:
            raise AdminError(f"DI {di_id} is not tagged as {tag!r}")
        if row[0]:
            raise AdminError(f"tag {tag!r} of DI {di_id} is fixed (its version) and cannot be removed")
        cur.execute("DELETE FROM di_tags WHERE di_id = %s AND tag = %s", (di_id, tag))
        if expiry:
            cur.execute("""SELECT vr.vm_id FROM vm_runtimes vr JOIN vms v ON v.id = vr.vm_id
                            WHERE v.osf_id = %s AND v.di_tag = %s AND vr.vm_state = 'running'
                              AND vr.current_di_id = %s""", (osf, tag, di_id))
            runtime.set_vm_expirations(cur, [r[0] for r in cur.fetchall()], expiry)
    ctx.tx(run)
