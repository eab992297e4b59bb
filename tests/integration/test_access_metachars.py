"""SQL metacharacters in logins, passwords, tenant and VM names and admin arguments are
data: stored and shown verbatim by qvd-admin and by the L7R's list_of_vm, never
interpreted (no injection, no LIKE wildcards where an exact name is meant)."""
import json

import pytest
from helpers.admin import Admin

from helpers.hostile import tls_node
from helpers.l7r_env import Reader, basic, get, open_conn

LOGIN = "o'brien; drop table users;--"          # logins are normalised to lower case
PASSWORD = "pa'ss\"; DROP TABLE users;-- \\%_"
VM_NAMES = ["it's \"quoted\"", "back\\slash\\", "100%", "100%x", "_", "a_b", "axb",
            "robert'); DROP TABLE vms;--", "%' OR '1'='1", "semi;colon $1 \\x00"]


@pytest.fixture
def env(tmp_path, pg_server, fresh_db_name):
    node = tls_node(tmp_path, pg_server, fresh_db_name)
    admin = Admin(node.conf_path, node.db)
    admin.ok("config", "set", "vm.network.ip.start=10.3.15.50", "vm.network.netmask=24",
             "vm.network.gateway=10.3.15.1")     # rows only: these VMs are never started
    admin.ok("osf", "add", "name=desk")
    yield node, admin
    node.close()


def l7r_list(node, login, password):
    sock = open_conn(node.svc.port, node.cert)
    try:
        get(sock, "/qvd/list_of_vm", [("Authorization", basic(login, password))])
        resp = Reader(sock).response()
    finally:
        sock.close()
    return resp.status, (json.loads(resp.body) if resp.status == 200 else None)


def column(out, title):
    """The cells of one column of a qvd-admin table (columns are padded to the header's layout)."""
    lines = out.splitlines()
    header = lines[0]
    start = header.index(title)
    later = [header.index(t, start + len(title)) for t in header[start + len(title):].split()]
    end = later[0] if later else None
    return [line[start:end].rstrip() for line in lines[2:] if line.strip()]


def test_metacharacters_stored_and_shown_verbatim(env):
    node, admin = env
    tables_before = node.db.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")
    admin.ok("user", "add", f"login={LOGIN}", f"password={PASSWORD}")
    admin.ok("user", "add", "login=o_brien; drop table users;--", "password=other")
    [(stored,)] = node.db.query("SELECT login FROM users WHERE login = %s", (LOGIN,))
    assert stored == LOGIN
    out = admin.ok("user", "list").out
    assert sorted(column(out, "Login")) == sorted([LOGIN, "o_brien; drop table users;--"]), out
    for name in VM_NAMES:
        admin.ok("vm", "add", f"name={name}", f"user={LOGIN}", "osf=desk")
    assert sorted(r[0] for r in node.db.query("SELECT name FROM vms")) == sorted(VM_NAMES)
    out = admin.ok("vm", "list").out
    assert sorted(column(out, "Name")) == sorted(VM_NAMES), out
    assert set(column(out, "User")) == {LOGIN}, out
    # filters mean exact names: % and _ are not wildcards (qvd-admin's own wildcards are * and ?)
    for name in ("100%", "a_b", "_"):
        listed = admin.ok("vm", "list", "-q", "-f", f"name={name}").out.splitlines()
        assert len(listed) == 1 and name in listed[0], (name, listed)
    # the L7R: the user logs in with every character of login and password, sees the names verbatim
    status, vms = l7r_list(node, LOGIN, PASSWORD)
    assert status == 200
    assert sorted(v["name"] for v in vms) == sorted(VM_NAMES)
    # no wildcard login: '_' in a login is a character, not "any one"
    assert l7r_list(node, "o_brien; drop table users;--", PASSWORD)[0] == 401
    assert l7r_list(node, "o%", PASSWORD)[0] == 401
    # a password change by qvd-admin with metacharacters works the same way
    admin.ok("user", "passwd", f"user={LOGIN}", "password=n'ew\\%;--")
    assert l7r_list(node, LOGIN, PASSWORD)[0] == 401
    assert l7r_list(node, LOGIN, "n'ew\\%;--")[0] == 200
    # nothing was dropped or added
    assert node.db.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1") == tables_before
    assert node.db.query_one("SELECT count(*) FROM users")[0] == 2


def test_metacharacters_in_tenant_names_and_logins(env):
    node, admin = env
    seed = node.seed
    tenant = seed.tenant("t'en%_ant;--")
    seed.tenant("tXen%Xant;--")
    user = seed.user("bob", "bob-pw", tenant_id=tenant)
    osf = seed.osf("t-osf", tenant_id=tenant)
    seed.vm("bob's \"vm\" 50%_off", user, osf)
    status, vms = l7r_list(node, "bob@t'en%_ant;--", "bob-pw")
    assert status == 200 and [v["name"] for v in vms] == ["bob's \"vm\" 50%_off"]
    for login in ("bob@t_en%_ant;--", "bob@t'en%", "bob@%", "bob@tXen%Xant;--", "bob#t'en__ant;--"):
        assert l7r_list(node, login, "bob-pw")[0] == 401, login
