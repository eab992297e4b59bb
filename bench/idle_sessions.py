#!/usr/bin/env python3
"""Memory per idle spliced L7R session.

Starts an embedded PostgreSQL (or uses QVD_TEST_PG_DSN), a real L7RService over TLS on
127.0.0.1, N VMs whose display port is one loopback echo server, and N clients; each
client does the real connect_to_vm (102 lines, 101), checks an echo round trip, then sits
idle. Reports the L7R process's RSS growth per session.

The clients and the echo server run in a separate process so that the RSS measured is
the L7R's alone (the L7R process also runs the database pool, the LISTEN connection and
the fake VMA's RPC server, which are per-process, not per-session).

    python3 bench/idle_sessions.py --sessions 1000
    python3 bench/idle_sessions.py --sessions 5000 --plain   # l7r.use_ssl=0 (os.splice path)
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))


def rss_kb(pid="self"):
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- the client side, in its own process (so the L7R's RSS is the L7R's alone) ---------------
def client_role(args):
    import base64
    import json
    import gevent
    import gevent.pool
    from gevent.server import StreamServer
    raise_nofile()

    def echo(sock, addr):
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                sock.sendall(data)
        except OSError:
            pass
    echo_server = StreamServer(("127.0.0.1", 0), echo, backlog=4096)
    echo_server.start()
    print(f"ECHO {echo_server.server_port}", flush=True)
    ctx = None
    if not args.plain:
        ctx = ssl.create_default_context(cafile=args.cert)
        ctx.check_hostname = False
    auth = "Basic " + base64.b64encode(b"bench:bench").decode()
    held, failures = [], []

    def one(vm_id):
        err = None
        for attempt in range(3):
            try:
                s = socket.create_connection(("127.0.0.1", args.port), timeout=60)
                if ctx:
                    s = ctx.wrap_socket(s, server_hostname="localhost")
                s.sendall(f"GET /qvd/connect_to_vm?id={vm_id} HTTP/1.1\r\nAuthorization: {auth}\r\n"
                          "Connection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n".encode())
                buf = b""
                while b"HTTP/1.1 101" not in buf or not buf.endswith(b"\r\n\r\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        raise OSError("closed before 101: " + buf[-200:].decode("latin-1"))
                    buf += chunk
                    if b"HTTP/1.1 503" in buf or b"HTTP/1.1 4" in buf:
                        raise OSError(buf[-300:].decode("latin-1"))
                s.sendall(b"hello")
                got = b""
                while len(got) < 5:
                    got += s.recv(5 - len(got))
                assert got == b"hello"
                held.append(s)
                return
            except Exception as exc:  # noqa: BLE001 - report and retry
                err = exc
                gevent.sleep(0.2 * (attempt + 1))
        failures.append(f"vm {vm_id}: {err}")

    for _ in range(2):  # phase 1 (warm-up), phase 2 (measured)
        line = sys.stdin.readline()
        if not line.startswith("GO "):
            break
        vm_ids = [int(x) for x in line.split()[1].split(",")]
        pool = gevent.pool.Pool(args.concurrency)
        t0 = time.time()
        with gevent.Timeout(args.max_seconds, False):
            for vm_id in vm_ids:
                pool.spawn(one, vm_id)
            pool.join()
        pool.kill()
        print("DONE " + json.dumps([len(held), failures[:5], time.time() - t0]), flush=True)
    sys.stdin.readline()
    for s in held:
        s.close()
    echo_server.stop()
    print("CLOSED", flush=True)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--plain", action="store_true", help="l7r.use_ssl=0 (os.splice between plaintext legs)")
    parser.add_argument("--concurrency", type=int, default=50, help="connects in flight at once")
    parser.add_argument("--max-seconds", type=int, default=600, help="bound on the whole connect phase")
    parser.add_argument("--client-role", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client_role:
        return client_role(args)
    limit = raise_nofile()
    if limit < args.sessions * 3 + 200:
        print(f"open-file limit {limit} is too low for {args.sessions} sessions", file=sys.stderr)
        return 1

    from qvd_gevent.config import Config
    from qvd_gevent.db import Database, make_green
    from qvd_gevent.db.deploy import deploy
    from qvd_gevent.db.listen import Listener
    from qvd_gevent.db.passwords import hash_password
    from qvd_gevent.l7r.server import L7RService
    from qvd_gevent.node.certs import make_self_signed
    import logging
    logging.basicConfig(level=logging.WARNING)
    make_green()

    work = tempfile.mkdtemp(prefix="qvd-bench-idle-")
    from qvd_gevent.db.embedded import EmbeddedPostgres
    pg = EmbeddedPostgres(os.path.join(work, "pg")).start()
    try:
        pg.create_database("qvd", "qvd", "bench")
        conf = os.path.join(work, "node.conf")
        with open(conf, "w") as fh:
            fh.write("\n".join(["nodename = bench-node", *pg.node_conf_lines("qvd", "qvd", "bench"),
                                f"path.run = {work}/run", "l7r.port = 0", "l7r.address = 127.0.0.1",
                                f"l7r.use_ssl = {0 if args.plain else 1}", "internal.l7r.poll_time.x = 0.02",
                                # the client role's echo stands in for every VM's display, with no gate
                                "vm.vma.legacy_unauthenticated = 1",
                                "internal.database.pool.size = 20", "log.level = WARN"]) + "\n")
        cfg = Config.load(conf)
        db = Database.from_config(cfg)
        assert deploy(db) in (0, 2)
        cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
        make_self_signed(cert, key)
        db.execute("INSERT INTO ssl_configs (key, value) VALUES ('l7r.ssl.cert', %s), ('l7r.ssl.key', %s)",
                   (open(cert).read(), open(key).read()))
        host_id = db.query_one("INSERT INTO hosts (name, address, frontend, backend) VALUES ('bench-node', "
                               "'127.0.0.1', true, true) RETURNING id")[0]
        db.execute("INSERT INTO host_runtimes (host_id, state, blocked) VALUES (%s, 'running', false)", (host_id,))
        user = db.query_one("INSERT INTO users (login, password, tenant_id) VALUES ('bench', %s, 1) RETURNING id",
                            (hash_password("bench"),))[0]
        osf = db.query_one("INSERT INTO osfs (name, memory, use_overlay, tenant_id) VALUES ('o', 64, false, 1) "
                           "RETURNING id")[0]
        db.execute("INSERT INTO vms (name, user_id, osf_id, di_tag) SELECT 'vm' || g, %s, %s, 'default' "
                   "FROM generate_series(1, %s) g", (user, osf, args.sessions))
        vm_ids = [r[0] for r in db.query("SELECT id FROM vms ORDER BY id")]

        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        from helpers.fake_vma import FakeVma
        vma = FakeVma(listen_delay=0, legacy=True).start()
        vma.state = "listening"
        listener = Listener(db).start()
        listener.wait_connected(10)
        svc = L7RService(cfg, db, listener).start()

        import json
        import gevent
        import gevent.subprocess
        cmd = [sys.executable, os.path.abspath(__file__), "--client-role", "--port", str(svc.port), "--cert", cert,
               "--concurrency", str(args.concurrency), "--max-seconds", str(args.max_seconds)]
        if args.plain:
            cmd.append("--plain")
        proc = gevent.subprocess.Popen(cmd, stdin=gevent.subprocess.PIPE, stdout=gevent.subprocess.PIPE, text=True)
        try:
            echo_port = int(proc.stdout.readline().split()[1])
            db.execute("INSERT INTO vm_runtimes (vm_id, host_id, vm_state, user_state, vm_address, vm_vma_port, "
                       "vm_x_port) SELECT id, %s, 'running', 'disconnected', '127.0.0.1', %s, %s FROM vms",
                       (host_id, vma.vma_port, echo_port))
            def phase(ids):
                proc.stdin.write("GO " + ",".join(map(str, ids)) + "\n")
                proc.stdin.flush()
                held, failures, took = json.loads(proc.stdout.readline().split(" ", 1)[1])
                for _ in range(100):
                    if svc.sessions_open >= held:
                        break
                    gevent.sleep(0.1)
                gevent.sleep(1.0)
                gc.collect()
                return held, failures, took, rss_kb(), svc.sessions_open
            start_rss = rss_kb()
            warm = max(100, args.sessions // 10)
            h1, f1, t1, rss1, open1 = phase(vm_ids[:warm])
            h2, f2, t2, rss2, open2 = phase(vm_ids[warm:])
            measured = open2 - open1
            per = (rss2 - rss1) * 1024 / max(measured, 1)
            mode = "plain (os.splice)" if args.plain else "TLS"
            print(f"mode: {mode}; sessions requested {args.sessions}, established {h2}, open in L7R {open2}; "
                  f"connect phases took {t1:.1f} s + {t2:.1f} s")
            for f in (f1 + f2)[:5]:
                print("  failure:", f)
            print(f"L7R RSS: start {start_rss} KB, after {open1} warm-up sessions {rss1} KB, "
                  f"after {open2} sessions {rss2} KB")
            print(f"memory per idle spliced session (marginal, {measured} sessions): {per / 1024:.1f} KB")
            print(f"all-in average including fixed costs (TLS/threadpool warm-up): "
                  f"{(rss2 - start_rss) / max(open2, 1):.1f} KB")
            held = h2
            proc.stdin.write("CLOSE\n")
            proc.stdin.flush()
            proc.stdout.readline()
        finally:
            try:
                proc.kill()
            except OSError:
                pass
            proc.wait()
        for _ in range(100):
            if svc.sessions_open == 0:
                break
            gevent.sleep(0.1)
        left = db.query_one("SELECT count(*) FROM vm_runtimes WHERE user_state <> 'disconnected'")[0]
        print(f"after close: sessions open {svc.sessions_open}, rows not disconnected {left}")
        svc.stop()
        listener.stop()
        vma.stop()
        db.close()
        return 0 if held == args.sessions else 2
    finally:
        pg.destroy()
        import shutil
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
