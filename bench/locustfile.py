"""A QVD user for locust: over TLS, list_of_vm, connect_to_vm, interactive traffic through
the splice, disconnect; every step reported through locust's request events.

Against the bench environment (see bench/README.md):

    python -m bench.serve --for 300 &                       # node + farm + HAProxy, 5 min at most
    locust -f bench/locustfile.py --headless --processes 2 -u 100 -r 20 --run-time 60s \
           --csv bench/results/locust --only-summary

Settings (environment): QVD_BENCH_TARGET (the file bench.serve writes, default
/tmp/qvd-bench-target.json), QVD_BENCH_LINES (interactive round trips per session,
default 20), QVD_BENCH_LINE_BYTES (default 100), QVD_BENCH_THINK (seconds between lines,
default 0.05), QVD_BENCH_WORKERS (most worker processes you run, default 4: each gets its
own share of the farm users, so two locust users never take the same VM over).
"""
import itertools
import json
import os
import time

from locust import User, between, events, task

from bench.wire import WireError, client_context, connect_to_vm, list_of_vm, open_connection, recv_exact

TARGET_FILE = os.environ.get("QVD_BENCH_TARGET", "/tmp/qvd-bench-target.json")
LINES = int(os.environ.get("QVD_BENCH_LINES", "20"))
LINE_BYTES = int(os.environ.get("QVD_BENCH_LINE_BYTES", "100"))
THINK = float(os.environ.get("QVD_BENCH_THINK", "0.05"))
MAX_WORKERS = int(os.environ.get("QVD_BENCH_WORKERS", "4"))

_counter = itertools.count()
_target = None


def target():
    global _target
    if _target is None:
        with open(TARGET_FILE) as fh:
            _target = json.load(fh)
        _target["context"] = client_context(_target["ca"])
    return _target


class QvdUser(User):
    wait_time = between(0.5, 1.5)

    def on_start(self):
        t = target()
        users = t["users"]
        runner = self.environment.runner
        worker = getattr(runner, "worker_index", 0) or 0
        share = max(1, len(users) // MAX_WORKERS)
        index = (worker % MAX_WORKERS) * share + next(_counter) % share
        self.account = users[index % len(users)]
        self.host_addr, self.port, self.context = t["host"], t["port"], t["context"]

    def fire(self, name, started, length=0, exception=None):
        events.request.fire(request_type="QVD", name=name, response_time=(time.perf_counter() - started) * 1000,
                            response_length=length, exception=exception, context={})

    @task
    def session(self):
        auth = self.account["auth"]
        # list_of_vm: a connection of its own, as the QVD client does
        started = time.perf_counter()
        try:
            sock = open_connection(self.host_addr, self.port, self.context)
            try:
                vms = list_of_vm(sock, auth, self.host_addr)
            finally:
                sock.close()
            self.fire("list_of_vm", started, len(vms))
        except (OSError, WireError) as exc:
            self.fire("list_of_vm", started, exception=exc)
            return
        vm_id = self.account["vm_ids"][0] if not vms else vms[0]["id"]
        started = time.perf_counter()
        try:
            sock = open_connection(self.host_addr, self.port, self.context)
            early = connect_to_vm(sock, vm_id, auth, self.host_addr)
            self.fire("connect_to_vm", started)
        except (OSError, WireError) as exc:
            self.fire("connect_to_vm", started, exception=exc)
            return
        try:
            line = b"x" * (LINE_BYTES - 1) + b"\n"
            for _ in range(LINES):
                started = time.perf_counter()
                sock.sendall(line)
                echoed = recv_exact(sock, len(line), early)
                early = b""
                if echoed != line:
                    raise WireError("the display echoed something else")
                self.fire(f"echo {LINE_BYTES} B", started, len(echoed))
                time.sleep(THINK)
        except (OSError, WireError) as exc:
            self.fire(f"echo {LINE_BYTES} B", started, exception=exc)
        finally:
            started = time.perf_counter()
            sock.close()
            self.fire("disconnect", started)
