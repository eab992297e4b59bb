"""A real NX session on the VMA's nx desktop, with Debian's nx-libs (issue 5, item 5):
directly, through qvd-client and a scripted L7R, and through this project's L7R.

Chain (all on this machine, loopback only):
    xlogo --X11--> nxagent :D (started by qvd-vma on x_start, listens on tcp *:4000+D)
          <--NX--> nxproxy -S localhost:D (client side, connects to 127.0.0.1:4000+D)
          --X11--> Xvfb :X (stands in for the user's screen)

Invocations found by experiment with nx-libs 3.5.99.26:
    nxagent :D -ac -name QVD -nolisten tcp -display nx/nx,options=<file>:D
        <file> = "nx/nx,keyboard=pc105/us,link=adsl,geometry=800x600,tolerancechecks=risky:D"
        logs "Session: Starting session at ..." then waits on tcp:*:4000+D;
        "Session: Session started at ..." when nxproxy has connected;
        "Session: Suspending session" / "Session suspended" when the proxy goes away.
    DISPLAY=:X nxproxy -S localhost:D     (the client side; ":D" means port 4000+D)
By default the VMA runs nxagent on a free local display L with ``listen=unix:<run
dir>/nxagent.sock`` in its options (no TCP port at all) and its display gate on
<address>:4000+D admits the connection armed by x_start and relays it there; the first
test reaches it through the gate's open form (an unauthenticated VMA, as the original)
so that a bare nxproxy can dial it, the others through keyed gates (qvd-client and an
L7R in front), and one checks the original's direct layout (vma.nxagent.direct).
The test uses D and X away from 100 so it never collides with a VMA on port 4100.
"""
import os
import re
import shutil
import struct
import subprocess
import sys

import gevent
import pytest
from helpers.nodes import wait_for

from qvd_gevent.config import Config
from qvd_gevent.vma.client import VmaClient
from qvd_gevent.vma.display_gate import new_key
from qvd_gevent.vma.server import VmaService

pytestmark = pytest.mark.slow

NEEDED = ("nxagent", "nxproxy", "Xvfb", "xlogo", "xwininfo", "xwd")



def x_output(argv, env):
    return subprocess.run(check=False, args=argv, capture_output=True, env=env, timeout=10).stdout.decode(errors="replace")


def screenshot(display, env):
    """The client's screen as (bytes_per_line, bytes_per_pixel, pixels) from xwd."""
    data = subprocess.run(check=False, args=["xwd", "-root", "-silent", "-display", f":{display}"], capture_output=True,
                          env=env, timeout=10).stdout
    header_size, = struct.unpack(">I", data[0:4])
    width, = struct.unpack(">I", data[16:20])
    bytes_per_line, = struct.unpack(">I", data[48:52])
    ncolors, = struct.unpack(">I", data[76:80])
    return bytes_per_line, bytes_per_line // width, data[header_size + 12 * ncolors:]


def count_pixels(shot, x0, y0, width, height):
    """(white, black) pixels in a rectangle of a 32-bpp TrueColor screenshot."""
    bytes_per_line, bytes_per_pixel, pixels = shot
    assert bytes_per_pixel == 4, bytes_per_pixel
    white = black = 0
    for y in range(y0, y0 + height):
        row = pixels[y * bytes_per_line + 4 * x0: y * bytes_per_line + 4 * (x0 + width)]
        for i in range(0, len(row), 4):
            rgb = row[i:i + 4]
            if rgb in (b"\xff\xff\xff\xff", b"\xff\xff\xff\x00", b"\x00\xff\xff\xff"):
                white += 1
            elif rgb in (b"\x00\x00\x00\x00", b"\x00\x00\x00\xff", b"\xff\x00\x00\x00"):
                black += 1
    return white, black


def wait_xlogo_on_screen(screen_display, env):
    """xlogo runs on nxagent's display inside the "VM" (100x100, black logo on white);
    nxagent mirrors its window into its own "QVD" window on the client's X server, and
    the pixels get there only through the NX link."""
    def xlogo_window():
        tree = x_output(["xwininfo", "-root", "-tree", "-display", f":{screen_display}"], env)
        if '"QVD": ("NXAgent" "NXAgent")' not in tree:
            return None
        match = re.search(r"100x100\+-?\d+\+-?\d+\s+\+(\d+)\+(\d+)", tree)
        return (int(match.group(1)), int(match.group(2))) if match else None
    x, y = wait_for(xlogo_window, 20, "xlogo's window on the client's X server")

    def xlogo_pixels_drawn():
        white, black = count_pixels(screenshot(screen_display, env), x, y, 100, 100)
        return white > 1000 and black > 300
    wait_for(xlogo_pixels_drawn, 20, "xlogo's black-on-white pixels on the client's X server")


def stop(proc):
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def displays():
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"NX test needs {', '.join(missing)} (scripts/install-test-deps.sh installs them)")
    base = 150 + os.getpid() % 30 * 3
    agent, screen = base, base + 1
    for d in (agent, screen, base + 2):
        if os.path.exists(f"/tmp/.X{d}-lock"):
            pytest.skip(f"display :{d} is in use on this machine")
    return agent, screen


def test_nx_session_comes_up_and_an_x_client_draws(displays, tmp_path):
    agent_display, screen_display = displays
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), NX_HOME=str(home))
    xvfb = proxy = None
    cfg = Config({"internal.nxagent.display": str(agent_display), "command.x-session": "xlogo"}, None)
    vma = VmaService(cfg, "127.0.0.1", port=0, desktop="nx", run_dir=str(tmp_path), key=None).start()
    client = VmaClient("127.0.0.1", vma.port, timeout=4)
    try:
        xvfb = subprocess.Popen(["Xvfb", f":{screen_display}", "-nolisten", "tcp", "-noreset", "-screen", "0", "1024x768x24"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(f"/tmp/.X11-unix/X{screen_display}"), 10, "Xvfb")

        assert client.x_state() == "stopped"
        assert client.x_start(**{"qvd.client.geometry": "800x600", "qvd.client.keyboard": "pc105/us",
                                 "qvd.client.link": "adsl", "qvd.vm.user.name": "qvd"}) == "starting"
        options = (tmp_path / "nxagent.conf").read_text().strip()
        # nxagent runs on a free local display, listening on a unix socket only, behind the
        # VMA's display gate on 127.0.0.1:4000+D; the client still dials 4000+D.
        local = vma.desktop.agent_display
        assert local != agent_display
        assert options == (f"nx/nx,keyboard=pc105/us,link=adsl,geometry=800x600,"
                           f"listen=unix:{tmp_path}/nxagent.sock,tolerancechecks=risky:{local}")
        wait_for(lambda: client.x_state() == "listening", 15, "x_state listening")
        wait_for(lambda: os.path.exists(tmp_path / "nxagent.sock"), 15, "nxagent's socket")
        listening = x_output(["ss", "-ltnpH"], os.environ)
        assert f"pid={vma.desktop.agent.pid}," not in listening, listening     # no TCP port of its own
        # nor an abstract X socket, which every process of the network namespace could dial
        with open("/proc/net/unix") as fh:
            x_sockets = [line.split()[-1] for line in fh if f".X11-unix/X{local}" in line]
        assert f"/tmp/.X11-unix/X{local}" in x_sockets and not [s for s in x_sockets if s.startswith("@")], x_sockets

        proxy = subprocess.Popen(["nxproxy", "-S", f"localhost:{agent_display}"],
                                 env=dict(env, DISPLAY=f":{screen_display}"),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: client.x_state() == "connected", 20, "x_state connected")
        log = (tmp_path / "nxagent.log").read_text(errors="replace")
        assert "Session: Starting session at" in log
        assert "Session: Session started at" in log

        wait_xlogo_on_screen(screen_display, env)

        stop(proxy)  # the user goes away: nxagent suspends by itself
        wait_for(lambda: client.x_state() == "suspended", 20, "x_state suspended")

        # the next x_start resumes it, and nxagent listens on its socket again
        assert client.x_start(**{"qvd.client.geometry": "800x600", "qvd.client.link": "adsl"}) == "starting"
        wait_for(lambda: client.x_state() == "listening", 20, "x_state listening again")
        proxy = subprocess.Popen(["nxproxy", "-S", f"localhost:{agent_display}"],
                                 env=dict(env, DISPLAY=f":{screen_display}"),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: client.x_state() == "connected", 20, "x_state connected after the resume")
        stop(proxy)
        wait_for(lambda: client.x_state() == "suspended", 20, "x_state suspended again")

        assert client.call("x_stop") == "stopping"
        wait_for(lambda: client.x_state() == "stopped", 25, "x_state stopped")
        assert "Session: Session terminated at" in (tmp_path / "nxagent.log").read_text(errors="replace")
    finally:
        stop(proxy)
        vma.stop()
        stop(xvfb)


def test_nx_session_through_qvd_client(displays, tmp_path):
    """nxproxy -> qvd-client --listen -> (TLS, connect_to_vm, 102s, 101) -> L7R -> nxagent.

    The L7R here is the scripted one of tests/helpers/scripted_l7r.py (the original's
    bytes, then a splice to the VM's display port), as the project's L7R was not there
    to test against when this was written. nxproxy is started as the original client
    starts it: ``nxproxy -S localhost:P`` against qvd-client listening on 4000+P.
    """
    from helpers.scripted_l7r import ScriptedL7R, make_cert
    agent_display, screen_display = displays
    proxy_port = agent_display + 2  # nxproxy dials 4000 + this, where qvd-client listens
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), NX_HOME=str(home))
    xvfb = proxy = qvd_client = None
    cfg = Config({"internal.nxagent.display": str(agent_display), "command.x-session": "xlogo"}, None)
    vma = VmaService(cfg, "127.0.0.1", port=0, desktop="nx", run_dir=str(tmp_path), key=new_key()).start()
    vma_client = VmaClient("127.0.0.1", vma.port, timeout=4, key=vma.key)
    cert, key = make_cert(str(tmp_path))
    l7r = ScriptedL7R(cert, key, vma, x_port=4000 + agent_display,
                      x_start_params={"qvd.client.geometry": "800x600", "qvd.client.link": "adsl"})
    try:
        xvfb = subprocess.Popen(["Xvfb", f":{screen_display}", "-nolisten", "tcp", "-noreset", "-screen", "0", "1024x768x24"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(f"/tmp/.X11-unix/X{screen_display}"), 10, "Xvfb")
        qvd_client = subprocess.Popen(
            [sys.executable, "-c", "from qvd_gevent.client.cli import main; main()",
             "--host", "127.0.0.1", "--port", str(l7r.port), "--user", "qvd", "--password", "qvd", "--ca", cert,
             "connect", "--vm", "10", "--listen", f"127.0.0.1:{4000 + proxy_port}", "--count", "1"],
            env=env, stderr=subprocess.PIPE)
        line = b""
        with gevent.Timeout(15):
            while b"listening on" not in line:
                line = qvd_client.stderr.readline()
                assert line, "qvd-client exited before listening"
        proxy = subprocess.Popen(["nxproxy", "-S", f"localhost:{proxy_port}"],
                                 env=dict(env, DISPLAY=f":{screen_display}"),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: vma_client.x_state() == "connected", 30, "x_state connected")
        assert "Session: Session started at" in (tmp_path / "nxagent.log").read_text(errors="replace")
        wait_xlogo_on_screen(screen_display, env)
        stop(proxy)
        wait_for(lambda: vma_client.x_state() == "suspended", 20, "x_state suspended")
        assert qvd_client.wait(timeout=15) == 0
        assert b"Connection established" in qvd_client.stderr.read()
    finally:
        stop(proxy)
        stop(qvd_client)
        l7r.stop()
        vma.stop()
        stop(xvfb)


def test_direct_layout_nxagent_listens_itself(displays, tmp_path):
    agent_display, _ = displays
    cfg = Config({"internal.nxagent.display": str(agent_display), "vma.nxagent.direct": "1"}, None)
    vma = VmaService(cfg, "127.0.0.1", port=0, desktop="nx", run_dir=str(tmp_path)).start()
    client = VmaClient("127.0.0.1", vma.port, timeout=4)
    try:
        assert client.x_start(**{"qvd.client.geometry": "640x480"}) == "starting"
        assert (tmp_path / "nxagent.conf").read_text().strip() == \
            f"nx/nx,keyboard=pc105/en,link=adsl,geometry=640x480,tolerancechecks=risky:{agent_display}"
        wait_for(lambda: client.x_state() == "listening", 15, "x_state listening")
        assert vma.gate.server is None
        listening = x_output(["ss", "-ltnp", f"sport = :{4000 + agent_display}"], os.environ)
        assert "nxagent" in listening
        assert client.call("x_stop") == "stopping"
        wait_for(lambda: client.x_state() == "stopped", 25, "x_state stopped")
    finally:
        vma.stop()


def test_nx_session_through_the_l7r(displays, tmp_path, pg_server, fresh_db_name):
    """The whole chain of issue 5 item 5 with this project's L7R (real PostgreSQL):
    xlogo -> nxagent (qvd-vma nx desktop) <- L7R splice <- TLS <- qvd-client --listen
    <- nxproxy -S localhost:P -> Xvfb. The VM is seeded as running at the VMA (no HKD)."""
    from types import SimpleNamespace

    from helpers.nodes import seeded_node
    agent_display, screen_display = displays
    proxy_port = agent_display + 2
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), NX_HOME=str(home))
    node = seeded_node(tmp_path, pg_server, fresh_db_name, extra={"internal.l7r.timeout.x_start": 15}, users=False,
                       start=False, with_hkd=False)
    seed, host_id, cert = node.seed, node.host_id, node.cert
    vm_id = seed.vm("nx-vm", seed.user("qvd", "qvd"), seed.osf())
    cfg = Config({"internal.nxagent.display": str(agent_display), "command.x-session": "xlogo"}, None)
    vma = VmaService(cfg, "127.0.0.1", port=0, desktop="nx", run_dir=str(tmp_path), key=new_key()).start()
    seed.running_at(vm_id, host_id, SimpleNamespace(vma_port=vma.port, x_port=4000 + agent_display, key=vma.key))
    node.start()
    vma_client = VmaClient("127.0.0.1", vma.port, timeout=4, key=vma.key)
    xvfb = proxy = qvd_client = None
    try:
        xvfb = subprocess.Popen(["Xvfb", f":{screen_display}", "-nolisten", "tcp", "-noreset", "-screen", "0", "1024x768x24"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(f"/tmp/.X11-unix/X{screen_display}"), 10, "Xvfb")
        qvd_client = subprocess.Popen(
            [sys.executable, "-c", "from qvd_gevent.client.cli import main; main()",
             "--host", "127.0.0.1", "--port", str(node.svc.port), "--user", "qvd", "--password", "qvd",
             "--ca", str(cert), "connect", "--vm", str(vm_id), "--geometry", "800x600", "--keyboard", "pc105/es",
             "--listen", f"127.0.0.1:{4000 + proxy_port}", "--count", "1"],
            env=env, stderr=subprocess.PIPE)
        line = b""
        with gevent.Timeout(15):
            while b"listening on" not in line:
                line = qvd_client.stderr.readline()
                assert line, "qvd-client exited before listening"
        proxy = subprocess.Popen(["nxproxy", "-S", f"localhost:{proxy_port}"],
                                 env=dict(env, DISPLAY=f":{screen_display}"),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: vma_client.x_state() == "connected", 30, "x_state connected")
        options = (tmp_path / "nxagent.conf").read_text()
        assert "keyboard=pc105/es" in options and "geometry=800x600" in options  # the client's params arrived
        wait_xlogo_on_screen(screen_display, env)
        state = node.db.query_one("SELECT user_state FROM vm_runtimes WHERE vm_id = %s", (vm_id,))[0]
        assert state == "connected"
        stop(proxy)
        wait_for(lambda: vma_client.x_state() == "suspended", 20, "x_state suspended")
        assert qvd_client.wait(timeout=15) == 0
        wait_for(lambda: node.db.query_one("SELECT user_state FROM vm_runtimes WHERE vm_id = %s",
                                           (vm_id,))[0] == "disconnected", 15, "the L7R to release the VM")
    finally:
        stop(proxy)
        stop(qvd_client)
        node.close()
        vma.stop()
        stop(xvfb)


def test_nx_desktop_of_a_whole_node(displays, tmp_path, pg_server, fresh_db_name):
    """`qvd-node demo --desktop nx` as a test: HKD starts the VM (process hypervisor, image
    qvd-vm-init, VM property qvd.vm.desktop=nx), the L7R splices, qvd-client --listen and
    nxproxy on the client side; the NX session reaches the client's X server."""
    from helpers.full_node import start_full_node

    from qvd_gevent.node.demo import DEMO_PASSWORD, DEMO_USER
    _, screen_display = displays
    proxy_port = displays[0] + 2
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), NX_HOME=str(home))
    node, vm_id, cert = start_full_node(tmp_path, pg_server, fresh_db_name, desktop="nx")
    xvfb = proxy = qvd_client = None
    client_log = tmp_path / "client.log"
    client_log.write_text("")
    try:
        xvfb = subprocess.Popen(["Xvfb", f":{screen_display}", "-nolisten", "tcp", "-noreset", "-screen", "0", "1024x768x24"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(f"/tmp/.X11-unix/X{screen_display}"), 10, "Xvfb")
        qvd_client = subprocess.Popen(
            [sys.executable, "-c", "from qvd_gevent.client.cli import main; main()",
             "--host", "127.0.0.1", "--port", str(node.l7r.port), "--user", DEMO_USER, "--password", DEMO_PASSWORD,
             "--ca", cert, "connect", "--vm", str(vm_id), "--listen", f"127.0.0.1:{4000 + proxy_port}",
             "--count", "1"], env=env, stderr=client_log.open("wb"))
        wait_for(lambda: "listening on" in client_log.read_text(), 15, "qvd-client listening")
        proxy = subprocess.Popen(["nxproxy", "-S", f"localhost:{proxy_port}"],
                                 env=dict(env, DISPLAY=f":{screen_display}"),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def nxagent_window():
            tree = x_output(["xwininfo", "-root", "-tree", "-display", f":{screen_display}"], env)
            return '"QVD": ("NXAgent" "NXAgent")' in tree
        try:
            wait_for(nxagent_window, 60, "nxagent's window on the client's X server")
        except AssertionError:
            logs = {p.name: p.read_text(errors="replace")[-3000:] for p in tmp_path.rglob("*.log")}
            raise AssertionError(f"no NX session; logs: {logs}") from None
        wait_for(lambda: node.db.query_one("SELECT user_state FROM vm_runtimes WHERE vm_id = %s",
                                           (vm_id,))[0] == "connected", 10, "user_state connected")
        stop(proxy)
        assert qvd_client.wait(timeout=20) == 0
        assert "Connection established" in client_log.read_text()
    finally:
        stop(proxy)
        stop(qvd_client)
        node.stop(0)
        stop(xvfb)
