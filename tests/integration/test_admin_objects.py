"""qvd-admin host / user / osf verbs: good input, bad input, the DB unchanged after a failure."""
import pytest
from helpers.admin import Admin

from qvd_gevent.db.passwords import is_legacy, verify_password


@pytest.fixture
def admin(node_conf, db):
    return Admin(node_conf, db)

EVIL = "x'); DROP TABLE vms;--"


def test_host_add_creates_runtime_and_counters(admin, db):
    assert admin.ok("host", "add", "name=node1", "address=10.3.15.2").out == "Host added with id 10000\n"
    assert db.query("SELECT name, address, frontend, backend FROM hosts") == [("node1", "10.3.15.2", True, True)]
    assert db.query("SELECT host_id, state, blocked FROM host_runtimes") == [(10000, "stopped", False)]
    assert db.query("SELECT host_id, http_requests FROM host_counters") == [(10000, 0)]


def test_host_add_bad_input(admin):
    admin.ok("host", "add", "name=node1", "address=10.3.15.2")
    admin.fails("host", "add", "name=node1", "address=10.3.15.3", contains="a host named 'node1' already exists")
    admin.fails("host", "add", "name=node2", "address=10.3.15.2", contains="address '10.3.15.2' already exists")
    admin.fails("host", "add", "name=node2", "address=10.3.15.999", contains="is not an IPv4 address")
    admin.fails("host", "add", "name=node2", "address=", contains="is not an IPv4 address")
    admin.fails("host", "add", "name=node2", contains="parameter 'address' is mandatory")
    admin.fails("host", "add", "name=", "address=10.3.15.9", contains="must not be empty")
    admin.fails("host", "add", "name=" + "n" * 128, "address=10.3.15.9", contains="longer than 127")


def test_host_list_block_unblock_counters(admin, db):
    admin.ok("host", "add", "name=node1", "address=10.3.15.2")
    admin.ok("host", "add", "name=node2", "address=10.3.15.3")
    out = admin.ok("host", "list").out.splitlines()
    assert out[0] == "Id    Name  Address   HKD Usable RAM Usable CPU VMs assigned Blocked State  "
    assert out[2] == "10000 node1 10.3.15.2 -   -          -          0            0       stopped"
    admin.ok("host", "block", "-f", "name=node2")
    assert db.query("SELECT host_id FROM host_runtimes WHERE blocked") == [(10001,)]
    db.execute("UPDATE host_runtimes SET ok_ts = (now() AT TIME ZONE 'UTC') - interval '65 seconds',"
               " usable_ram = 4000, usable_cpu = 3.5, state = 'running' WHERE host_id = 10000")
    out = admin.ok("host", "list", "-q", "-f", "id=10000").out
    assert out.startswith("10000 node1 10.3.15.2 00:01:0") and "4000" in out and "3.5" in out and "running" in out
    admin.ok("host", "unblock", "-f", "name=node*")
    assert db.query("SELECT count(*) FROM host_runtimes WHERE blocked") == [(0,)]
    res = admin.ok("host", "block")  # no filter, no terminal: not confirmed, nothing done
    assert "Are you sure you want to block all hosts? [y/N]" in res.out
    assert db.query("SELECT count(*) FROM host_runtimes WHERE blocked") == [(0,)]
    admin.ok("host", "block", "--force")
    assert db.query("SELECT count(*) FROM host_runtimes WHERE blocked") == [(2,)]
    db.execute("UPDATE host_counters SET http_requests = 7 WHERE host_id = 10001")
    out = admin.ok("host", "counters", "-f", "name=node2").out.splitlines()
    assert out[0].split() == ["Id", "Name", "HTTP", "Requests", "Auth", "attempts", "Auth", "OK", "NX", "attempts",
                              "NX", "OK", "Short", "sessions"]
    assert out[2].split() == ["10001", "node2", "7", "0", "0", "0", "0", "0"]
    admin.fails("host", "list", "-f", "name=ghost", contains="filter 'name=ghost' matches no host")
    admin.fails("host", "block", "-f", "colour=red", contains="unknown filter key 'colour'")


def test_host_del(admin, db):
    admin.ok("host", "add", "name=node1", "address=10.3.15.2")
    admin.ok("host", "add", "name=node2", "address=10.3.15.3")
    admin.ok("host", "propset", "-f", "name=node2", "rack=7")
    admin.fails("host", "del", "-f", "name=ghost", contains="matches no host")
    assert admin.ok("host", "del", "-f", "name=node2").out == "Deleting 1 host(s)\n"
    assert db.query("SELECT name FROM hosts") == [("node1",)]
    assert db.query("SELECT count(*) FROM host_properties") == [(0,)]
    # a host a VM is assigned to cannot go
    admin.ok("osf", "add", "name=o")
    admin.ok("user", "add", "login=u", "password=p")
    admin.ok("vm", "add", "name=v", "user=u", "osf=o")
    db.execute("UPDATE vm_runtimes SET host_id = 10000")
    admin.fails("host", "del", "-f", "name=node1", contains="host 'node1' is still referenced by 1 VM(s)")
    admin.ok("host", "del")  # unconfirmed
    assert db.query("SELECT count(*) FROM hosts") == [(1,)]


def test_user_add_hashes_with_scrypt_and_normalises_the_login(admin, db):
    assert admin.ok("user", "add", "login=  Alice ", "password=s3cret").out == "User added with id 10000\n"
    [(login, stored, tenant)] = db.query("SELECT login, password, tenant_id FROM users")
    assert (login, tenant) == ("alice", 1)
    assert stored.startswith("$scrypt$") and not is_legacy(stored) and verify_password("s3cret", stored)
    assert "s3cret" not in admin.ok("user", "list").out
    admin.fails("user", "add", "login=ALICE", "password=x", contains="login 'alice' already exists")
    admin.fails("user", "add", "login=bob", "password=", contains="password must not be empty")
    admin.fails("user", "add", "login=bob", contains="parameter 'password' is mandatory")
    admin.fails("user", "add", "login=bob", "password=x", "-t", "77", contains="tenant 77 does not exist")
    admin.ok("user", "add", "login=alice", "password=x", "-t", "0")  # another tenant: fine
    assert admin.ok("user", "list").out == "Id    Login\n-----------\n10000 alice\n"
    assert admin.ok("user", "list", "-t", "0", "-q").out.endswith(" alice\n")  # a failed insert used up an id


def test_user_passwd(admin, db):
    admin.ok("user", "add", "login=guest", "password=old")
    admin.ok("user", "passwd", "guest", stdin="n3w pass\n")  # bare login, password from a pipe
    [(stored,)] = db.query("SELECT password FROM users")
    assert verify_password("n3w pass", stored) and not verify_password("old", stored)
    admin.ok("user", "passwd", "user=guest", "password=third")
    [(stored,)] = db.query("SELECT password FROM users")
    assert verify_password("third", stored)
    admin.fails("user", "passwd", "user=nobody", "password=x", contains="user 'nobody' not found")
    admin.fails("user", "passwd", "guest", stdin="", contains="password must not be empty")
    admin.fails("user", "passwd", contains="parameter 'user' is mandatory")


def test_user_passwd_prompts_twice_on_a_terminal(admin, db, monkeypatch):
    import getpass
    answers = iter(["one", "two"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt, stream=None: next(answers))
    admin.ok("user", "add", "login=guest", "password=old")
    admin.fails("user", "passwd", "guest", tty=True, contains="Entered passwords don't match")
    answers = iter(["same", "same"])
    res = admin.ok("user", "passwd", "guest", tty=True)
    assert "same" not in res.out + res.err
    assert verify_password("same", db.query("SELECT password FROM users")[0][0])


def test_user_block_unblock_del(admin, db):
    admin.ok("user", "add", "login=a1", "password=p")
    admin.ok("user", "add", "login=a2", "password=p")
    admin.ok("user", "add", "login=b1", "password=p")
    admin.ok("user", "block", "-f", "login=a*")
    assert db.query("SELECT login FROM users WHERE blocked ORDER BY login") == [("a1",), ("a2",)]
    admin.ok("user", "unblock", "-f", "login=a?")
    assert db.query("SELECT count(*) FROM users WHERE blocked") == [(0,)]
    admin.ok("osf", "add", "name=o")
    admin.ok("vm", "add", "name=v", "user=b1", "osf=o")
    admin.fails("user", "del", "-f", "login=b1", contains="user 'b1' still owns 1 VM(s)")
    assert admin.ok("user", "del", "-f", "login=a*").out == "Deleting 2 user(s)\n"
    assert db.query("SELECT login FROM users") == [("b1",)]


def test_like_metacharacters_are_literal(admin, db):
    admin.ok("user", "add", "login=a_b", "password=p")
    admin.ok("user", "add", "login=axb", "password=p")
    assert admin.ok("user", "list", "-q", "-f", "login=a_*").out == "10000 a_b  \n"
    assert admin.ok("user", "list", "-q", "-f", "login=a?b").out == "10000 a_b  \n10001 axb  \n"


def test_osf_add_list_del(admin, db):
    assert admin.ok("osf", "add", "name=desktop").out == "OSF added with id 10000\n"
    admin.ok("osf", "add", "name=app", "memory=1024", "use_overlay=0", "user_storage_size=2k", "is_application=1")
    admin.ok("config", "set", "osf.default.memory=512")
    admin.ok("osf", "add", "name=" + EVIL)
    assert db.query("SELECT name, memory, use_overlay, user_storage_size, is_application FROM osfs ORDER BY id") == [
        ("desktop", 256, True, None, False), ("app", 1024, False, 2048, True), (EVIL, 512, True, None, False)]
    assert admin.ok("osf", "list").out == (
        "Id    Name                   RAM  Overlay UserHD IsApplication\n"
        "--------------------------------------------------------------\n"
        "10000 desktop                 256 yes     -      no           \n"
        "10001 app                    1024 no      2048   yes          \n"
        "10002 x'); DROP TABLE vms;--  512 yes     -      no           \n")
    admin.fails("osf", "add", "name=desktop", contains="an OSF named 'desktop' already exists")
    admin.fails("osf", "add", "name=z", "memory=lots", contains="memory: 'lots' is not a whole number")
    admin.fails("osf", "add", "name=z", "use_overlay=maybe", contains="malformed boolean")
    admin.fails("osf", "add", "name=z", "user_storage_size=3q", contains="malformed size")
    admin.fails("osf", "add", contains="parameter 'name' is mandatory")
    admin.ok("user", "add", "login=u", "password=p")
    admin.ok("vm", "add", "name=v", "user=u", "osf=desktop")
    res = admin.ok("osf", "del", "-f", "name=*p*")  # desktop (has a VM) and app
    assert res.out == "Deleting 2 osf(s)\n1 OSFs deleted.\n"
    assert "OSF 'desktop' kept" in res.err
    admin.fails("osf", "del", "-f", "name=nothing", contains="matches no osf")
    assert [r[0] for r in db.query("SELECT name FROM osfs ORDER BY id")] == ["desktop", EVIL]
