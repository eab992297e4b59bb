"""A private OpenLDAP slapd for tests: its own slapd.conf and database in a temporary
folder, listening on 127.0.0.1 only (ldap:// and ldaps:// on free ports) with a
certificate from a test CA, entries loaded with ldapadd, stopped (and its files left to
the tmp_path) at the end.

Directory: dc=example,dc=org; people under ou=people (uid=<name>, objectClass
inetOrgPerson + posixAccount); a service account cn=reader,ou=services that may search;
the rootdn cn=admin,dc=example,dc=org. Passwords are stored in clear (slapd compares
them on bind), which is fine for a throw-away test directory.
"""
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SUFFIX = "dc=example,dc=org"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PW = "root-secret"
PEOPLE = f"ou=people,{SUFFIX}"
READER_DN = f"cn=reader,ou=services,{SUFFIX}"
READER_PW = "reader-secret"


def require_slapd():
    missing = [b for b in ("slapd", "ldapadd") if not (shutil.which(b) or os.path.exists(f"/usr/sbin/{b}"))]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} missing: scripts/install-test-deps.sh installs slapd and ldap-utils")
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install slapd ldap-utils)")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path, key):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                   serialization.NoEncryption()))


def make_ca_and_server_cert(folder, name="Test directory CA"):
    """(ca.pem, server cert.pem, server key.pem); the server cert names 127.0.0.1 and localhost."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = _key()
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths[2], key)
    return paths


CONF = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
pidfile {folder}/slapd.pid
modulepath /usr/lib/ldap
moduleload back_mdb
TLSCACertificateFile {ca}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
database mdb
maxsize 104857600
suffix "{suffix}"
rootdn "{rootdn}"
rootpw {rootpw}
directory {folder}/db
access to attrs=userPassword by anonymous auth by self read by * none
access to * by * read
"""


def person(uid, password, number, mail=None):
    lines = [f"dn: uid={uid},{PEOPLE}", "objectClass: inetOrgPerson", "objectClass: posixAccount",
             f"uid: {uid}", f"cn: {uid}", f"sn: {uid}", f"uidNumber: {number}", f"gidNumber: {number}",
             f"homeDirectory: /home/{uid}", f"userPassword: {password}"]
    if mail:
        lines.append(f"mail: {mail}")
    return "\n".join(lines) + "\n"


class Slapd:
    def __init__(self, folder):
        self.folder = folder
        self.proc = None
        self.port = self.ldaps_port = None
        self.ca = None

    @property
    def uri(self):
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_uri(self):
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    def start(self):
        require_slapd()
        (self.folder / "db").mkdir(parents=True, exist_ok=True)
        self.ca, cert, key = make_ca_and_server_cert(self.folder / "tls")
        (self.folder / "slapd.conf").write_text(CONF.format(folder=self.folder, ca=self.ca, cert=cert, key=key,
                                                            suffix=SUFFIX, rootdn=ROOT_DN, rootpw=ROOT_PW))
        self.port, self.ldaps_port = _free_port(), _free_port()
        self._spawn()
        self.add(f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: example\ndc: example\n\n"
                 f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n\n"
                 f"dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services\n\n"
                 f"dn: {READER_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
                 f"cn: reader\nuserPassword: {READER_PW}\n")
        return self

    def _spawn(self):
        slapd = shutil.which("slapd") or "/usr/sbin/slapd"
        self.log = open(self.folder / "slapd.log", "ab")
        self.proc = subprocess.Popen(
            [slapd, "-f", str(self.folder / "slapd.conf"), "-h", f"{self.uri}/ {self.ldaps_uri}/", "-d", "stats"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited: {(self.folder / 'slapd.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                socket.create_connection(("127.0.0.1", self.ldaps_port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("slapd did not listen within 15 s")

    def add(self, ldif):
        out = subprocess.run(["ldapadd", "-x", "-H", self.uri, "-D", ROOT_DN, "-w", ROOT_PW],
                             input=ldif.encode(), capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr.decode()

    def add_people(self, people):
        """people: iterable of (uid, password[, mail]); uidNumbers from 2001 upwards."""
        self.add("\n".join(person(p[0], p[1], 2001 + i, *p[2:]) for i, p in enumerate(people)))

    def freeze(self):
        """SIGSTOP: the kernel still accepts connections, nothing answers (a hung directory)."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.thaw()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            self.log.close()
        self.proc = None

    def restart(self):
        self.stop()
        self._spawn()
