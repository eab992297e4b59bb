"""64 MiB through qvd-client --listen, a scripted TLS L7R (tests/helpers/scripted_l7r.py) and a
VMA echo desktop, all on loopback. Run: python3 bench/client_echo_throughput.py"""
from gevent import monkey; monkey.patch_all()
import os, sys, time, socket, subprocess, tempfile
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import gevent
from helpers.scripted_l7r import ScriptedL7R, make_cert
from qvd_gevent.config import Config
from qvd_gevent.vma.server import VmaService
tmp = tempfile.mkdtemp()
vma = VmaService(Config({}, None), "127.104.1.1").start()
cert, key = make_cert(tmp)
l7r = ScriptedL7R(cert, key, vma)
proc = subprocess.Popen([sys.executable, "-c", "from qvd_gevent.client.cli import main; main()", "--host", "127.0.0.1",
    "--port", str(l7r.port), "--user", "qvd", "--password", "qvd", "--ca", cert, "connect", "--vm", "10",
    "--listen", "127.0.0.1:0", "--count", "1"], stderr=subprocess.PIPE)
line = b""
while b"listening on" not in line:
    line = proc.stderr.readline()
port = int(line.decode().split(":")[-1].split()[0])
size = 64 << 20
block = os.urandom(1 << 20)
t0 = time.monotonic()
s = socket.create_connection(("127.0.0.1", port))
t_connect = None
def send():
    for _ in range(size >> 20):
        s.sendall(block)
g = gevent.spawn(send)
got = 0
while got < size:
    chunk = s.recv(1 << 20)
    if t_connect is None:
        t_connect = time.monotonic() - t0
    got += len(chunk)
el = time.monotonic() - t0
g.join()
print(f"64 MiB echoed through qvd-client + scripted TLS L7R + VMA echo: {el:.2f}s = {size/el/1e6:.0f} MB/s each way (first bytes after {t_connect*1000:.0f} ms)")
s.close(); proc.wait(10); l7r.stop(); vma.stop()
