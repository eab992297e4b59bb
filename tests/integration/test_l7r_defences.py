"""Slow clients, oversized requests, throttling, TLS policy and reload, plain mode with os.splice."""
import os
import socket
import ssl
import time

import gevent
import pytest

from helpers.l7r_env import AUTH, UPGRADE, Reader, basic, client_context, get, open_conn, read_to_close, session_row
from helpers.nodes import seeded_node, seeded_nodes, wait_for
from qvd_gevent.l7r.server import L7RError, L7RService
from qvd_gevent.node.certs import make_self_signed


@pytest.fixture
def node_factory(tmp_path, pg_server, fresh_db_name):
    with seeded_nodes(tmp_path, pg_server, fresh_db_name) as make:
        yield make


def test_slow_client_gets_408_and_close(node_factory):
    node = node_factory({"l7r.timeout.request": 1})
    sock = open_conn(node.svc.port, node.cert)
    t0 = time.monotonic()
    sock.sendall(b"GET /qvd/ping HTTP/1.1\r\n")
    for _ in range(3):  # trickling bytes does not extend the deadline
        gevent.sleep(0.3)
        try:
            sock.sendall(b"X-A: b\r\n")
        except OSError:
            break
    reader = Reader(sock)
    resp = reader.response()
    assert resp.status == 408
    assert time.monotonic() - t0 < 3
    assert reader.buf + read_to_close(sock) == b""   # and closed, nothing after the 408
    sock.close()
    assert wait_for(lambda: node.svc.connections_open == 0)


def test_silent_connection_closed_after_deadline(node_factory):
    node = node_factory({"l7r.timeout.request": 1, "l7r.use_ssl": 0})
    sock = socket.create_connection(("127.0.0.1", node.svc.port))
    sock.settimeout(5)
    data = sock.recv(1000)
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    sock.close()


def test_idle_keepalive_timeout(node_factory):
    """A keep-alive connection that has not logged in is closed after the short
    l7r.timeout.idle.unauthenticated; one that has, after l7r.timeout.idle."""
    node = node_factory({"l7r.timeout.idle": 3, "l7r.timeout.idle.unauthenticated": 1, "l7r.use_ssl": 0})
    stranger = socket.create_connection(("127.0.0.1", node.svc.port))
    user = socket.create_connection(("127.0.0.1", node.svc.port))
    for sock, auth in ((stranger, []), (user, AUTH)):
        sock.settimeout(8)
        get(sock, "/qvd/list_of_vm" if auth else "/qvd/ping", auth)
        assert Reader(sock).response().status == 200
    t0 = time.monotonic()
    assert stranger.recv(100) == b""                  # closed silently after the short idle timeout
    assert 0.5 < time.monotonic() - t0 < 2.5
    assert user.recv(100) == b""                      # the logged-in one stayed longer
    assert 2.5 < time.monotonic() - t0 < 6
    stranger.close()
    user.close()


def test_connections_per_address_are_capped(node_factory):
    """1,000 connections from one address that never become sessions: only
    l7r.limits.connections_per_address are held, the rest closed at once; they go when their
    deadline comes; another address meanwhile logs in as usual."""
    node = node_factory({"l7r.limits.connections_per_address": 20, "l7r.timeout.request": 3})
    socks = []
    for _ in range(1000):
        s = socket.socket()
        s.bind(("127.0.0.70", 0))
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", node.svc.port))
        socks.append(s)
    try:
        gevent.sleep(1.0)
        held = 0
        for s in socks:
            try:
                held += s.recv(1, socket.MSG_PEEK) != b""      # data would be odd; b"": closed
            except BlockingIOError:
                held += 1                                    # open: no answer, no end of stream
            except OSError:
                pass                                         # reset: closed
        print(f"held {held} of 1000 connections from one address")
        assert held == 20
        assert node.svc._pending.get("127.0.0.70") == 20
        ctx = client_context(node.cert)
        raw = socket.create_connection(("127.0.0.1", node.svc.port), timeout=5, source_address=("127.0.0.71", 0))
        with ctx.wrap_socket(raw, server_hostname="localhost") as other:
            get(other, "/qvd/list_of_vm", AUTH)
            assert Reader(other).response().status == 200
        assert wait_for(lambda: node.svc._pending.get("127.0.0.70") is None, 10)   # cut at their deadline
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("raw,status", [
    (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /qvd/ping HTTP/1.1\r\n" + b"X-Big: " + b"b" * 600 + b"\r\n\r\n", 431),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /qvd/ping HTTP/1.1\r\nbad header line\r\n\r\n", 400),
    (b"GET /qvd/ping HTTP/2.0\r\n\r\n", 505),
])
def test_limits(node_factory, raw, status):
    node = node_factory({"l7r.limits.request_line": 200, "l7r.limits.headers": 400}, users=False)
    sock = open_conn(node.svc.port, node.cert)
    sock.sendall(raw)
    reader = Reader(sock)
    assert reader.response().status == status
    assert reader.buf + read_to_close(sock) == b""   # and closed, nothing after the refusal
    sock.close()


def test_throttle_counts_client_retries_once(node_factory):
    node = node_factory({"l7r.auth.throttle.max_failures": 3, "l7r.auth.throttle.burst": 10})
    bad = [("Authorization", basic("qvd", "wrong"))]

    def status(headers):
        sock = open_conn(node.svc.port, node.cert)
        get(sock, "/qvd/list_of_vm", headers)
        s = Reader(sock).response().status
        sock.close()
        return s
    # the original client retries 5 times: one mistyped password is one failure
    assert [status(bad) for _ in range(5)] == [401] * 5
    assert status(AUTH) == 200
    # three different wrong passwords -> throttled (429), even the right password now
    assert status([("Authorization", basic("qvd", "w2"))]) == 401
    assert status([("Authorization", basic("qvd", "w3"))]) == 401
    assert status([("Authorization", basic("qvd", "w4"))]) == 429
    assert status(AUTH) == 429


def test_throttle_per_login_across_addresses():
    from qvd_gevent.l7r.throttle import Throttle
    t = Throttle(max_failures=2, window=60, burst=5, max_login_failures=3)
    assert t.begin("10.0.0.1", "bob@default", "f1", 0).entries
    assert t.begin("10.0.0.2", "bob@default", "f2", 1).entries
    assert t.blocked("10.0.0.3", "bob@default", 2) is None     # below the all-addresses ceiling
    assert t.begin("10.0.0.4", "bob@default", "f3", 1).entries
    assert t.blocked("10.0.0.3", "bob@default", 2) == "login"
    assert t.blocked("10.0.0.3", "alice@default", 2) is None
    assert t.blocked("10.0.0.3", "bob@default", 62) is None


def test_plain_mode_uses_os_splice_and_half_close_both_ways(node_factory):
    node = node_factory({"l7r.use_ssl": 0})
    node.seed.running_at(node.vm_id, node.host_id, node.vma)
    sock = socket.create_connection(("127.0.0.1", node.svc.port))
    sock.settimeout(10)
    get(sock, f"/qvd/connect_to_vm?id={node.vm_id}", AUTH + UPGRADE)
    reader = Reader(sock)
    infos, final = reader.final()
    assert final.status == 101
    session = wait_for(lambda: node.svc.sessions.get(node.vm_id))
    assert wait_for(lambda: session.splice is not None)
    assert session.splice.uses_os_splice
    payload = os.urandom(3 * 1024 * 1024)
    gevent.spawn(sock.sendall, payload)
    assert reader.recv_exact(len(payload)) == payload
    sock.shutdown(socket.SHUT_WR)
    assert sock.recv(10) == b""
    sock.close()
    assert wait_for(lambda: session_row(node)[0] == "disconnected")


def test_tls_versions(node_factory):
    node = node_factory(users=False)
    for version, ok in ((ssl.TLSVersion.TLSv1_1, False), (ssl.TLSVersion.TLSv1_2, True), (ssl.TLSVersion.TLSv1_3, True)):
        ctx = client_context(node.cert)
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        try:
            ctx.maximum_version = version
            ctx.minimum_version = version
        except (ValueError, ssl.SSLError):
            continue
        raw = socket.create_connection(("127.0.0.1", node.svc.port), timeout=5)
        try:
            s = ctx.wrap_socket(raw, server_hostname="localhost")
            assert ok, f"{version} accepted"
            assert s.version() in ("TLSv1.2", "TLSv1.3")
            s.close()
        except (ssl.SSLError, OSError):
            assert not ok, f"{version} refused"
            raw.close()


def test_tls13_only_setting(node_factory):
    node = node_factory({"l7r.options.SSL_version": "TLSv1_3"}, users=False)
    ctx = client_context(node.cert)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    raw = socket.create_connection(("127.0.0.1", node.svc.port), timeout=5)
    with pytest.raises((ssl.SSLError, OSError)):
        ctx.wrap_socket(raw, server_hostname="localhost")
    raw.close()


def test_refuses_insecure_key_file(tmp_path, pg_server, fresh_db_name):
    node = seeded_node(tmp_path, pg_server, fresh_db_name, start=False, users=False)
    try:
        node.db.execute("DELETE FROM ssl_configs")
        folder = tmp_path / "loose"
        folder.mkdir()
        cert, key = make_self_signed(str(folder / "c.pem"), str(folder / "k.pem"))
        os.chmod(key, 0o644)
        node.cfg.file_values["path.l7r.ssl.key"] = key
        node.cfg.file_values["path.l7r.ssl.cert"] = cert
        with pytest.raises(L7RError, match="insecure permissions"):
            node.svc.start()
        os.chmod(key, 0o600)
        os.chmod(cert, 0o646)
        svc = L7RService(node.cfg, node.db, node.listener)
        with pytest.raises(L7RError, match="certificate file .* insecure permissions"):
            svc.start()
    finally:
        node.close()


def test_files_written_private_and_reload_on_notify(node_factory, tmp_path):
    node = node_factory(users=False)
    key_path = node.cfg.get_str("path.l7r.ssl.key")
    assert os.stat(key_path).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(key_path)).st_mode & 0o777 == 0o700
    first = open_conn(node.svc.port, node.cert)
    get(first, "/qvd/ping")
    assert Reader(first).response().status == 200
    # a new certificate in ssl_configs + NOTIFY: new connections get it, without a restart
    folder = tmp_path / "new"
    folder.mkdir()
    cert2, key2 = make_self_signed(str(folder / "c.pem"), str(folder / "k.pem"), common_name="renewed")
    node.db.execute("UPDATE ssl_configs SET value = %s WHERE key = 'l7r.ssl.cert'", (open(cert2).read(),))
    node.db.execute("UPDATE ssl_configs SET value = %s WHERE key = 'l7r.ssl.key'", (open(key2).read(),))
    node.db.notify("qvd_config_changed", "tenant_id=-1")

    def new_cert_served():
        try:
            s = open_conn(node.svc.port, cert2)
            s.close()
            return True
        except ssl.SSLError:
            return False
    assert wait_for(new_cert_served, timeout=5)
    # the connection opened before keeps working
    get(first, "/qvd/ping")
    assert Reader(first).response().status == 200
    first.close()


def test_client_certificate_required(tmp_path, node_factory):
    node = build_with_client_ca(tmp_path, node_factory)
    # no client certificate: handshake (or first read) fails
    with pytest.raises((ssl.SSLError, OSError, EOFError)) as refusal:
        s = open_conn(node.svc.port, node.cert)
        get(s, "/qvd/ping")
        Reader(s).response()
    assert not isinstance(refusal.value, TimeoutError), "no answer, but no refusal either"
    ctx = client_context(node.cert)
    ctx.load_cert_chain(str(tmp_path / "ca" / "c.pem"), str(tmp_path / "ca" / "k.pem"))
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", node.svc.port), timeout=5), server_hostname="localhost")
    get(s, "/qvd/ping")
    assert Reader(s).response().status == 200
    s.close()


def build_with_client_ca(tmp_path, node_factory):
    folder = tmp_path / "ca"
    folder.mkdir()
    cert, key = make_self_signed(str(folder / "c.pem"), str(folder / "k.pem"), common_name="client")
    node = node_factory({"l7r.client.cert.require": 1}, start=False, users=False)
    node.db.execute("INSERT INTO ssl_configs (key, value) VALUES ('l7r.ssl.ca', %s)", (open(cert).read(),))
    node.start()
    return node


def _ca_and_client(folder, revoke):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "user")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(4242)
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    crl = x509.CertificateRevocationListBuilder().issuer_name(ca_name).last_update(now - datetime.timedelta(minutes=5)) \
        .next_update(now + datetime.timedelta(days=1))
    if revoke:
        crl = crl.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(4242)
                                          .revocation_date(now - datetime.timedelta(minutes=1)).build())
    crl = crl.sign(ca_key, hashes.SHA256())
    pem = serialization.Encoding.PEM
    (folder / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (folder / "leaf.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    return ca.public_bytes(pem).decode(), crl.public_bytes(pem).decode()


@pytest.mark.parametrize("revoke", [False, True])
def test_client_certificate_crl(tmp_path, node_factory, revoke):
    folder = tmp_path / "pki"
    folder.mkdir()
    ca, crl = _ca_and_client(folder, revoke)
    node = node_factory({"l7r.client.cert.require": 1}, start=False, users=False)
    node.db.execute("INSERT INTO ssl_configs (key, value) VALUES ('l7r.ssl.ca', %s), ('l7r.ssl.crl', %s)", (ca, crl))
    node.start()
    ctx = client_context(node.cert)
    ctx.load_cert_chain(str(folder / "leaf.pem"), str(folder / "leaf.key"))

    def ping():
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", node.svc.port), timeout=5),
                            server_hostname="localhost")
        get(s, "/qvd/ping")
        status = Reader(s).response().status
        s.close()
        return status
    if revoke:
        with pytest.raises((ssl.SSLError, OSError, EOFError)) as refusal:
            ping()
        assert not isinstance(refusal.value, TimeoutError), "no answer, but no refusal either"
    else:
        assert ping() == 200
