"""vm add / del / list / start / stop / block / unblock / disconnect_user / edit / counters.

Commands reach the nodes the way the original's do: a column in vm_runtimes (vm_cmd,
user_cmd) plus a NOTIFY to the node concerned, sent inside the same transaction so it is
delivered only if the command is committed. The node also polls, so a lost NOTIFY is a
delay, not a loss. Unlike the original, `vm disconnect_user` notifies the L7R's node
(`qvd_cmd_for_user_on_host<l7r_host_id>`) instead of waiting for its poll, and aborts
the sessions of the VMs that have one even when other matched VMs have none.
"""
import datetime

from ..config import ConfigError
from ..config.network import NetworkError
from ..db import runtime
from ..db.placement import NoHostAvailable
from ..db.provision import add_vm, used_vm_addresses
from .common import confirmed, int_arg, ip_arg, matching_ids, text_arg
from .context import AdminError
from .dates import parse_when
from .di import osf_args, resolve_osf
from .objects import VM
from .registry import verb
from .user import normalise_login

FILTER_USAGE = "[-f id=,name=,user=,osf=,host=,state=,ip=,di_tag=,user_state=,blocked=,property.<k>=] [-t tenant]"
MAX_BULK = 10000


def vm_network(ctx):
    try:
        return ctx.cfg.vm_network()
    except ConfigError as exc:  # names the key
        raise AdminError(str(exc)) from None


def check_vm_ip(ctx, text):
    ip = ip_arg(text, "ip")
    net = vm_network(ctx)
    if not net.is_vm_address(ip):
        raise AdminError(f"ip {ip} is outside the VM range {net.start} - {net.broadcast - 1} "
                         "(vm.network.ip.start, vm.network.netmask)")
    return ip


def _resolve_user(cur, ctx):
    if ctx.inv.has("user") and ctx.inv.has("user_id"):
        raise AdminError("Syntax error: parameters 'user_id' and 'user' are mutually exclusive")
    user_id = int_arg(ctx, "user_id", "user_id")
    if user_id is not None:
        cur.execute("SELECT id, tenant_id FROM users WHERE id = %s", (user_id,))
        row = cur.fetchone()
        if row is None:
            raise AdminError(f"user {user_id} does not exist")
        return row
    login = normalise_login(ctx.cfg, ctx.inv.arg("user") or "")
    tenant = ctx.tenant(1)
    cur.execute("SELECT id, tenant_id FROM users WHERE login = %s AND tenant_id = %s", (login, tenant))
    row = cur.fetchone()
    if row is None:
        raise AdminError(f"user {login!r} not found in tenant {tenant}")
    return row


@verb("vm", "add", "name=<name> (user=<login> | user_id=<id>) (osf=<name> | osf_id=<id>) [ip=<ip>] "
      "[di_tag=<tag>] [bulk=<N>] [-t tenant]", "Adds virtual machines (IP from the VM range unless given).",
      mandatory=("name", ("user", "user_id"), ("osf", "osf_id")),
      allowed=("ip", "di_tag", "bulk", "storage", "description"))
def vm_add(ctx):
    name = text_arg(ctx, "name", "VM name", 64, required=True)
    di_tag = text_arg(ctx, "di_tag", "di_tag", 128, default="default") or "default"
    osf_id, osf_name = osf_args(ctx)
    bulk = int_arg(ctx, "bulk", "bulk", minimum=1)
    ip_text = ctx.inv.arg("ip") or ""
    if bulk is not None and ip_text:
        raise AdminError("Syntax error: parameters 'bulk' and 'ip' are mutually exclusive")
    if bulk is not None and bulk > MAX_BULK:
        raise AdminError(f"bulk: at most {MAX_BULK} VMs at once")
    names = [name] if bulk is None else [f"{name}-{i}" for i in range(bulk)]
    if any(len(n) > 64 for n in names):
        raise AdminError("VM name is longer than 64 characters")
    net = vm_network(ctx)
    ip = check_vm_ip(ctx, ip_text) if ip_text else None
    storage = ctx.inv.arg("storage") or ""
    description = ctx.inv.arg("description")

    def run(cur):
        user_id, user_tenant = _resolve_user(cur, ctx)
        osf, osf_tenant = resolve_osf(cur, ctx, osf_id, osf_name)
        if user_tenant != osf_tenant:
            raise AdminError(f"the user (tenant {user_tenant}) and the OSF (tenant {osf_tenant}) "
                             "belong to different tenants")
        used = used_vm_addresses(cur)
        if ip is not None and ip in used:
            raise AdminError(f"IP address {ip} is already used by VM {used[ip]!r}")
        ids = []
        for vm_name in names:
            try:
                vm_ip = ip or net.free_vm_address(used)
            except NetworkError as exc:
                raise AdminError(str(exc)) from None
            used[vm_ip] = vm_name
            ids.append(add_vm(cur, vm_name, user_id, osf, di_tag, vm_ip, storage, description))
        return ids
    for vm_id in ctx.tx(run):
        ctx.say(f"VM added with id {vm_id}")


@verb("vm", "del", FILTER_USAGE, "Deletes stopped virtual machines.")
def vm_del(ctx):
    if not confirmed(ctx, "Are you sure you want to delete all vms?"):
        return 0

    def run(cur):
        ids = matching_ids(cur, ctx, VM)
        cur.execute("""DELETE FROM vms WHERE id = ANY(%s)
                          AND id IN (SELECT vm_id FROM vm_runtimes WHERE vm_state = 'stopped')""", (ids,))
        return len(ids), cur.rowcount
    matched, deleted = ctx.tx(run)
    ctx.say(f"Deleting {matched} vm(s)")
    if deleted < matched:
        ctx.warn(f"{matched - deleted} VM(s) not deleted: they are not stopped")


def _local(ts):
    if ts is None:
        return None
    return ts.replace(tzinfo=datetime.UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


@verb("vm", "list", FILTER_USAGE, "Lists virtual machines.")
def vm_list(ctx):
    def run(cur):
        ids = matching_ids(cur, ctx, VM)
        cur.execute("""
            SELECT v.id, v.name, u.login, ru.login, v.ip, o.name, v.di_tag,
                   (SELECT d.version FROM dis d JOIN di_tags t ON t.di_id = d.id
                     WHERE d.osf_id = v.osf_id AND t.tag = v.di_tag ORDER BY d.id DESC LIMIT 1),
                   cd.version, h.name, vr.vm_state, lh.name, vr.user_state, vr.blocked,
                   vr.vm_expiration_soft, vr.vm_expiration_hard
              FROM vms v JOIN users u ON u.id = v.user_id JOIN osfs o ON o.id = v.osf_id
              JOIN vm_runtimes vr ON vr.vm_id = v.id
              LEFT JOIN users ru ON ru.id = vr.real_user_id
              LEFT JOIN dis cd ON cd.id = vr.current_di_id
              LEFT JOIN hosts h ON h.id = vr.host_id
              LEFT JOIN hosts lh ON lh.id = vr.l7r_host_id
             WHERE v.id = ANY(%s) ORDER BY v.id""", (ids,))
        return cur.fetchall()
    rows = [list(r[:14]) + [_local(r[14]), _local(r[15])] for r in ctx.tx(run)]
    ctx.table(["Id", "Name", "User", "RealUser", "Ip", "OSF", "DI_Tag", "DI", "Running DI", "Host", "State", "L7R",
               "UserState", "Blocked", "Expire soft", "Expire hard"], rows)


def _start_one(cur, ctx, vm_id):
    placed = runtime.request_start(cur, ctx.cfg, vm_id)
    return placed is not None and placed[1] != "not_stopped"


@verb("vm", "start", FILTER_USAGE, "Starts stopped virtual machines (placing them on a host).")
def vm_start(ctx):
    if not confirmed(ctx, "Are you sure you want to start all machines?"):
        return 0
    ids = ctx.tx(lambda cur: matching_ids(cur, ctx, VM))
    started = 0
    for vm_id in ids:
        try:
            if ctx.tx(_start_one, ctx, vm_id):
                started += 1
        except NoHostAvailable:
            ctx.warn(f"VM {vm_id}: Unable to start machine, no hosts available")
    ctx.say(f"Started {started} VMs.")


def _stop_one(cur, vm_id):
    return runtime.request_stop(cur, vm_id) in ("commanded", "cancelled")


@verb("vm", "stop", FILTER_USAGE, "Stops virtual machines.")
def vm_stop(ctx):
    if not confirmed(ctx, "Are you sure you want to stop all machines?"):
        return 0
    ids = ctx.tx(lambda cur: matching_ids(cur, ctx, VM))
    stopped = sum(1 for vm_id in ids if ctx.tx(_stop_one, vm_id))
    ctx.say(f"Stopped {stopped} VMs.")


def _set_blocked(ctx, blocked):
    action = "block" if blocked else "unblock"
    if not confirmed(ctx, f"Are you sure you want to {action} all machines?"):
        return 0

    def run(cur):
        ids = matching_ids(cur, ctx, VM)
        runtime.set_vms_blocked(cur, ids, blocked)
    ctx.tx(run)
    return 0


@verb("vm", "block", FILTER_USAGE, "Blocks virtual machines: users cannot connect to them.")
def vm_block(ctx):
    return _set_blocked(ctx, True)


@verb("vm", "unblock", FILTER_USAGE, "Unblocks virtual machines.")
def vm_unblock(ctx):
    return _set_blocked(ctx, False)


@verb("vm", "disconnect_user", FILTER_USAGE, "Ends the user sessions on virtual machines.")
def vm_disconnect_user(ctx):
    if not confirmed(ctx, "Are you sure you want to disconnect all users?"):
        return 0

    def run(cur):
        ids = matching_ids(cur, ctx, VM)
        return runtime.request_disconnect(cur, ids)
    ctx.say(f"Disconnected {ctx.tx(run)} users.")


_EDIT_TEXT = {"name": 64, "description": 32768, "di_tag": 128, "storage": 4096}
_EDIT_TIMES = {"expire-soft": "vm_expiration_soft", "expire-hard": "vm_expiration_hard"}


@verb("vm", "edit", "key=value ... (name, description, di_tag, ip, storage, expire-soft=DATE|'', "
      "expire-hard=DATE|'') " + FILTER_USAGE, "Changes virtual machines.", allowed=None)
def vm_edit(ctx):
    vm_cols, rt_cols = {}, {}
    for key, value in ctx.inv.args:
        if key in _EDIT_TEXT:
            if len(value) > _EDIT_TEXT[key]:
                raise AdminError(f"{key} is longer than {_EDIT_TEXT[key]} characters")
            if key in ("name", "di_tag") and not value.strip():
                raise AdminError(f"{key} must not be empty")
            vm_cols[key] = value
        elif key == "ip":
            vm_cols["ip"] = check_vm_ip(ctx, value)
        elif key in _EDIT_TIMES:
            rt_cols[_EDIT_TIMES[key]] = parse_when(value) if value else None
        else:
            raise AdminError(f"cannot edit '{key}' (editable: name, description, di_tag, ip, storage, "
                             "expire-soft, expire-hard)")
    if not vm_cols and not rt_cols:
        raise AdminError("Syntax error: nothing to edit (usage: vm edit key=value ... -f filter)")
    if not confirmed(ctx, "Are you sure you want to edit all machines?"):
        return 0

    def run(cur):
        ids = matching_ids(cur, ctx, VM)
        if vm_cols:
            sets = ", ".join(f"{col} = %s" for col in vm_cols)  # names from the fixed list above
            cur.execute(f"UPDATE vms SET {sets} WHERE id = ANY(%s)", list(vm_cols.values()) + [ids])
        if rt_cols:
            runtime.set_vm_expirations(cur, ids, rt_cols)
        return len(ids)
    ctx.say(f"Edited {ctx.tx(run)} VMs.")


@verb("vm", "counters", FILTER_USAGE, "Shows run counters of virtual machines.")
def vm_counters(ctx):
    def run(cur):
        ids = matching_ids(cur, ctx, VM)
        cur.execute("""SELECT v.id, v.name, c.run_attempts, c.run_ok, vr.vm_state, vr.blocked
                         FROM vms v JOIN vm_runtimes vr ON vr.vm_id = v.id
                         LEFT JOIN vm_counters c ON c.vm_id = v.id
                        WHERE v.id = ANY(%s) ORDER BY v.id""", (ids,))
        return cur.fetchall()
    rows = ctx.tx(run)
    running = sum(1 for r in rows if r[4] == "running")
    blocked = sum(1 for r in rows if r[5])
    ctx.table(["Virtual machines", "Running", "Blocked"], [[len(rows), running, blocked]])
    ctx.print("\n")
    ctx.table(["Id", "Name", "Run attempts", "Run OK"], [r[:4] for r in rows])
