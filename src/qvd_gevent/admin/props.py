"""propset / propget / propdel for host, user, osf, di and vm, on QVD 4's property model.

A property name lives in properties_list (key, tenant), is enabled for an object kind in
qvd_object_properties_list, and holds a value per object in <obj>_properties. propset
creates the first two rows when missing (the legacy CLI predates this model and would
fail on a 4.3 database). Host properties belong to tenant -1 (hosts have no tenant).
"""
from ..db.provision import property_slot
from .common import confirmed, matching_ids
from .context import AdminError
from .objects import KINDS, select_ids
from .registry import verb

_LABEL = {"host": "hosts", "user": "users", "osf": "OSFs", "di": "DIs", "vm": "virtual machines"}


def _tenant(ctx, kind):
    return ctx.tenant(kind.default_tenant) if kind.tenant_sql else None


def make_propset(kind):
    def propset(ctx):
        pairs = ctx.inv.args
        if not pairs:
            raise AdminError(f"Syntax error: nothing to set (usage: {kind.name} propset key=value ... [-f filter])")
        for key, value in pairs:
            if len(key) > 1024:
                raise AdminError("property key is longer than 1024 characters")
            if len(value) > 32768:
                raise AdminError(f"value of property {key} is longer than 32768 characters")

        def run(cur):
            ids = select_ids(cur, kind, ctx.filters, _tenant(ctx, kind))
            if not ids:
                raise AdminError(f"No properties were set (filter matched 0 {_LABEL[kind.name]})")
            cur.execute(f"SELECT {kind.id_sql}, {kind.prop_tenant_sql} FROM {kind.from_sql}"
                        f" WHERE {kind.id_sql} = ANY(%s)", (ids,))
            tenants = dict(cur.fetchall())
            cache = {}
            for obj_id in ids:
                for key, value in pairs:
                    tkey = (key, tenants[obj_id])
                    if tkey not in cache:
                        cache[tkey] = property_slot(cur, kind.qvd_object, key, tenants[obj_id])
                    cur.execute(f"INSERT INTO {kind.prop_table} ({kind.prop_fk}, property_id, value)"
                                " VALUES (%s, %s, %s)"
                                f" ON CONFLICT ({kind.prop_fk}, property_id) DO UPDATE SET value = EXCLUDED.value",
                                (obj_id, cache[tkey], value))
            return len(ids)
        ctx.say(f"propset in {ctx.tx(run)} {_LABEL[kind.name]}.")
    return propset


def _prop_join(kind):
    return (f" JOIN {kind.prop_table} p ON p.{kind.prop_fk} = {kind.id_sql}"
            " JOIN qvd_object_properties_list q ON q.id = p.property_id"
            " JOIN properties_list l ON l.id = q.property_id")


def make_propget(kind):
    def propget(ctx):
        keys = [k for k, _ in ctx.inv.args]

        def run(cur):
            ids = matching_ids(cur, ctx, kind)
            sql = (f"SELECT {kind.label_sql}, l.key, p.value FROM {kind.from_sql}{_prop_join(kind)}"
                   f" WHERE {kind.id_sql} = ANY(%s)")
            params = [ids]
            if keys:
                sql += " AND l.key = ANY(%s)"
                params.append(keys)
            cur.execute(sql + f" ORDER BY {kind.id_sql}, l.key", params)
            return cur.fetchall()
        ctx.print("".join(f"{label}\t{key}={value}\n" for label, key, value in ctx.tx(run)))
    return propget


def make_propdel(kind):
    def propdel(ctx):
        keys = [k for k, _ in ctx.inv.args]
        if not confirmed(ctx, f"Are you sure you want to delete the prop in all {_LABEL[kind.name]}?"):
            return 0

        def run(cur):
            ids = matching_ids(cur, ctx, kind)
            sql = (f"DELETE FROM {kind.prop_table} p USING qvd_object_properties_list q, properties_list l"
                   f" WHERE q.id = p.property_id AND l.id = q.property_id AND p.{kind.prop_fk} = ANY(%s)")
            params = [ids]
            if keys:
                sql += " AND l.key = ANY(%s)"
                params.append(keys)
            cur.execute(sql, params)
            return cur.rowcount
        count = ctx.tx(run)
        ctx.say(f"{count} properties deleted.")
        return 0
    return propdel


for _name, _kind in KINDS.items():
    _filter = "[-f filter]" + (" [-t tenant]" if _kind.tenant_sql else "")
    verb(_name, "propset", f"key=value ... {_filter}", f"Sets properties of {_LABEL[_name]}.",
         allowed=None)(make_propset(_kind))
    verb(_name, "propget", f"[key ...] {_filter}", f"Prints properties of {_LABEL[_name]}.",
         allowed=None, bare="keys")(make_propget(_kind))
    verb(_name, "propdel", f"[key ...] {_filter}", f"Deletes properties of {_LABEL[_name]} (all without keys).",
         allowed=None, bare="keys")(make_propdel(_kind))
