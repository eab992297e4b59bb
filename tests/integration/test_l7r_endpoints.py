"""L7R endpoints over real TLS on 127.0.0.1 against a real PostgreSQL."""
import base64
import json

import pytest

from helpers.l7r_env import Node, Reader, basic, get, open_conn, write_conf
from helpers.nodes import wait_for, seeded_node
from qvd_gevent.db.passwords import is_legacy, legacy_token
from qvd_gevent.db.runtime import token_digest

ORIGINAL_LIST = (b"GET /qvd/list_of_vm? HTTP/1.1\r\n"
                 b"Authorization: Basic cXZkOnF2ZA==\r\n"
                 b"Accept: application/json\r\n"
                 b"User-Agent: QVD::HTTPC/0.01 (linux)\r\n\r\n")



@pytest.fixture
def env(tmp_path, pg_server, fresh_db_name):
    node = seeded_node(tmp_path, pg_server, fresh_db_name)
    yield node
    node.close()


def ask(env, target, headers=(), sock=None):
    own = sock is None
    sock = sock or open_conn(env.svc.port, env.cert)
    try:
        get(sock, target, headers)
        return Reader(sock).final()[1]
    finally:
        if own:
            sock.close()


def test_ping(env):
    resp = ask(env, "/qvd/ping")
    assert (resp.status, resp.body) == (200, b"I am alive!\r\n")
    assert resp.head.startswith(b"HTTP/1.1 200 OK\r\n")
    # the node keeps its state until the database announces a change (NOTIFY host_changed /
    # host_blocked_or_unblocked): the answer follows within moments, not at once
    env.db.execute("UPDATE host_runtimes SET blocked = true")
    wait_for(lambda: ask(env, "/qvd/ping").status == 503, 5, interval=0.02, what="the block announced")
    resp = ask(env, "/qvd/ping")
    assert (resp.status, resp.text) == (503, "Server is blocked")
    env.db.execute("UPDATE host_runtimes SET blocked = false, state = 'stopping'")
    wait_for(lambda: ask(env, "/qvd/ping").text == "Server is stopping", 5, interval=0.02,
             what="the state change announced")


def test_original_list_request_bytes_without_host_header(env):
    sock = open_conn(env.svc.port, env.cert)
    sock.sendall(ORIGINAL_LIST)
    resp = Reader(sock).response()
    sock.close()
    assert resp.status == 200
    assert resp.raw_headers == ["Content-Type: application/json", f"Content-Length: {len(resp.body)}"]
    items = json.loads(resp.body)
    assert items == [{"id": env.vm_id, "name": "qvd-vm1", "state": "stopped", "blocked": False, "is_application": False}]


def test_list_of_applications_and_flags(env):
    app_osf = env.seed.osf("apps", is_application=True)
    app = env.seed.vm("app1", env.user, app_osf, blocked=True)
    resp = ask(env, "/qvd/list_of_applications", [("Authorization", basic("qvd", "qvd"))])
    assert json.loads(resp.body) == [{"id": app, "name": "app1", "state": "stopped", "blocked": True,
                                      "is_application": True}]
    assert [v["id"] for v in json.loads(ask(env, "/qvd/list_of_vm", [("Authorization", basic("qvd", "qvd"))]).body)] == [env.vm_id]


@pytest.mark.parametrize("auth", [None, basic("qvd", "wrong"), basic("nobody", "qvd"), "Digest abc", basic("qvd", ""),
                                  basic("qvd@nosuchtenant", "qvd"), basic("qvd@*", "qvd")])
def test_list_401(env, auth):
    headers = [("Authorization", auth)] if auth else []
    resp = ask(env, "/qvd/list_of_vm", headers)
    assert resp.status == 401
    assert resp.headers["www-authenticate"] == 'Basic realm="QVD"'
    assert resp.headers["content-type"] == "text/plain"


def test_header_names_case_insensitive(env):
    resp = ask(env, "/qvd/list_of_vm", [("AUTHORIZATION", basic("qvd", "qvd"))])
    assert resp.status == 200
    resp = ask(env, "/qvd/list_of_vm", [("authorization", basic("qvd", "qvd"))])
    assert resp.status == 200


def test_blocked_user_tenant_host(env):
    t = env.seed.tenant("acme")
    u = env.seed.user("bob", "pw", tenant_id=t)
    assert ask(env, "/qvd/list_of_vm", [("Authorization", basic("bob@acme", "pw"))]).status == 200
    assert ask(env, "/qvd/list_of_vm", [("Authorization", basic("BOB#ACME", "pw"))]).status == 200
    env.db.execute("UPDATE users SET blocked = true WHERE id = %s", (u,))
    assert ask(env, "/qvd/list_of_vm", [("Authorization", basic("bob@acme", "pw"))]).status == 401
    env.db.execute("UPDATE users SET blocked = false WHERE id = %s", (u,))
    env.db.execute("UPDATE tenants SET blocked = true WHERE id = %s", (t,))
    assert ask(env, "/qvd/list_of_vm", [("Authorization", basic("bob@acme", "pw"))]).status == 401
    env.db.execute("UPDATE host_runtimes SET blocked = true")
    resp = ask(env, "/qvd/list_of_vm", [("Authorization", basic("qvd", "qvd"))])
    assert (resp.status, resp.text) == (503, "Server is blocked")
    # auth comes before the host checks, as the original
    assert ask(env, "/qvd/list_of_vm", [("Authorization", basic("qvd", "bad"))]).status == 401


def test_legacy_password_upgraded_on_login(env):
    assert env.db.query_one("SELECT password FROM users WHERE id = %s", (env.user,))[0] == legacy_token("qvd")
    assert ask(env, "/qvd/list_of_vm", [("Authorization", basic("qvd", "qvd"))]).status == 200
    # the upgrade is done off the login's path (one scrypt per user, not one per login of a burst)
    wait_for(lambda: not is_legacy(env.db.query_one("SELECT password FROM users WHERE id = %s", (env.user,))[0]),
             10, what="the stored hash upgraded to scrypt")
    assert ask(env, "/qvd/list_of_vm", [("Authorization", basic("qvd", "qvd"))]).status == 200
    assert ask(env, "/qvd/list_of_vm", [("Authorization", basic("qvd", "qvdx"))]).status == 401


def test_unknown_path_and_version(env):
    assert ask(env, "/qvd/nothing").status == 404
    sock = open_conn(env.svc.port, env.cert)
    sock.sendall(b"GET /qvd/ping HTTP/1.0\r\n\r\n")
    resp = Reader(sock).response()
    assert resp.status == 505
    sock.close()


def test_keep_alive_several_requests(env):
    sock = open_conn(env.svc.port, env.cert)
    reader = Reader(sock)
    for _ in range(3):
        get(sock, "/qvd/ping")
        assert reader.response().status == 200
        get(sock, "/qvd/list_of_vm", [("Authorization", basic("qvd", "qvd"))])
        assert reader.response().status == 200
    sock.close()


def test_authenticate_user_and_tokens(env):
    resp = ask(env, "/qvd/authenticate_user", [("Authorization", basic("qvd", "qvd"))])
    assert (resp.status, json.loads(resp.body)) == (200, {})
    resp = ask(env, "/qvd/authenticate_user?store_auth=1", [("Authorization", basic("qvd", "qvd"))])
    assert set(json.loads(resp.body)) == {"auth_params_id"}
    resp = ask(env, "/qvd/create_auth_token", [("Authorization", basic("qvd", "qvd"))])
    body = json.loads(resp.body)
    assert body["auth_token"].endswith("\n")
    raw = base64.b64decode(body["auth_token"]).decode()
    assert len(raw) >= 40
    # multi_use tokens work repeatedly, on new connections
    for _ in range(2):
        assert ask(env, "/qvd/list_of_vm", [("Authorization", "Bearer " + body["auth_token"].strip())]).status == 200
    sock = open_conn(env.svc.port, env.cert)
    sock.sendall(b"GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: Bearer " + body["auth_token"].encode().rstrip(b"\n")
                 + b"\r\n\r\n")
    assert Reader(sock).response().status == 200
    sock.close()


def test_single_use_and_expired_tokens(env):
    env.db.execute("INSERT INTO user_tokens (token, user_id, expiration, multi_use) VALUES "
                   "(%s, %s, extract(epoch from now())::int + 100, false), "
                   "(%s, %s, extract(epoch from now())::int - 100, true)",
                   (token_digest("once"), env.user, token_digest("old"), env.user))
    bearer = lambda t: [("Authorization", "Bearer " + base64.b64encode(t.encode()).decode())]  # noqa: E731
    # single use: list and a second request on the same connection work (per-connection cache) ...
    sock = open_conn(env.svc.port, env.cert)
    reader = Reader(sock)
    get(sock, "/qvd/list_of_vm", bearer("once"))
    assert reader.response().status == 200
    get(sock, "/qvd/list_of_vm", bearer("once"))
    assert reader.response().status == 200
    sock.close()
    # ... but not on a new one
    assert ask(env, "/qvd/list_of_vm", bearer("once")).status == 401
    assert ask(env, "/qvd/list_of_vm", bearer("old")).status == 401
    assert env.db.query_one("SELECT count(*) FROM user_tokens WHERE token = %s", (token_digest("old"),))[0] == 0


def test_counters(env):
    before = env.db.query_one("SELECT http_requests, auth_attempts, auth_ok FROM host_counters WHERE host_id = %s",
                              (env.host_id,))
    ask(env, "/qvd/list_of_vm", [("Authorization", basic("qvd", "qvd"))])
    ask(env, "/qvd/list_of_vm", [("Authorization", basic("qvd", "nope"))])
    ask(env, "/qvd/ping")
    env.svc.flush_counters()
    after = env.db.query_one("SELECT http_requests, auth_attempts, auth_ok FROM host_counters WHERE host_id = %s",
                             (env.host_id,))
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (2, 2, 1)


def test_unregistered_host(tmp_path, pg_server, fresh_db_name):
    conf = write_conf(tmp_path, pg_server, fresh_db_name, extra={"l7r.use_ssl": 0})
    node = Node(conf)
    try:
        sock = open_conn(node.svc.port)
        get(sock, "/qvd/ping")
        resp = Reader(sock).response()
        assert (resp.status, resp.text) == (503, "Host is not registered in the database")
        sock.close()
    finally:
        node.close()
