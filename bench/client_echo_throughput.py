"""64 MiB through qvd-client --listen, a scripted TLS L7R (tests/helpers/scripted_l7r.py) and
a VMA echo desktop, all on loopback: the client side's own throughput.

Run: python3 bench/client_echo_throughput.py
"""
from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from helpers.scripted_l7r import ScriptedL7R, make_cert  # noqa: E402
from qvd_gevent.config import Config  # noqa: E402
from qvd_gevent.vma.server import VmaService  # noqa: E402

SIZE = 64 << 20


def main():
    tmp = tempfile.mkdtemp()
    vma = VmaService(Config({}, None), "127.104.1.1").start()
    cert, key = make_cert(tmp)
    l7r = ScriptedL7R(cert, key, vma)
    proc = subprocess.Popen([sys.executable, "-c", "from qvd_gevent.client.cli import main; main()",
                             "--host", "127.0.0.1", "--port", str(l7r.port), "--user", "qvd", "--password", "qvd",
                             "--ca", cert, "connect", "--vm", "10", "--listen", "127.0.0.1:0", "--count", "1"],
                            stderr=subprocess.PIPE)
    line = b""
    while b"listening on" not in line:
        line = proc.stderr.readline()
    port = int(line.decode().split(":")[-1].split()[0])
    block = os.urandom(1 << 20)
    t0 = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port))
    first_bytes = None

    def send():
        for _ in range(SIZE >> 20):
            sock.sendall(block)

    sender = gevent.spawn(send)
    got = 0
    while got < SIZE:
        chunk = sock.recv(1 << 20)
        if first_bytes is None:
            first_bytes = time.monotonic() - t0
        got += len(chunk)
    elapsed = time.monotonic() - t0
    sender.join()
    print(f"64 MiB echoed through qvd-client + scripted TLS L7R + VMA echo: {elapsed:.2f}s = "
          f"{SIZE / elapsed / 1e6:.0f} MB/s each way (first bytes after {first_bytes * 1000:.0f} ms)")
    sock.close()
    proc.wait(10)
    l7r.stop()
    vma.stop()


if __name__ == "__main__":
    main()
