"""Who may reach which VM, through a running L7R over TLS (real PostgreSQL, a stand-in VM).

Two tenants, a login that exists in both, VMs of several users. A user cannot list,
connect to or stop another user's VM, nor a VM of another tenant, by any spelling of its
id or with any token that is not theirs; blocked user, tenant, VM and host get the
contract's status (401/401/403/503) and leave every session row as it was; tokens expire
and bind as specified; failed logins are throttled per address and per login, while the
original client's retries of one mistyped password are not held against the user.
"""
import base64
import json
import pathlib
import socket
import time
import urllib.parse

import gevent

import pytest
from qvd_gevent.db.runtime import token_digest

from helpers.hostile import tls_node
from helpers.l7r_env import UPGRADE, Reader, basic, client_context, get
from helpers.nodes import wait_for

HOSTILE = str(pathlib.Path(__file__).resolve().parents[1] / "helpers" / "hostile.py")
FORBIDDEN = "You are not allowed to access requested virtual machine"


class World:
    """The node plus who is who."""

    def __init__(self, node):
        self.node = node
        seed = node.seed
        self.port = node.svc.port
        self.osf = seed.osf()
        self.acme = seed.tenant("acme")
        self.acme_osf = seed.osf("acme-osf", tenant_id=self.acme)
        self.alice = seed.user("alice", "alice-pw")
        self.bob = seed.user("bob", "bob-pw")
        self.acme_alice = seed.user("alice", "acme-pw", tenant_id=self.acme)   # same login, other tenant
        self.alice_vm = seed.vm("alice-vm", self.alice, self.osf)
        self.alice_vm2 = seed.vm("alice-vm2", self.alice, self.osf)
        self.bob_vm = seed.vm("bob-vm", self.bob, self.osf)
        self.acme_vm = seed.vm("acme-alice-vm", self.acme_alice, self.acme_osf)
        for vm in (self.alice_vm, self.bob_vm, self.acme_vm):
            seed.running_at(vm, node.host_id, node.vma)

    # --- requests ----------------------------------------------------------------------------
    def conn(self, source="127.0.0.1"):
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10, source_address=(source, 0))
        return client_context(self.node.cert).wrap_socket(raw, server_hostname="localhost")

    def request(self, target, auth=None, headers=(), source="127.0.0.1"):
        """(final response, 102 infos) of one request on a fresh connection."""
        sock = self.conn(source)
        try:
            hdrs = ([("Authorization", auth)] if auth else []) + list(headers)
            get(sock, target, hdrs)
            infos, final = Reader(sock).final()
        finally:
            sock.close()
        return final, infos

    def status(self, target, auth=None, headers=(), source="127.0.0.1"):
        return self.request(target, auth, headers, source)[0].status

    def vm_list(self, auth):
        final, _ = self.request("/qvd/list_of_vm", auth)
        assert final.status == 200, final
        return json.loads(final.body)

    def connect(self, vm_id, auth):
        return self.request(f"/qvd/connect_to_vm?id={vm_id}", auth, UPGRADE)[0]

    def stop(self, vm_id, auth):
        return self.request(f"/qvd/stop_vm?id={vm_id}", auth, UPGRADE)[0]

    # --- database ----------------------------------------------------------------------------
    def runtimes(self):
        return self.node.db.query("SELECT * FROM vm_runtimes ORDER BY vm_id")

    def add_token(self, token, user_id, vm_id=None, expires_in=3600, multi_use=True):
        from qvd_gevent.db import now_epoch
        self.node.db.execute("INSERT INTO user_tokens (token, user_id, vm_id, expiration, multi_use) "
                             "VALUES (%s, %s, %s, %s, %s)",
                             (token_digest(token), user_id, vm_id, now_epoch() + expires_in, multi_use))
        return bearer(token)


def bearer(token, newline=False):
    return "Bearer " + base64.b64encode(token.encode()).decode() + ("\n" if newline else "")


ALICE = basic("alice", "alice-pw")
BOB = basic("bob", "bob-pw")
ACME_ALICE = basic("alice@acme", "acme-pw")


def make_world(tmp_path, pg_server, dbname, max_failures, per_login=None, extra=None):
    values = {"l7r.token.lifetime": 2, "l7r.auth.throttle.max_failures": max_failures,
              "l7r.auth.throttle.max_failures_per_login": per_login or 10 * max_failures,
              "l7r.auth.throttle.window": 4, "l7r.auth.throttle.burst": 2}
    values.update(extra or {})
    return World(tls_node(tmp_path, pg_server, dbname, values))


@pytest.fixture
def world(tmp_path, pg_server, fresh_db_name):
    """Throttling out of the way: these tests send many refused requests on purpose."""
    w = make_world(tmp_path, pg_server, fresh_db_name, 100000)
    yield w
    w.node.close()


@pytest.fixture
def strict_world(tmp_path, pg_server, fresh_db_name):
    """The throttle as configured in production, with a 4 s window."""
    w = make_world(tmp_path, pg_server, fresh_db_name, 5)
    yield w
    w.node.close()


# --- other users and tenants -----------------------------------------------------------------------
def test_each_user_lists_only_their_own_vms(world):
    w = world
    assert [v["id"] for v in w.vm_list(ALICE)] == [w.alice_vm, w.alice_vm2]
    assert [v["id"] for v in w.vm_list(basic("alice@default", "alice-pw"))] == [w.alice_vm, w.alice_vm2]
    assert [v["id"] for v in w.vm_list(basic("alice#default", "alice-pw"))] == [w.alice_vm, w.alice_vm2]
    assert [v["id"] for v in w.vm_list(BOB)] == [w.bob_vm]
    assert [v["id"] for v in w.vm_list(ACME_ALICE)] == [w.acme_vm]
    assert [v["id"] for v in w.vm_list(basic("ALICE@ACME", "acme-pw"))] == [w.acme_vm]
    # one tenant's password does not open the same login in the other tenant
    assert w.status("/qvd/list_of_vm", basic("alice@acme", "alice-pw")) == 401
    assert w.status("/qvd/list_of_vm", basic("alice", "acme-pw")) == 401
    # a tenant spelled oddly is another (unknown) tenant (no LIKE, no prefix), the supertenant cannot log in;
    # surrounding blanks and case are normalised as the original does
    assert [v["id"] for v in w.vm_list(basic(" alice@acme ", "acme-pw"))] == [w.acme_vm]
    for login in ("alice@default@acme", "alice@acme#default", "alice@*", "alice@", "alice@%", "alice@ac_e", "alice@acm"):
        assert w.status("/qvd/list_of_vm", basic(login, "acme-pw")) == 401, login
    # list_of_applications: same rule
    final, _ = w.request("/qvd/list_of_applications", BOB)
    assert final.status == 200 and json.loads(final.body) == []


def id_spellings(vm_id):
    """Ways to write a VM id in a query string; all must lead to that VM or to no VM."""
    return [str(vm_id), f"0{vm_id}", f"00{vm_id}", f"%2B{vm_id}", f"+{vm_id}", f"%20{vm_id}", f"{vm_id}%20",
            f"{vm_id}.0", f"{vm_id}e0", f"0x{vm_id:x}", f"{vm_id}%00", f"{vm_id}abc", f"-{vm_id}",
            "".join(chr(0x0660 + int(d)) for d in str(vm_id)),                     # Arabic-Indic digits
            "".join(chr(0xFF10 + int(d)) for d in str(vm_id)),                     # fullwidth digits
            f"{vm_id}&id={vm_id}", f"1&id={vm_id}", f"{vm_id}%26id%3D1", f"{vm_id};", f"{vm_id} OR 1=1",
            f"{vm_id}'--", f"({vm_id})", f"{vm_id}-0", f"{vm_id}_", f"{vm_id}%", str(vm_id + 2 ** 32),
            str(vm_id - 2 ** 32), "99999999999999999999999"]


@pytest.mark.parametrize("who,victim", [("alice", "bob_vm"), ("alice", "acme_vm"), ("acme_alice", "alice_vm"),
                                        ("bob", "alice_vm2")])
def test_no_way_into_someone_elses_vm(world, who, victim):
    w = world
    auth = {"alice": ALICE, "acme_alice": ACME_ALICE, "bob": BOB}[who]
    vm_id = getattr(w, victim)
    before = w.runtimes()
    for spelling in id_spellings(vm_id):
        target_id = urllib.parse.quote(spelling, safe="%&=+;")
        for path in ("connect_to_vm", "stop_vm"):
            final, infos = w.request(f"/qvd/{path}?id={target_id}", auth, UPGRADE)
            assert final.status in (403, 404), (path, spelling, final)
            assert infos == [], (path, spelling, infos)   # not one step of a session or a stop
            if final.status == 403:
                assert final.text == FORBIDDEN, (path, spelling, final)
    assert w.runtimes() == before, "a refused request changed a session row"
    # and the owner still can
    owner = {"bob_vm": BOB, "acme_vm": ACME_ALICE, "alice_vm": ALICE, "alice_vm2": ALICE}[victim]
    if victim != "alice_vm2":
        assert w.connect(vm_id, owner).status == 101


# --- tokens ----------------------------------------------------------------------------------------
def test_tokens_of_other_users_and_tenants_open_only_their_own_vms(world):
    w = world
    final, _ = w.request("/qvd/create_auth_token", BOB)
    assert final.status == 200
    bob_token = "Bearer " + json.loads(final.body)["auth_token"].strip()
    final, _ = w.request("/qvd/create_auth_token", ACME_ALICE)
    acme_token = "Bearer " + json.loads(final.body)["auth_token"].strip()
    before = w.runtimes()
    # a token is its creator: bob's token lists bob's VMs and opens none of alice's
    assert [v["id"] for v in w.vm_list(bob_token)] == [w.bob_vm]
    assert [v["id"] for v in w.vm_list(acme_token)] == [w.acme_vm]
    for token in (bob_token, acme_token):
        for vm in (w.alice_vm, w.alice_vm2):
            assert w.connect(vm, token).status == 403
            assert w.stop(vm, token).status == 403
    assert w.connect(w.bob_vm, acme_token).status == 403
    assert w.connect(w.acme_vm, bob_token).status == 403
    assert w.runtimes() == before
    # guessed, mangled or wildcard tokens are nobody
    raw = base64.b64decode(bob_token.split(" ", 1)[1]).decode()
    for guess in (raw[:-1], raw + "x", raw.upper() if raw.upper() != raw else raw.lower(), "%", "_" * len(raw),
                  "' OR '1'='1", raw[:10] + "%"):
        assert w.status("/qvd/list_of_vm", bearer(guess)) == 401, guess


def test_token_bound_to_a_vm_opens_only_that_vm(world):
    w = world
    token = w.add_token("bound-to-vm2", w.alice, vm_id=w.alice_vm2)
    before = w.runtimes()
    final = w.connect(w.alice_vm, token)
    assert final.status == 403 and final.text == "vm_id does not match with provided token"
    final = w.stop(w.alice_vm, token)
    assert final.status == 403 and final.text == "vm_id does not match with provided token"
    assert w.connect(w.bob_vm, token).status == 403
    assert w.runtimes() == before
    # the VM it is bound to: allowed (stopped, so the test HKD starts it)
    assert w.connect(w.alice_vm2, token).status == 101


def test_expired_token_refused_and_deleted(world):
    w = world
    token = w.add_token("old-token", w.alice, expires_in=-1)
    assert w.status("/qvd/list_of_vm", token) == 401
    assert w.connect(w.alice_vm, token).status == 401
    assert w.node.db.query("SELECT token FROM user_tokens WHERE token = %s", (token_digest("old-token"),)) == []


def test_single_use_token_works_once(world):
    w = world
    token = w.add_token("once", w.alice, multi_use=False)
    before = w.runtimes()
    assert w.status("/qvd/list_of_vm", token) == 200
    assert w.status("/qvd/list_of_vm", token) == 401
    assert w.connect(w.alice_vm, token).status == 401
    assert w.runtimes() == before
    # the original client does list_of_vm then connect_to_vm on ONE connection with its token
    token2 = w.add_token("once-again", w.alice, multi_use=False)
    sock = w.conn()
    get(sock, "/qvd/list_of_vm", [("Authorization", token2)])
    reader = Reader(sock)
    assert reader.response().status == 200
    get(sock, f"/qvd/connect_to_vm?id={w.alice_vm}", [("Authorization", token2)] + UPGRADE)
    assert reader.final()[1].status == 101
    sock.close()
    assert w.status("/qvd/list_of_vm", token2) == 401


def test_multi_use_token_from_create_auth_token_expires_after_its_lifetime(world):
    from qvd_gevent.db import now_epoch
    w = world
    final, _ = w.request("/qvd/create_auth_token", ALICE)
    body = json.loads(final.body)
    assert body["auth_token"].endswith("\n")          # the original's encode_base64 newline
    raw = base64.b64decode(body["auth_token"]).decode()
    row = w.node.db.query_one("SELECT user_id, vm_id, expiration, multi_use FROM user_tokens WHERE token = %s",
                              (token_digest(raw),))
    assert row[0] == w.alice and row[1] is None and row[3] is True
    assert abs(row[2] - (now_epoch() + 2)) <= 1       # l7r.token.lifetime = 2 in this test
    for value in ("Bearer " + body["auth_token"].strip(), bearer(raw)):
        assert w.status("/qvd/list_of_vm", value) == 200   # used twice: multi_use honoured
    time.sleep(3.2)
    assert w.status("/qvd/list_of_vm", bearer(raw)) == 401
    assert w.node.db.query("SELECT 1 FROM user_tokens WHERE token = %s", (token_digest(raw),)) == []


def open_session(w, vm_id, auth):
    """A live session: (socket, 101 response); the session lasts until the socket closes."""
    sock = w.conn()
    get(sock, f"/qvd/connect_to_vm?id={vm_id}", [("Authorization", auth)] + UPGRADE)
    _, final = Reader(sock).final()
    assert final.status == 101, final
    return sock, final


def wait_released(w, vm_id, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if w.node.db.query_one("SELECT user_state FROM vm_runtimes WHERE vm_id = %s", (vm_id,))[0] == "disconnected":
            return
        time.sleep(0.05)
    raise AssertionError(f"session on VM {vm_id} not released")


def test_the_desktops_token_opens_only_its_vm_and_dies_with_the_session(world):
    """The token handed to the VM (x_start's auth_token) is bound to that VM and revoked when
    the session ends: a desktop user cannot use it to reach another VM, or after logging out."""
    w = world
    sock, _ = open_session(w, w.alice_vm, ALICE)
    vm_token = bearer(w.node.vma.x_start_calls[-1]["auth_token"])
    try:
        assert w.status("/qvd/list_of_vm", vm_token) == 200          # it is alice's token ...
        final = w.connect(w.alice_vm2, vm_token)                      # ... for this VM only
        assert (final.status, final.text) == (403, "vm_id does not match with provided token")
        assert w.stop(w.alice_vm2, vm_token).status == 403
        assert w.status("/qvd/create_auth_token", vm_token) == 401    # and it cannot mint another
    finally:
        sock.close()
    wait_released(w, w.alice_vm)
    assert w.status("/qvd/list_of_vm", vm_token) == 401
    assert w.connect(w.alice_vm, vm_token).status == 401


def test_a_bearer_token_cannot_mint_another(world):
    w = world
    final, _ = w.request("/qvd/create_auth_token", ALICE)
    token = "Bearer " + json.loads(final.body)["auth_token"].strip()
    count = w.node.db.query_one("SELECT count(*) FROM user_tokens")[0]
    final, _ = w.request("/qvd/create_auth_token", token)
    assert final.status == 401 and final.headers["www-authenticate"] == 'Basic realm="QVD"'
    assert w.node.db.query_one("SELECT count(*) FROM user_tokens")[0] == count
    assert w.status("/qvd/list_of_vm", token) == 200                  # the token itself still works


def test_no_token_is_stored_in_clear(world):
    """After create_auth_token and a connect, neither token appears anywhere in the database."""
    w = world
    final, _ = w.request("/qvd/create_auth_token", ALICE)
    user_token = base64.b64decode(json.loads(final.body)["auth_token"]).decode()
    sock, _ = open_session(w, w.alice_vm, bearer(user_token))
    vm_token = w.node.vma.x_start_calls[-1]["auth_token"]
    try:
        tables = [t for (t,) in w.node.db.query(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        dump = "\n".join(str(r) for t in tables for r in w.node.db.query(f'SELECT t::text FROM "{t}" t'))
        assert len(dump) > 1000                   # the dump holds the rows it should
        assert user_token not in dump and vm_token not in dump
        assert user_token[:16] not in dump and vm_token[:16] not in dump
        # what is stored instead: their SHA-256 digests
        assert token_digest(user_token) in dump and token_digest(vm_token) in dump
    finally:
        sock.close()


@pytest.mark.parametrize("verb", [("user", "passwd", "user=alice", "password=new-alice-pw-1"),
                                  ("user", "block", "-f", "login=alice"),
                                  ("user", "del", "-f", "login=alice")])
def test_password_change_block_and_delete_revoke_tokens(world, verb):
    import io

    from qvd_gevent.admin.cli import run
    w = world
    final, _ = w.request("/qvd/create_auth_token", ALICE)
    token = "Bearer " + json.loads(final.body)["auth_token"].strip()
    bob_token = "Bearer " + json.loads(w.request("/qvd/create_auth_token", BOB)[0].body)["auth_token"].strip()
    assert w.status("/qvd/list_of_vm", token) == 200
    if verb[1] == "del":
        w.node.db.execute("DELETE FROM vms WHERE user_id = %s", (w.alice,))    # only users without VMs go
    out, err = io.StringIO(), io.StringIO()
    assert run(["--config", str(w.node.conf_path), "--force", *verb], out, err, io.StringIO()) == 0, err.getvalue()
    assert w.status("/qvd/list_of_vm", token) == 401
    assert w.status("/qvd/list_of_vm", bob_token) == 200                 # nobody else's
    if verb[1] == "block":
        run(["--config", str(w.node.conf_path), "--force", "user", "unblock", "-f", "login=alice"],
            out, err, io.StringIO())
        assert w.status("/qvd/list_of_vm", ALICE) == 200
        assert w.status("/qvd/list_of_vm", token) == 401                 # unblocking brings no token back


def test_tokens_of_blocked_users_and_tenants_refused(world):
    w = world
    token = w.add_token("alice-t", w.alice)
    acme = w.add_token("acme-t", w.acme_alice)
    w.node.db.execute("UPDATE users SET blocked = true WHERE id = %s", (w.alice,))
    w.node.db.execute("UPDATE tenants SET blocked = true WHERE id = %s", (w.acme,))
    assert w.status("/qvd/list_of_vm", token) == 401
    assert w.connect(w.alice_vm, token).status == 401
    assert w.status("/qvd/list_of_vm", acme) == 401
    assert w.connect(w.acme_vm, acme).status == 401


# --- blocked entities ------------------------------------------------------------------------------
def test_blocked_user_tenant_vm_host_get_the_contract_statuses(world):
    w = world
    db = w.node.db
    before = w.runtimes()

    def every_endpoint(auth, vm_id):
        return (w.status("/qvd/list_of_vm", auth), w.connect(vm_id, auth).status, w.stop(vm_id, auth).status)

    db.execute("UPDATE users SET blocked = true WHERE id = %s", (w.bob,))
    assert every_endpoint(BOB, w.bob_vm) == (401, 401, 401)
    assert w.runtimes() == before
    db.execute("UPDATE users SET blocked = false WHERE id = %s", (w.bob,))

    db.execute("UPDATE tenants SET blocked = true WHERE id = %s", (w.acme,))
    assert every_endpoint(ACME_ALICE, w.acme_vm) == (401, 401, 401)
    assert w.status("/qvd/list_of_vm", ALICE) == 200      # the other tenant is not affected
    assert w.runtimes() == before
    db.execute("UPDATE tenants SET blocked = false WHERE id = %s", (w.acme,))

    db.execute("UPDATE vm_runtimes SET blocked = true WHERE vm_id = %s", (w.bob_vm,))
    before = w.runtimes()
    final = w.connect(w.bob_vm, BOB)
    assert final.status == 403 and final.text == "The requested virtual machine is offline for maintenance"
    listed = {v["id"]: v for v in w.vm_list(BOB)}
    assert listed[w.bob_vm]["blocked"] is True
    assert w.runtimes() == before
    db.execute("UPDATE vm_runtimes SET blocked = false WHERE vm_id = %s", (w.bob_vm,))

    db.execute("UPDATE host_runtimes SET blocked = true WHERE host_id = %s", (w.node.host_id,))
    # the node applies a host's block when the database announces it (NOTIFY), within moments
    wait_for(lambda: w.status("/qvd/ping") == 503, 5, interval=0.02, what="the block announced")
    before = w.runtimes()
    for auth, vm in ((BOB, w.bob_vm), (ALICE, w.alice_vm)):
        final, _ = w.request("/qvd/list_of_vm", auth)
        assert (final.status, final.text) == (503, "Server is blocked")
        final = w.connect(vm, auth)
        assert (final.status, final.text) == (503, "Server is blocked")
        final = w.stop(vm, auth)
        assert (final.status, final.text) == (503, "Server is blocked")
    assert w.status("/qvd/ping") == 503
    # credentials come first: a wrong password on a blocked host is still 401
    assert w.status("/qvd/list_of_vm", basic("bob", "nope")) == 401
    assert w.runtimes() == before
    db.execute("UPDATE host_runtimes SET blocked = false WHERE host_id = %s", (w.node.host_id,))
    wait_for(lambda: w.status("/qvd/ping") == 200, 5, interval=0.02, what="the unblock announced")
    assert w.connect(w.bob_vm, BOB).status == 101


# --- password guessing ----------------------------------------------------------------------------
def test_original_client_retries_do_not_lock_out_the_user(strict_world):
    world = strict_world
    """The original client retries a refused login 5 times at once; two typos (10 requests)
    and then the right password: the user gets in."""
    w = world
    for typo in ("alice-pX", "alice-pY"):
        assert [w.status("/qvd/list_of_vm", basic("alice", typo)) for _ in range(5)] == [401] * 5
    assert w.status("/qvd/list_of_vm", ALICE) == 200
    assert w.connect(w.alice_vm, ALICE).status == 101


def test_password_guessing_is_throttled_per_address_and_per_login(strict_world):
    world = strict_world
    w = world
    attacker, other = "127.0.0.2", "127.0.0.3"
    t0 = time.monotonic()
    for i in range(5):
        assert w.status("/qvd/list_of_vm", basic("bob", f"guess-{i}"), source=attacker) == 401
    # the 6th attempt is refused even with the right password, and says nothing about it
    final, _ = w.request("/qvd/list_of_vm", BOB, source=attacker)
    assert final.status == 429, final
    assert w.request("/qvd/list_of_vm", basic("bob", "guess-9"), source=attacker)[0].text == final.text
    assert w.status("/qvd/list_of_vm", ALICE, source=attacker) == 429   # per address: any login
    # a stranger's failures at one address never lock bob out at another
    assert w.connect(w.bob_vm, BOB).status == 101
    assert w.status("/qvd/list_of_vm", BOB, source=other) == 200
    assert w.status("/qvd/list_of_vm", ALICE, source=other) == 200      # others are not affected
    # bearer guessing from the same address is refused too
    assert w.status("/qvd/list_of_vm", bearer("guessed"), source=attacker) == 429
    # until the window (4 s) has passed
    wait = 4.2 - (time.monotonic() - t0)
    if wait > 0:
        time.sleep(wait)
    assert w.status("/qvd/list_of_vm", BOB, source=attacker) == 200
    assert w.status("/qvd/list_of_vm", ALICE, source=attacker) == 200


def test_token_guessing_is_throttled_per_address(strict_world):
    world = strict_world
    w = world
    attacker = "127.0.0.4"
    for i in range(5):
        assert w.status("/qvd/list_of_vm", bearer(f"guess-{i}"), source=attacker) == 401
    assert w.status("/qvd/list_of_vm", w.add_token("real", w.alice), source=attacker) == 429
    assert w.status("/qvd/list_of_vm", ALICE) == 200


def test_client_cannot_set_server_side_session_parameters(world):
    """Only qvd.client.* and custom.* come from the client; who the user is inside the VM
    (qvd.vm.user.name) and the slave key are the server's, whatever the request says."""
    w = world
    before = w.runtimes()
    for extra in ("qvd.vm.user.name=root", "qvd.slave.key=AAAA", "qvd.vm.user.uid=0", "QVD.CLIENT.X=1"):
        final = w.request(f"/qvd/connect_to_vm?id={w.alice_vm}&{extra}", ALICE, UPGRADE)[0]
        assert final.status == 403 and final.text.startswith("Invalid parameters "), (extra, final)
    assert w.runtimes() == before
    sneaky = [("Auth-" + b"qvd.vm.user.name".hex(), base64.b64encode(b"root").decode())]
    final, _ = w.request(f"/qvd/connect_to_vm?id={w.alice_vm}&qvd.client.keyboard=pc105%2Fes&custom.x=1",
                         ALICE, UPGRADE + sneaky)
    assert final.status == 101
    sent = w.node.vma.x_start_calls[-1]
    assert sent["qvd.vm.user.name"] == "alice" and sent["qvd.client.keyboard"] == "pc105/es"
    assert sent["qvd.slave.key"] == final.headers["x-qvd-slave-key"]


def test_auth_variables_reach_the_vm_under_their_own_prefix(world):
    """Auth-<hex name> headers (the client's shared variables) reach the VMA's x_start as
    auth.<name>, and never as a server-side parameter of the same name."""
    w = world
    headers = [("Auth-" + b"LANG".hex(), base64.b64encode(b"es_ES.UTF-8").decode()),
               ("Auth-" + b"qvd.slave.key".hex(), base64.b64encode(b"mine").decode()),
               ("Auth-zz", "not hex")]
    final, _ = w.request(f"/qvd/connect_to_vm?id={w.alice_vm}", ALICE, UPGRADE + headers)
    assert final.status == 101
    sent = w.node.vma.x_start_calls[-1]
    assert sent["auth.LANG"] == "es_ES.UTF-8"
    assert sent["auth.qvd.slave.key"] == "mine"
    assert sent["qvd.slave.key"] == final.headers["x-qvd-slave-key"]
    assert not any(k.startswith("auth.") and k not in ("auth.LANG", "auth.qvd.slave.key") for k in sent)


def median_401s(w, logins, rounds=9):
    """Median seconds to a 401 for each login (a wrong password each time). The logins take
    turns within each round, in a rotating order, so that a change in the machine's load
    falls on all of them alike."""
    times = {login: [] for login in logins}
    for i in range(rounds):
        for login in logins[i % len(logins):] + logins[:i % len(logins)]:
            t0 = time.monotonic()
            assert w.status("/qvd/list_of_vm", basic(login, f"wrong-{i}")) == 401
            times[login].append(time.monotonic() - t0)
    return {login: sorted(t)[rounds // 2] for login, t in times.items()}


# "as long": medians within a quarter of each other. Without the decoy hash an unknown login
# or a legacy hash is refused in about a millisecond, a hundredth of the scrypt cost.
SAME_COST = (0.75, 1.33)


def test_refusal_takes_as_long_for_unknown_logins_as_for_wrong_passwords(world):
    """A 401 must not tell whether the login exists: with a scrypt hash a wrong password
    costs tens of milliseconds, so an unknown user or tenant must cost the same."""
    from qvd_gevent.db.passwords import hash_password
    w = world
    w.node.seed.user("carol", "carol-pw", stored=hash_password("carol-pw"))
    medians = median_401s(w, ["carol", "nobody-here", "carol@no-such-tenant"])
    known, unknown_user, unknown_tenant = medians["carol"], medians["nobody-here"], medians["carol@no-such-tenant"]
    print(f"401 in: known login {known * 1000:.0f} ms, unknown login {unknown_user * 1000:.0f} ms, "
          f"unknown tenant {unknown_tenant * 1000:.0f} ms")
    assert known > 0.01        # the scrypt cost is there to hide in the first place
    for unknown in (unknown_user, unknown_tenant):
        assert SAME_COST[0] * known <= unknown <= SAME_COST[1] * known, medians


@pytest.fixture
def ceiling_world(tmp_path, pg_server, fresh_db_name):
    """The production throttle, with the all-addresses ceiling of one login lowered to 5."""
    w = make_world(tmp_path, pg_server, fresh_db_name, 5, per_login=5)
    yield w
    w.node.close()


def test_throttle_per_login_sees_through_spellings_and_addresses(ceiling_world):
    """Guesses spread over five addresses and five spellings of one login still count for
    that login (the login is normalised before it is counted), up to the per-login ceiling
    l7r.auth.throttle.max_failures_per_login (5 here)."""
    w = ceiling_world
    spellings = ["BOB", "bob#default", " bob@default ", "Bob@Default", "bob"]
    for i, login in enumerate(spellings):
        assert w.status("/qvd/list_of_vm", basic(login, f"guess-{i}"), source=f"127.0.0.{11 + i}") == 401
    assert w.status("/qvd/list_of_vm", BOB, source="127.0.0.20") == 429
    assert w.status("/qvd/list_of_vm", ALICE, source="127.0.0.20") == 200


# --- login floods ----------------------------------------------------------------------------------
def test_a_flood_of_wrong_logins_from_one_address_is_cut_before_hashing(strict_world):
    """60 concurrent wrong logins from one address (a separate process, like a real
    attacker): no more 401s than the threshold (the rest 429 without a password hash), and
    a login from another address meanwhile takes under 0.2 s, its own scrypt check included."""
    import subprocess
    import sys

    from qvd_gevent.db.passwords import hash_password
    w = strict_world
    w.node.seed.user("erin", "erin-pw", stored=hash_password("erin-pw"))
    flood = subprocess.Popen([sys.executable, HOSTILE, "login-flood", str(w.port), "--cafile", w.node.cert,
                              "--source", "127.0.0.30", "--count", "60", "--max-seconds", "60"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = flood.stdout.readline()
        assert ready.split() == ["READY", "60"], ready
        t_alone = time.monotonic()
        assert w.status("/qvd/list_of_vm", basic("erin", "erin-pw"), source="127.0.0.31") == 200
        alone = time.monotonic() - t_alone
        flood.stdin.write("go\n")
        flood.stdin.flush()
        time.sleep(0.05)                          # the flood's requests are in
        t0 = time.monotonic()
        assert w.status("/qvd/list_of_vm", basic("erin", "erin-pw"), source="127.0.0.32") == 200
        legit = time.monotonic() - t0
        legit_done = time.monotonic()
        results = json.loads(flood.stdout.readline())
        flood_done = float(flood.stdout.readline())     # its last answer (the same monotonic clock)
    finally:
        flood.kill()
        flood.wait()
    print(f"flood: {results.count(401)} x 401, {results.count(429)} x 429; another address logged in in "
          f"{legit * 1000:.0f} ms (alone, before the flood: {alone * 1000:.0f} ms), "
          f"{(flood_done - legit_done) * 1000:.0f} ms before the flood's last answer")
    assert len(results) == 60 and set(results) <= {401, 429}
    assert flood_done > legit_done, "the other address's login was not measured while the flood ran"
    assert results.count(401) <= 5
    assert legit < 0.2
    assert w.status("/qvd/list_of_vm", BOB, source="127.0.0.33") == 200     # bob elsewhere: unaffected


def test_empty_passwords_are_not_counted(strict_world):
    w = strict_world
    for _ in range(20):
        assert w.status("/qvd/list_of_vm", basic("bob", ""), source="127.0.0.33") == 401
    assert w.status("/qvd/list_of_vm", BOB, source="127.0.0.33") == 200


def test_a_full_hash_queue_answers_503_at_once(tmp_path, pg_server, fresh_db_name):
    """With room for one hash, concurrent logins from many addresses: those that find the
    queue full get 503 "retry later" at once instead of queueing without bound."""
    from qvd_gevent.db.passwords import hash_password
    w = make_world(tmp_path, pg_server, fresh_db_name, 100000,
                   extra={"l7r.auth.hash.threads": 1, "l7r.auth.hash.queue": 1})
    # a stored hash four times the usual scrypt cost: the one running check holds the thread
    # long enough that "at once" cannot be confused with "after the check"
    w.node.seed.user("slow", "slow-pw", stored=hash_password("slow-pw", n=2 ** 16))
    try:
        answers = []

        def login(i):
            t0 = time.monotonic()
            final, _ = w.request("/qvd/list_of_vm", basic("slow", f"wrong-{i}"), source=f"127.0.1.{i + 1}")
            answers.append((final.status, time.monotonic() - t0, final.headers.get("retry-after")))
        gevent.joinall([gevent.spawn(login, i) for i in range(20)], timeout=60)
        statuses = [a[0] for a in answers]
        assert len(answers) == 20 and set(statuses) <= {401, 503} and 503 in statuses and 401 in statuses
        assert all(retry == "2" for status, _, retry in answers if status == 503)
        refused_in = sorted(took for status, took, _ in answers if status == 503)
        hashed_in = sorted(took for status, took, _ in answers if status == 401)
        print(f"full hash queue: {len(refused_in)} x 503 in {refused_in[0]:.3f}-{refused_in[-1]:.3f} s, "
              f"{len(hashed_in)} x 401 in {hashed_in[0]:.3f}-{hashed_in[-1]:.3f} s")
        # at once: every 503 is sent while the check that fills the queue is still running
        assert refused_in[-1] < hashed_in[0], (refused_in, hashed_in)
        assert w.status("/qvd/list_of_vm", ALICE) == 200          # the queue drains; logins work again
    finally:
        w.node.close()


def test_refusal_takes_as_long_for_a_legacy_hash_as_for_scrypt(world):
    """A stored hash in the original's salted SHA-256 form fails in microseconds; the refusal
    must still cost what a scrypt user's (and an unknown login's) costs."""
    from qvd_gevent.db.passwords import hash_password
    w = world
    w.node.seed.user("carol", "carol-pw", stored=hash_password("carol-pw"))
    w.node.seed.user("dave", "dave-pw")                     # the seed stores the legacy form
    medians = median_401s(w, ["carol", "dave"])
    scrypt_user, legacy_user = medians["carol"], medians["dave"]
    print(f"401 in: scrypt {scrypt_user * 1000:.0f} ms, legacy {legacy_user * 1000:.0f} ms")
    assert scrypt_user > 0.01
    assert SAME_COST[0] * scrypt_user <= legacy_user <= SAME_COST[1] * scrypt_user, medians
