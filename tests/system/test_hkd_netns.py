"""The whole HKD with the `netns` hypervisor inside a test namespace (docs/testing.md#network-safety).

The node runs in a namespace the test made (bridge, 10.77.x addresses, dnsmasq, VM
namespaces all inside it, no route out); it reaches PostgreSQL through the embedded
server's unix socket, which crosses network namespaces. A VM is started the way the L7R
starts it (vm_cmd + NOTIFY), gets its address by DHCP from our dnsmasq, answers the VMA
ping, and is stopped with nothing left behind.
"""
import json
import os
import shutil
import sys

import gevent
import pytest
from helpers.hkd_env import add_host, add_vms, start_vm, stop_vm, vm_row, wait_vm_state
from helpers.netns import VM_NET, hkd_node_conf, processes_mentioning, test_host  # noqa: F401

pytestmark = pytest.mark.root

DRIVER = """
from qvd_gevent.config import Config
from qvd_gevent.db import Database, make_green
from qvd_gevent.db.listen import Listener
from qvd_gevent.hkd import HKD
make_green()
conf = os.environ["QVD_TEST_CONF"]
cfg = Config.load(conf)
db = Database.from_config(cfg)
listener = Listener(db).start()
listener.wait_connected(10)
hkd = HKD(cfg, db, listener)
hkd.start()
open(os.environ["QVD_TEST_READY"], "w").write("ready")
# the test drives the VM through the database; it touches this file when done
deadline = time.monotonic() + 90
while not os.path.exists(os.environ["QVD_TEST_DONE"]) and time.monotonic() < deadline:
    gevent.sleep(0.1)
hkd.stop(timeout=10)
links = os.popen("ip -o link show").read()
listener.stop()
db.close()
report(dict(links=links))
"""


def test_netns_vm_started_by_command_gets_dhcp_address_and_stops_clean(test_host, tmp_path, pg_server,  # noqa: F811
                                                                        fresh_db_name):
    if pg_server.embedded is None:
        pytest.skip("needs the embedded PostgreSQL (its unix socket reaches into the test namespace)")
    init = shutil.which("qvd-vm-init", path=os.path.dirname(sys.executable))
    if not init:
        pytest.skip("qvd-vm-init is not installed (pip install -e .)")
    from qvd_gevent.config import Config
    from qvd_gevent.db import Database

    conf = hkd_node_conf(test_host, tmp_path, pg_server, fresh_db_name)
    db = Database.from_config(Config.load(str(conf)))
    try:
        host_id = add_host(db, "test-node", f"{VM_NET}.0.1")      # the gateway address on the bridge
        (vm_id,) = add_vms(db, di_path=init)
        db.execute("UPDATE vms SET ip = %s WHERE id = %s", (f"{VM_NET}.0.150", vm_id))
        ready, done = tmp_path / "ready", tmp_path / "done"
        driver = gevent.spawn(test_host.python, DRIVER, timeout=150,
                              env={"QVD_TEST_CONF": str(conf), "QVD_TEST_READY": str(ready),
                                   "QVD_TEST_DONE": str(done)})
        for _ in range(300):
            if ready.exists() or driver.ready():
                break
            gevent.sleep(0.1)
        if driver.ready():
            driver.get()                       # raises with the driver's output
        assert ready.exists(), "HKD did not start in the test namespace"
        assert db.query_one("SELECT state FROM host_runtimes WHERE host_id = %s", (host_id,))[0] == "running"

        start_vm(db, vm_id, host_id)
        row = wait_vm_state(db, vm_id, "running", timeout=40)
        assert row["vm_address"] == f"{VM_NET}.0.150"          # leased from our dnsmasq
        hosts_file = (tmp_path / "run" / "dhcp-hostsfile").read_text()
        assert f"{VM_NET}.0.150" in hosts_file
        # the VMA answers inside the namespace (the HKD only calls it running after a ping)
        url = f"http://{VM_NET}.0.150:3030/vma/ping"
        ping = test_host.run([sys.executable, "-c", f"import urllib.request; urllib.request.urlopen({url!r}, timeout=3)"])
        assert ping.returncode == 0, ping.stderr

        stop_vm(db, vm_id)
        row = wait_vm_state(db, vm_id, "stopped", timeout=30)
        assert row["host_id"] is None and row["vm_address"] is None
        assert f"{VM_NET}.0.150" not in (tmp_path / "run" / "dhcp-hostsfile").read_text()
        assert test_host.vm_namespaces() == []
        done.write_text("1")
        result, _ = driver.get(timeout=60)
        assert "qvdbr0" not in result["links"]                 # vm.network.setup removed what it made
        assert db.query_one("SELECT state FROM host_runtimes WHERE host_id = %s", (host_id,))[0] == "stopped"
        assert vm_row(db, vm_id)["vm_state"] == "stopped"
    finally:
        (tmp_path / "done").write_text("1")
        db.close()
    assert processes_mentioning(json.dumps(str(tmp_path)).strip('"')) == []


def test_netns_node_killed_and_restarted_adopts_its_vm(test_host, tmp_path, pg_server, fresh_db_name):  # noqa: F811
    import subprocess
    if pg_server.embedded is None:
        pytest.skip("needs the embedded PostgreSQL (its unix socket reaches into the test namespace)")
    init = shutil.which("qvd-vm-init", path=os.path.dirname(sys.executable))
    if not init:
        pytest.skip("qvd-vm-init is not installed (pip install -e .)")
    from qvd_gevent.config import Config
    from qvd_gevent.db import Database
    conf = hkd_node_conf(test_host, tmp_path, pg_server, fresh_db_name)
    db = Database.from_config(Config.load(str(conf)))
    log_path = tmp_path / "hkd.log"
    procs = []

    def start_node():
        with open(log_path, "ab") as log:
            proc = test_host.popen([sys.executable, "-m", "qvd_gevent.hkd", "--config", str(conf)],
                                   stdout=subprocess.PIPE, stderr=log)
        procs.append(proc)
        line = proc.stdout.readline()
        assert line.strip() == b"READY", f"HKD did not start: {log_path.read_text()[-3000:]}"
        return proc

    try:
        host_id = add_host(db, "test-node", f"{VM_NET}.0.1")
        (vm_id,) = add_vms(db, di_path=init)
        db.execute("UPDATE vms SET ip = %s WHERE id = %s", (f"{VM_NET}.0.151", vm_id))
        node = start_node()
        start_vm(db, vm_id, host_id)
        before = wait_vm_state(db, vm_id, "running", timeout=40)
        node.kill()
        node.wait(10)

        node = start_node()                             # a crashed node's dnsmasq must not block this
        row = vm_row(db, vm_id)
        assert row["vm_state"] == "running" and row["vm_pid"] == before["vm_pid"]
        assert f"{VM_NET}.0.151" in (tmp_path / "run" / "dhcp-hostsfile").read_text()   # re-registered
        url = f"http://{VM_NET}.0.151:3030/vma/ping"
        ping = test_host.run([sys.executable, "-c", f"import urllib.request; urllib.request.urlopen({url!r}, timeout=3)"])
        assert ping.returncode == 0, ping.stderr
        stop_vm(db, vm_id)
        wait_vm_state(db, vm_id, "stopped", timeout=30)
        assert test_host.vm_namespaces() == []
        node.terminate()
        assert node.wait(30) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        db.close()
