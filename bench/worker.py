"""A load-generating client process; the orchestrator runs several side by side.

    python -m bench.worker '<json spec>'

Talks JSON lines: stdout gets {"ready": ...} after set-up and {"result": ...} at the end;
stdin gives "go" (start the measured part) and, for the idle job, "open N" / "close".
Every loop is bounded by a count and a deadline; the worker exits when stdin closes.
Jobs: bulk, pingpong, idle, handshake, connect (see each function).
"""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402

from bench.wire import Target, WireError, connect_to_vm, open_connection, ping, recv_exact  # noqa: E402


def emit(kind, value):
    sys.stdout.write(json.dumps({kind: value}) + "\n")
    sys.stdout.flush()


def wait_line(expected=None):
    line = sys.stdin.readline()
    if not line:
        os._exit(0)
    line = line.strip()
    if expected and line != expected:
        raise SystemExit(f"worker: expected {expected!r}, got {line!r}")
    return line


def job_bulk(spec, target):
    """One stream of spec['bytes'] bytes to the sink; MB/s from first byte to the sink's ack."""
    total, deadline_s = int(spec["bytes"]), float(spec["seconds"])
    sock, _ = target.session(0)
    emit("ready", 1)
    wait_line("go")
    block = memoryview(os.urandom(1 << 20))
    t0 = time.monotonic()
    sock.sendall(struct.pack("!Q", total))
    sent, complete = 0, True
    while sent < total:
        if time.monotonic() - t0 > deadline_s:
            complete = False
            break
        n = min(len(block), total - sent)
        sock.sendall(block[:n])
        sent += n
    send_seconds = time.monotonic() - t0
    stalled = False
    if complete:
        # the sink acknowledges once it has every byte; a proxy that never forwards the
        # last bytes (or the ack) shows up as a stall, not as a hung benchmark
        sock.settimeout(float(spec.get("ack_timeout", 10)))
        try:
            ack = recv_exact(sock, 10)
            got = struct.unpack("!Q", ack[2:])[0]
        except (OSError, WireError):
            stalled, complete, got = True, False, sent
            if spec.get("debug_stall"):
                import subprocess
                with open(spec["debug_stall"], "a") as fh:
                    fh.write(f"STALL client {sock.getsockname()[1]} -> {target.port} pending={sock.pending()}\n")
                    fh.write(subprocess.run(["ss", "-tnoi", "state", "established"],
                                            capture_output=True, text=True).stdout + "\n----\n")
    elapsed = time.monotonic() - t0
    sock.close()
    emit("result", {"bytes": got, "seconds": elapsed, "complete": complete, "stalled": stalled,
                    "sent": sent, "send_seconds": send_seconds})


def job_pingpong(spec, target):
    """spec['sessions'] sessions, each sends spec['size'] bytes and waits for them back,
    spec['round_trips'] times or until spec['seconds'] pass."""
    sessions, size = int(spec["sessions"]), int(spec["size"])
    rounds, limit = int(spec["round_trips"]), float(spec["seconds"])
    offset = int(spec.get("offset", 0))
    socks = gevent.pool.Pool(50).map(lambda i: target.session(offset + i)[0], range(sessions))
    emit("ready", len(socks))
    wait_line("go")
    payload = os.urandom(size)
    done = [0] * sessions
    t0 = time.monotonic()

    def run(i):
        sock = socks[i]
        for _ in range(rounds):
            if time.monotonic() - t0 > limit:
                break
            sock.sendall(payload)
            recv_exact(sock, size)
            done[i] += 1

    gevent.joinall([gevent.spawn(run, i) for i in range(sessions)], raise_error=True)
    elapsed = time.monotonic() - t0
    for sock in socks:
        sock.close()
    emit("result", {"round_trips": sum(done), "seconds": elapsed})


def job_idle(spec, target):
    """Holds sessions: "open N" opens N more (with 100 at a time), "close" ends."""
    socks, failures, offset = [], 0, int(spec.get("offset", 0))
    emit("ready", 0)
    for _ in range(1000):
        line = wait_line()
        if line == "close":
            break
        want = int(line.split()[1])
        start = len(socks)
        errors = []

        def one(i, errors=errors):
            try:
                sock, _ = target.session(offset + i, timeout=60)
                sock.settimeout(None)
                return sock
            except (OSError, WireError) as exc:
                errors.append(str(exc))
                return None

        opened = gevent.pool.Pool(int(spec.get("parallel", 50))).map(one, range(start + failures, start + failures + want))
        socks += [s for s in opened if s is not None]
        failures += len(errors)
        emit("result", {"open": len(socks), "failures": failures, "last_error": errors[-1] if errors else None})
    for sock in socks:
        sock.close()
    emit("result", {"closed": len(socks)})


def job_handshake(spec, target):
    """Full TLS handshakes, spec['concurrency'] at a time, until spec['count'] or spec['seconds'].
    With spec['ping'], each connection also asks /qvd/ping before closing."""
    count, limit, conc = int(spec["count"]), float(spec["seconds"]), int(spec["concurrency"])
    with_ping = bool(spec.get("ping"))
    emit("ready", 1)
    wait_line("go")
    done, errors = [0], []
    t0 = time.monotonic()

    def run():
        while done[0] < count and time.monotonic() - t0 < limit:
            done[0] += 1
            try:
                sock = open_connection(target.host, target.port, target.context, timeout=10)
                if with_ping:
                    ping(sock, target.host)
                sock.close()
            except (OSError, WireError) as exc:
                errors.append(str(exc))

    gevent.joinall([gevent.spawn(run) for _ in range(conc)])
    elapsed = time.monotonic() - t0
    emit("result", {"handshakes": done[0] - len(errors), "errors": len(errors), "seconds": elapsed,
                    "last_error": errors[-1] if errors else None})


def job_connect(spec, target):
    """Virtual users, each with its own token and VMs: connect_to_vm -> 101 -> close, again
    (round robin over the user's VMs), until spec['count'] or spec['seconds']. Latency from
    the TCP connect to the 101. A user with a "port" of its own goes to that L7R, and one with
    a "source" connects from that address (the cluster bench spreads users over its nodes
    and gives each an address of its own)."""
    users, limit, count = spec["users"], float(spec["seconds"]), int(spec["count"])
    emit("ready", len(users))
    wait_line("go")
    latencies, errors, started = [], [], [0]
    t0 = time.monotonic()

    def run(user):
        for i in range(count):
            if started[0] >= count or time.monotonic() - t0 > limit:
                break
            started[0] += 1
            vm_id = user["vm_ids"][i % len(user["vm_ids"])]
            t = time.monotonic()
            try:
                sock = open_connection(target.host, user.get("port", target.port), target.context, timeout=30,
                                       source=user.get("source"))
                try:
                    connect_to_vm(sock, vm_id, user["auth"], target.host)
                    latencies.append(time.monotonic() - t)
                finally:
                    sock.close()
            except (OSError, WireError) as exc:
                errors.append(str(exc))
            gevent.sleep(float(spec.get("think", 0)))

    gevent.joinall([gevent.spawn(run, u) for u in users])
    elapsed = time.monotonic() - t0
    emit("result", {"latencies": latencies, "errors": len(errors), "seconds": elapsed,
                    "last_error": errors[-1] if errors else None})


JOBS = {"bulk": job_bulk, "pingpong": job_pingpong, "idle": job_idle, "handshake": job_handshake,
        "connect": job_connect}


def main():
    spec = json.loads(sys.argv[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    target = Target(spec["target"])
    JOBS[spec["job"]](spec, target)


if __name__ == "__main__":
    main()
