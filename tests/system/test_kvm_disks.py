"""The kvm hypervisor's disks with the real qemu-img: per-VM qcow2 overlays on the DI image (no libvirt, no root)."""
import json
import os
import shutil
import subprocess

import pytest

from qvd_gevent.config import Config
from qvd_gevent.hypervisors.base import HypervisorError, VmSpec

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                reason="qemu-img is not installed (package qemu-utils)")


def _hv(tmp_path, persistent=False):
    from qvd_gevent.hypervisors.kvm import KvmHypervisor
    cfg = Config({"path.storage.root": str(tmp_path / "storage"), "vm.overlay.persistent": "1" if persistent else "0",
                  "vm.kvm.accel": "tcg", "path.serial.captures": str(tmp_path / "serial")})
    return KvmHypervisor(cfg)


def _image(tmp_path, fmt):
    path = tmp_path / "images" / f"base.{fmt}"
    path.parent.mkdir(exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), "8M"], check=True, timeout=30)
    return path


def _info(path):
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], check=True, capture_output=True,
                         text=True, timeout=30).stdout
    return json.loads(out)


def _spec(image, use_overlay=True):
    return VmSpec(vm_id=9, name="vm9", ip="10.0.0.109", mac="54:52:00:00:00:6d", memory=256, di_id=4,
                  di_path=str(image), use_overlay=use_overlay)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_overlay_is_made_on_the_image_with_its_format_and_removed_at_release(tmp_path, fmt):
    hv = _hv(tmp_path)
    image = _image(tmp_path, fmt)
    extras = hv.prepare(_spec(image))
    overlay = tmp_path / "storage" / "overlays" / "4-9-overlay.qcow2"
    assert extras["overlay"] == extras["disk_path"] == str(overlay)
    assert extras["disk_format"] == "qcow2" and not extras["disk_readonly"] and extras["domain_type"] == "qemu"
    info = _info(overlay)
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == str(image) and info["backing-filename-format"] == fmt
    assert "<source file=\"%s\"" % overlay in hv.domain_xml(_spec(image), extras)
    hv.release(extras)
    assert not overlay.exists() and image.exists()


def test_persistent_overlay_is_reused_and_kept(tmp_path):
    hv = _hv(tmp_path, persistent=True)
    image = _image(tmp_path, "raw")
    extras = hv.prepare(_spec(image))
    overlay = extras["overlay"]
    before = os.stat(overlay).st_ino
    hv.release(extras)
    assert os.path.exists(overlay)                           # kept with vm.overlay.persistent
    assert os.stat(hv.prepare(_spec(image))["overlay"]).st_ino == before      # reused, not recreated


def test_non_persistent_overlay_is_recreated_at_each_start(tmp_path):
    hv = _hv(tmp_path)
    image = _image(tmp_path, "raw")
    overlay = hv.prepare(_spec(image))["overlay"]
    with open(overlay, "ab") as fh:                           # the guest "wrote" to it
        fh.write(b"\0" * 65536)
    grown = os.path.getsize(overlay)
    assert os.path.getsize(hv.prepare(_spec(image))["overlay"]) < grown


def test_without_overlay_the_image_is_used_read_only(tmp_path):
    hv = _hv(tmp_path)
    image = _image(tmp_path, "qcow2")
    extras = hv.prepare(_spec(image, use_overlay=False))
    assert extras["disk_path"] == str(image) and extras["disk_readonly"] and extras["disk_format"] == "qcow2"
    assert not extras["overlay"]
    assert not (tmp_path / "storage" / "overlays").exists()


def test_missing_image_is_refused_with_its_path(tmp_path):
    hv = _hv(tmp_path)
    with pytest.raises(HypervisorError, match="missing.qcow2 is not a regular file"):
        hv.prepare(_spec(tmp_path / "missing.qcow2"))


def test_user_disk_is_made_once_with_its_size_and_kept(tmp_path):
    hv = _hv(tmp_path)
    image = _image(tmp_path, "raw")
    spec = _spec(image)
    spec.user_storage_size = 64
    extras = hv.prepare(spec)
    home = tmp_path / "storage" / "homes" / "9-data.qcow2"
    assert extras["home_disk"] == str(home) and _info(home)["virtual-size"] == 64 * 1048576
    assert 'dev="vdb"' in hv.domain_xml(spec, extras)
    before = os.stat(home).st_ino
    hv.release(extras)
    assert os.stat(home).st_ino == before and os.stat(hv.prepare(spec)["home_disk"]).st_ino == before
