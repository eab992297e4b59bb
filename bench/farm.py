"""The bench's backend: a stand-in for many running VMs in one process, on loopback only.

    python -m bench.farm --address 127.77.0.1     prints one JSON line with its ports, then serves

- a VMA (SimpleRPC over HTTP): /vma/ping -> 1, /vma/x_start -> "starting",
  /vma/x_state -> "listening" (the L7R needs nothing more to splice a session);
- an echo port (the display of every farm VM): bytes come back unchanged, any number of
  connections at once (relay ping-pong and idle sessions);
- a sink port (the bulk VM's display): an 8-byte big-endian length N, then N bytes that
  are counted and dropped; it answers b"OK" + the count as 8 bytes once N arrived;
- an rfb port (the display of an idle desktop, native or in a browser): it sends the RFB
  server's first message (``RFB 003.008\n``, what Xvnc sends before anything else), then
  reads and drops whatever comes until the viewer leaves: a desktop nobody looks at.

With QVD_VMA_SECRET=K in its environment (as a VM gets its agent key) every VMA call must
carry ``Authorization: Bearer K`` (else 401), and a
display connection that starts with the VMA's display preamble
(qvd_gevent/vma/display_gate.py) is admitted as the VMA's gate admits it: its key must be
one an x_start armed (each key once), and it gets the ACK before the echo or sink starts.
Connections without a preamble (HAProxy, the direct client) are served as they come, so
the L7R pays the handshake a real VM asks for and the others do not.

The L7R, HAProxy and the direct client all reach these same ports, so the backend's own
cost is the same in every comparison. It stops on SIGTERM or when its parent dies.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

from qvd_gevent.vma import display_gate, rpc  # noqa: E402

RPC_ANSWERS = {"ping": b"1", "x_start": b'"starting"', "x_state": b'"listening"', "x_suspend": b'"suspended"',
               "x_stop": b'"stopping"', "poweroff": b"1"}


AGENT_KEY = None           # QVD_VMA_SECRET: what every VMA call must carry
ARMED = set()             # display keys armed by x_start calls, each admitted once


def serve_rpc(sock, _peer):
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = sock.recv(65536)
        if not chunk:
            return
        data += chunk
    try:
        target = data.split(b"\r\n", 1)[0].split(b" ")[1].decode()
        request = rpc.parse_request_head(data.split(b"\r\n\r\n", 1)[0])
    except (IndexError, rpc.BadRequest):
        return
    if AGENT_KEY is not None and not rpc.bearer_matches(request.headers, AGENT_KEY):
        sock.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        return
    method = target.split("?", 1)[0].rsplit("/", 1)[-1]
    if method == "x_start" and display_gate.PARAM in request.params:
        ARMED.add(request.params[display_gate.PARAM])
    body = RPC_ANSWERS.get(method)
    if body is None:
        head = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        sock.sendall(head)
        return
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n%s" % (len(body), body))


def admitted(sock):
    """False when the connection presented a display key that no x_start armed (closed
    unserved, as the VMA's gate does); True for an armed key (spent, ACK sent) and for a
    connection without any preamble."""
    prefix = display_gate.PREAMBLE_PREFIX
    head = b""
    for _ in range(5000):       # a client that stops inside the prefix is served raw after ~5 s
        head = sock.recv(len(prefix), socket.MSG_PEEK)
        if not head or not prefix.startswith(head) or len(head) == len(prefix):
            break
        gevent.sleep(0.001)
    if head != prefix:
        return True
    key = display_gate.key_of_preamble(display_gate.recv_exactly(sock, display_gate.PREAMBLE_LENGTH))
    if key is None or key not in ARMED:
        return False
    ARMED.discard(key)
    sock.sendall(display_gate.ACK)
    return True


def serve_echo(sock, _peer):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if not admitted(sock):
            return
        while True:
            data = sock.recv(65536)
            if not data:
                break
            sock.sendall(data)
    except OSError:
        pass
    finally:
        sock.close()


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def serve_sink(sock, _peer):
    buf = bytearray(1 << 18)
    view = memoryview(buf)
    try:
        if not admitted(sock):
            return
        (want,) = struct.unpack("!Q", _recv_exact(sock, 8))
        got = 0
        while got < want:
            n = sock.recv_into(view, min(len(buf), want - got))
            if not n:
                break
            got += n
        sock.sendall(b"OK" + struct.pack("!Q", got))
        sock.recv(1)
    except (OSError, EOFError, struct.error):
        pass
    finally:
        sock.close()


RFB_BANNER = b"RFB 003.008\n"


def serve_rfb(sock, _peer):
    try:
        if not admitted(sock):
            return
        sock.sendall(RFB_BANNER)
        while sock.recv(65536):
            pass
    except OSError:
        pass
    finally:
        sock.close()


def watch_parent(parent):
    while os.getppid() == parent:
        gevent.sleep(1)
    os._exit(0)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.farm")
    parser.add_argument("--address", default="127.77.0.1")
    args = parser.parse_args(argv)
    global AGENT_KEY
    AGENT_KEY = os.environ.pop("QVD_VMA_SECRET", None)
    if not args.address.startswith("127."):
        parser.error("the farm serves loopback addresses only")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    servers = {}
    for name, handler in (("rpc", serve_rpc), ("echo", serve_echo), ("sink", serve_sink), ("rfb", serve_rfb)):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((args.address, 0))
        listener.listen(4096)
        servers[name] = StreamServer(listener, handler)
        servers[name].start()
    print(json.dumps({"pid": os.getpid(), "address": args.address,
                      **{name: srv.server_port for name, srv in servers.items()}}), flush=True)
    gevent.spawn(watch_parent, os.getppid())
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    stop.wait()
    for srv in servers.values():
        srv.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
