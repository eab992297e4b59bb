"""qvd-vma over real sockets: SimpleRPC framing, every method, the echo desktop, x_state,
the agent key every call needs and the display gate.

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
from qvd_gevent.vma import display_gate
from qvd_gevent.vma.client import VmaClient, VmaError, open_display
from qvd_gevent.vma.server import VmaService

_addresses = itertools.count(1)


def loopback_address():
    n = next(_addresses)
    return f"127.101.{os.getpid() % 250 + 1}.{n % 250 + 1}"


@pytest.fixture
def make_vma():
    services = []

    def make(overrides=None, desktop="echo", key=AGENT_KEY, **kw):
        cfg = Config(overrides or {}, None)
        service = VmaService(cfg, loopback_address(), desktop=desktop, key=key, **kw).start()
        services.append(service)
        return service, ArmingClient(service.address, service.port, timeout=4, key=key)

    yield make
    for service in services:
        service.stop()


AGENT_KEY = display_gate.new_key()
AUTH = b"Authorization: Bearer " + AGENT_KEY.encode() + b"\r\n"


class ArmingClient(VmaClient):
    """Calls as the L7R does: each x_start arms the display with a new one-time key."""

    display_key = None

    def x_start(self, **params):
        if self.key is not None:
            self.display_key = display_gate.new_key()
            params.setdefault(display_gate.PARAM, self.display_key)
        return self.call("x_start", **params)

    def display(self, address, port=4100):
        return open_display(address, port, self.display_key, timeout=5)


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
                         b"GET /vma/x_state HTTP/1.1\r\nUser-Agent: QVD::HTTPC/0.01 (linux)\r\nConnection: close\r\n"
                         + AUTH + b"\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert b"Content-Type: application/json-simplerpc" in lines
    assert body == b'"stopped"\r\n'


def test_error_framing_and_404(make_vma):
    service, client = make_vma()
    answer = raw_request(service.address, service.port,
                         b"GET /vma/x_start?qvd.client.geometry=1024x768%20bad&qvd.display.key="
                         + display_gate.new_key().encode() + b" HTTP/1.1\r\nConnection: close\r\n" + AUTH + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.partition(b"\r\n\r\n")[2].startswith(b'"",')
    with pytest.raises(VmaError, match="Invalid value"):
        client.x_start(**{"qvd.client.geometry": "1024x768 bad"})
    assert raw_request(service.address, service.port,
                       b"GET /vma/no_such_method HTTP/1.1\r\nConnection: close\r\n" + AUTH + b"\r\n"
                       ).startswith(b"HTTP/1.1 404")
    assert raw_request(service.address, service.port, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400")


def test_keep_alive_serves_several_requests_on_one_connection(make_vma):
    service, _ = make_vma()
    answer = raw_request(service.address, service.port,
                         b"GET /vma/ping HTTP/1.1\r\n" + AUTH + b"\r\nGET /vma/x_state HTTP/1.1\r\nConnection: close\r\n"
                         + AUTH + b"\r\n")
    assert answer.count(b"HTTP/1.1 200 OK") == 2
    assert answer.endswith(b'"stopped"\r\n')


def test_ping_expire_and_unknown_state_methods(make_vma):
    _, client = make_vma()
    assert client.ping() is True
    assert client.call("ping") == 1
    assert client.call("expire", **{"vm.expiration.soft": "2030-01-01", "vm.expiration.hard": ""}) == 1
    assert client.call("x_suspend") == "stopped"
    assert client.call("x_stop") == "stopped"


def echo_roundtrip(client, address, payload):
    with client.display(address) as s:
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
    payload = os.urandom(1 << 20) + b"\x00\r\n\xff"
    for _ in range(3):
        assert client.x_start(**{"qvd.client.geometry": "800x600"}) == "starting"     # arms a new key
        assert echo_roundtrip(client, service.address, payload) == payload
        wait_state(client, "suspended")
    assert service.desktop.sessions == 3


def test_x_state_transitions(make_vma):
    service, client = make_vma()
    assert client.x_state() == "stopped"
    assert client.x_start() == "starting"
    assert client.x_state() == "listening"
    conn = client.display(service.address)
    wait_state(client, "connected")
    # A second x_start while connected suspends the session and fails, as the original.
    with pytest.raises(VmaError, match="in state connected, suspending it"):
        client.x_start()
    assert conn.recv(10) == b""  # the desktop dropped the old client
    conn.close()
    assert client.x_state() == "suspended"
    assert client.x_start() == "starting"  # resume
    assert client.x_state() == "listening"
    conn = client.display(service.address)
    wait_state(client, "connected")
    assert client.call("x_suspend") == "suspended"
    conn.close()
    assert client.x_start() == "starting"
    assert client.call("x_stop") == "stopping"
    assert client.x_state() == "stopped"
    with pytest.raises(ConnectionRefusedError):
        client.display(service.address)     # x_stop disarmed the display


def test_every_call_needs_the_agent_key_and_a_refused_one_changes_nothing(make_vma):
    service, client = make_vma()
    wrong = VmaClient(service.address, service.port, timeout=4, key=display_gate.new_key())
    keyless = VmaClient(service.address, service.port, timeout=4)
    for caller, why in ((keyless, "no agent key"), (wrong, "wrong agent key")):
        for method in ("ping", "x_state", "x_start", "x_suspend", "x_stop", "expire", "poweroff", "no_such"):
            with pytest.raises(VmaError, match=f"refused: {why} \\(401\\)"):
                caller.call(method, **{display_gate.PARAM: display_gate.new_key()})
    answer = raw_request(service.address, service.port, b"GET /vma/ping HTTP/1.1\r\nAuthorization: Basic "
                         + AGENT_KEY.encode() + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b'WWW-Authenticate: Bearer realm="qvd-vma"' in answer
    gevent.sleep(0.2)               # a poweroff would have been called back by now
    assert client.x_state() == "stopped" and service.desktop.sessions == 0
    with pytest.raises(OSError):
        socket.create_connection((service.address, 4100), timeout=2)  # no x_start got through


def closed_unanswered(sock):
    """The peer closed without sending a byte (a reset: it closed with our bytes unread).
    A receive timeout raises instead: silence is not a refusal."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_the_display_admits_only_the_armed_connection_once(make_vma):
    service, client = make_vma()
    assert client.x_start() == "starting"
    spent = client.display_key
    # no preamble at all, a preamble with a key nobody armed, silence: closed unanswered
    for opening in (b"GET / HTTP/1.0\r\n\r\n" + b"x" * 60, display_gate.preamble(display_gate.new_key()), b""):
        with socket.create_connection((service.address, 4100), timeout=5) as s:
            s.sendall(opening)
            if not opening:
                s.shutdown(socket.SHUT_WR)
            assert closed_unanswered(s)
    assert client.x_state() == "listening" and service.desktop.sessions == 0   # nothing reached the desktop
    conn = client.display(service.address)
    conn.sendall(b"mine\n")
    assert conn.recv(100) == b"mine\n"
    with pytest.raises(ConnectionRefusedError):
        open_display(service.address, 4100, spent, timeout=5)      # a key admits one connection only
    conn.sendall(b"still mine\n")
    assert conn.recv(100) == b"still mine\n"                      # and the refusal did not disturb it
    assert service.gate.refused == 4 and service.gate.admitted == 1
    conn.close()


def test_a_new_arming_closes_the_previous_display_connection(make_vma):
    service, client = make_vma()
    assert client.x_start() == "starting"
    old = client.display(service.address)
    wait_state(client, "connected")
    old_key = client.display_key
    with pytest.raises(VmaError, match="in state connected"):
        client.x_start()            # a takeover: the new session's key is armed at once
    assert old.recv(10) == b""      # the holder's connection is gone
    old.close()
    with pytest.raises(ConnectionRefusedError):
        open_display(service.address, 4100, old_key, timeout=5)
    assert client.x_start() == "starting"
    new = client.display(service.address)
    new.sendall(b"new session\n")
    assert new.recv(100) == b"new session\n"
    new.close()


def test_an_older_claims_x_start_is_refused_and_leaves_the_display_alone(make_vma):
    """A contender aborted mid-way may still have an x_start on its way: it must not arm the
    display over the session that took the VM from it (qvd.display.generation: the claim's)."""
    service, client = make_vma()
    assert client.x_start(**{display_gate.GENERATION_PARAM: "20"}) == "starting"
    conn = client.display(service.address)
    conn.sendall(b"newer\n")
    assert conn.recv(100) == b"newer\n"
    with pytest.raises(VmaError, match="a newer session"):
        client.x_start(**{display_gate.GENERATION_PARAM: "19"})
    conn.sendall(b"still mine\n")
    assert conn.recv(100) == b"still mine\n"
    assert service.gate.generation == 20
    conn.close()


def _x_start_in_any_state(client, **params):
    try:
        client.x_start(**params)
    except VmaError as exc:                   # a takeover while connected: armed all the same
        assert "in state connected" in str(exc)


def test_the_gate_tells_a_takeover_of_an_open_connection_from_one_its_l7r_closed(make_vma):
    """The L7R closes a session's display connection before it releases the session's row,
    and a newer session claims only after that release: a connection still open when the
    newer session arms the display means two sessions overlapped. The gate counts those."""
    service, client = make_vma()
    client.x_start(**{display_gate.GENERATION_PARAM: "1"})
    first = client.display(service.address)
    wait_state(client, "connected")
    first.close()                                                  # its L7R let go first
    _x_start_in_any_state(client, **{display_gate.GENERATION_PARAM: "2"})
    assert service.gate.taken_while_open == 0
    second = client.display(service.address)
    wait_state(client, "connected")
    _x_start_in_any_state(client, **{display_gate.GENERATION_PARAM: "3"})   # taken while open
    assert service.gate.taken_while_open == 1
    assert second.recv(10) == b""
    second.close()


def test_silent_strangers_do_not_hold_up_the_armed_client(make_vma):
    service, client = make_vma({"internal.vma.display.key_timeout": "30"})
    assert client.x_start() == "starting"
    strangers = [socket.create_connection((service.address, 4100), timeout=5) for _ in range(8)]
    try:
        conn = client.display(service.address)
        conn.sendall(b"through\n")
        assert conn.recv(100) == b"through\n"
        conn.close()
    finally:
        for s in strangers:
            s.close()


def test_an_unauthenticated_vma_serves_everyone_as_the_original(make_vma):
    service, client = make_vma(key=None)
    assert client.ping() is True
    assert client.x_start() == "starting"
    with socket.create_connection((service.address, 4100), timeout=5) as s:
        s.sendall(b"no preamble\n")
        assert s.recv(100) == b"no preamble\n"


def test_the_gate_refuses_direct_nxagent_with_a_key():
    with pytest.raises(ValueError, match="vma.nxagent.direct"):
        VmaService(Config({"vma.nxagent.direct": "1"}, None), "127.0.0.1", desktop="nx", key=AGENT_KEY)


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


def test_x_start_refuses_client_nxagent_options_outside_the_allowlist(make_vma, tmp_path):
    """The nx desktop's x_start: what a client may put in qvd.client.nxagent.extra_args is
    an allowlist of link and display options; anything else fails the x_start, nxagent unstarted."""
    service, client = make_vma(desktop="nx", run_dir=str(tmp_path))
    for extra in ("listen=tcp:0.0.0.0:4000", "connect=tcp:evil.example:4000", "errors=/etc/passwd",
                  "clipboard=both", "cache=8M\n", "cache=8M,slave=1"):
        with pytest.raises(VmaError, match="qvd.client.nxagent.extra_args"):
            client.x_start(**{"qvd.client.nxagent.extra_args": extra})
        assert client.call("x_state") == "stopped"
    assert not (tmp_path / "nxagent.conf").exists()
