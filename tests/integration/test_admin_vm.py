"""qvd-admin vm verbs: IPs from the VM range, commands through vm_runtimes + NOTIFY, bad input."""
import gevent
import gevent.event
import pytest
from helpers.admin import Admin

from qvd_gevent.db.listen import Listener


@pytest.fixture
def admin(node_conf, db):
    return Admin(node_conf, db)

EVIL = "x'); DROP TABLE vms;--"


@pytest.fixture
def world(admin, tmp_path):
    """The seed's network, a host, an OSF with a DI, a user."""
    admin.ok("config", "set", "vm.network.ip.start=10.3.15.50", "vm.network.netmask=24",
             "vm.network.gateway=10.3.15.1")
    admin.ok("host", "add", "name=node1", "address=10.3.15.2")
    admin.ok("osf", "add", "name=desktop")
    image = tmp_path / "img"
    image.write_text("x")
    admin.ok("di", "add", f"path={image}", "osf=desktop")
    admin.ok("user", "add", "login=qvd", "password=qvd")
    return admin


class Notifications:
    def __init__(self, db, *channels):
        self.listener = Listener(db).start()
        self.got = {c: gevent.event.AsyncResult() for c in channels}
        for channel in channels:
            self.listener.subscribe(channel, lambda ch, payload: self.got[ch].set(payload))
        assert self.listener.wait_connected(10)
        gevent.sleep(0.2)

    def wait(self, channel, timeout=5):
        return self.got[channel].get(timeout=timeout)

    def stop(self):
        self.listener.stop()


def test_vm_add_assigns_ips_top_down_and_creates_runtime_and_counters(world, db):
    assert world.ok("vm", "add", "name=a", "user=qvd", "osf=desktop").out == "VM added with id 10000\n"
    world.ok("vm", "add", "name=b", "user_id=10000", "osf_id=10000", "ip=10.3.15.100")
    assert world.ok("vm", "add", "name=c", "user=qvd", "osf=desktop", "bulk=2").out == \
        "VM added with id 10002\nVM added with id 10003\n"
    assert db.query("SELECT name, ip, di_tag, storage FROM vms ORDER BY id") == [
        ("a", "10.3.15.254", "default", ""), ("b", "10.3.15.100", "default", ""),
        ("c-0", "10.3.15.253", "default", ""), ("c-1", "10.3.15.252", "default", "")]
    assert db.query("SELECT DISTINCT vm_state, user_state, blocked, host_id FROM vm_runtimes") == [
        ("stopped", "disconnected", False, None)]
    assert db.query("SELECT count(*) FROM vm_counters WHERE run_attempts = 0") == [(4,)]


def test_vm_add_bad_input(world):
    world.ok("vm", "add", "name=a", "user=qvd", "osf=desktop", "ip=10.3.15.60")
    world.fails("vm", "add", "name=a", "user=qvd", "osf=desktop", contains="already has a VM named 'a'")
    world.fails("vm", "add", "name=b", "user=qvd", "osf=desktop", "ip=10.3.15.60",
                contains="10.3.15.60 is already used by VM 'a'")
    world.fails("vm", "add", "name=b", "user=qvd", "osf=desktop", "ip=10.3.15.6o", contains="not an IPv4 address")
    world.fails("vm", "add", "name=b", "user=qvd", "osf=desktop", "ip=10.3.15.10",
                contains="outside the VM range 10.3.15.50 - 10.3.15.254")
    world.fails("vm", "add", "name=b", "user=qvd", "osf=desktop", "ip=10.3.15.255", contains="outside the VM range")
    world.fails("vm", "add", "name=b", "user=ghost", "osf=desktop", contains="user 'ghost' not found")
    world.fails("vm", "add", "name=b", "user=qvd", "osf=ghost", contains="OSF 'ghost' not found")
    world.fails("vm", "add", "name=b", "user=qvd", "user_id=10000", "osf=desktop", contains="mutually exclusive")
    world.fails("vm", "add", "name=b", "user=qvd", "osf=desktop", "bulk=2", "ip=10.3.15.70",
                contains="'bulk' and 'ip' are mutually exclusive")
    world.fails("vm", "add", "name=b", "user=qvd", "osf=desktop", "bulk=0", contains="below 1")
    world.fails("vm", "add", "user=qvd", "osf=desktop", contains="parameter 'name' is mandatory")
    world.fails("vm", "add", "name=b", "osf=desktop", contains="either parameter 'user' or 'user_id'")
    world.fails("vm", "add", "name=b", "user=qvd", "osf=desktop", "colour=red", contains="too many arguments")
    world.ok("user", "add", "login=other", "password=p", "-t", "0")
    world.fails("vm", "add", "name=b", "user_id=10001", "osf_id=10000", contains="different tenants")


def test_vm_add_runs_out_of_addresses(world):
    world.ok("config", "set", "vm.network.ip.start=10.3.15.252")
    world.ok("vm", "add", "name=a", "user=qvd", "osf=desktop", "bulk=3")  # .252 .253 .254
    world.fails("vm", "add", "name=b", "user=qvd", "osf=desktop", contains="No free IP addresses")
    world.fails("vm", "add", "name=c", "user=qvd", "osf=desktop", "bulk=2", contains="No free IP addresses")


def test_vm_list_with_filter_aliases_and_verbatim_names(world, db):
    world.ok("vm", "add", "name=" + EVIL, "user=qvd", "osf=desktop")
    world.ok("user", "add", "login=ann", "password=p")
    world.ok("vm", "add", "name=plain", "user=ann", "osf=desktop")
    world.ok("vm", "propset", "-f", "name=plain", "dept=sales")
    db.execute("UPDATE vm_runtimes SET host_id = 10000, vm_state = 'running', user_state = 'connected',"
               " l7r_host_id = 10000, real_user_id = 10001 WHERE vm_id = 10001")
    out = world.ok("vm", "list").out.splitlines()
    assert out[0].split()[:4] == ["Id", "Name", "User", "RealUser"] and out[0].rstrip().endswith("Expire hard")
    assert out[2].startswith("10000 " + EVIL + " qvd ")
    assert out[3].split() == ["10001", "plain", "ann", "ann", "10.3.15.253", "desktop", "default",
                              f"{db.query('SELECT version FROM dis')[0][0]}", "-", "node1", "running", "node1",
                              "connected", "0", "-", "-"]

    def ids(*filters):
        res = world.ok("vm", "list", "-q", *filters)
        return [line.split()[0] for line in res.out.splitlines()]
    assert ids("-f", "name=" + EVIL) == ["10000"]
    assert ids("-f", "user=an*") == ["10001"]
    assert ids("-f", "osf=desktop,state=running") == ["10001"]
    assert ids("-f", "host=node1") == ["10001"]
    assert ids("-f", "property.dept=sal*") == ["10001"]
    assert ids("-f", "blocked=0,user_state=disconnected") == ["10000"]
    assert ids("-f", "ip=10.3.15.25?") == ["10000", "10001"]
    assert ids("-t", "0") == []  # another tenant's view: empty, no filter, no error
    world.fails("vm", "list", "-f", "name=nobody", contains="matches no vm")
    world.fails("vm", "list", "-f", "colour=red", contains="unknown filter key 'colour' for vm")
    assert db.query("SELECT count(*) FROM vms") == [(2,)]  # and the table is still there


def test_vm_start_places_the_vm_and_notifies_its_node(world, db):
    world.ok("vm", "add", "name=a", "user=qvd", "osf=desktop")
    world.ok("vm", "add", "name=b", "user=qvd", "osf=desktop")
    res = world.ok("vm", "start", "-f", "name=a")
    assert res.out == "Started 0 VMs.\n" and "no hosts available" in res.err
    assert db.query("SELECT count(*) FROM vm_runtimes WHERE vm_cmd IS NOT NULL OR host_id IS NOT NULL") == [(0,)]
    db.execute("UPDATE host_runtimes SET state = 'running', usable_ram = 1000, usable_cpu = 1000")
    note = Notifications(db, "qvd_cmd_for_vm_on_host10000")
    try:
        assert world.ok("vm", "start", "-f", "name=a").out == "Started 1 VMs.\n"
        note.wait("qvd_cmd_for_vm_on_host10000")
    finally:
        note.stop()
    assert db.query("SELECT vm_id, host_id, vm_cmd FROM vm_runtimes WHERE vm_cmd IS NOT NULL") == [
        (10000, 10000, "start")]
    res = world.ok("vm", "start")  # no filter and no terminal: not confirmed
    assert "Are you sure you want to start all machines? [y/N]" in res.out
    assert db.query("SELECT count(*) FROM vm_runtimes WHERE vm_cmd = 'start'") == [(1,)]
    db.execute("UPDATE vm_runtimes SET vm_state = 'running', vm_cmd = NULL WHERE vm_id = 10000")
    assert world.ok("vm", "start", "--force").out == "Started 1 VMs.\n"  # only b was stopped
    world.fails("vm", "start", "-f", "id=4242", contains="matches no vm")


def test_vm_stop(world, db):
    world.ok("vm", "add", "name=a", "user=qvd", "osf=desktop", "bulk=3")
    db.execute("UPDATE vm_runtimes SET vm_state = 'running', host_id = 10000 WHERE vm_id = 10000")
    db.execute("UPDATE vm_runtimes SET vm_cmd = 'start', host_id = 10000 WHERE vm_id = 10001")
    note = Notifications(db, "qvd_cmd_for_vm_on_host10000")
    try:
        assert world.ok("vm", "stop", "-f", "name=a-*").out == "Stopped 2 VMs.\n"
        note.wait("qvd_cmd_for_vm_on_host10000")
    finally:
        note.stop()
    assert db.query("SELECT vm_id, vm_state, vm_cmd, host_id FROM vm_runtimes ORDER BY vm_id") == [
        (10000, "running", "stop", 10000), (10001, "stopped", None, None), (10002, "stopped", None, None)]


def test_vm_block_unblock(world, db):
    world.ok("vm", "add", "name=a", "user=qvd", "osf=desktop", "bulk=2")
    world.ok("vm", "block", "-f", "name=a-1")
    assert db.query("SELECT vm_id FROM vm_runtimes WHERE blocked") == [(10001,)]
    world.ok("vm", "unblock", "-f", "id=10001")
    assert db.query("SELECT count(*) FROM vm_runtimes WHERE blocked") == [(0,)]
    world.ok("vm", "block", stdin="y\n", tty=True)
    assert db.query("SELECT count(*) FROM vm_runtimes WHERE blocked") == [(2,)]
    world.fails("vm", "block", "-f", "blocked=maybe", contains="malformed boolean")


def test_vm_disconnect_user_aborts_sessions_and_notifies_the_l7r_node(world, db):
    world.ok("vm", "add", "name=a", "user=qvd", "osf=desktop", "bulk=2")
    db.execute("UPDATE vm_runtimes SET user_state = 'connected', l7r_host_id = 10000, l7r_pid = 1 WHERE vm_id = 10000")
    note = Notifications(db, "qvd_cmd_for_user_on_host10000")
    try:
        assert world.ok("vm", "disconnect_user", "-f", "name=a-*").out == "Disconnected 1 users.\n"
        note.wait("qvd_cmd_for_user_on_host10000")
    finally:
        note.stop()
    assert db.query("SELECT vm_id, user_cmd FROM vm_runtimes ORDER BY vm_id") == [(10000, "abort"), (10001, None)]
    assert world.ok("vm", "disconnect_user", "-f", "id=10001").out == "Disconnected 0 users.\n"


def test_vm_edit(world, db):
    world.ok("vm", "add", "name=a", "user=qvd", "osf=desktop", "bulk=2")
    assert world.ok("vm", "edit", "-f", "name=a-0", "name=renamed", "di_tag=head", "ip=10.3.15.77",
                    "expire-hard=2030-01-01 00:00").out == "Edited 1 VMs.\n"
    assert db.query("SELECT name, di_tag, ip FROM vms WHERE id = 10000") == [("renamed", "head", "10.3.15.77")]
    assert db.query("SELECT vm_expiration_hard IS NOT NULL FROM vm_runtimes WHERE vm_id = 10000") == [(True,)]
    world.ok("vm", "edit", "-f", "id=10000", "expire-hard=")
    assert db.query("SELECT vm_expiration_hard FROM vm_runtimes WHERE vm_id = 10000") == [(None,)]
    world.fails("vm", "edit", "-f", "id=10001", "ip=10.3.15.77", contains="IP address '10.3.15.77' is already used")
    world.fails("vm", "edit", "-f", "id=10001", "ip=192.168.1.1", contains="outside the VM range")
    world.fails("vm", "edit", "-f", "id=10001", "vm_state=running", contains="cannot edit 'vm_state'")
    world.fails("vm", "edit", "-f", "id=10001", "expire-soft=whenever", contains="invalid datetime")
    world.fails("vm", "edit", "-f", "id=10001", contains="nothing to edit")
    world.fails("vm", "edit", "-f", "id=999", "name=z", contains="matches no vm")
    world.fails("vm", "edit", "-f", "name=a-1", "name=renamed", contains="already has a VM named 'renamed'")
    world.ok("vm", "edit", "di_tag=x")  # unconfirmed
    assert db.query("SELECT count(*) FROM vms WHERE di_tag = 'x'") == [(0,)]


def test_vm_counters(world, db):
    world.ok("vm", "add", "name=a", "user=qvd", "osf=desktop", "bulk=3")
    db.execute("UPDATE vm_runtimes SET vm_state = 'running' WHERE vm_id = 10000")
    db.execute("UPDATE vm_runtimes SET blocked = true WHERE vm_id IN (10001, 10002)")
    db.execute("UPDATE vm_counters SET run_attempts = 5, run_ok = 4 WHERE vm_id = 10000")
    assert world.ok("vm", "counters").out == (
        "Virtual machines Running Blocked\n"
        "--------------------------------\n"
        "3                1       2      \n"
        "\n"
        "Id    Name Run attempts Run OK\n"
        "------------------------------\n"
        "10000 a-0  5            4     \n"
        "10001 a-1  0            0     \n"
        "10002 a-2  0            0     \n")


def test_vm_del_removes_only_stopped_vms_with_their_rows(world, db):
    world.ok("vm", "add", "name=a", "user=qvd", "osf=desktop", "bulk=2")
    world.ok("vm", "propset", "k=v")
    db.execute("UPDATE vm_runtimes SET vm_state = 'running' WHERE vm_id = 10001")
    res = world.ok("vm", "del", "--force")
    assert res.out == "Deleting 2 vm(s)\n" and "1 VM(s) not deleted: they are not stopped" in res.err
    assert db.query("SELECT id FROM vms") == [(10001,)]
    assert db.query("SELECT vm_id FROM vm_runtimes") == [(10001,)]
    assert db.query("SELECT vm_id FROM vm_counters") == [(10001,)]
    assert db.query("SELECT vm_id FROM vm_properties") == [(10001,)]
    world.fails("vm", "del", "-f", "name=zzz", contains="matches no vm")


def test_concurrent_vm_adds_get_distinct_addresses(world, db):
    """Two operators adding VMs at once: SERIALIZABLE plus retry, never the same IP twice."""
    jobs = [gevent.spawn(world, "vm", "add", f"name=c{i}", "user=qvd", "osf=desktop", "bulk=3") for i in range(4)]
    gevent.joinall(jobs, timeout=60)
    assert [job.value.rc for job in jobs] == [0, 0, 0, 0], [job.value for job in jobs]
    ips = [r[0] for r in db.query("SELECT ip FROM vms")]
    assert len(ips) == 12 and len(set(ips)) == 12
    assert sorted(ips) == [f"10.3.15.{n}" for n in range(243, 255)]
