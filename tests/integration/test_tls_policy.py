"""The L7R's TLS policy, seen from clients that try to weaken it (real sockets, a test CA).

- TLS 1.0 and 1.1 handshakes are refused by the server: the client is built to offer
  them (OpenSSL 3 refuses to offer them at its default security level, so the client
  uses @SECLEVEL=0) and a control server proves the client really can negotiate them.
- Weak cipher suites (NULL, anonymous, MD5, and RC4/3DES/DES/EXPORT where this OpenSSL
  still has them) are refused, again with a control server that accepts them.
- l7r.client.cert.require=1: no certificate, a certificate of another CA, an expired
  one, and one revoked in the CRL are refused; a certificate from the CA works; a CRL
  updated in ssl_configs refuses a certificate without a restart.
- A key file readable by group or others stops the L7R (and the qvd-node process) at
  start with one clear line.
"""
import os
import socket
import ssl
import subprocess
import sys

import gevent
import pytest

from helpers.hostile import Pki, tls_node, wait_until
from helpers.l7r_env import Reader, get

WEAK = "eNULL:aNULL:RC4:3DES:DES:EXPORT:MD5:LOW:@SECLEVEL=0"


@pytest.fixture
def make_node(tmp_path, pg_server, fresh_db_name):
    made = []

    def make(extra=None, **kw):
        node = tls_node(tmp_path, pg_server, fresh_db_name, extra, **kw)
        made.append(node)
        return node
    yield make
    for node in made:
        node.close()


def legacy_client(version=None, ciphers=None, cafile=None, cert=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if cafile:
        ctx.load_verify_locations(cafile=cafile)
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        ctx.minimum_version = version
        ctx.maximum_version = version
    ctx.set_ciphers(ciphers or "ALL:@SECLEVEL=0")
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx


def handshake(ctx, port):
    """(version, cipher) on success; raises ssl.SSLError/OSError when refused."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s = ctx.wrap_socket(raw, server_hostname="localhost")
        try:
            return s.version(), s.cipher()[0]
        finally:
            s.close()
    except BaseException:
        raw.close()
        raise


class ControlServer:
    """A permissive TLS server with the same certificate: proves what the client offers."""

    def __init__(self, pki, min_version=ssl.TLSVersion.MINIMUM_SUPPORTED, ciphers="ALL:COMPLEMENTOFALL:@SECLEVEL=0",
                 rsa=False):
        cert, key, _ = pki.issue("control", server=True, rsa=rsa)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = min_version
        self.ctx.set_ciphers(ciphers)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.greenlet = gevent.spawn(self._serve)

    def _serve(self):
        for _ in range(1000):
            conn, _addr = self.sock.accept()
            try:
                s = self.ctx.wrap_socket(conn, server_side=True)
                s.close()
            except (ssl.SSLError, OSError):
                conn.close()

    def close(self):
        self.greenlet.kill()
        self.sock.close()


@pytest.fixture
def control(tmp_path):
    servers = []

    def make(**kw):
        server = ControlServer(Pki(str(tmp_path / f"control-pki-{len(servers)}")), **kw)
        servers.append(server)
        return server
    yield make
    for server in servers:
        server.close()


def seeded(node):
    node.osf = node.seed.osf()
    node.user = node.seed.user("alice", "alice-pw")
    node.vm_id = node.seed.vm("alice-vm", node.user, node.osf)
    return node


def ping_with(ctx, port):
    """Status of /qvd/ping over a connection made with ctx (raises when TLS refuses)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    try:
        get(s, "/qvd/ping")
        return Reader(s).response().status
    finally:
        s.close()


def refused(ctx, port):
    """True when the server refuses this client: during the handshake, or (TLS 1.3 client
    certificates are checked after the client's Finished) at the first read, with no HTTP answer."""
    try:
        status = ping_with(ctx, port)
    except TimeoutError:
        raise AssertionError("the server neither answered nor refused within 5 s") from None
    except (ssl.SSLError, OSError, EOFError):
        return True
    raise AssertionError(f"the server answered {status}")


# --- protocol versions -----------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [None, "TLSv1_1:!SSLv3:!SSLv2:!TLSv1", "TLSv1:TLSv1_1", "SSLv23", "ALL"],
                         ids=["default", "original-httpd-fallback", "old-only", "SSLv23", "ALL"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["TLSv1.0", "TLSv1.1"])
def test_old_tls_versions_are_refused_by_the_server(make_node, control, version, spec):
    """Whatever l7r.options.SSL_version says (the original's HTTPD fallback allowed TLS 1.1),
    the floor is TLS 1.2."""
    client = legacy_client(version)
    # the control: this client does offer and negotiate the old version with a server that allows it
    try:
        got = handshake(client, control(min_version=ssl.TLSVersion.MINIMUM_SUPPORTED).port)
    except ssl.SSLError as exc:
        pytest.skip(f"this OpenSSL ({ssl.OPENSSL_VERSION}) cannot negotiate {version.name} even at "
                    f"@SECLEVEL=0 ({exc}); the server's refusal cannot be told apart")
    assert got[0] == {"TLSv1": "TLSv1", "TLSv1_1": "TLSv1.1"}[version.name], got
    node = make_node({"l7r.options.SSL_version": spec} if spec else None)
    with pytest.raises(ssl.SSLError) as info:
        handshake(client, node.svc.port)
    # the server answered with an alert ("protocol version" / "unsupported protocol")
    assert "VERSION" in str(info.value).upper() or "PROTOCOL" in str(info.value).upper(), info.value
    # 1.2 and 1.3 keep working, with the real CA
    for ok in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = ssl.create_default_context(cafile=node.cert)
        ctx.check_hostname = False
        ctx.minimum_version = ctx.maximum_version = ok
        assert handshake(ctx, node.svc.port)[0] == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[ok.name]


def test_tls12_client_gets_a_forward_secret_aead_suite(make_node):
    node = make_node()
    ctx = legacy_client(ssl.TLSVersion.TLSv1_2, "ALL:COMPLEMENTOFALL:@SECLEVEL=0", cafile=node.cert)
    version, cipher = handshake(ctx, node.svc.port)
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher


@pytest.mark.parametrize("tickets", [None, 2], ids=["default", "two"])
def test_session_tickets_are_sent_only_when_configured(make_node, tickets):
    """QVD clients never resume a TLS session: by default no TLS 1.3 ticket is sent (each
    costs the node an encryption per connection); l7r.tls.session_tickets turns them on,
    and a client then resumes with one."""
    node = make_node({} if tickets is None else {"l7r.tls.session_tickets": tickets})
    ctx = ssl.create_default_context(cafile=node.cert)
    ctx.check_hostname = False
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", node.svc.port), timeout=5)) as s:
        get(s, "/qvd/ping")                 # tickets come after the handshake: read past them
        assert Reader(s).response().status == 200
        session = s.session
        assert s.version() == "TLSv1.3"
    assert session.has_ticket is (tickets is not None)
    if tickets:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", node.svc.port), timeout=5),
                             session=session) as again:
            assert again.session_reused


# --- weak ciphers ------------------------------------------------------------------------------------
def weak_suites(key):
    """{suite name: the weaknesses it has} for the TLS 1.2 suites a client can offer to a
    server with this key type (or to none at all)."""
    ctx = legacy_client(ssl.TLSVersion.TLSv1_2, WEAK)
    suites = {}
    for c in ctx.get_ciphers():
        if c["protocol"] == "TLSv1.3" or c["auth"] not in (f"auth-{key}", "auth-null"):
            continue
        if c["kea"] not in ("kx-ecdhe", "kx-dhe", "kx-any", "kx-rsa"):
            continue   # PSK suites need a key neither side has
        suites[c["name"]] = ({"NULL"} if c["symmetric"] is None else set()) | (
            {"anonymous"} if c["auth"] == "auth-null" else set()) | ({"MD5"} if c["digest"] == "md5" else set())
    return suites


@pytest.mark.parametrize("key", ["ecdsa", "rsa"])
def test_weak_cipher_suites_are_refused(make_node, control, key):
    """NULL, anonymous and MD5 suites, each offered alone and all together, are refused,
    while a permissive server with the same kind of key negotiates them. OpenSSL 3's only
    MD5 suite (NULL-MD5) needs an RSA certificate: the rsa case offers it."""
    suites = weak_suites(key)
    assert suites, f"this OpenSSL ({ssl.OPENSSL_VERSION}) offers none of {WEAK}"
    print("weak suites offered:", sorted(suites))
    permissive = control(rsa=key == "rsa")
    node = make_node(rsa=key == "rsa")
    accepted_by_control = []
    for suite in sorted(suites):
        client = legacy_client(ssl.TLSVersion.TLSv1_2, suite + ":@SECLEVEL=0")
        try:
            accepted_by_control.append(handshake(client, permissive.port)[1])
        except ssl.SSLError:
            pass
        with pytest.raises(ssl.SSLError):
            handshake(client, node.svc.port)
    print("weak suites the control server negotiated:", accepted_by_control)
    # each weakness the row names was really on offer: the refusal is the L7R's choice
    shown = set().union(*(suites[name] for name in accepted_by_control))
    assert shown >= ({"NULL", "anonymous", "MD5"} if key == "rsa" else {"NULL", "anonymous"}), shown
    # all of them offered together: still refused
    with pytest.raises(ssl.SSLError):
        handshake(legacy_client(ssl.TLSVersion.TLSv1_2, WEAK), node.svc.port)


STATIC_RSA = "AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA256:AES256-SHA256:AES128-SHA:AES256-SHA"


@pytest.mark.parametrize("cipher_list", [None, "ALL:@SECLEVEL=0"], ids=["default", "operator-allows-all"])
def test_static_rsa_key_exchange_is_refused_with_an_rsa_certificate(make_node, control, cipher_list):
    """With an RSA certificate, a client offering only static-RSA suites (no forward secrecy)
    is refused, whatever l7r.options.SSL_cipher_list says; a permissive server accepts it."""
    client = legacy_client(ssl.TLSVersion.TLSv1_2, STATIC_RSA + ":@SECLEVEL=0")
    assert handshake(client, control(rsa=True).port)[1] in STATIC_RSA.split(":")
    node = make_node({"l7r.options.SSL_cipher_list": cipher_list} if cipher_list else None, rsa=True)
    with pytest.raises(ssl.SSLError):
        handshake(client, node.svc.port)
    version, cipher = handshake(legacy_client(ssl.TLSVersion.TLSv1_2, cafile=node.cert), node.svc.port)
    assert cipher.startswith("ECDHE-RSA-"), cipher


# --- client certificates -----------------------------------------------------------------------------
@pytest.fixture
def cert_node(tmp_path, make_node):
    pki = Pki(str(tmp_path / "pki"))
    good = pki.issue("good-client", client=True)
    revoked = pki.issue("revoked-client", client=True)
    expired = pki.issue("expired-client", client=True, days=-1)
    crl = pki.crl([revoked[2]])
    node = seeded(make_node(pki=pki, client_ca=True, crl_path=crl))
    other = Pki(str(tmp_path / "other-pki"), name="Some other CA")
    node.certs = {"good": good[:2], "revoked": revoked[:2], "expired": expired[:2],
                  "other-ca": other.issue("stranger", client=True)[:2]}
    return node


def client_ctx(node, cert=None, version=None):
    ctx = ssl.create_default_context(cafile=node.cert)
    ctx.check_hostname = False
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLSv1.2", "TLSv1.3"])
def test_client_certificate_required_and_checked(cert_node, version):
    node = cert_node
    port = node.svc.port
    assert ping_with(client_ctx(node, node.certs["good"], version), port) == 200
    assert refused(client_ctx(node, None, version), port)
    assert refused(client_ctx(node, node.certs["revoked"], version), port)
    assert refused(client_ctx(node, node.certs["expired"], version), port)
    assert refused(client_ctx(node, node.certs["other-ca"], version), port)
    # a good certificate is not a login: the endpoints still want credentials
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    s = client_ctx(node, node.certs["good"], version).wrap_socket(raw, server_hostname="localhost")
    get(s, "/qvd/list_of_vm")
    assert Reader(s).response().status == 401
    s.close()
    assert wait_until(lambda: node.svc.connections_open == 0, 5) is True


def test_without_crl_the_same_certificate_is_accepted(tmp_path, make_node):
    """The control for the CRL test: what refuses the revoked certificate is the CRL."""
    pki = Pki(str(tmp_path / "pki"))
    revoked = pki.issue("revoked-client", client=True)
    node = make_node(pki=pki, client_ca=True)
    assert ping_with(client_ctx(node, revoked[:2]), node.svc.port) == 200


@pytest.mark.parametrize("intermediate_revoked", [False, True], ids=["control", "intermediate-revoked"])
def test_crl_is_checked_over_the_whole_chain(tmp_path, make_node, intermediate_revoked):
    """A client certificate issued by an intermediate CA that the root revoked is refused,
    though the client certificate itself is on no CRL (the leaf-only check let it in)."""
    root = Pki(str(tmp_path / "root"), name="QVD root CA")
    sub = Pki(str(tmp_path / "sub"), name="QVD intermediate CA", parent=root)
    cert, key, _ = sub.issue("branch-client", client=True)
    chain = str(tmp_path / "client-chain.pem")
    with open(chain, "w") as fh:
        fh.write(open(cert).read() + open(sub.ca_path).read())
    crls = str(tmp_path / "crls.pem")
    with open(crls, "w") as fh:
        fh.write(open(root.crl([sub.serial] if intermediate_revoked else [])).read()
                 + open(sub.crl([])).read())
    node = seeded(make_node(pki=root, client_ca=True, crl_path=crls))
    ctx = client_ctx(node, (chain, key), ssl.TLSVersion.TLSv1_2)
    if intermediate_revoked:
        assert refused(ctx, node.svc.port)
    else:
        assert ping_with(ctx, node.svc.port) == 200


def test_crl_update_in_ssl_configs_applies_without_restart(cert_node):
    node = cert_node
    pki = node.pki
    good_serial = None
    from cryptography import x509
    with open(node.certs["good"][0], "rb") as fh:
        good_serial = x509.load_pem_x509_certificate(fh.read()).serial_number
    assert ping_with(client_ctx(node, node.certs["good"]), node.svc.port) == 200
    crl = pki.crl([good_serial], filename="crl2.pem")
    node.db.execute("UPDATE ssl_configs SET value = %s WHERE key = 'l7r.ssl.crl'", (open(crl).read(),))
    node.db.notify("qvd_config_changed", "tenant_id=-1")

    def now_refused():
        try:
            return refused(client_ctx(node, node.certs["good"]), node.svc.port)
        except AssertionError:
            return False
    assert wait_until(now_refused, 10)


# --- key file permissions ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606])
def test_key_readable_by_group_or_others_is_refused_at_start(tmp_path, pg_server, fresh_db_name, mode):
    from qvd_gevent.l7r.server import L7RError, L7RService
    node = tls_node(tmp_path, pg_server, fresh_db_name, start=False)
    try:
        # an operator who points the node at files instead of ssl_configs
        node.db.execute("DELETE FROM ssl_configs")
        cert, key, _ = node.pki.issue("file-server", server=True)
        node.cfg.file_values["path.l7r.ssl.cert"] = cert
        node.cfg.file_values["path.l7r.ssl.key"] = key
        os.chmod(cert, 0o640)          # the original's rule: no world bits on the certificate either
        os.chmod(key, mode)
        with pytest.raises(L7RError) as info:
            node.svc.start()
        message = str(info.value)
        assert "\n" not in message and key in message and "insecure permissions" in message
        assert f"{mode:04o}" in message, message
        assert node.svc.port is None   # never listened
        os.chmod(key, 0o600)           # the control: the same files with 0600 serve
        svc = L7RService(node.cfg, node.db, node.listener).start()
        try:
            assert svc.port
        finally:
            svc.stop()
    finally:
        node.close()


def test_qvd_node_process_refuses_a_loose_key_with_one_line(tmp_path, pg_server, fresh_db_name):
    from helpers.database import write_node_conf
    from helpers.hkd_env import fast_hkd_settings
    from qvd_gevent.config import Config
    from qvd_gevent.db import Database
    from qvd_gevent.node import demo
    pki = Pki(str(tmp_path / "pki"))
    cert, key, _ = pki.issue("node-server", server=True)
    os.chmod(cert, 0o640)
    os.chmod(key, 0o640)
    values = fast_hkd_settings(tmp_path)
    values.pop("nodename")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    values.update({"l7r.port": port, "l7r.address": "127.0.0.1", "l7r.metrics.address": "",
                   "internal.hkd.address_check.enabled": 0, "vm.network.use_dhcp": 0,
                   "path.l7r.ssl.key": key, "path.l7r.ssl.cert": cert})
    conf = write_node_conf(tmp_path / "node.conf", pg_server, fresh_db_name, values)
    demo.provision(tmp_path, conf, "echo")
    db = Database.from_config(Config.load(str(conf)))
    try:
        db.execute("DELETE FROM ssl_configs")   # the files above are the node's only key material
    finally:
        db.close()
    run = subprocess.run([sys.executable, "-m", "qvd_gevent.node.main", "--config", str(conf)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 78, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("qvd-node:")]
    assert len(lines) == 1, run.stderr[-2000:]
    assert "insecure permissions 0640" in lines[0] and key in lines[0], lines[0]
    assert "Traceback" not in run.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
