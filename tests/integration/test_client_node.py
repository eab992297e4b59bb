"""The demo's path, all real: qvd-client -> L7R -> HKD starts the VM (process hypervisor,
image = the installed qvd-vm-init) -> qvd-vma's echo desktop, in one node in this process."""
import subprocess
import sys

import pytest
from helpers.full_node import start_full_node

from qvd_gevent.node.demo import DEMO_PASSWORD, DEMO_USER


@pytest.fixture
def full_node(tmp_path, pg_server, fresh_db_name):
    node, vm_id, cert = start_full_node(tmp_path, pg_server, fresh_db_name)
    yield node, vm_id, cert
    node.stop(0)


def test_demo_line_gives_bytes_to_and_from_the_vm(full_node):
    node, vm_id, cert = full_node
    base = [sys.executable, "-c", "from qvd_gevent.client.cli import main; main()", "--host", "127.0.0.1",
            "--port", str(node.l7r.port), "--user", DEMO_USER, "--password", DEMO_PASSWORD, "--ca", cert]
    listed = subprocess.run(check=False, args=base + ["list"], capture_output=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.decode().splitlines()[1].split()[:3] == [str(vm_id), "demo", "stopped"]
    # the line `qvd-node demo` prints: the echo comes back on the command's stderr
    result = subprocess.run(check=False, args=base + ["connect", "--vm", str(vm_id), "--exec", "sh", "-c",
                                                      "echo hello from the demo VM; head -n 1 >&2"],
                            capture_output=True, timeout=120)
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert "qvd-client: Starting virtual machine" in err
    assert "qvd-client: Connection established" in err
    assert err.rstrip().endswith("hello from the demo VM")
    again = subprocess.run(check=False, args=base + ["list"], capture_output=True, timeout=60)
    assert again.stdout.decode().splitlines()[1].split()[:3] == [str(vm_id), "demo", "running"]
