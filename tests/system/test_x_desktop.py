"""The x desktop (the browser client's): TigerVNC's Xvnc on a free local display, its root
window painted RGB (52, 101, 164), a clock on it, reached only through the VMA.

A minimal RFB viewer (tests/helpers/rfb.py) reads the whole framebuffer in Raw encoding
and counts the background's pixels."""
import os
import shutil
import socket
import stat

import gevent
import pytest
from helpers.nodes import wait_for
from helpers.rfb import RfbViewer

from qvd_gevent.config import Config
from qvd_gevent.vma.xstate import TIMEOUT_KEYS
from qvd_gevent.vma.xvnc import XvncDesktop

NEEDED = ("Xvnc", "xsetroot", "xclock")
BACKGROUND = (52, 101, 164)


@pytest.fixture
def desktop(tmp_path):
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the x desktop needs {', '.join(missing)} (scripts/install-test-deps.sh installs them)")
    cfg = Config({"vma.x.display.first": str(320 + os.getpid() % 40 * 3)}, None)
    made = XvncDesktop(cfg, str(tmp_path), {state: cfg.get(key) for state, key in TIMEOUT_KEYS.items()})
    yield made
    made.close()


def connect(desktop):
    """A connection the VMA would have admitted, served by the desktop in a greenlet."""
    ours, theirs = socket.socketpair()
    acked = []
    server = gevent.spawn(desktop.serve, theirs, lambda: acked.append(1))
    ours.settimeout(10)
    return ours, server, acked


def test_x_desktop_shows_the_background_and_a_clock_and_survives_the_viewer(desktop, tmp_path):
    assert desktop.x_state() == "stopped"
    assert desktop.x_start({"qvd.client.geometry": "800x600"}) == "starting"
    wait_for(lambda: desktop.x_state() == "listening", 20, "Xvnc listening")
    # RFB only on a unix socket in the run folder, mode 0600: no TCP port of Xvnc's own
    mode = os.stat(desktop.socket_path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    for port in (5900 + desktop.display, 5900, 6000 + desktop.display):
        probe = socket.socket()
        assert probe.connect_ex(("127.0.0.1", port)) != 0, f"Xvnc listens on TCP {port}"
        probe.close()
    # X clients only through /tmp/.X11-unix (a VM's private /tmp), no abstract socket, which
    # every process of the network namespace could dial
    with open("/proc/net/unix") as fh:
        x_sockets = [line.split()[-1] for line in fh if f".X11-unix/X{desktop.display}" in line]
    assert f"/tmp/.X11-unix/X{desktop.display}" in x_sockets and not [s for s in x_sockets if s.startswith("@")], \
        x_sockets

    viewer_sock, server, acked = connect(desktop)
    viewer = RfbViewer(viewer_sock).handshake()
    assert acked == [1]
    assert (viewer.width, viewer.height) == (800, 600)
    wait_for(lambda: desktop.x_state() == "connected", 5, "x_state connected")

    def painted():
        counts = viewer.frame()
        background = counts.get(BACKGROUND, 0)
        # most of the screen is the background; the clock draws other colours on it
        return background > 0.8 * 800 * 600 and sum(counts.values()) - background > 1000
    wait_for(painted, 20, "background colour and a clock on the x desktop")
    assert any(p.args[0] == "xclock" and p.poll() is None for p in desktop.programs)

    viewer_sock.close()
    server.join(timeout=5)
    wait_for(lambda: desktop.x_state() == "suspended", 5, "x_state suspended after the viewer left")
    # the next x_start resumes the same desktop: same display, programs still running
    display = desktop.display
    assert desktop.x_start({}) == "starting"
    assert desktop.x_state() == "listening" and desktop.display == display
    viewer_sock, server, acked = connect(desktop)
    viewer = RfbViewer(viewer_sock).handshake()
    assert viewer.frame().get(BACKGROUND, 0) > 0.8 * 800 * 600
    viewer_sock.close()

    assert desktop.x_stop() == "stopping"
    wait_for(lambda: desktop.x_state() == "stopped", 20, "x_state stopped")
    assert not desktop.programs


def test_a_connection_while_no_session_listens_is_closed_unanswered(desktop):
    viewer_sock, server, acked = connect(desktop)
    server.join(timeout=5)
    assert acked == [] and viewer_sock.recv(10) == b""


def test_the_vma_serves_the_x_desktop_only_through_its_armed_display_port(tmp_path):
    """qvd-vma --desktop x: x_start (as a browser session asks: qvd.display.protocol=rfb)
    arms the display port; the armed connection gets RFB, the VNC server has no port of
    its own, and the next arming ends the previous viewer."""
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the x desktop needs {', '.join(missing)} (scripts/install-test-deps.sh installs them)")
    from qvd_gevent.vma import display_gate
    from qvd_gevent.vma.client import VmaClient, open_display
    from qvd_gevent.vma.server import VmaService
    agent_key = display_gate.new_key()
    address = f"127.102.{os.getpid() % 250 + 1}.1"
    cfg = Config({"vma.x.display.first": str(330 + os.getpid() % 40 * 3)}, None)
    service = VmaService(cfg, address, port=0, desktop="auto", run_dir=str(tmp_path), key=agent_key).start()
    vma = VmaClient(address, service.port, timeout=5, key=agent_key)
    try:
        first = display_gate.new_key()
        assert vma.x_start(**{"qvd.vm.desktop": "x", "qvd.display.protocol": "rfb",
                              display_gate.PARAM: first}) == "starting"
        assert service.desktop.kind == "x"
        wait_for(lambda: vma.x_state() == "listening", 20, "x desktop listening")
        viewer = RfbViewer(open_display(address, 4100, first, timeout=5)).handshake()
        assert viewer.frame().get(BACKGROUND, 0) > 0.8 * viewer.width * viewer.height
        wait_for(lambda: vma.x_state() == "connected", 5, "x_state connected")

        # a takeover: x_start arms a new key and the first viewer's connection ends
        second = display_gate.new_key()
        try:
            vma.x_start(**{display_gate.PARAM: second})
        except Exception:
            pass                                  # "connected, suspending it": the L7R retries
        vma.x_start(**{display_gate.PARAM: second})
        with pytest.raises(OSError):
            viewer.io.settimeout(5)
            viewer.frame()
        wait_for(lambda: vma.x_state() == "listening", 10, "listening again")
        viewer = RfbViewer(open_display(address, 4100, second, timeout=5)).handshake()
        assert viewer.frame().get(BACKGROUND, 0) > 0.8 * viewer.width * viewer.height
    finally:
        service.stop()


def test_a_browser_session_on_the_nx_desktop_is_refused_with_a_clear_message(tmp_path):
    from qvd_gevent.vma import display_gate
    from qvd_gevent.vma.client import VmaClient, VmaError
    from qvd_gevent.vma.server import VmaService
    agent_key = display_gate.new_key()
    address = f"127.102.{os.getpid() % 250 + 1}.2"
    service = VmaService(Config({}, None), address, port=0, desktop="nx", run_dir=str(tmp_path), key=agent_key).start()
    try:
        with pytest.raises(VmaError, match="cannot be shown in a browser"):
            VmaClient(address, service.port, timeout=5, key=agent_key).x_start(
                **{"qvd.display.protocol": "rfb", display_gate.PARAM: display_gate.new_key()})
        assert service.desktop.x_state() == "stopped"
    finally:
        service.stop()
