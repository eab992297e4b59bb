"""What the VMA's display gate costs (docs/protocol.md#display-gate), on loopback.

    python3 bench/vma_gate.py [--opens 300] [--megabytes 256]

1. Opening a display connection: the L7R's connect + 60-byte preamble + 15-byte answer to
   a keyed VMA (echo desktop), against a bare connect to an unauthenticated VMA; each
   then does one 1-byte round trip so that both have really reached the desktop. The VMA
   runs in its own process; every keyed open is armed by an x_start beforehand (not
   timed: the L7R calls x_start either way). Median and 95th percentile in µs.
2. The relay in front of nxagent: bytes through the gate, the VMA relaying them to the
   desktop's unix socket, against the same bytes straight to that socket. The desktop is
   a stand-in for nxagent (an echo on the unix socket named in its options file, started
   by the VMA as it starts nxagent). CPU of the VMA process per MB relayed
   (utime+stime from /proc), and the throughput both ways.

Bounded: --opens connections and --megabytes per run, 120 s at most per part.
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from qvd_gevent.vma import display_gate  # noqa: E402
from qvd_gevent.vma.client import VmaClient, VmaError, open_display  # noqa: E402

FAKE_NXAGENT = textwrap.dedent("""\
    #!{python}
    # Stands in for nxagent: an echo on the unix socket of its options file's listen=unix:<path>.
    import os, re, socket, sys, threading
    options = next(a for a in sys.argv if "options=" in a).split("options=")[1].rsplit(":", 1)[0]
    path = re.search(r"listen=unix:([^,:]+)", open(options).read()).group(1)
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(4)
    print("Session: Starting session at 'now'.", flush=True)
    def echo(conn):
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            conn.sendall(data)
        conn.close()
    while True:
        conn, _ = server.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
    """)


def start_vma(address, desktop, key, run_dir, conf=None):
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, "..", "src"))
    argv = [sys.executable, "-m", "qvd_gevent.vma.server", "--address", address, "--desktop", desktop,
            "--run-dir", run_dir]
    if key is None:
        argv.append("--unauthenticated")
    else:
        env["QVD_VMA_SECRET"] = key
    if conf:
        argv += ["--config", conf]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = VmaClient(address, 3030, timeout=2, key=key)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            return proc, client
        except VmaError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("the VMA did not come up") from None
            time.sleep(0.05)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def round_trip(sock):
    sock.sendall(b"x")
    assert sock.recv(1) == b"x"


def opens(address, keyed, count, limit):
    key = display_gate.new_key() if keyed else None
    run_dir = tempfile.mkdtemp(prefix="qvd-bench-gate-")
    proc, client = start_vma(address, "echo", key, run_dir)
    times = []
    try:
        deadline = time.monotonic() + limit
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            display_key = display_gate.new_key() if keyed else None
            client.x_start(**({display_gate.PARAM: display_key} if keyed else {}))
            t0 = time.perf_counter()
            sock = open_display(address, 4100, display_key, timeout=5)
            round_trip(sock)
            times.append((time.perf_counter() - t0) * 1e6)
            sock.close()
            client.call("x_suspend")
    finally:
        proc.terminate()
        proc.wait(10)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1], len(times)


def pump(sock, megabytes, limit):
    """megabytes through sock and back; seconds taken."""
    block = os.urandom(1 << 20)
    received = 0
    total = megabytes << 20
    t0 = time.monotonic()
    sock.setblocking(True)
    import threading
    sender = threading.Thread(target=lambda: [sock.sendall(block) for _ in range(megabytes)], daemon=True)
    sender.start()
    while received < total and time.monotonic() - t0 < limit:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        received += len(chunk)
    sender.join(limit)
    assert received == total, f"only {received} of {total} bytes came back"
    return time.monotonic() - t0


def relay(address, megabytes, limit):
    work = tempfile.mkdtemp(prefix="qvd-bench-gate-")
    fake = os.path.join(work, "nxagent")
    with open(fake, "w") as fh:
        fh.write(FAKE_NXAGENT.format(python=sys.executable))
    os.chmod(fake, 0o755)
    conf = os.path.join(work, "vma.conf")
    with open(conf, "w") as fh:
        fh.write(f"command.nxagent = {fake}\n")
    key = display_gate.new_key()
    proc, client = start_vma(address, "nx", key, work, conf)
    try:
        display_key = display_gate.new_key()
        client.x_start(**{display_gate.PARAM: display_key})
        deadline = time.monotonic() + 20
        while client.x_state() != "listening" and time.monotonic() < deadline:
            time.sleep(0.05)
        direct = socket.socket(socket.AF_UNIX)
        direct.connect(os.path.join(work, "nxagent.sock"))
        direct_seconds = pump(direct, megabytes, limit)
        direct.close()
        sock = open_display(address, 4100, display_key, timeout=5)
        sock.settimeout(None)
        cpu0 = cpu_seconds(proc.pid)
        relayed_seconds = pump(sock, megabytes, limit)
        relay_cpu = cpu_seconds(proc.pid) - cpu0
        sock.close()
    finally:
        proc.terminate()
        proc.wait(10)
    return direct_seconds, relayed_seconds, relay_cpu


def main():
    parser = argparse.ArgumentParser(prog="bench/vma_gate.py")
    parser.add_argument("--opens", type=int, default=300)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--address", default="127.105.0.1")
    args = parser.parse_args()
    open_median, open_p95, n_open = opens(args.address, False, args.opens, 120)
    gated_median, gated_p95, n_gated = opens(args.address, True, args.opens, 120)
    print(f"display open + 1-byte round trip, {n_open}/{n_gated} runs: open {open_median:.0f} µs "
          f"(p95 {open_p95:.0f}), gated {gated_median:.0f} µs (p95 {gated_p95:.0f}): "
          f"the preamble and answer add {gated_median - open_median:.0f} µs")
    direct, relayed, cpu = relay(args.address, args.megabytes, 120)
    mb = args.megabytes
    print(f"{mb} MB each way: straight to the desktop's socket {mb / direct:.0f} MB/s, through the gate's relay "
          f"{mb / relayed:.0f} MB/s; the VMA's CPU {cpu * 1e3 / (2 * mb):.2f} ms per MB relayed "
          f"({cpu:.2f} s for {2 * mb} MB in both directions)")


if __name__ == "__main__":
    main()
