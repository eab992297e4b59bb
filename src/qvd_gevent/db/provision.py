"""Creating users and VMs, and setting properties: the rows `qvd-admin user add`, `vm add`
and `propset` write, shared with the L7R's `auto` authentication plugin so that a user
or VM made at first login is exactly one an administrator would have made.

Every function takes an open cursor: the caller owns the transaction (SERIALIZABLE in
this project, so a concurrent caller that read the same rows is retried, not duplicated).
The runtime row of a new VM is db.runtime's business, like every vm_runtimes write.
"""
from . import runtime


def add_user(cur, login, tenant_id, password=None, description=None):
    """Insert a users row; password is an already-hashed value or None (no local password:
    only a plugin such as ldap can log this user in). Returns the new id."""
    cur.execute("INSERT INTO users (login, password, tenant_id, description) VALUES (%s, %s, %s, %s)"
                " RETURNING id", (login, password, tenant_id, description))
    return cur.fetchone()[0]


def used_vm_addresses(cur):
    """{ip: vm name} of every VM that has an address (for free_vm_address)."""
    cur.execute("SELECT ip, name FROM vms WHERE ip IS NOT NULL")
    return dict(cur.fetchall())


def add_vm(cur, name, user_id, osf_id, di_tag, ip, storage="", description=None):
    """Insert a VM with its runtime row (stopped, disconnected) and counters. Returns its id."""
    cur.execute("""INSERT INTO vms (name, user_id, osf_id, di_tag, ip, storage, description)
                   VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id""",
                (name, user_id, osf_id, di_tag, ip, storage, description))
    vm_id = cur.fetchone()[0]
    runtime.create_vm_runtime(cur, vm_id)
    return vm_id


def property_slot(cur, qvd_object, key, tenant_id):
    """Id of the qvd_object_properties_list row for (key, tenant, object kind), created
    when missing (QVD 4's property model: a name per tenant, enabled per object kind)."""
    cur.execute("INSERT INTO properties_list (key, tenant_id) VALUES (%s, %s) ON CONFLICT (key, tenant_id) DO NOTHING",
                (key, tenant_id))
    cur.execute("SELECT id FROM properties_list WHERE key = %s AND tenant_id = %s", (key, tenant_id))
    prop = cur.fetchone()[0]
    cur.execute("INSERT INTO qvd_object_properties_list (property_id, qvd_object) VALUES (%s, %s)"
                " ON CONFLICT (property_id, qvd_object) DO NOTHING", (prop, qvd_object))
    cur.execute("SELECT id FROM qvd_object_properties_list WHERE property_id = %s AND qvd_object = %s",
                (prop, qvd_object))
    return cur.fetchone()[0]


def user_property(cur, user_id, key):
    """The value of one property of a user, or None."""
    cur.execute("SELECT p.value FROM user_properties p JOIN qvd_object_properties_list q ON q.id = p.property_id"
                " JOIN properties_list l ON l.id = q.property_id WHERE p.user_id = %s AND l.key = %s",
                (user_id, key))
    row = cur.fetchone()
    return None if row is None else row[0]


def set_user_property(cur, user_id, tenant_id, key, value):
    slot = property_slot(cur, "user", key, tenant_id)
    cur.execute("INSERT INTO user_properties (user_id, property_id, value) VALUES (%s, %s, %s)"
                " ON CONFLICT (user_id, property_id) DO UPDATE SET value = EXCLUDED.value",
                (user_id, slot, value))
