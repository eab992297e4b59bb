"""Helpers for the hostile-client, TLS and access-control tests.

- ``Pki``: a test CA (ECDSA) that issues server and client certificates and CRLs, made
  with ``cryptography``; nothing leaves the test's tmp folder.
- ``tls_node(...)``: an L7R node (helpers.l7r_env.Node: real PostgreSQL, FakeVma, TestHkd)
  serving a CA-signed certificate, optionally requiring client certificates (CA + CRL in
  ``ssl_configs``, as ``qvd-admin config ssl`` stores them).
- Leak accounting for this process: open file descriptors, live greenlets, errors the
  gevent hub reported.
- ``client_hello()``: the bytes of a genuine TLS ClientHello (for truncated-record and
  stalled-handshake attacks).
- Run as a script (``python3 hostile.py slowloris ...``) it is the slowloris attacker:
  a separate process, like a real attacker, so the node's own hub is measured honestly.
  It prints ``READY <n>`` once every connection is open, then one JSON line with what
  happened to each connection, and exits; every loop is bounded by count and time. With
  ``--connect-first`` every TCP connect comes first (a pure connection flood over the
  ramp), the handshakes and slow requests after.
"""
import datetime
import gc
import ipaddress
import json
import os
import resource
import ssl
import sys
import time

if __name__ == "__main__":  # the attacker process: patch before anything else imports socket
    from gevent import monkey
    monkey.patch_all()

import gevent
import gevent.event
import gevent.socket
import greenlet


# --- process accounting -----------------------------------------------------------------------------
def raise_nofile(wanted=65536):
    """Raise this process's soft RLIMIT_NOFILE towards wanted (never above the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def live_greenlets():
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and not o.dead)


class HubErrors:
    """Records every error the gevent hub is told about (an exception that escaped a greenlet)."""

    def __init__(self):
        self.errors = []
        self._hub = gevent.get_hub()
        self._orig = None

    def __enter__(self):
        self._orig = self._hub.handle_error

        def handle_error(context, type_, value, tb):
            if type_ is not None and not issubclass(type_, (gevent.GreenletExit, SystemExit, KeyboardInterrupt)):
                self.errors.append(f"{type_.__name__}: {value} (in {context!r})")
            return self._orig(context, type_, value, tb)
        self._hub.handle_error = handle_error
        return self

    def __exit__(self, *exc):
        self._hub.handle_error = self._orig
        return False


def wait_until(pred, timeout, step=0.05):
    """pred's first truthy value, or its last value after timeout (bounded by time)."""
    deadline = time.monotonic() + timeout
    value = pred()
    while not value and time.monotonic() < deadline:
        gevent.sleep(step)
        value = pred()
    return value


# --- a test PKI -------------------------------------------------------------------------------------
class Pki:
    """A CA with server and client certificates and CRLs, as PEM files under folder."""

    def __init__(self, folder, name="QVD test CA", parent=None):
        """parent: the CA that signs this one (an intermediate CA); None for a root."""
        from cryptography.hazmat.primitives.asymmetric import ec
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_name = self._name(name)
        signer = parent or self
        self.ca_cert = signer._sign(self.ca_name, self.ca_key.public_key(), ca=True)
        self.ca_path = self._write_cert("ca.pem", self.ca_cert)
        self.serial = self.ca_cert.serial_number

    @staticmethod
    def _name(cn):
        from cryptography import x509
        from cryptography.x509.oid import NameOID
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def _sign(self, subject, public_key, ca=False, server=False, client=False, days=30):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID
        now = datetime.datetime.now(datetime.timezone.utc)
        start = now - datetime.timedelta(minutes=5) if days > 0 else now + datetime.timedelta(days=days - 30)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.ca_name).public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start)
                   .not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
                critical=True)
        else:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False)
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        if client:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return builder.sign(self.ca_key, hashes.SHA256())

    def _write_cert(self, filename, cert):
        from cryptography.hazmat.primitives import serialization
        path = os.path.join(self.folder, filename)
        with open(path, "wb") as fh:
            fh.write(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def _write_key(self, filename, key):
        from cryptography.hazmat.primitives import serialization
        path = os.path.join(self.folder, filename)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        return path

    def issue(self, name, server=False, client=False, days=30, rsa=False):
        """(cert_path, key_path, serial) of a new certificate for CN=name signed by this CA
        (days < 0: one that expired that many days ago; rsa: an RSA key instead of ECDSA)."""
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys
        key = rsa_keys.generate_private_key(65537, 2048) if rsa else ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(self._name(name), key.public_key(), server=server, client=client, days=days)
        return self._write_cert(f"{name}-cert.pem", cert), self._write_key(f"{name}-key.pem", key), cert.serial_number

    def crl(self, revoked_serials, filename="crl.pem"):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.ca_name)
                   .last_update(now - datetime.timedelta(minutes=5)).next_update(now + datetime.timedelta(days=1)))
        for serial in revoked_serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - datetime.timedelta(minutes=1))
                .build())
        crl = builder.sign(self.ca_key, hashes.SHA256())
        path = os.path.join(self.folder, filename)
        with open(path, "wb") as fh:
            fh.write(crl.public_bytes(serialization.Encoding.PEM))
        return path


# --- an L7R node with that PKI -------------------------------------------------------------------------
def tls_node(tmp_path, pg_server, dbname, extra=None, pki=None, client_ca=False, crl_path=None, start=True,
             nodename="test-node", rsa=False):
    """A seeded node (helpers.nodes.seeded_node, no users) whose certificate is signed by pki's CA;
    node.cert is the CA to trust.

    client_ca=True stores the CA as l7r.ssl.ca (and crl_path as l7r.ssl.crl) and sets
    l7r.client.cert.require=1."""
    from helpers.nodes import seeded_node
    pki = pki or Pki(str(tmp_path / "pki"))
    values = dict(extra or {})
    if client_ca:
        values["l7r.client.cert.require"] = 1
    cert, key, _serial = pki.issue("localhost", server=True, rsa=rsa)
    node = seeded_node(tmp_path, pg_server, dbname, nodename, extra=values, users=False, start=False,
                       certificate=(cert, key), client_ca=pki.ca_path if client_ca else None,
                       crl=crl_path, trust=pki.ca_path)
    node.pki = pki
    if start:
        node.start()
    return node


def client_hello(server_hostname="localhost"):
    """The bytes of a real TLS ClientHello (as a client would send first)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


# --- the slowloris attacker (a separate process) --------------------------------------------------------
KINDS = ("hello", "idle", "head", "body")


class AllConnected:
    """Set once every one of total TCP connects has been made (or has failed)."""

    def __init__(self, total):
        self.total, self.connected, self.event = total, 0, gevent.event.Event()

    def wait(self, timeout):
        self.event.wait(timeout)


def _count_connect(all_connected):
    all_connected.connected += 1
    if all_connected.connected == all_connected.total:
        all_connected.event.set()


def source_address(i, sources):
    """The loopback address connection i comes from, out of `sources` addresses (127.1.x.y)."""
    n = i % max(1, sources)
    return f"127.1.{n // 250}.{n % 250 + 1}" if sources > 1 else "127.0.0.1"


def _slow_one(kind, port, cafile, period, max_seconds, hello, results, established, all_connected=None,
              source="127.0.0.1"):
    """One slowloris connection: never finishes its request; returns when the server cuts it (or at max).
    all_connected: an Event to wait for between the TCP connect and the rest (a pure SYN flood first)."""
    record = {"kind": kind, "t_connect": None, "t_tcp": None, "t_ready": None, "t_closed": None, "answer": "",
              "sent": 0}
    results.append(record)
    t0 = time.monotonic()
    record["t_connect"] = t0
    try:
        raw = gevent.socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    except OSError as exc:
        record["answer"] = f"connect failed: {exc}"
        if all_connected is not None:
            _count_connect(all_connected)
        return
    record["t_tcp"] = time.monotonic()
    sock = raw
    if all_connected is not None:
        _count_connect(all_connected)
        all_connected.wait(max_seconds)
    try:
        if kind == "hello":
            # a genuine ClientHello, one byte at a time, never the last one
            pending = list(hello[:-1])
        else:
            ctx = ssl.create_default_context(cafile=cafile)
            ctx.check_hostname = False
            sock = ctx.wrap_socket(raw, server_hostname="localhost")
            if kind == "idle":
                pending = []
            elif kind == "head":
                sock.sendall(b"GET /qvd/list_of_vm HTTP/1.1\r\n")
                pending = list(b"".join(b"X-Slow-%04d: a\r\n" % i for i in range(2000)))
            else:  # body: a whole head, then a body that never ends
                sock.sendall(b"GET /qvd/ping HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
                pending = list(b"x" * 100000)
        record["t_ready"] = time.monotonic()
        established.append(1)
        sock.settimeout(period)
        answer = b""
        for _ in range(int(max_seconds / period) + 1):
            if time.monotonic() - t0 > max_seconds:
                break
            try:
                data = sock.recv(4096)
                if not data:
                    record["t_closed"] = time.monotonic()
                    break
                answer += data
                continue
            except (TimeoutError, gevent.socket.timeout):
                pass
            except OSError:
                record["t_closed"] = time.monotonic()
                break
            if pending:
                try:
                    sock.sendall(bytes([pending.pop(0)]))
                    record["sent"] += 1
                except OSError:
                    record["t_closed"] = time.monotonic()
                    break
        record["answer"] = answer[:200].decode("latin-1")
    except (OSError, ssl.SSLError) as exc:
        record["answer"] = f"error: {exc}"
        record["t_closed"] = time.monotonic()
    finally:
        sock.close()


def slowloris_main(argv):
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("--cafile", required=True)
    p.add_argument("--per-kind", type=int, default=500)
    p.add_argument("--period", type=float, default=1.0)
    p.add_argument("--ramp", type=float, default=3.0)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--connect-first", action="store_true",
                   help="every TCP connect first (the ramp is then a pure connection flood), handshakes after")
    p.add_argument("--sources", type=int, default=1,
                   help="loopback source addresses to spread the connections over (a node caps each address)")
    a = p.parse_args(argv)
    raise_nofile(65536)
    hello = client_hello()
    results, established = [], []
    greenlets = []
    total = a.per_kind * len(KINDS)
    all_connected = None
    if a.connect_first:
        all_connected = AllConnected(total)
    for i in range(total):
        kind = KINDS[i % len(KINDS)]
        greenlets.append(gevent.spawn_later(a.ramp * i / total, _slow_one, kind, a.port, a.cafile, a.period,
                                            a.max_seconds, hello, results, established, all_connected,
                                            source_address(i, a.sources)))
    deadline = time.monotonic() + a.ramp + 30
    while len(established) < total and time.monotonic() < deadline:
        if all(g.ready() for g in greenlets):
            break
        gevent.sleep(0.05)
    print(f"READY {len(established)}", flush=True)
    gevent.joinall(greenlets, timeout=a.max_seconds + a.ramp + 10)
    gevent.killall([g for g in greenlets if not g.ready()], timeout=5)
    print(json.dumps(results), flush=True)


def login_flood_main(argv):
    """N TLS connections from one source address, each with one wrong Basic login: all
    connected first (READY), then all requests at once when a line arrives on stdin; prints
    the statuses as one JSON list, then the time.monotonic() of the last answer."""
    import argparse
    import base64
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("--cafile", required=True)
    p.add_argument("--source", default="127.0.0.1")
    p.add_argument("--count", type=int, default=60)
    p.add_argument("--login", default="bob")
    p.add_argument("--max-seconds", type=float, default=60.0)
    a = p.parse_args(argv)
    ctx = ssl.create_default_context(cafile=a.cafile)
    ctx.check_hostname = False
    go = gevent.event.Event()
    statuses, socks, last_answer = [], [], [None]

    def one(i):
        raw = gevent.socket.create_connection(("127.0.0.1", a.port), timeout=a.max_seconds,
                                              source_address=(a.source, 0))
        s = ctx.wrap_socket(raw, server_hostname="localhost")
        socks.append(s)
        go.wait(a.max_seconds)
        auth = base64.b64encode(f"{a.login}:flood-{i}".encode()).decode()
        s.sendall(f"GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: Basic {auth}\r\n\r\n".encode())
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
        statuses.append(int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0)
        last_answer[0] = time.monotonic()
        s.close()
    greenlets = [gevent.spawn(one, i) for i in range(a.count)]
    deadline = time.monotonic() + a.max_seconds
    while len(socks) < a.count and time.monotonic() < deadline and not all(g.ready() for g in greenlets):
        gevent.sleep(0.02)
    print(f"READY {len(socks)}", flush=True)
    gevent.get_hub().threadpool.apply(sys.stdin.readline)
    go.set()
    gevent.joinall(greenlets, timeout=a.max_seconds)
    print(json.dumps(statuses), flush=True)
    print(last_answer[0], flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["slowloris"]:
        slowloris_main(sys.argv[2:])
    elif sys.argv[1:2] == ["login-flood"]:
        login_flood_main(sys.argv[2:])
    else:
        sys.exit("usage: hostile.py slowloris PORT --cafile CA [--per-kind N --period S --ramp S --max-seconds S]\n"
                 "       hostile.py login-flood PORT --cafile CA [--source IP --count N --login L]")
