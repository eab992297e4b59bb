"""The objects qvd-admin works on, and their -f filters turned into parameterised SQL.

Filter rules (qvd-admin.pl ``set_filter``): ``-f k1=v1,k2=v2`` is an AND; a value with
``*`` or ``?`` becomes LIKE (``*``->``%``, ``?``->``_``, a literal ``%``/``_``/``\\`` is
escaped); ``property.<key>=<value>`` matches objects having that property. Every key is
looked up in the object's table of aliases; an unknown key is an error, never SQL.
Tenant scoping: users and OSFs by their tenant, VMs and DIs by their OSF's tenant
(default tenant 1, ``-t`` to change); hosts are global.
"""
from collections import namedtuple

from .context import AdminError

# kind: int, bool or text
Column = namedtuple("Column", "sql kind")

_BOOL_TRUE = {"1", "true", "yes", "y", "t", "on"}
_BOOL_FALSE = {"0", "false", "no", "n", "f", "off"}


class ObjectKind:
    def __init__(self, name, table, id_sql, from_sql, columns, tenant_sql=None, default_tenant=1,
                 label_sql=None, plural=None, prop_table=None, prop_fk=None, prop_tenant_sql=None,
                 qvd_object=None):
        self.name = name
        self.table = table
        self.id_sql = id_sql
        self.from_sql = from_sql
        self.columns = columns
        self.tenant_sql = tenant_sql
        self.default_tenant = default_tenant
        self.label_sql = label_sql
        self.plural = plural or name + "s"
        self.prop_table = prop_table
        self.prop_fk = prop_fk
        self.prop_tenant_sql = prop_tenant_sql
        self.qvd_object = qvd_object or name


HOST = ObjectKind(
    "host", "hosts", "hosts.id",
    "hosts JOIN host_runtimes ON host_runtimes.host_id = hosts.id",
    {
        "id": Column("hosts.id", "int"),
        "name": Column("hosts.name", "text"),
        "address": Column("hosts.address", "text"),
        "frontend": Column("hosts.frontend", "bool"),
        "backend": Column("hosts.backend", "bool"),
        "blocked": Column("host_runtimes.blocked", "bool"),
        "state": Column("host_runtimes.state", "text"),
    },
    label_sql="hosts.name", plural="hosts", prop_table="host_properties", prop_fk="host_id",
    prop_tenant_sql="-1")

USER = ObjectKind(
    "user", "users", "users.id", "users",
    {
        "id": Column("users.id", "int"),
        "login": Column("users.login", "text"),
        "blocked": Column("users.blocked", "bool"),
        "description": Column("users.description", "text"),
    },
    tenant_sql="users.tenant_id", label_sql="users.login", plural="users",
    prop_table="user_properties", prop_fk="user_id", prop_tenant_sql="users.tenant_id")

OSF = ObjectKind(
    "osf", "osfs", "osfs.id", "osfs",
    {
        "id": Column("osfs.id", "int"),
        "name": Column("osfs.name", "text"),
        "memory": Column("osfs.memory", "int"),
        "use_overlay": Column("osfs.use_overlay", "bool"),
        "user_storage_size": Column("osfs.user_storage_size", "int"),
        "is_application": Column("osfs.is_application", "bool"),
    },
    tenant_sql="osfs.tenant_id", label_sql="osfs.name", plural="OSFs",
    prop_table="osf_properties", prop_fk="osf_id", prop_tenant_sql="osfs.tenant_id")

DI = ObjectKind(
    "di", "dis", "dis.id", "dis JOIN osfs ON osfs.id = dis.osf_id",
    {
        "id": Column("dis.id", "int"),
        "osf_id": Column("dis.osf_id", "int"),
        "osf": Column("osfs.name", "text"),
        "path": Column("dis.path", "text"),
        "version": Column("dis.version", "text"),
        "blocked": Column("dis.blocked", "bool"),
        "tag": Column("tag", "tag"),
    },
    tenant_sql="osfs.tenant_id", label_sql="dis.path", plural="DIs",
    prop_table="di_properties", prop_fk="di_id", prop_tenant_sql="osfs.tenant_id")

VM = ObjectKind(
    "vm", "vms", "vms.id",
    "vms JOIN users ON users.id = vms.user_id JOIN osfs ON osfs.id = vms.osf_id"
    " JOIN vm_runtimes ON vm_runtimes.vm_id = vms.id LEFT JOIN hosts ON hosts.id = vm_runtimes.host_id",
    {
        "id": Column("vms.id", "int"),
        "name": Column("vms.name", "text"),
        "user": Column("users.login", "text"),
        "osf": Column("osfs.name", "text"),
        "host": Column("hosts.name", "text"),
        "state": Column("vm_runtimes.vm_state", "text"),
        "vm_state": Column("vm_runtimes.vm_state", "text"),
        "user_id": Column("vms.user_id", "int"),
        "ip": Column("vms.ip", "text"),
        "osf_id": Column("vms.osf_id", "int"),
        "di_tag": Column("vms.di_tag", "text"),
        "host_id": Column("vm_runtimes.host_id", "int"),
        "user_state": Column("vm_runtimes.user_state", "text"),
        "vm_pid": Column("vm_runtimes.vm_pid", "int"),
        "blocked": Column("vm_runtimes.blocked", "bool"),
    },
    tenant_sql="osfs.tenant_id", label_sql="vms.name", plural="virtual machines",
    prop_table="vm_properties", prop_fk="vm_id", prop_tenant_sql="users.tenant_id")

KINDS = {k.name: k for k in (HOST, USER, OSF, DI, VM)}


def has_wildcard(value):
    return "*" in value or "?" in value


def like_pattern(value):
    """Shell-style wildcards to a LIKE pattern with backslash as the escape character."""
    out = []
    for ch in value:
        if ch in "\\%_":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def parse_bool(value, what):
    low = str(value).strip().lower()
    if low in _BOOL_TRUE:
        return True
    if low in _BOOL_FALSE:
        return False
    raise AdminError(f"{what}: malformed boolean {value!r} (use 1/0, yes/no or true/false)")


def _match(sql, kind, value, key, params):
    """One condition 'sql matches value'; appends to params."""
    if kind == "bool":
        params.append(parse_bool(value, f"filter {key}"))
        return f"{sql} IS NOT DISTINCT FROM %s"
    if has_wildcard(value):
        params.append(like_pattern(value))
        cast = "::text" if kind == "int" else ""
        return f"{sql}{cast} LIKE %s ESCAPE '\\'"
    if kind == "int":
        try:
            params.append(int(value))
        except ValueError:
            raise AdminError(f"filter {key}: {value!r} is not a number") from None
        return f"{sql} = %s"
    params.append(value)
    return f"{sql} = %s"


def where_clause(kind, filters, tenant):
    """(sql, params) selecting the objects of kind matched by filters within tenant."""
    conds, params = [], []
    for key, value in filters:
        if key.startswith("property.") and len(key) > len("property.") and kind.prop_table:
            pkey = key[len("property."):]
            params.append(pkey)
            inner = _match("p.value", "text", value, key, params)
            conds.append(
                f"EXISTS (SELECT 1 FROM {kind.prop_table} p"
                " JOIN qvd_object_properties_list q ON q.id = p.property_id"
                " JOIN properties_list l ON l.id = q.property_id"
                f" WHERE p.{kind.prop_fk} = {kind.id_sql} AND l.key = %s AND {inner})")
            continue
        col = kind.columns.get(key)
        if col is None:
            valid = ", ".join(sorted(kind.columns)) + ", property.<key>"
            raise AdminError(f"unknown filter key '{key}' for {kind.name} (valid: {valid})")
        if col.kind == "tag":
            inner = _match("t.tag", "text", value, key, params)
            conds.append(f"EXISTS (SELECT 1 FROM di_tags t WHERE t.di_id = dis.id AND {inner})")
        else:
            conds.append(_match(col.sql, col.kind, value, key, params))
    if kind.tenant_sql is not None and tenant is not None:
        conds.append(f"{kind.tenant_sql} = %s")
        params.append(tenant)
    return (" AND ".join(conds) if conds else "TRUE"), params


def select_ids(cur, kind, filters, tenant, lock=False):
    """Ids of the matching objects, ordered by id."""
    where, params = where_clause(kind, filters, tenant)
    cur.execute(f"SELECT {kind.id_sql} FROM {kind.from_sql} WHERE {where} ORDER BY {kind.id_sql}", params)
    return [row[0] for row in cur.fetchall()]


def require_match(ids, kind, filters):
    """A filter that matches nothing is an error (without a filter an empty set is fine)."""
    if not ids and filters:
        shown = ",".join(f"{k}={v}" for k, v in filters)
        raise AdminError(f"filter '{shown}' matches no {kind.name}")
    return ids
