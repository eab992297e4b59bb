"""Helpers for the qvd-admin integration tests: run main() in-process, snapshot the DB."""
import datetime
import io

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qvd_gevent.admin.cli import run

# Every table an admin verb may write; a failed command must leave all of them as they were.
TABLES = ["hosts", "host_runtimes", "host_counters", "users", "osfs", "dis", "di_tags", "di_runtimes", "vms",
          "vm_runtimes", "vm_counters", "configs", "ssl_configs", "properties_list", "qvd_object_properties_list",
          "host_properties", "user_properties", "vm_properties", "osf_properties", "di_properties"]


class Result:
    def __init__(self, rc, out, err):
        self.rc, self.out, self.err = rc, out, err

    def __repr__(self):
        return f"Result(rc={self.rc}, out={self.out!r}, err={self.err!r})"


class FakeTty(io.StringIO):
    def isatty(self):
        return True


class Admin:
    """admin('host', 'add', 'name=x', ...) -> Result; stdin text is not a terminal unless tty=True."""

    def __init__(self, conf_path, db):
        self.conf = str(conf_path)
        self.db = db

    def __call__(self, *argv, stdin="", tty=False):
        out, err = io.StringIO(), io.StringIO()
        source = FakeTty(stdin) if tty else io.StringIO(stdin)
        rc = run(["--config", self.conf, *argv], out, err, source)
        return Result(rc, out.getvalue(), err.getvalue())

    def ok(self, *argv, **kw):
        res = self(*argv, **kw)
        assert res.rc == 0, res
        return res

    def fails(self, *argv, contains=None, **kw):
        """The command fails with exactly one 'Error: ...' line and changes nothing."""
        before = self.snapshot()
        res = self(*argv, **kw)
        assert res.rc == 1, res
        lines = res.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), res
        assert "Traceback" not in res.err
        if contains:
            assert contains in lines[0], res
        assert self.snapshot() == before, "a failed command changed the database"
        return lines[0]

    def snapshot(self):
        state = {}
        for table in TABLES:
            rows = self.db.query(f"SELECT * FROM {table}")
            state[table] = sorted(rows, key=repr)
        return state


def self_signed(tmp_path, cn="qvd.test", days=30, not_before=None, name="server"):
    """A key and a self-signed certificate written as PEM files; returns (key_path, cert_path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    start = not_before or now - datetime.timedelta(minutes=5)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days)).sign(key, hashes.SHA256()))
    key_path = tmp_path / f"{name}-key.pem"
    cert_path = tmp_path / f"{name}-cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path
