"""What an operator sees of each command before it does anything: its version (written
once, in src/qvd_gevent/__init__.py, and read by setup.py) and its help."""
import ast
import pathlib
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from qvd_gevent import __version__

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _setup_call_keywords():
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    return {kw.arg: kw.value for kw in call.keywords}


def test_setup_py_takes_the_version_from_the_package():
    res = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == __version__


@pytest.mark.parametrize("command", ["qvd-node", "qvd-deploy-db", "qvd-client", "qvd-vma", "qvd-vm-init"])
def test_every_command_reports_the_same_version(command):
    res = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stdout, res.stderr) == (0, f"qvd-gevent {__version__}\n", "")


def test_h11_floor_excludes_the_request_smuggling_versions():
    requires = ast.literal_eval(_setup_call_keywords()["install_requires"])
    h11 = next(Requirement(r) for r in requires if Requirement(r).name == "h11")
    assert not h11.specifier.contains("0.15.0") and not h11.specifier.contains("0.14.0")
    assert h11.specifier.contains("0.16.0")


def test_node_help_mentions_the_demo():
    res = subprocess.run(["qvd-node", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "qvd-node demo" in res.stdout and "qvd-node demo --help" in res.stdout


def test_vm_init_help_is_its_own_usage_only():
    res = subprocess.run(["qvd-vm-init", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stderr == ""     # no log line
    assert res.stdout.startswith("usage: qvd-vm-init [-h] [--version]\n")
    assert "QVD_VM_DESKTOP" in res.stdout and "qvd-admin di add" in res.stdout
    for vma_option in ("--address", "--x-port", "--poweroff-exits", "--run-dir"):
        assert vma_option not in res.stdout
