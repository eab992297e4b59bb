"""TLS for the L7R: key material from ssl_configs, file permission checks, SSLContext.

Why the standard-library ``ssl`` module and not pyOpenSSL: gevent supports ``ssl``
natively (cooperative handshake, reads and writes), while pyOpenSSL needs its own
WantRead/WantWrite loop; and memory per idle TLS connection is the figure this node is
built around: about 22-27 KB with ``ssl`` against 57-61 KB with pyOpenSSL
(docs/design.md#tls-library). CPython also sets SSL_MODE_RELEASE_BUFFERS, so an idle
connection gives its record buffers back.

The key and certificate live in the database (``qvd-admin config ssl``); the node writes
them to ``path.l7r.ssl.*`` (directory 0700, files 0600) and builds a fresh context from
the files on every ``qvd_config_changed``; connections accepted afterwards use the new
context, open ones keep theirs.
"""
import logging
import os
import ssl
import stat

log = logging.getLogger("qvd.l7r.tls")

SSL_ROWS = ("key", "cert", "ca", "crl")


class TlsError(Exception):
    """The L7R cannot serve TLS; the message is one line for the operator."""


def load_ssl_rows(db):
    rows = db.query("SELECT key, value FROM ssl_configs WHERE key LIKE 'l7r.ssl.%%'")
    return {key[len("l7r.ssl."):]: value for key, value in rows}


def _write_private(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_ssl_files(cfg, rows):
    """Write the ssl_configs material to path.l7r.ssl.*; remove files of absent rows."""
    folder = cfg.get_str("path.l7r.ssl")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    paths = {}
    for name in SSL_ROWS:
        path = cfg.get_str(f"path.l7r.ssl.{name}")
        paths[name] = path
        if name in rows:
            d = os.path.dirname(path)
            if d and not os.path.isdir(d):
                os.makedirs(d, mode=0o700, exist_ok=True)
            _write_private(path, rows[name])
        elif name in ("ca", "crl") and os.path.exists(path) and os.path.dirname(path) == folder:
            os.unlink(path)
    return paths


def check_permissions(key_path, cert_path):
    """Refuse a key readable by group/others or a certificate with any world bit (the original's rule)."""
    for what, path in (("key", key_path), ("certificate", cert_path)):
        if not os.path.exists(path):
            raise TlsError(f"L7R {what} file {path} does not exist; store it with 'qvd-admin config ssl key=... cert=...'")
        if not os.access(path, os.R_OK):
            raise TlsError(f"L7R {what} file {path} is not readable")
    key_mode = stat.S_IMODE(os.stat(key_path).st_mode)
    if key_mode & 0o077:
        raise TlsError(f"L7R key file {key_path} has insecure permissions {key_mode:04o} (must not be accessible by group or others; chmod 600)")
    cert_mode = stat.S_IMODE(os.stat(cert_path).st_mode)
    if cert_mode & 0o007:
        raise TlsError(f"L7R certificate file {cert_path} has insecure permissions {cert_mode:04o} (no access for others; chmod 640)")


def minimum_version(spec):
    """Map the original's OpenSSL protocol spec to a floor of TLS 1.2 or 1.3, never lower."""
    items = [item.strip() for item in str(spec or "").split(":") if item.strip()]
    wanted = {item for item in items if not item.startswith("!")}
    excluded = {item[1:] for item in items if item.startswith("!")}
    if "TLSv1_2" in excluded or (wanted and wanted <= {"TLSv1_3"}):
        return ssl.TLSVersion.TLSv1_3
    return ssl.TLSVersion.TLSv1_2


# Whatever l7r.options.SSL_cipher_list says, a TLS 1.2 key exchange must be forward secret
# (a stolen key must not decrypt recorded sessions): no static RSA, no anonymous or null
# suites, no pre-shared keys. TLS 1.3 suites are all forward secret.
FORWARD_SECRET_ONLY = ":!kRSA:!aNULL:!eNULL:!PSK:!SRP"


def build_context(cfg, paths=None):
    paths = paths or {name: cfg.get_str(f"path.l7r.ssl.{name}") for name in SSL_ROWS}
    check_permissions(paths["key"], paths["cert"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum_version(cfg.get_str("l7r.options.SSL_version"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    # a client half-close (TCP FIN without close_notify) is EOF, not an error answered by an alert
    ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    ciphers = cfg.get_str("l7r.options.SSL_cipher_list")
    try:
        ctx.set_ciphers(ciphers + FORWARD_SECRET_ONLY)
    except ssl.SSLError:
        raise TlsError(f"l7r.options.SSL_cipher_list {ciphers!r} selects no forward-secret cipher") from None
    try:
        ctx.load_cert_chain(paths["cert"], paths["key"])
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"cannot load L7R certificate {paths['cert']} and key {paths['key']}: {exc}") from None
    if cfg.get_bool("l7r.client.cert.require"):
        if not os.path.exists(paths["ca"]):
            raise TlsError(f"l7r.client.cert.require is set but the CA file {paths['ca']} does not exist")
        try:
            ctx.load_verify_locations(cafile=paths["ca"])
            if os.path.exists(paths["crl"]):
                # every certificate of the client's chain is checked, so a revoked intermediate CA
                # revokes what it issued; the file must then hold a CRL of every CA in the chain
                ctx.load_verify_locations(cafile=paths["crl"])
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(f"cannot load L7R client CA/CRL: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def context_from_database(cfg, db):
    """Write the files from ssl_configs (when there are rows) and build the context."""
    rows = load_ssl_rows(db)
    if rows:
        if "key" not in rows or "cert" not in rows:
            raise TlsError("ssl_configs lacks l7r.ssl.key or l7r.ssl.cert; run 'qvd-admin config ssl key=... cert=...'")
        paths = write_ssl_files(cfg, rows)
    else:
        paths = None
    return build_context(cfg, paths)
