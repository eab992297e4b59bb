"""Many `qvd-node` processes on one machine and one PostgreSQL, for the cluster bench.

Node i is `bench-n<i>`: its own node.conf, run folder and log, L7R on 127.0.0.1:<free
port>, the `process` hypervisor (it starts no VM: the sessions go to the farm's stand-in
VMs), metrics off, every timer at its default unless the caller says otherwise. Its host
row must exist (bench/cluster.py seeds them). Each node dies with the bench
(PR_SET_PDEATHSIG), and stop() ends every node, also after a failure.
"""
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .env import free_port, wait_port
from .procstat import cpu_seconds, rss_bytes

_PR_SET_PDEATHSIG = 1


def _die_with_parent():
    # a bench killed by a timeout must not leave 50 nodes heartbeating into nowhere
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def node_name(index):
    return f"bench-n{index}"


class NodeFleet:
    def __init__(self, folder, db_lines, extra=None, say=print):
        self.folder = Path(folder)
        self.db_lines = list(db_lines)
        self.extra = dict(extra or {})
        self.say = say
        self.nodes = []             # (name, port, Popen, log file)
        self.last_start = None

    def __len__(self):
        return len(self.nodes)

    @property
    def ports(self):
        return [port for _, port, _, _ in self.nodes]

    @property
    def pids(self):
        return [proc.pid for _, _, proc, _ in self.nodes]

    def _conf(self, index, port):
        name = node_name(index)
        home = self.folder / name
        home.mkdir(parents=True, exist_ok=True)
        values = {
            "nodename": name,
            "path.run": home / "run", "path.log": home / "log", "path.storage.root": home / "storage",
            "log.preset": "stderr",
            "l7r.address": "127.0.0.1", "l7r.port": port, "l7r.metrics.address": "",
            "l7r.workers": 1,               # one process per node: what the cluster run counts
            "l7r.drain.grace": 1,
            "vm.hypervisor": "process",
            "internal.hkd.address_check.enabled": 0, "vm.network.use_dhcp": 0,
            # the machine's own network namespace: no nftables table a killed run would leave
            "internal.vm.network.firewall.enable": 0,
            **self.extra,
        }
        path = home / "node.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(self.db_lines + [f"{k} = {v}" for k, v in values.items()]) + "\n")
        return path

    def grow_to(self, count, batch=5, timeout=180):
        """Start nodes until count run, batch at a time (each listening before the next batch)."""
        while len(self.nodes) < count:
            started = []
            for _ in range(min(batch, count - len(self.nodes))):
                index, port = len(self.nodes), free_port()
                conf = self._conf(index, port)
                log = open(self.folder / f"{node_name(index)}.log", "wb")  # noqa: SIM115 - closed in stop()
                proc = subprocess.Popen([sys.executable, "-m", "qvd_gevent.node.main", "--config", str(conf)],
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        preexec_fn=_die_with_parent)
                self.nodes.append((node_name(index), port, proc, log))
                started.append((index, port, proc))
            for index, port, proc in started:
                try:
                    wait_port("127.0.0.1", port, timeout, proc)
                except RuntimeError as exc:
                    raise RuntimeError(f"{node_name(index)}: {exc}: {self.log_tail(index)}") from None
            self.last_start = time.monotonic()
            self.say(f"{len(self.nodes)} nodes listening")

    def check_alive(self):
        for index, (name, _, proc, _) in enumerate(self.nodes):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: {self.log_tail(index)}")

    def log_tail(self, index, lines=8):
        try:
            text = (self.folder / f"{node_name(index)}.log").read_text(errors="replace")
        except OSError:
            return ""
        return " / ".join(text.splitlines()[-lines:])

    def log_count(self, needle):
        total = 0
        for index in range(len(self.nodes)):
            try:
                total += (self.folder / f"{node_name(index)}.log").read_text(errors="replace").count(needle)
            except OSError:
                pass
        return total

    def cpu_seconds(self):
        total = 0.0
        for pid in self.pids:
            try:
                total += cpu_seconds(pid)
            except OSError:
                pass
        return total

    def rss_bytes(self):
        total = 0
        for pid in self.pids:
            try:
                total += rss_bytes(pid)
            except (OSError, ValueError):
                pass
        return total

    def stop(self, timeout=60):
        for _, _, proc, _ in self.nodes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, _, proc, _ in self.nodes:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for _, _, _, log in self.nodes:
            log.close()
        self.nodes = []
