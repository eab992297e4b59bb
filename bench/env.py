"""Everything a bench run needs, started in order and stopped in reverse, all on loopback.

BenchEnv.start(): an embedded PostgreSQL, the schema and a node provisioned the way
`qvd-node demo` does it (admin CLI in-process), the farm (bench/farm.py: stand-in VMs
on 127.77.0.1), the node itself in a subprocess (`qvd-node --config node.conf`, process
hypervisor) and HAProxy terminating TLS with the same ECDSA P-256 certificate in front of
the same farm ports. BenchEnv.stop() undoes all of it, also after a failure.

Farm VMs are rows the bench writes itself (one user `bench` owning N VMs, 100 users
`bench-c<i>` with a few VMs each), all `running` on a second host row `bench-farm`
(backend=false, so the node never places a VM there) with their display on the farm's
echo port; one VM's display is the farm's sink. Users authenticate with multi-use bearer
tokens (one DB lookup) so the figures measure the node, not scrypt.
"""
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .procstat import cpu_seconds, tree_cpu_seconds

FARM_ADDRESS = "127.77.0.1"
COLD_USER = "bench-cold"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host, port, timeout=30.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout} s")


def raise_file_limit(want=200000):
    """Children inherit it: the node and HAProxy hold two sockets per session."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < want:
        try:       # root with CAP_SYS_RESOURCE only; containers often lack it
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            pass
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def script(name):
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.access(beside, os.X_OK) else shutil.which(name)


class BenchEnv:
    def __init__(self, farm_vms=200, connect_users=100, vms_per_user=3, workdir=None, log=print):
        self.farm_vms = farm_vms
        self.connect_users = connect_users
        self.vms_per_user = vms_per_user
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="qvd-bench-"))
        self.log = log
        self.pg = self.farm = self.node = self.haproxy = None
        self.db = None
        self.procs = []
        self.file_limit = None
        self.keep_logs = None        # a folder: node.log and haproxy.log are copied there on stop
        # a command the node runs under (bench/profile.py: valgrind, py-spy) and how long
        # its start may then take
        self.l7r_workers = 1        # l7r.workers of the node (bench/scenarios.py workers: 1 and 2)
        self.node_wrapper = []
        self.node_python_options = []
        self.node_start_timeout = 60
        self.haproxy_wrapper = []

    # --- start / stop ----------------------------------------------------------------------
    def start(self):
        self.file_limit = raise_file_limit()
        try:
            self._start_postgres()
            self._provision()
            self._start_farm()
            self._seed_farm()
            self._start_node()
            self._start_haproxy()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def max_sessions(self):
        """Sessions one proxy process can hold: two sockets each, under the file limit."""
        return (self.file_limit - 400) // 2

    def stop(self):
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs = []
        if self.db is not None:
            self.db.close()
            self.db = None
        if self.pg is not None:
            self.pg.stop()
        if self.keep_logs:
            for name in ("node.log", "haproxy.log"):
                if (self.dir / name).exists():
                    shutil.copy(self.dir / name, Path(self.keep_logs) / name)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- parts ------------------------------------------------------------------------------
    def _start_postgres(self):
        from qvd_gevent.db.embedded import EmbeddedPostgres
        self.pg = EmbeddedPostgres(self.dir / "pg").start()
        self.db_password = secrets.token_urlsafe(18)
        self.pg.create_database("qvd", "qvd", self.db_password)
        self.l7r_port = free_port()
        self.conf = self.dir / "node.conf"
        lines = [
            "nodename = bench-node",
            *self.pg.node_conf_lines("qvd", "qvd", self.db_password),
            f"path.run = {self.dir}/run", f"path.log = {self.dir}/log", f"path.storage.root = {self.dir}/storage",
            "log.preset = stderr",
            "l7r.address = 127.0.0.1", f"l7r.port = {self.l7r_port}",
            f"l7r.workers = {self.l7r_workers}",
            f"l7r.metrics.address = 127.0.0.1:{free_port()}",
            "internal.hkd.address_check.enabled = 0", "vm.network.use_dhcp = 0",
            "vm.process.address.base = auto",        # a range of its own: other nodes may run here
            # the cold VM's qvd-vm-init imports qvd_gevent: this checkout's, as the node does (the
            # sandbox builds a VM's environment from scratch, and an installed copy may be another)
            "vm.environment.pass = PYTHONPATH",
            # the node runs in the machine's own network namespace: no nftables table there that a
            # killed run would leave behind (docs/hkd.md#process-vms)
            "internal.vm.network.firewall.enable = 0",
            # the farm host's heartbeat is the bench's: never call it lost during a run
            "internal.hkd.cluster.node.timeout = 86400",
        ]
        fd = os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        from qvd_gevent.config import Config
        from qvd_gevent.db import Database
        self.cfg = Config.load(str(self.conf))
        self.db = Database.from_config(self.cfg)

    def _admin(self, *args):
        from qvd_gevent.admin.cli import main as admin_main
        code = admin_main(["--config", str(self.conf), "-q", *args])
        if code != 0:
            raise RuntimeError(f"qvd-admin {' '.join(args)} failed (exit {code})")

    def _provision(self):
        from qvd_gevent.db.deploy import deploy
        from qvd_gevent.node.certs import make_self_signed
        deploy(self.db)
        ssl_dir = self.dir / "ssl"
        ssl_dir.mkdir(mode=0o700)
        self.cert, self.key = str(ssl_dir / "cert.pem"), str(ssl_dir / "key.pem")
        make_self_signed(self.cert, self.key)        # ECDSA P-256, SAN 127.0.0.1
        self.init = script("qvd-vm-init")
        if not self.init:
            raise RuntimeError("qvd-vm-init is not installed (pip install -e .)")
        self._admin("config", "ssl", f"key={self.key}", f"cert={self.cert}")
        self._admin("config", "set", "vm.hypervisor=process", "vm.network.ip.start=10.240.0.10",
                    "vm.network.netmask=16", "vm.network.gateway=10.240.0.1")
        self._admin("host", "add", "name=bench-node", "address=127.0.0.1")
        self._admin("osf", "add", "name=bench", "memory=256")
        self._admin("di", "add", f"path={self.init}", "osf=bench")
        self._admin("user", "add", f"login={COLD_USER}", f"password={secrets.token_urlsafe(12)}")
        self._admin("vm", "add", "name=cold", f"user={COLD_USER}", "osf=bench")
        self.cold_vm = self.db.query_one("SELECT v.id FROM vms v JOIN users u ON u.id = v.user_id "
                                         "WHERE u.login = %s", (COLD_USER,))[0]
        self.cold_auth = self.add_token(COLD_USER)

    def add_token(self, login):
        from qvd_gevent.client.protocol import bearer_auth
        from qvd_gevent.db.runtime import token_digest
        token = secrets.token_urlsafe(24)
        self.db.execute("INSERT INTO user_tokens (token, user_id, vm_id, expiration, multi_use) "
                        "SELECT %s, id, NULL, %s, true FROM users WHERE login = %s",
                        (token_digest(token), int(time.time()) + 86400, login))
        return bearer_auth(token)

    def _start_farm(self):
        self.farm_key = secrets.token_urlsafe(32)      # the agent key of every farm VM
        self.farm = subprocess.Popen([sys.executable, "-m", "bench.farm", "--address", FARM_ADDRESS],
                                     stdout=subprocess.PIPE, text=True, cwd=self._repo(),
                                     env=dict(os.environ, QVD_VMA_SECRET=self.farm_key))
        self.procs.append(self.farm)
        self.farm_ports = json.loads(self.farm.stdout.readline())

    def _repo(self):
        return str(Path(__file__).resolve().parent.parent)

    def _seed_farm(self):
        """Farm host, users, VMs, runtimes and tokens in one transaction (thousands of rows)."""
        ports = self.farm_ports
        users = ["bench"] + [f"bench-c{i}" for i in range(self.connect_users)]

        def run(cur):
            cur.execute("INSERT INTO hosts (name, address, frontend, backend) VALUES ('bench-farm', %s, false, false) "
                        "RETURNING id", (FARM_ADDRESS,))
            host_id = cur.fetchone()[0]
            cur.execute("INSERT INTO host_runtimes (host_id, state, blocked, ok_ts, usable_ram, usable_cpu) "
                        "VALUES (%s, 'running', false, now(), 0, 0)", (host_id,))
            cur.execute("INSERT INTO host_counters (host_id) VALUES (%s)", (host_id,))
            cur.execute("SELECT id FROM osfs WHERE name = 'bench'")
            osf_id = cur.fetchone()[0]
            vm_ids = {}
            for login in users:
                cur.execute("INSERT INTO users (login, password, tenant_id) VALUES (%s, '!', 1) RETURNING id", (login,))
                user_id = cur.fetchone()[0]
                count = self.farm_vms + 1 if login == "bench" else self.vms_per_user
                cur.execute("INSERT INTO vms (name, user_id, osf_id, di_tag) "
                            "SELECT 'farm-' || g, %s, %s, 'default' FROM generate_series(1, %s) g "
                            "ORDER BY g RETURNING id", (user_id, osf_id, count))
                ids = sorted(r[0] for r in cur.fetchall())
                vm_ids[login] = ids
                cur.execute("INSERT INTO vm_runtimes (vm_id, host_id, vm_state, vm_state_ts, user_state, blocked, "
                            "vm_address, vm_vma_port, vm_x_port) "
                            "SELECT id, %s, 'running', %s, 'disconnected', false, %s, %s, %s FROM unnest(%s) id",
                            (host_id, int(time.time()), FARM_ADDRESS, ports["rpc"], ports["echo"], ids))
                cur.execute("INSERT INTO vm_counters (vm_id) SELECT unnest(%s)", (ids,))
                cur.execute("INSERT INTO vm_agent_keys (vm_id, secret, created) SELECT id, %s, %s FROM unnest(%s) id",
                            (self.farm_key, int(time.time()), ids))
            # the bulk VM: its display is the sink
            cur.execute("UPDATE vm_runtimes SET vm_x_port = %s WHERE vm_id = %s", (ports["sink"], vm_ids["bench"][-1]))
            return host_id, vm_ids
        self.farm_host, vm_ids = self.db.transaction(run)
        self.sink_vm = vm_ids["bench"][-1]
        self.echo_vms = vm_ids["bench"][:-1]
        self.bench_auth = self.add_token("bench")
        self.connect_users_spec = [{"auth": self.add_token(login), "vm_ids": vm_ids[login]}
                                   for login in users[1:]]

    def add_farm_vms(self, count, display="echo"):
        """More VMs for user bench whose display is the farm's echo port (the idle
        scenario's 10,000 sessions) or its rfb port (the browser scenario's desktops);
        returns their ids."""
        if count <= 0:
            return []
        ports = self.farm_ports

        def run(cur):
            cur.execute("SELECT id FROM users WHERE login = 'bench'")
            user_id = cur.fetchone()[0]
            cur.execute("SELECT id FROM osfs WHERE name = 'bench'")
            osf_id = cur.fetchone()[0]
            cur.execute("SELECT count(*) FROM vms WHERE user_id = %s", (user_id,))
            start = cur.fetchone()[0] + 10
            cur.execute("INSERT INTO vms (name, user_id, osf_id, di_tag) "
                        "SELECT 'farm-' || g, %s, %s, 'default' FROM generate_series(%s, %s) g RETURNING id",
                        (user_id, osf_id, start, start + count - 1))
            ids = sorted(r[0] for r in cur.fetchall())
            cur.execute("INSERT INTO vm_runtimes (vm_id, host_id, vm_state, vm_state_ts, user_state, blocked, "
                        "vm_address, vm_vma_port, vm_x_port) "
                        "SELECT id, %s, 'running', %s, 'disconnected', false, %s, %s, %s FROM unnest(%s) id",
                        (self.farm_host, int(time.time()), FARM_ADDRESS, ports["rpc"], ports[display], ids))
            cur.execute("INSERT INTO vm_counters (vm_id) SELECT unnest(%s)", (ids,))
            cur.execute("INSERT INTO vm_agent_keys (vm_id, secret, created) SELECT id, %s, %s FROM unnest(%s) id",
                        (self.farm_key, int(time.time()), ids))
            return ids
        ids = self.db.transaction(run)
        if display == "echo":
            self.echo_vms += ids
        return ids

    def web_tokens(self, vm_ids, lifetime=3600):
        """One token per VM as the web login hands them out (single-use, bound to its VM,
        stored as a digest), for user bench. A longer life than l7r.web.token.lifetime: a
        slow machine may take minutes to open them all."""
        from qvd_gevent.db import runtime

        def run(cur):
            cur.execute("SELECT id FROM users WHERE login = 'bench'")
            user_id = cur.fetchone()[0]
            return [runtime.issue_token(cur, user_id, {}, lifetime, vm_id=vm_id, multi_use=False)[0]
                    for vm_id in vm_ids]
        return self.db.transaction(run)

    def log_mark(self):
        self.node_log.flush()
        return (self.dir / "node.log").stat().st_size

    def log_count(self, mark, needles):
        """How often each needle occurs in node.log after mark (what the node reported meanwhile)."""
        with open(self.dir / "node.log", "rb") as fh:
            fh.seek(mark)
            text = fh.read().decode("utf-8", "replace")
        return {needle: text.count(needle) for needle in needles}

    def farm_heartbeat(self):
        self.db.execute("UPDATE host_runtimes SET ok_ts = now() WHERE host_id = %s", (self.farm_host,))

    def _start_node(self, log_mode="w"):
        command = [script("qvd-node")]
        if self.node_wrapper:       # a wrapper (valgrind) wants the interpreter, not a script
            command = [*self.node_wrapper, sys.executable, *self.node_python_options, "-m", "qvd_gevent.node.main"]
        self.node_log = open(self.dir / "node.log", log_mode)
        mark = self.node_log.tell()
        self.node = subprocess.Popen([*command, "--config", str(self.conf)], stdout=self.node_log,
                                     stderr=subprocess.STDOUT)
        self.procs.append(self.node)
        wait_port("127.0.0.1", self.l7r_port, self.node_start_timeout, self.node)
        # the port serves once the first L7R worker does: wait for all of them
        deadline = time.monotonic() + self.node_start_timeout
        while time.monotonic() < deadline and self.node.poll() is None:
            with open(self.dir / "node.log", "rb") as fh:
                fh.seek(mark)
                if b"node bench-node running" in fh.read():
                    return
            time.sleep(0.1)
        raise RuntimeError(f"the node did not start within {self.node_start_timeout} s (see node.log)")

    def restart_node(self, workers):
        """Stop the node (SIGTERM, as systemd does) and start it again with l7r.workers = workers."""
        self.node.send_signal(signal.SIGTERM)
        try:
            self.node.wait(60)
        except subprocess.TimeoutExpired:
            self.node.kill()
            self.node.wait(10)
        self.procs.remove(self.node)
        self.node_log.close()
        self.l7r_workers = workers
        text = self.conf.read_text()
        self.conf.write_text("\n".join(f"l7r.workers = {workers}" if line.startswith("l7r.workers") else line
                                       for line in text.splitlines()) + "\n")
        self._start_node(log_mode="a")

    def _start_haproxy(self):
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not os.path.exists(binary):
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        pem = self.dir / "ssl" / "haproxy.pem"
        pem.write_text(Path(self.cert).read_text() + Path(self.key).read_text())
        os.chmod(pem, 0o600)
        self.haproxy_echo_port, self.haproxy_sink_port = free_port(), free_port()
        ports = self.farm_ports
        cfg = f"""global
    log stderr format short local0 err
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend echo_tls
    bind 127.0.0.1:{self.haproxy_echo_port} ssl crt {pem}
    default_backend echo
frontend sink_tls
    bind 127.0.0.1:{self.haproxy_sink_port} ssl crt {pem}
    default_backend sink
backend echo
    server farm {FARM_ADDRESS}:{ports['echo']}
backend sink
    server farm {FARM_ADDRESS}:{ports['sink']}
"""
        path = self.dir / "haproxy.cfg"
        path.write_text(cfg)
        self.haproxy_version = subprocess.run([binary, "-v"], capture_output=True, text=True).stdout.splitlines()[0]
        self.haproxy = subprocess.Popen([*self.haproxy_wrapper, binary, "-f", str(path), "-db"],
                                        stdout=subprocess.DEVNULL, stderr=open(self.dir / "haproxy.log", "w"))
        self.procs.append(self.haproxy)
        wait_port("127.0.0.1", self.haproxy_echo_port, 120 if self.haproxy_wrapper else 20, self.haproxy)

    # --- targets for workers -----------------------------------------------------------------
    def target(self, kind, sink=False, vm_ids=None, tokens=None, expect=None):
        """kind l7r: connect_to_vm; web: the browser's WebSocket (tokens: one per VM of
        vm_ids); haproxy; direct. expect: bytes a session waits for from the VM."""
        if kind in ("l7r", "web"):
            spec = {"kind": kind, "host": "127.0.0.1", "port": self.l7r_port, "ca": self.cert,
                    "auth": self.bench_auth, "vm_ids": [self.sink_vm] if sink else (vm_ids or self.echo_vms)}
            if tokens is not None:
                spec["tokens"] = tokens
            if expect is not None:
                spec["expect"] = expect
            return spec
        if kind == "haproxy":
            return {"kind": "tls", "host": "127.0.0.1", "ca": self.cert,
                    "port": self.haproxy_sink_port if sink else self.haproxy_echo_port}
        return {"kind": "plain", "host": FARM_ADDRESS,
                "port": self.farm_ports["sink" if sink else "echo"]}

    def postgres_pid(self):
        return int((self.pg.pgdata / "postmaster.pid").read_text().split()[0])

    def proxy_cpu_seconds(self, kind):
        """CPU seconds of a proxy so far: HAProxy's process, the node's with its L7R workers."""
        if kind == "l7r":
            return tree_cpu_seconds(self.node.pid)
        pid = self.proxy_pid(kind)
        return cpu_seconds(pid) if pid else 0.0

    def proxy_pid(self, kind):
        proc = {"l7r": self.node, "haproxy": self.haproxy}.get(kind)
        return proc.pid if proc is not None else None
