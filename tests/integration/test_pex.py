"""Single-file deployment: build dist/qvd-node.pex, then run --version and the demo from it.

The demo runs with a PATH that holds none of the pip-installed console scripts, so every
command it prints (qvd-client, qvd-admin) and the VM image (qvd-vm-init) come from the pex.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pex_file():
    if not shutil.which("pex"):
        pytest.skip("pex is not installed (pip install pex; scripts/install-test-deps.sh installs it)")
    out = Path(tempfile.mkdtemp(prefix="qvd-pex-")) / "qvd-node.pex"
    subprocess.run([shutil.which("pex"), str(ROOT), "-c", "qvd-node", "-o", str(out),
                    "--python-shebang", "/usr/bin/env python3"], check=True, timeout=600,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    os.chmod(out.parent, 0o755)
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)


def _clean_env(home):
    python_dir = os.path.dirname(os.path.realpath(sys.executable))
    return {"PATH": f"{python_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), "PEX_ROOT": str(home / ".pex"),
            "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"}


def test_pex_version(pex_file, tmp_path):
    run = subprocess.run([str(pex_file), "--version"], capture_output=True, text=True, timeout=120,
                         env=_clean_env(tmp_path))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("qvd-gevent ")


def test_demo_from_the_pex(pex_file):
    home = Path(tempfile.mkdtemp(prefix="qvd-pex-demo-"))
    os.chmod(home, 0o777)
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"] if os.geteuid() == 0 else []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _clean_env(home)
    proc = subprocess.Popen(drop + [str(pex_file), "demo", "--dir", str(home / "d"), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=str(home), start_new_session=True)
    try:
        client_line, seen = None, []
        deadline = time.time() + 180
        while time.time() < deadline and client_line is None:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "--exec" in line:
                client_line = line.strip()
        assert client_line, "".join(seen)
        assert str(home / "d" / "bin" / "qvd-client") in client_line, client_line
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        run = subprocess.run(drop + ["sh", "-c", client_line], capture_output=True, text=True, timeout=120, env=env)
        assert "hello from the demo VM" in run.stdout + run.stderr, run.stdout + run.stderr
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        shutil.rmtree(home, ignore_errors=True)
    assert proc.returncode == 0, out
