"""TLS for the L7R: key material from ssl_configs, file permission checks, SSLContext.

Why the standard-library ``ssl`` module and not pyOpenSSL: memory per idle TLS
connection is the figure this node is built around: about 24 KB with ``ssl`` against
37 KB with pyOpenSSL, handshake CPU at par (docs/design.md#tls-library). CPython also sets
SSL_MODE_RELEASE_BUFFERS, so an idle connection gives its record buffers back. A client
connection is a ``TlsStream`` (below), not gevent's heavier SSLSocket.

The key and certificate live in the database (``qvd-admin config ssl``); the node writes
them to ``path.l7r.ssl.*`` (directory 0700, files 0600) and builds a fresh context from
the files on every ``qvd_config_changed``; connections accepted afterwards use the new
context, open ones keep theirs.
"""
import logging
import os
import ssl
import stat
import time

import _socket
import gevent

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
    # the QVD clients open a connection per request (or two on one) and never resume: a
    # ticket nobody uses costs an encryption and a write per connection (docs/design.md#tls-library)
    ctx.num_tickets = max(0, cfg.get_int("l7r.tls.session_tickets"))
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


class AcceptedSocket(_socket.socket):
    """A bare accepted socket (the C type, no gevent or io layer on it), weakly
    referenceable as the TLS object wants its socket to be."""

    __slots__ = ("__weakref__",)


class TlsStream:
    """One client's TLS connection, waited on by the hub: gevent's SSLSocket without its
    weight (it stacks three socket objects, a dict and several Python frames on every
    call; a handshake plus one request went through about forty of them).

    ``raw`` is the accepted ``_socket.socket`` (non-blocking), ``tls`` the C-level TLS
    object over it (``SSLContext._wrap_socket``, as gevent and the standard library build
    theirs). The request loop uses ``do_handshake``, ``recv`` and ``sendall``, which
    wait on the hub like any gevent socket (so ``gevent.Timeout`` bounds them); the splice
    reads and writes ``tls`` directly. EOF without close_notify reads as EOF (the context
    sets OP_IGNORE_UNEXPECTED_EOF; the QVD client just closes).

    ``send_timeout`` (seconds, None: no limit) bounds each ``sendall``: a client that stops
    reading would otherwise hold its connection, its greenlet and the unsent answer for
    ever (a slow-read attack needs no login: the browser client's files are public). The
    clock starts at the first write that would block, so a write that fits costs nothing."""

    __slots__ = ("raw", "tls", "_events", "_nonblocking", "send_timeout", "__weakref__")

    def __init__(self, raw, context):
        raw.setblocking(False)
        self.raw = raw
        self.tls = context._wrap_socket(raw, server_side=True)
        self._events = None          # (read watcher, write watcher), made at the first wait
        self._nonblocking = False    # settimeout(0.0): recv_into/send never wait (a relay on watchers)
        self.send_timeout = None

    def fileno(self):
        return self.raw.fileno()

    def setsockopt(self, *args):
        return self.raw.setsockopt(*args)

    def getsockopt(self, *args):
        return self.raw.getsockopt(*args)

    def getpeername(self):
        return self.raw.getpeername()

    def _wait(self, writing, deadline=None):
        if self._events is None:
            loop = gevent.get_hub().loop
            fd = self.raw.fileno()
            self._events = (loop.io(fd, 1), loop.io(fd, 2))
        if deadline is None:
            gevent.get_hub().wait(self._events[1 if writing else 0])
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client took no data for send_timeout seconds")
        with gevent.Timeout(left, TimeoutError("the client took no data for send_timeout seconds")):
            gevent.get_hub().wait(self._events[1 if writing else 0])

    def do_handshake(self):
        tls = self.tls
        while True:
            try:
                return tls.do_handshake()
            except ssl.SSLWantReadError:
                self._wait(False)
            except ssl.SSLWantWriteError:
                self._wait(True)

    def recv(self, size):
        """Up to size bytes; b"" at EOF."""
        tls = self.tls
        while True:
            try:
                return tls.read(size)
            except ssl.SSLWantReadError:
                self._wait(False)
            except ssl.SSLWantWriteError:
                self._wait(True)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def sendall(self, data):
        """All of data, or TimeoutError (an OSError) once send_timeout has passed."""
        # no partial writes: a write that would block is retried with the same bytes
        tls = self.tls
        deadline = None
        while True:
            try:
                tls.write(data)
                return
            except ssl.SSLWantWriteError:
                writing = True
            except ssl.SSLWantReadError:
                writing = False
            if deadline is None and self.send_timeout is not None:
                deadline = time.monotonic() + self.send_timeout
            self._wait(writing, deadline)

    # --- what a relay driven by watchers uses (ws_relay), as gevent's SSLSocket with timeout 0 ---
    def settimeout(self, timeout):
        self._nonblocking = timeout == 0.0

    def recv_into(self, buffer, nbytes=0):
        """Bytes read into buffer (0 at EOF); non-blocking: SSLWantReadError when none."""
        tls = self.tls
        size = nbytes or len(buffer)
        while True:
            try:
                return tls.read(size, buffer)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0
            except ssl.SSLWantReadError:
                if self._nonblocking:
                    raise
                self._wait(False)
            except ssl.SSLWantWriteError:
                if self._nonblocking:
                    raise
                self._wait(True)

    def send(self, data):
        """Bytes written: all of data, or (non-blocking) 0 when the socket takes none now; the
        caller then offers the same bytes again, as OpenSSL requires."""
        tls = self.tls
        while True:
            try:
                return tls.write(data)
            except ssl.SSLWantWriteError:
                if self._nonblocking:
                    return 0
                self._wait(True)
            except ssl.SSLWantReadError:
                if self._nonblocking:
                    return 0
                self._wait(False)

    def pending(self):
        return self.tls.pending()

    def version(self):
        return self.tls.version()

    def cipher(self):
        return self.tls.cipher()

    def drop_watchers(self):
        """The splice takes the fd over with watchers of its own: free these (an idle
        session should hold as little as possible)."""
        if self._events is not None:
            for event in self._events:
                event.close()
            self._events = None

    def close(self):
        self.drop_watchers()
        self.raw.close()
