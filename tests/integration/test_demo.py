"""`qvd-node demo` as a user meets it: one command, then the printed qvd-client line.

Runs the installed console scripts in subprocesses. As root (CI) the demo runs as the
unprivileged user `nobody`, proving it needs no root.
"""
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time

import pytest


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port, timeout, host="127.0.0.1"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.2)
    return False


def _as_user():
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if not setpriv:
        pytest.skip("running as root without setpriv: cannot drop to an unprivileged user for the demo")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def _start_demo(directory, port, *extra, host="127.0.0.1", folder="d",
                until=lambda line: "--exec" in line and "qvd-client" in line):
    env = dict(os.environ, HOME=str(directory), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(_as_user() + [shutil.which("qvd-node"), "demo", "--dir", str(directory / folder),
                                          "--port", str(port), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=str(directory), start_new_session=True)
    lines, client_line = [], None
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if until(line):
            client_line = line.strip()
            break
    assert client_line, "demo printed no line to follow:\n" + "".join(lines)
    assert _wait_port(port, 60, host), "the demo's L7R never listened:\n" + "".join(lines)
    return proc, client_line, lines


def _stop(proc):
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return proc.returncode, out


@pytest.fixture
def demo_dir():
    """A folder the unprivileged demo user can reach (pytest's own tmp folders are 0700)."""
    import pathlib
    import tempfile
    # not under /tmp: a VM has a private /tmp, where the demo's folder would be out of view anyway
    path = pathlib.Path(tempfile.mkdtemp(prefix="qvd-demo-test-", dir="/var/tmp"))
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_demo_one_command_then_the_printed_client_line(demo_dir):
    tmp_path = demo_dir
    port = _free_port()
    proc, client_line, lines = _start_demo(tmp_path, port)
    try:
        assert any("qvd-client" in line and line.strip().endswith(" list") for line in lines)
        run = subprocess.run(_as_user() + ["sh", "-c", client_line], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, HOME=str(tmp_path)))
        assert run.returncode == 0, run.stdout + run.stderr
        assert "hello from the demo VM" in run.stdout + run.stderr
        assert "Connection established" in run.stderr
        conf = tmp_path / "d" / "node.conf"
        listing = subprocess.run(_as_user() + [shutil.which("qvd-admin"), "--config", str(conf), "vm", "list"],
                                 capture_output=True, text=True, timeout=30)
        assert listing.returncode == 0, listing.stderr
        assert re.search(r"\bdemo\b.*\brunning\b", listing.stdout), listing.stdout
        _assert_the_vm_sees_nothing_of_the_demo(tmp_path / "d")
    finally:
        code, out = _stop(proc)
    assert code == 0, out
    assert "node stopped" in out
    if _as_user():
        assert "VMs run as this node's user (uid 65534), in user and mount namespaces" in out
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _cmdline_mentions(p, str(tmp_path))]


def _assert_the_vm_sees_nothing_of_the_demo(directory):
    """What the demo's VM sees of the demo's folder, looked at through its own root
    (/proc/<pid>/root: the VM's mount namespace): no node.conf, database, password or key."""
    marker = f"QVD_NODE_RUN={directory / 'run'}".encode()
    inits = [int(p) for p in os.listdir("/proc") if p.isdigit() and _cmdline_mentions(p, "qvd-vm-init")
             and os.getpgid(int(p)) != int(p) and marker in _environ(p).split(b"\0")]
    assert inits, "no VM init found"
    view = f"/proc/{inits[0]}/root{directory}"
    assert (directory / "node.conf").read_text() and (directory / "db.password").read_text()
    for name in ("node.conf", "db.password"):       # an empty read-only file it cannot open
        with open(f"{view}/{name}") as fh:
            assert fh.read() == "", name
        assert os.stat(f"{view}/{name}").st_mode & 0o777 == 0
    assert os.listdir(f"{view}/pg") == [] and os.listdir(f"{view}/ssl") == []
    assert os.listdir(f"{view}/run") == ["vms"] and os.listdir(f"{view}/run/vms") == [os.listdir(directory / "run" / "vms")[0]]


def _environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _cmdline_mentions(pid, text):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return text.encode() in fh.read()
    except OSError:
        return False


def test_demo_run_twice_reuses_its_folder(demo_dir):
    tmp_path = demo_dir
    port = _free_port()
    proc, _, _ = _start_demo(tmp_path, port)
    _stop(proc)
    proc, client_line, lines = _start_demo(tmp_path, port)
    try:
        assert not any("schema deployed" in line for line in lines), "the second run deployed again"
        run = subprocess.run(_as_user() + shlex.split(client_line.split(" --exec ")[0]) + ["--exec", "sh", "-c",
                             "echo again; head -n 1 >&2"], capture_output=True, text=True, timeout=60)
        assert "again" in run.stdout + run.stderr, run.stderr
    finally:
        code, out = _stop(proc)
    assert code == 0, out


def _addresses_of_this_machine():
    """This machine's IPv4 and IPv6 addresses other than loopback (iproute2)."""
    out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        address = fields[3].split("/")[0]
        if fields[1] != "lo" and not address.startswith("fe80:"):
            found.append(address)
    return found


def _reachable(address, port):
    try:
        socket.create_connection((address, port), timeout=3).close()
        return True
    except OSError:
        return False


def test_demo_listens_on_loopback_unless_told_otherwise(demo_dir):
    """Anyone who reaches the demo may log in as demo/demo: by default only this machine can."""
    others = _addresses_of_this_machine()
    assert others, "this machine has no address besides loopback to try the demo's port on"
    port = _free_port()
    proc, _, _ = _start_demo(demo_dir, port)
    try:
        listeners = [line.split()[1] for line in open("/proc/net/tcp").read().splitlines()[1:] + \
                     open("/proc/net/tcp6").read().splitlines()[1:]
                     if line.split()[3] == "0A" and line.split()[1].endswith(f":{port:04X}")]
        assert listeners == [f"0100007F:{port:04X}"], listeners        # 127.0.0.1 and nothing else
        assert not [address for address in others if _reachable(address, port)]
    finally:
        _stop(proc)
    address = others[0]
    proc, client_line, lines = _start_demo(demo_dir, port, "--listen", address, host=address)
    try:
        assert f"--host {address} " in client_line
        assert not _reachable("127.0.0.1", port)
        run = subprocess.run(_as_user() + ["sh", "-c", client_line], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, HOME=str(demo_dir)))
        assert "hello from the demo VM" in run.stdout + run.stderr, run.stdout + run.stderr
    finally:
        code, out = _stop(proc)
    assert code == 0, out


def test_two_demos_in_two_folders_on_one_machine_both_connect(demo_dir):
    """Each demo's VM 1 gets an address of its own (the node's range is its own)."""
    demos = []
    try:
        for folder in ("one", "two"):
            port = _free_port()
            proc, client_line, _ = _start_demo(demo_dir, port, folder=folder)
            demos.append(proc)
            run = subprocess.run(_as_user() + shlex.split(client_line.split(" --exec ")[0]) +
                                 ["--exec", "sh", "-c", f"echo hello from {folder}; head -n 1 >&2"],
                                 capture_output=True, text=True, timeout=60)
            assert f"hello from {folder}" in run.stdout + run.stderr, run.stdout + run.stderr
        ranges = {(demo_dir / folder / "run" / "process-vms" / "address-range").read_text() for folder in ("one", "two")}
        assert len(ranges) == 2
    finally:
        outcomes = [_stop(proc) for proc in demos]
    assert [code for code, _ in outcomes] == [0, 0], outcomes


def test_demo_x_desktop_at_the_printed_url(demo_dir):
    """`qvd-node demo --desktop x` (as nobody when the test runs as root): the page at the
    printed URL, its web login with demo/demo and the desktop's WebSocket, as the page
    does them (tests/helpers/web_client.py), show the x desktop: its background colour
    over most of the screen. The real browser does the same against a whole node in
    tests/system/test_browser_client.py."""
    import gevent
    from helpers.rfb import RfbViewer
    from helpers.web_client import open_desktop, web_login
    missing = [tool for tool in ("Xvnc", "xsetroot", "xclock") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the x desktop needs {', '.join(missing)} (scripts/install-test-deps.sh installs them)")
    port = _free_port()
    proc, url, lines = _start_demo(demo_dir, port, "--desktop", "x",
                                   until=lambda line: line.strip().startswith("https://"))
    try:
        assert url == f"https://127.0.0.1:{port}/"
        cert = str(demo_dir / "d" / "ssl" / "cert.pem")
        status, _, answer = web_login(port, cert, "demo", "demo")
        assert status == 200, answer
        [vm] = answer["vms"]
        status, _, desktop = open_desktop(port, cert, vm["id"], vm["token"])
        assert status == 101, desktop
        with gevent.Timeout(90):
            viewer = RfbViewer(desktop).handshake()
        assert viewer.frame().get((52, 101, 164), 0) > 0.8 * viewer.width * viewer.height
        desktop.close()
    finally:
        code, out = _stop(proc)
    assert code == 0, out
