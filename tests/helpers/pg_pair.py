"""A PostgreSQL primary and a streaming standby from the distribution's binaries, for the
failover test: both on 127.0.0.1 on free ports, run by the unprivileged ``postgres`` user
(PostgreSQL refuses root) in a temporary folder that ``destroy()`` removes with everything
in it, whatever happened before.

Replication is synchronous (``synchronous_standby_names = '*'`` on the primary): a commit
returns only once the standby has it, so stopping the primary loses no committed row. The
standby's copy of the configuration does not carry that setting, so once promoted it
commits on its own.

    pair = StreamingPair().start()
    pair.create_database(name, owner, password)
    pair.stop_primary()          # pg_ctl stop -m immediate: a crash, as far as clients see
    pair.promote()               # the standby becomes the read-write server
    pair.destroy()
"""
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import psycopg2
import pytest
from psycopg2 import sql

PG_USER = "postgres"
INSTALL_HINT = "apt-get install postgresql (scripts/install-test-deps.sh does)"


def debian_bin_dir():
    """The newest /usr/lib/postgresql/<version>/bin holding initdb, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else None


def require_debian_postgres():
    """Skip (saying why) without root, the binaries or their user; CI has all three."""
    reason = None
    if os.geteuid() != 0:
        reason = "needs root (to run PostgreSQL as the postgres user); run the system tests as root (CI does)"
    elif debian_bin_dir() is None:
        reason = f"needs the distribution's PostgreSQL binaries: {INSTALL_HINT}"
    else:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            reason = f"needs the {PG_USER} user: {INSTALL_HINT}"
    if reason:
        print(f"SKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StreamingPair:
    host = "127.0.0.1"

    def __init__(self):
        self.bin = debian_bin_dir()
        self.user = pwd.getpwnam(PG_USER)
        self.folder = tempfile.mkdtemp(prefix="qvd-failover-pg-")
        os.chmod(self.folder, 0o755)
        os.chown(self.folder, self.user.pw_uid, self.user.pw_gid)
        self.primary_dir = os.path.join(self.folder, "primary")
        self.standby_dir = os.path.join(self.folder, "standby")
        self.primary_port = _free_port()
        self.standby_port = _free_port()
        self.password = secrets.token_urlsafe(16)
        self.primary_up = self.standby_up = False

    # --- running the binaries as the postgres user --------------------------------------------
    def _run(self, name, *args, timeout=120, check=True):
        done = subprocess.run([os.path.join(self.bin, name), *args], user=self.user.pw_uid, group=self.user.pw_gid,
                              extra_groups=[], cwd=self.folder, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
        if check and done.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(args)} failed ({done.returncode}): "
                               f"{(done.stdout + done.stderr).strip()[-2000:]}")
        return done

    def _pg_ctl_start(self, data, port):
        log = os.path.join(self.folder, os.path.basename(data) + ".log")
        self._run("pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o", f"-p {port} -k {self.folder}", "start")

    def superuser_dsn(self, port, dbname="postgres"):
        return dict(host=self.host, port=port, user=PG_USER, password=self.password, dbname=dbname,
                    connect_timeout=5)

    def superuser(self, port, dbname="postgres"):
        conn = psycopg2.connect(**self.superuser_dsn(port, dbname))
        conn.autocommit = True
        return conn

    def _query(self, port, text, params=None, dbname="postgres"):
        conn = self.superuser(port, dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(text, params)
                return cur.fetchall() if cur.description else None
        finally:
            conn.close()

    def _wait(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except psycopg2.Error:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{what}: not within {timeout} s (logs in {self.folder})")

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self):
        pwfile = os.path.join(self.folder, "pwfile")
        with open(pwfile, "w") as fh:
            fh.write(self.password + "\n")
        os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
        self._run("initdb", "-D", self.primary_dir, "-U", PG_USER, "--encoding=UTF8", "--auth-local=peer",
                  "--auth-host=scram-sha-256", f"--pwfile={pwfile}")
        os.unlink(pwfile)
        with open(os.path.join(self.primary_dir, "postgresql.conf"), "a") as fh:
            # fsync off: an immediate stop is a crash of PostgreSQL, not of the machine
            fh.write("listen_addresses = '127.0.0.1'\nmax_connections = 100\nfsync = off\n"
                     "shared_buffers = 32MB\nwal_level = replica\nhot_standby = on\n"
                     "wal_receiver_status_interval = 1\n")
        self._pg_ctl_start(self.primary_dir, self.primary_port)
        self.primary_up = True
        conninfo = (f"host={self.host} port={self.primary_port} user={PG_USER} password={self.password} "
                    "application_name=standby")
        self._run("pg_basebackup", "-D", self.standby_dir, "-d", conninfo, "-X", "stream", "-R", "-c", "fast")
        self._pg_ctl_start(self.standby_dir, self.standby_port)
        self.standby_up = True
        self._wait(lambda: self._query(self.primary_port, "SELECT state FROM pg_stat_replication") == [("streaming",)],
                   30, "the standby streaming")
        # synchronous from now on: set on the primary only, after the standby copied its files
        self._query(self.primary_port, "ALTER SYSTEM SET synchronous_standby_names = '*'")
        self._query(self.primary_port, "SELECT pg_reload_conf()")
        self._wait(lambda: self._query(self.primary_port, "SELECT sync_state FROM pg_stat_replication") == [("sync",)],
                   30, "synchronous replication")
        return self

    def create_database(self, name, owner, password):
        conn = self.superuser(self.primary_port)
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE ROLE {} WITH LOGIN PASSWORD %s").format(sql.Identifier(owner)), (password,))
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(owner)))
        finally:
            conn.close()

    def wait_replayed(self, timeout=30):
        """The standby has replayed everything the primary wrote so far."""
        lsn = self._query(self.primary_port, "SELECT pg_current_wal_lsn()")[0][0]
        self._wait(lambda: self._query(self.standby_port, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                                       (lsn,))[0][0], timeout, "the standby replaying the primary's WAL")

    def stop_primary(self):
        """pg_ctl stop -m immediate: every backend quits at once, as in a crash."""
        self._run("pg_ctl", "-D", self.primary_dir, "-m", "immediate", "-w", "stop")
        self.primary_up = False

    def promote(self):
        """pg_ctl promote -w: returns once the standby accepts writes."""
        self._run("pg_ctl", "-D", self.standby_dir, "-w", "-t", "60", "promote")

    def is_primary(self, port):
        return self._query(port, "SELECT pg_is_in_recovery()") == [(False,)]

    def destroy(self):
        for data in (self.primary_dir, self.standby_dir):
            if os.path.exists(os.path.join(data, "postmaster.pid")):
                self._run("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop", check=False, timeout=60)
        self.primary_up = self.standby_up = False
        shutil.rmtree(self.folder, ignore_errors=True)
