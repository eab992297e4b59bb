"""Domain XML of kvm and lxc VMs as pure functions (no libvirt, no I/O)."""
import xml.etree.ElementTree as ET

import pytest

from qvd_gevent.config.network import mac_for_ip
from qvd_gevent.hypervisors.base import HypervisorError, VmSpec
from qvd_gevent.hypervisors.kvm import KvmDomainSettings, kvm_domain_xml
from qvd_gevent.hypervisors.libvirt_common import domain_name, event_name, parse_domain_metadata, vm_id_of
from qvd_gevent.hypervisors.lxc import basefs_name, lxc_domain_xml


def spec(**kw):
    values = {"vm_id": 42, "name": "desk <&> 1", "ip": "10.0.1.100", "mac": mac_for_ip("10.0.1.100"), "memory": 512,
                  "di_id": 7, "di_path": "/var/lib/qvd/storage/images/ubuntu.qcow2"}
    values.update(kw)
    return VmSpec(**values)


def parse(xml):
    return ET.fromstring(xml)


def test_kvm_disk_boot_with_overlay_virtio_and_serial_log():
    settings = KvmDomainSettings(domain_type="kvm", cpus=2, virtio=True, bridge="qvdnet",
                                 disk_path="/s/overlays/7-42-overlay.qcow2", disk_format="qcow2",
                                 serial_log="/tmp/qvd/qvd-42-serial.txt", overlay="/s/overlays/7-42-overlay.qcow2")
    root = parse(kvm_domain_xml(spec(), settings))
    assert root.get("type") == "kvm"
    assert root.findtext("name") == "qvd-42"
    assert root.findtext("title") == "desk <&> 1"                 # escaped in XML, intact when read
    assert root.find("memory").get("unit") == "MiB" and root.findtext("memory") == "512"
    assert root.findtext("vcpu") == "2"
    assert root.find("os/boot").get("dev") == "hd" and root.find("os/kernel") is None
    assert root.find("features/acpi") is not None                 # ACPI shutdown needs it
    assert root.find("cpu").get("mode") == "host-passthrough"
    disk = root.find("devices/disk")
    assert disk.find("source").get("file") == "/s/overlays/7-42-overlay.qcow2"
    assert disk.find("driver").get("type") == "qcow2"
    assert disk.find("target").get("bus") == "virtio" and disk.find("readonly") is None
    nic = root.find("devices/interface")
    assert nic.get("type") == "bridge" and nic.find("source").get("bridge") == "qvdnet"
    assert nic.find("mac").get("address") == "54:52:00:00:01:64"   # docs/hkd.md#addresses-and-mac's example
    assert nic.find("model").get("type") == "virtio"
    assert root.find("devices/serial").get("type") == "file"
    assert root.find("devices/serial/source").get("path") == "/tmp/qvd/qvd-42-serial.txt"
    assert root.find("devices/graphics") is None


def test_kvm_tcg_direct_kernel_boot_without_disk():
    settings = KvmDomainSettings(domain_type="qemu", cpus=1, virtio=False, bridge="br9", kernel="/k/vmlinuz",
                                 initrd="/k/initrd.img", cmdline="console=ttyS0 quiet")
    root = parse(kvm_domain_xml(spec(di_path=""), settings))
    assert root.get("type") == "qemu" and root.find("cpu") is None
    assert root.findtext("os/kernel") == "/k/vmlinuz"
    assert root.findtext("os/initrd") == "/k/initrd.img"
    assert root.findtext("os/cmdline") == "console=ttyS0 quiet"
    assert root.find("devices/disk") is None
    assert root.find("devices/interface/model").get("type") == "e1000"    # a real model, not none
    assert root.find("devices/serial") is None


def test_kvm_image_without_overlay_is_read_only():
    for virtio, bus in ((True, "virtio"), (False, "scsi")):
        settings = KvmDomainSettings(virtio=virtio, disk_path="/img/base.raw", disk_format="raw", disk_readonly=True)
        disk = parse(kvm_domain_xml(spec(use_overlay=False), settings)).find("devices/disk")
        assert disk.find("readonly") is not None and disk.find("target").get("bus") == bus
        assert disk.find("driver").get("type") == "raw"


@pytest.mark.parametrize("change, message", [
    ({"settings": {"domain_type": "xen"}}, "domain type"),
    ({"spec": {"memory": 0}}, "memory"),
    ({"settings": {"disk_path": None, "kernel": ""}}, "neither a disk image nor vm.kvm.kernel"),
])
def test_kvm_invalid_inputs_are_refused_with_a_reason(change, message):
    settings = {"domain_type": "qemu", "disk_path": "/x.qcow2"}
    settings.update(change.get("settings", {}))
    with pytest.raises(HypervisorError, match=message):
        kvm_domain_xml(spec(**change.get("spec", {})), KvmDomainSettings(**settings))


def test_metadata_round_trip_gives_what_adoption_needs():
    xml = kvm_domain_xml(spec(), KvmDomainSettings(disk_path="/o.qcow2", overlay="/o.qcow2"))
    meta = parse_domain_metadata(xml)
    assert meta["vm_id"] == "42" and meta["ip"] == "10.0.1.100" and meta["mac"] == "54:52:00:00:01:64"
    assert meta["di_id"] == "7" and meta["overlay"] == "/o.qcow2"
    assert parse_domain_metadata("<domain type='kvm'><name>other</name></domain>") == {}
    assert parse_domain_metadata("not xml") == {}


def test_domain_names():
    assert domain_name(5) == "qvd-5"
    assert vm_id_of("qvd-5") == 5
    assert vm_id_of("qvd-x") is None and vm_id_of("test") is None and vm_id_of("qvd-5-old") is None


def test_event_names():
    assert event_name(5, 0) == "STOPPED" and event_name(2, 0) == "STARTED"
    assert event_name(6, 0) == "SHUTDOWN_FINISHED" and event_name(6, 1) == "SHUTDOWN"
    assert event_name(99) == "EVENT99"


def test_lxc_container_xml():
    root = parse(lxc_domain_xml(spec(), rootfs="/s/rootfs/42-fs", bridge="qvdnet", init="/sbin/init",
                                extras={"rootfs": "/s/rootfs/42-fs"}))
    assert root.get("type") == "lxc" and root.findtext("name") == "qvd-42"
    assert root.findtext("os/type") == "exe" and root.findtext("os/init") == "/sbin/init"
    fs = root.find("devices/filesystem")
    assert fs.find("source").get("dir") == "/s/rootfs/42-fs" and fs.find("target").get("dir") == "/"
    nic = root.find("devices/interface")
    assert nic.find("source").get("bridge") == "qvdnet"
    assert nic.find("mac").get("address") == "54:52:00:00:01:64"
    assert parse_domain_metadata(ET.tostring(root, encoding="unicode"))["rootfs"] == "/s/rootfs/42-fs"
    test_root = parse(lxc_domain_xml(spec(), rootfs="/r", bridge="b", domain_type="test"))
    assert test_root.get("type") == "test"
    with pytest.raises(HypervisorError, match="lxc domain type"):
        lxc_domain_xml(spec(), rootfs="/r", bridge="b", domain_type="kvm")
    with pytest.raises(HypervisorError, match="root filesystem"):
        lxc_domain_xml(spec(), rootfs="", bridge="b")


def test_the_agent_key_reaches_kvm_guests_by_fw_cfg_and_containers_by_their_init_environment():
    key = "K" * 43
    kvm = parse(kvm_domain_xml(spec(agent_key=key), KvmDomainSettings(disk_path="/o.qcow2")))
    entries = kvm.findall("sysinfo[@type='fwcfg']/entry")
    assert [(e.get("name"), e.text) for e in entries] == [("opt/qvd/vma-secret", key)]
    assert key not in ET.tostring(kvm.find("metadata"), encoding="unicode")      # adoption reads it from the database
    assert parse(kvm_domain_xml(spec(), KvmDomainSettings(disk_path="/o"))).find("sysinfo") is None    # legacy
    lxc = parse(lxc_domain_xml(spec(agent_key=key), rootfs="/r", bridge="b"))
    assert [(e.get("name"), e.text) for e in lxc.findall("os/initenv")] == [("QVD_VMA_SECRET", key)]
    legacy = parse(lxc_domain_xml(spec(), rootfs="/r", bridge="b"))         # vm.vma.legacy_unauthenticated
    assert [(e.get("name"), e.text) for e in legacy.findall("os/initenv")] == [("QVD_VMA_UNAUTHENTICATED", "1")]


@pytest.mark.parametrize("path, name", [
    ("/i/ubuntu.tar.gz", "ubuntu"), ("/i/ubuntu.tgz", "ubuntu"), ("/i/deb.tar.xz", "deb"),
    ("/i/deb.tar", "deb"), ("/i/deb.tar.bz2", "deb"), ("/i/rootdir/", "rootdir"),
])
def test_basefs_name_drops_the_tarball_extension(path, name):
    assert basefs_name(path) == name
