"""Small pure helpers of the HKD: load-balancer figures, MAC derivation, DI paths."""
import os

from qvd_gevent.config import Config
from qvd_gevent.hkd.vm_runner import di_full_path, mac_from_ip
from qvd_gevent.system.procfs import usable_cpu, usable_ram_mb


def test_usable_ram_is_memtotal_kb_over_1000(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       16384000 kB\nMemFree:  1 kB\n")
    assert usable_ram_mb(str(f)) == 16384.0


def test_usable_cpu_is_80_percent_of_bogomips(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nbogomips\t: 4000.00\n\nprocessor\t: 1\nbogomips\t: 4000.00\n")
    assert usable_cpu(str(f)) == 6400.0


def test_usable_cpu_without_bogomips_falls_back_to_cpu_count(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: some arm\n")     # arm64 kernels show no bogomips
    assert usable_cpu(str(f)) == (os.cpu_count() or 1) * 1000.0


def test_mac_from_ip_as_the_reference():
    assert mac_from_ip("54:52:00", "10.0.1.100") == "54:52:00:00:01:64"


def test_di_path_relative_to_images_unless_absolute(tmp_path):
    conf = tmp_path / "node.conf"
    conf.write_text("nodename = n\npath.storage.root = /srv/qvd\n")
    cfg = Config.load(str(conf))
    assert di_full_path(cfg, "10000-ubuntu.qcow2") == "/srv/qvd/images/10000-ubuntu.qcow2"
    assert di_full_path(cfg, "/usr/bin/qvd-vm-init") == "/usr/bin/qvd-vm-init"
