"""host add / del / list / block / unblock / counters."""
from ..db import runtime
from .common import confirmed, ip_arg, matching_ids, text_arg
from .context import AdminError
from .objects import HOST
from .registry import verb

FILTER_USAGE = "[-f id=,name=,address=,state=,blocked=]"


@verb("host", "add", "name=<name> address=<ip>", "Adds a host (a node): its runtime and counters too.",
      mandatory=("name", "address"), allowed=("description",))
def host_add(ctx):
    name = text_arg(ctx, "name", "host name", 127, required=True)
    address = ip_arg(ctx.inv.arg("address"), "address")
    description = ctx.inv.arg("description")

    def run(cur):
        cur.execute("INSERT INTO hosts (name, address, description, frontend, backend)"
                    " VALUES (%s, %s, %s, true, true) RETURNING id", (name, address, description))
        host_id = cur.fetchone()[0]
        runtime.create_host_runtime(cur, host_id)
        return host_id
    ctx.say(f"Host added with id {ctx.tx(run)}")


@verb("host", "del", FILTER_USAGE, "Deletes hosts (with their runtime, counters and properties).")
def host_del(ctx):
    if not confirmed(ctx, "Are you sure you want to delete all hosts?"):
        return 0

    def run(cur):
        ids = matching_ids(cur, ctx, HOST)
        cur.execute("""SELECT h.name, count(*) FROM hosts h JOIN vm_runtimes vr
                         ON vr.host_id = h.id OR vr.l7r_host_id = h.id
                        WHERE h.id = ANY(%s) GROUP BY h.name ORDER BY h.name""", (ids,))
        busy = cur.fetchall()
        if busy:
            name, count = busy[0]
            raise AdminError(f"host {name!r} is still referenced by {count} VM(s) (running there or holding a "
                             "session); stop them or wait for the node to release them")
        cur.execute("DELETE FROM hosts WHERE id = ANY(%s)", (ids,))
        return len(ids)
    count = ctx.tx(run)
    ctx.say(f"Deleting {count} host(s)")


def _timespan(seconds):
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@verb("host", "list", FILTER_USAGE, "Lists hosts.")
def host_list(ctx):
    def run(cur):
        ids = matching_ids(cur, ctx, HOST)
        cur.execute("""
            SELECT h.id, h.name, h.address,
                   EXTRACT(EPOCH FROM (now() AT TIME ZONE 'UTC') - hr.ok_ts),
                   hr.usable_ram, hr.usable_cpu,
                   (SELECT count(*) FROM vm_runtimes vr WHERE vr.host_id = h.id),
                   hr.blocked, hr.state
              FROM hosts h JOIN host_runtimes hr ON hr.host_id = h.id
             WHERE h.id = ANY(%s) ORDER BY h.id""", (ids,))
        return cur.fetchall()
    rows = []
    for r in ctx.tx(run):
        hkd = "-" if r[3] is None else _timespan(float(r[3]))
        rows.append([r[0], r[1], r[2], hkd, r[4], r[5], r[6], r[7], r[8]])
    ctx.table(["Id", "Name", "Address ", "HKD", "Usable RAM", "Usable CPU", "VMs assigned", "Blocked", "State"], rows)


def _set_blocked(ctx, blocked):
    action = "block" if blocked else "unblock"
    if not confirmed(ctx, f"Are you sure you want to {action} all hosts?"):
        return 0

    def run(cur):
        ids = matching_ids(cur, ctx, HOST)
        runtime.set_hosts_blocked(cur, ids, blocked)
    ctx.tx(run)
    return 0


@verb("host", "block", FILTER_USAGE, "Blocks hosts: the load balancer stops placing VMs there.")
def host_block(ctx):
    return _set_blocked(ctx, True)


@verb("host", "unblock", FILTER_USAGE, "Unblocks hosts.")
def host_unblock(ctx):
    return _set_blocked(ctx, False)


@verb("host", "counters", FILTER_USAGE, "Lists the L7R counters of hosts.")
def host_counters(ctx):
    def run(cur):
        ids = matching_ids(cur, ctx, HOST)
        cur.execute("""SELECT h.id, h.name, c.http_requests, c.auth_attempts, c.auth_ok, c.nx_attempts,
                              c.nx_ok, c.short_sessions
                         FROM hosts h LEFT JOIN host_counters c ON c.host_id = h.id
                        WHERE h.id = ANY(%s) ORDER BY h.id""", (ids,))
        return cur.fetchall()
    ctx.table(["Id", "Name", "HTTP Requests ", "Auth attempts", "Auth OK", "NX attempts", "NX OK", "Short sessions"],
              ctx.tx(run))
