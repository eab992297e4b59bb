"""The seed's own steps (seed/000, issue 2 "Done when"), run through qvd-admin."""
import os
import shutil
import subprocess
import sys

import pytest
from helpers.admin import Admin, self_signed


@pytest.fixture
def admin(node_conf, db):
    return Admin(node_conf, db)

SEED_CONFIG = [
    "vm.network.ip.start=10.3.15.50",
    "vm.network.netmask=24",
    "vm.network.gateway=10.3.15.1",
    "vm.network.dns_server=10.3.15.254",
    "vm.network.bridge=qvdnet0",
]


def test_seed_steps_then_vm_list_shows_an_ip_from_the_range(admin, tmp_path, cfg):
    for setting in SEED_CONFIG:
        res = admin.ok("config", "set", setting)
        assert res.out == "" and res.err == ""
    key, cert = self_signed(tmp_path)
    assert admin.ok("config", "ssl", f"key={key}", f"cert={cert}").out == \
        "SSL certificate, private key, ca and crl set.\n"
    assert admin.ok("host", "add", "name=test-node", "address=10.3.15.2").out == "Host added with id 10000\n"
    assert admin.ok("osf", "add", "name=desktop").out == "OSF added with id 10000\n"
    image = shutil.which("qvd-vm-init") or sys.executable
    assert admin.ok("di", "add", f"path={image}", "osf=desktop").out == "DI added with id 10000\n"
    assert admin.ok("user", "add", "login=qvd", "password=qvd").out == "User added with id 10000\n"
    assert admin.ok("vm", "add", "name=sample_vm", "user=qvd", "osf=desktop").out == "VM added with id 10000\n"

    listing = admin.ok("vm", "list").out.splitlines()
    assert listing[0].split()[:4] == ["Id", "Name", "User", "RealUser"]
    assert set(listing[1]) == {"-"}
    row = listing[2].split()
    assert row[:3] == ["10000", "sample_vm", "qvd"]
    assert row[4] == "10.3.15.254"  # top-down from the broadcast, inside 10.3.15.50-254
    assert "stopped" in row and "disconnected" in row

    got = admin.ok("config", "get", "vm.network.ip.start", "vm.network.netmask", "vm.network.bridge").out
    assert got == "vm.network.bridge=qvdnet0\nvm.network.ip.start=10.3.15.50\nvm.network.netmask=24\n"
    # the DI is a copy of the image, executable, named <id>-<basename>
    copied = tmp_path / "storage" / "images" / f"10000-{os.path.basename(image)}"
    assert copied.is_file() and os.access(copied, os.X_OK)


def test_installed_console_scripts_work(node_conf, tmp_path):
    """qvd-admin and qvd-admin.pl as installed by pip, in a subprocess."""
    for script in ("qvd-admin", "qvd-admin.pl"):
        exe = shutil.which(script)
        assert exe, f"{script} is not installed (pip install -e .)"
    res = subprocess.run(["qvd-admin.pl", "--config", str(node_conf), "config", "set", "vm.network.netmask=24"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res
    res = subprocess.run(["qvd-admin", "host", "add", "name=n1", "--config", str(node_conf), "address=10.0.0.1"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert (res.returncode, res.stdout) == (0, "Host added with id 10000\n"), res
    res = subprocess.run(["qvd-admin", "--config", str(node_conf), "vm", "frobnicate"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 1
    assert res.stderr == "Error: vm: 'frobnicate' not implemented\n"
    res = subprocess.run(["qvd-admin", "--config", str(tmp_path / "missing.conf"), "host", "list"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "does not exist" in res.stderr
