"""qvd-vma over real sockets: SimpleRPC framing, every method, the echo desktop, x_state.

Each test runs its own VMA on its own loopback address (127.101.x.y) on the real ports
(3030 for the RPC, 4100 for the display), so tests never collide with each other or
with other VMAs on the machine.
"""
import itertools
import os
import socket
import time

import gevent
import pytest

from qvd_gevent.config import Config
from qvd_gevent.vma.client import VmaClient, VmaError
from qvd_gevent.vma.server import VmaService

_addresses = itertools.count(1)


def loopback_address():
    n = next(_addresses)
    return f"127.101.{os.getpid() % 250 + 1}.{n % 250 + 1}"


@pytest.fixture
def make_vma():
    services = []

    def make(overrides=None, desktop="echo", **kw):
        cfg = Config(overrides or {}, None)
        service = VmaService(cfg, loopback_address(), desktop=desktop, **kw).start()
        services.append(service)
        return service, VmaClient(service.address, service.port, timeout=4)

    yield make
    for service in services:
        service.stop()


def raw_request(address, port, data):
    with socket.create_connection((address, port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def test_framing_on_the_wire_without_host_header(make_vma):
    service, _ = make_vma()
    answer = raw_request(service.address, service.port,
                         b"GET /vma/x_state HTTP/1.1\r\nUser-Agent: QVD::HTTPC/0.01 (linux)\r\nConnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert b"Content-Type: application/json-simplerpc" in lines
    assert body == b'"stopped"\r\n'


def test_error_framing_and_404(make_vma):
    service, client = make_vma()
    answer = raw_request(service.address, service.port,
                         b"GET /vma/x_start?qvd.client.geometry=1024x768%20bad HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.partition(b"\r\n\r\n")[2].startswith(b'"",')
    with pytest.raises(VmaError, match="Invalid value"):
        client.x_start(**{"qvd.client.geometry": "1024x768 bad"})
    assert raw_request(service.address, service.port,
                       b"GET /vma/no_such_method HTTP/1.1\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert raw_request(service.address, service.port, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400")


def test_keep_alive_serves_several_requests_on_one_connection(make_vma):
    service, _ = make_vma()
    answer = raw_request(service.address, service.port,
                         b"GET /vma/ping HTTP/1.1\r\n\r\nGET /vma/x_state HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200 OK") == 2
    assert answer.endswith(b'"stopped"\r\n')


def test_ping_expire_and_unknown_state_methods(make_vma):
    _, client = make_vma()
    assert client.ping() is True
    assert client.call("ping") == 1
    assert client.call("expire", **{"vm.expiration.soft": "2030-01-01", "vm.expiration.hard": ""}) == 1
    assert client.call("x_suspend") == "stopped"
    assert client.call("x_stop") == "stopped"


def echo_roundtrip(address, payload):
    with socket.create_connection((address, 4100), timeout=5) as s:
        sender = gevent.spawn(s.sendall, payload)
        got = bytearray()
        while len(got) < len(payload):
            chunk = s.recv(65536)
            assert chunk, "echo closed early"
            got += chunk
        sender.get()
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b""  # echo half-closes back once we did
    return bytes(got)


def wait_state(client, wanted, limit=5.0):
    deadline = time.monotonic() + limit
    state = None
    while time.monotonic() < deadline:
        state = client.x_state()
        if state == wanted:
            return state
        gevent.sleep(0.02)
    raise AssertionError(f"x_state stayed {state!r}, wanted {wanted!r}")


def test_echo_desktop_is_byte_exact_over_many_connections(make_vma):
    service, client = make_vma()
    with pytest.raises(OSError):
        socket.create_connection((service.address, 4100), timeout=2)  # nothing before x_start
    assert client.x_start(**{"qvd.client.geometry": "800x600"}) == "starting"
    payload = os.urandom(1 << 20) + b"\x00\r\n\xff"
    for _ in range(3):
        assert echo_roundtrip(service.address, payload) == payload
        wait_state(client, "suspended")
    assert service.desktop.sessions == 3


def test_x_state_transitions(make_vma):
    service, client = make_vma()
    assert client.x_state() == "stopped"
    assert client.x_start() == "starting"
    assert client.x_state() == "listening"
    conn = socket.create_connection((service.address, 4100), timeout=5)
    wait_state(client, "connected")
    # A second x_start while connected suspends the session and fails, as the original.
    with pytest.raises(VmaError, match="in state connected, suspending it"):
        client.x_start()
    assert conn.recv(10) == b""  # the desktop dropped the old client
    conn.close()
    assert client.x_state() == "suspended"
    assert client.x_start() == "starting"  # resume
    assert client.x_state() == "listening"
    conn = socket.create_connection((service.address, 4100), timeout=5)
    wait_state(client, "connected")
    assert client.call("x_suspend") == "suspended"
    conn.close()
    assert client.x_start() == "starting"
    assert client.call("x_stop") == "stopping"
    assert client.x_state() == "stopped"
    with pytest.raises(OSError):
        socket.create_connection((service.address, 4100), timeout=2)


def test_listening_timeout_stops_an_unclaimed_session(make_vma):
    _, client = make_vma({"internal.nxagent.timeout.listening": "1"})
    assert client.x_start() == "starting"
    assert client.x_state() == "listening"
    gevent.sleep(1.3)
    assert client.x_state() == "stopping"
    assert client.x_state() == "stopped"


def test_auto_desktop_picks_echo_unless_nx_asked(make_vma):
    service, client = make_vma(desktop="auto")
    assert client.x_state() == "stopped"
    assert client.x_start(**{"qvd.vm.desktop": "echo-please"}) == "starting"
    assert service.desktop.kind == "echo"


def test_poweroff_answers_then_calls_back(make_vma):
    called = []
    _, client = make_vma(on_poweroff=lambda: called.append(True))
    assert client.call("poweroff") == 1
    gevent.sleep(0.2)
    assert called == [True]
