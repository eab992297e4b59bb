"""The pure parts of VM confinement: the uid range check, the VM's environment, what a DI
needs (docs/hkd.md#vm-confinement). The confinement itself is tried from inside real VMs:
tests/integration/test_process_hypervisor.py, tests/system/test_netns_hypervisor.py."""
import os

import pytest

from qvd_gevent.config import Config
from qvd_gevent.hypervisors.base import HypervisorError
from qvd_gevent.hypervisors.sandbox import VmSandbox, _kept_path, closed_to_others, vm_environment
from qvd_gevent.hypervisors.vm_accounts import VmUids

USERS = [("root", 0), ("alice", 1000), ("nobody", 65534)]
GROUPS = [("root", 0), ("staff", 50), ("nogroup", 65534)]
SUBORDINATES = [("subordinate uids", "alice", 100000, 65536), ("subordinate gids", "alice", 100000, 65536)]


def uids(base, count=1000):
    return VmUids(Config({"vm.uid.base": base, "vm.uid.count": count}))


def test_a_free_range_passes_and_gives_one_uid_per_vm():
    vm_uids = uids(1900000000, 100000000)
    vm_uids.check(USERS, GROUPS, SUBORDINATES)
    assert vm_uids.uid_for(1) == 1900000001 and vm_uids.uid_for(42) == 1900000042
    with pytest.raises(HypervisorError, match="below vm.uid.count"):
        vm_uids.uid_for(100000000)


@pytest.mark.parametrize("base, count, what", [
    (1000, 10, "the user alice"),
    (60000, 5600, "the user nobody"),
    (40, 20, "the group staff"),
    (150000, 10, "subordinate uids of alice"),
    (90000, 10001, "subordinate uids of alice"),
    (0, 10, "within 1 .."),
    (2 ** 31 - 5, 10, "within 1 .."),
])
def test_a_range_holding_an_account_is_refused_with_one_line_naming_it(base, count, what):
    with pytest.raises(HypervisorError) as error:
        uids(base, count).check(USERS, GROUPS, SUBORDINATES)
    assert what in str(error.value) and "\n" not in str(error.value)


def test_the_vm_environment_is_built_from_scratch(monkeypatch):
    for name, value in (("QVD_CONFIG", "/etc/qvd/node.conf"), ("PGPASSWORD", "secret"), ("PYTHONPATH", "/src"),
                        ("LANG", "C.UTF-8"), ("HTTP_PROXY", "http://proxy:3128")):
        monkeypatch.setenv(name, value)
    env = vm_environment(Config({}), "/run/qvd/vms/7", {"QVD_VM_ID": "7"})
    assert env == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/run/qvd/vms/7",
                   "LANG": "C.UTF-8", "QVD_VM_ID": "7"}
    passed = vm_environment(Config({"vm.environment.pass": "PYTHONPATH, UNSET_NAME"}), "/h", {})
    assert passed["PYTHONPATH"] == "/src" and "UNSET_NAME" not in passed


def test_what_a_vm_keeps_of_a_di_under_tmp():
    assert _kept_path("/tmp/images/vm-init") == "/tmp/images"
    assert _kept_path("/tmp/vm-init") == "/tmp/vm-init"          # not the whole of the shared /tmp
    assert _kept_path("/usr/bin/qvd-vm-init") is None


def test_a_di_closed_to_other_users_is_named(tmp_path):
    folder = tmp_path / "closed"
    folder.mkdir(mode=0o700)
    di = folder / "init"
    di.write_text("#!/bin/sh\n")
    di.chmod(0o751)
    assert closed_to_others(str(di)) is not None
    folder.chmod(0o755)
    assert closed_to_others(str(di), start=str(folder)) == str(di)     # a script others cannot read
    di.chmod(0o755)
    assert closed_to_others(str(di), start=str(folder)) is None


def test_node_conf_run_folder_logs_and_keys_are_hidden(tmp_path):
    conf = tmp_path / "node.conf"
    conf.write_text(f"nodename = n\npath.run = {tmp_path}/run\npath.log = {tmp_path}/log\n"
                    f"path.l7r.ssl.key = /etc/ssl/private/qvd.pem\nvm.hidden_paths = /srv/secrets\n")
    hidden = VmSandbox(Config.load(str(conf))).hidden_paths()
    assert str(conf) in hidden and f"{tmp_path}/run" in hidden and f"{tmp_path}/log" in hidden
    assert {"/etc/ssl/private/qvd.pem", "/srv/secrets"} <= set(hidden)
    assert all(os.path.isabs(path) for path in hidden)
