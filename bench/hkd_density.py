"""HKD CPU with many idle, healthy VMs (issue 6, last scenario).

netns (root): a network namespace made here with no route out (docs/testing.md#network-safety,
tests/helpers/netns.py); inside it `qvd-node` runs with the `netns` hypervisor, sets up
its bridge, supervises dnsmasq and starts every VM in a namespace of its own on
10.77.1.x; PostgreSQL is reached through the embedded server's unix socket. Each VM is
the tiny busybox-httpd init the netns tests use (it answers the VMA ping).
process: the same node and VMs with the `process` hypervisor on loopback (the fallback
when there is no root).

Measured: the node process's CPU (utime+stime; the HKD is all that runs: nobody connects)
over a window with every VM running, the VMA pings of the HKD included (one per VM per
internal.hkd.vmhandler.vma_monitor.delay.after.ok, 120 s by default).
"""
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .procstat import cpu_seconds, rss_bytes

TESTS = str(Path(__file__).resolve().parent.parent / "tests")


def _wait(predicate, timeout, what, interval=0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def run(quick, hypervisor="netns", say=print):
    count = 10 if quick else 200
    window = 10 if quick else 120
    note = ""
    if hypervisor == "netns" and (os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("busybox")):
        hypervisor, note = "process", "netns needs root, ip and busybox; measured with process VMs instead"
        say(note)
    sys.path.insert(0, TESTS)
    from helpers.netns import TestNamespace, node_settings, write_http_di

    from qvd_gevent.config import Config
    from qvd_gevent.db import Database
    from qvd_gevent.db.deploy import deploy
    from qvd_gevent.db.embedded import EmbeddedPostgres
    from .env import script

    tmp = Path(tempfile.mkdtemp(prefix="qvd-bench-hkd-"))
    pg = ns = node = db = None
    node_log = open(tmp / "node.log", "w")
    try:
        pg = EmbeddedPostgres(tmp / "pg").start()
        password = secrets.token_urlsafe(18)
        pg.create_database("qvd", "qvd", password)
        di = write_http_di(tmp)
        (tmp / "run").mkdir(exist_ok=True)
        if hypervisor == "netns":
            ns = TestNamespace().create()
            values = node_settings(ns, tmp)
            node_address, ip_of = "10.77.0.1", (lambda i: f"10.77.1.{i}")
        else:
            # in the machine's own network namespace: no nftables table there (docs/hkd.md#process-vms)
            values = {"vm.hypervisor": "process", "vm.process.address.base": "127.81.0.0/16",
                      "internal.hkd.address_check.enabled": "0", "vm.network.use_dhcp": "0", "path.run": tmp / "run",
                      "internal.vm.network.firewall.enable": "0"}
            node_address, ip_of = "127.0.0.1", (lambda i: f"10.241.1.{i}")
        values.update({
            "nodename": "bench-hkd",
            # the unix socket directory: it reaches into the namespace
            "database.host": str(pg.directory), "database.port": pg.port, "database.name": "qvd",
            "database.user": "qvd", "database.password": password,
            "path.storage.root": tmp / "storage", "path.log": tmp / "log", "log.preset": "stderr",
            "l7r.use_ssl": "0", "l7r.address": "127.0.0.1", "l7r.port": "18443", "l7r.metrics.address": "",
            "l7r.workers": "1",             # the HKD's CPU is this process's
        })
        conf = tmp / "node.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("".join(f"{k} = {v}\n" for k, v in values.items()))
        db = Database.from_config(Config.load(str(conf)))
        deploy(db)
        host_id, vm_ids = db.transaction(_seed, node_address, di, count, ip_of)
        argv = [script("qvd-node"), "--config", str(conf)]
        node = (ns.popen(argv, stdout=node_log, stderr=subprocess.STDOUT) if ns
                else subprocess.Popen(argv, stdout=node_log, stderr=subprocess.STDOUT))
        _wait(lambda: node.poll() is not None or db.query_one(
            "SELECT state FROM host_runtimes WHERE host_id = %s", (host_id,))[0] == "running", 90, "the node running")
        if node.poll() is not None:
            raise RuntimeError(f"qvd-node exited with {node.returncode}: {_tail(tmp / 'node.log')}")
        say(f"node up ({hypervisor}); starting {count} VMs")
        cpu0, t0 = cpu_seconds(node.pid), time.monotonic()
        db.transaction(_command, vm_ids, host_id, "start")
        running = lambda: db.query_one("SELECT count(*) FROM vm_runtimes WHERE vm_state = 'running'")[0]  # noqa: E731
        _wait(lambda: running() == count or node.poll() is not None, 60 + 3 * count, f"{count} VMs running", 1)
        start_wall, start_cpu = time.monotonic() - t0, cpu_seconds(node.pid) - cpu0
        if node.poll() is not None:
            raise RuntimeError(f"qvd-node exited with {node.returncode}: {_tail(tmp / 'node.log')}")
        say(f"{count} VMs running after {start_wall:.1f} s; idle window {window} s")
        time.sleep(2)
        cpu1, t1 = cpu_seconds(node.pid), time.monotonic()
        time.sleep(window)
        idle_cpu, idle_wall = cpu_seconds(node.pid) - cpu1, time.monotonic() - t1
        still = running()
        healthy = db.query_one("SELECT count(*) FROM vm_runtimes WHERE vm_state = 'running' AND vma_ok_ts >= %s",
                               (int(time.time() - window - 300),))[0]
        rss = rss_bytes(node.pid)
        t2 = time.monotonic()
        db.transaction(_command, vm_ids, host_id, "stop")
        _wait(lambda: db.query_one("SELECT count(*) FROM vm_runtimes WHERE vm_state <> 'stopped'")[0] == 0
              or node.poll() is not None, 120, "every VM stopped", 1)
        stop_wall = time.monotonic() - t2
        cpu_percent = idle_cpu / idle_wall * 100
        out = {"hypervisor": hypervisor, "note": note, "vms": count, "running_at_end": still,
               "healthy_vma_ok": healthy, "start_wall_s": start_wall, "start_node_cpu_s": start_cpu,
               "idle_window_s": idle_wall, "idle_node_cpu_s": idle_cpu, "cpu_percent": cpu_percent,
               "cpu_ms_per_vm_per_min": idle_cpu * 1000 / count / (idle_wall / 60), "node_rss_bytes": rss,
               "stop_wall_s": stop_wall, "vm_image": "busybox httpd answering /vma/ping (tests/helpers/netns.py)"}
        label = f"{hypervisor} VMs" + (" (netns not possible here)" if note else "")
        out["rows"] = [(f"HKD CPU with {count} idle healthy {label}, {window} s window (% of one core)",
                        f"{cpu_percent:.2f}% ({out['cpu_ms_per_vm_per_min']:.2f} ms CPU per VM per minute; "
                        f"{count} started in {start_wall:.0f} s)", "(no reference)", "-",
                        f"{still}/{count} running at the end")]
        return out
    finally:
        if node is not None and node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait(10)
        if ns is not None:
            ns.destroy()
        if db is not None:
            db.close()
        if pg is not None:
            pg.stop()
        node_log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _tail(path, lines=15):
    try:
        return " / ".join(Path(path).read_text().splitlines()[-lines:])
    except OSError:
        return ""


def _seed(cur, node_address, di, count, ip_of):
    cur.execute("INSERT INTO hosts (name, address, frontend, backend) VALUES ('bench-hkd', %s, true, true) "
                "RETURNING id", (node_address,))
    host_id = cur.fetchone()[0]
    cur.execute("INSERT INTO host_runtimes (host_id, state, blocked) VALUES (%s, 'stopped', false)", (host_id,))
    cur.execute("INSERT INTO host_counters (host_id) VALUES (%s)", (host_id,))
    cur.execute("INSERT INTO users (tenant_id, login, password) VALUES (1, 'bench-hkd', '!') RETURNING id")
    user_id = cur.fetchone()[0]
    cur.execute("INSERT INTO osfs (tenant_id, name, memory, use_overlay) VALUES (1, 'bench-hkd', 64, false) RETURNING id")
    osf_id = cur.fetchone()[0]
    cur.execute("INSERT INTO dis (osf_id, path, version) VALUES (%s, %s, '1') RETURNING id", (osf_id, di))
    di_id = cur.fetchone()[0]
    cur.execute("INSERT INTO di_tags (di_id, tag) VALUES (%s, 'default'), (%s, 'head')", (di_id, di_id))
    ids = []
    for i in range(1, count + 1):
        cur.execute("INSERT INTO vms (name, user_id, osf_id, di_tag, ip) VALUES (%s, %s, %s, 'default', %s) "
                    "RETURNING id", (f"hkd-{i}", user_id, osf_id, ip_of(i)))
        vm_id = cur.fetchone()[0]
        cur.execute("INSERT INTO vm_runtimes (vm_id, vm_state, user_state, blocked) "
                    "VALUES (%s, 'stopped', 'disconnected', false)", (vm_id,))
        cur.execute("INSERT INTO vm_counters (vm_id) VALUES (%s)", (vm_id,))
        ids.append(vm_id)
    return host_id, ids


def _command(cur, vm_ids, host_id, command):
    """What the L7R and the admin CLI do: vm_cmd, then NOTIFY the VM's host (one per VM)."""
    if command == "start":
        cur.execute("UPDATE vm_runtimes SET host_id = %s, vm_cmd = 'start' WHERE vm_id = ANY(%s)", (host_id, vm_ids))
    else:
        cur.execute("UPDATE vm_runtimes SET vm_cmd = 'stop' WHERE vm_id = ANY(%s) AND vm_state <> 'stopped'", (vm_ids,))
    for vm_id in vm_ids:
        cur.execute("SELECT pg_notify(%s, %s)", (f"qvd_cmd_for_vm_on_host{host_id}", str(vm_id)))
