"""qvd-admin di add / list / tag / untag / del (behaviour of the original's t/10-di-tag.t and more)."""
import datetime
import os
import stat

import pytest
from helpers.admin import Admin


@pytest.fixture
def admin(node_conf, db):
    return Admin(node_conf, db)

TODAY = datetime.date.today().strftime("%Y-%m-%d")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "staging" / "vm-init"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\necho hi\n")
    path.chmod(0o755)
    return path


def tags(db, di_id):
    return sorted(r[0] for r in db.query("SELECT tag FROM di_tags WHERE di_id = %s", (di_id,)))


def test_di_add_versions_tags_and_the_copied_file(admin, db, image, tmp_path):
    admin.ok("osf", "add", "name=one")
    admin.ok("osf", "add", "name=two")
    assert admin.ok("di", "add", f"path={image}", "osf=one").out == "DI added with id 10000\n"
    assert admin.ok("di", "add", f"path={image}", "osf_id=10000").out == "DI added with id 10001\n"
    admin.ok("di", "add", f"path={image}", "osf=two", "version=v7")
    assert tags(db, 10000) == [f"{TODAY}-000", "default"]
    assert tags(db, 10001) == [f"{TODAY}-001", "head"]
    assert tags(db, 10002) == ["default", "head", "v7"]
    assert db.query("SELECT tag FROM di_tags WHERE fixed ORDER BY id") == [(f"{TODAY}-000",), (f"{TODAY}-001",),
                                                                        ("v7",)]
    assert db.query("SELECT di_id, state FROM di_runtimes ORDER BY di_id") == [
        (10000, "published"), (10001, "published"), (10002, "published")]
    images = tmp_path / "storage" / "images"
    assert sorted(os.listdir(images)) == ["10000-vm-init", "10001-vm-init", "10002-vm-init"]
    copied = images / "10001-vm-init"
    assert copied.read_text() == image.read_text()
    assert stat.S_IMODE(copied.stat().st_mode) == 0o755
    assert db.query("SELECT path, version FROM dis WHERE id = 10001") == [("10001-vm-init", f"{TODAY}-001")]

    out = admin.ok("di", "list").out.splitlines()
    assert out[0].split() == ["Id", "OSF", "Version", "Path", "Tags"]
    assert out[2].split(None, 4) == ["10000", "10000", f"{TODAY}-000", "10000-vm-init", f"{TODAY}-000, default"]
    assert [line.split()[0] for line in admin.ok("di", "list", "-q", "-f", "tag=head").out.splitlines()] == \
        ["10001", "10002"]
    assert [line.split()[0] for line in admin.ok("di", "list", "-q", "-f", "osf=two").out.splitlines()] == ["10002"]
    admin.fails("di", "list", "-f", "tag=nothing", contains="matches no di")


def test_di_add_bad_input_leaves_no_row_and_no_file(admin, db, image, tmp_path):
    admin.ok("osf", "add", "name=one")
    admin.ok("di", "add", f"path={image}", "osf=one", "version=v1")
    admin.fails("di", "add", f"path={tmp_path / 'missing.img'}", "osf=one", contains="Unable to read disk image")
    admin.fails("di", "add", f"path={image}", "osf=ghost", contains="OSF 'ghost' not found")
    admin.fails("di", "add", f"path={image}", "osf_id=424242", contains="OSF 424242 does not exist")
    admin.fails("di", "add", f"path={image}", "osf=one", "osf_id=10000", contains="mutually exclusive")
    admin.fails("di", "add", f"path={image}", "osf=one", "version=v1", contains="already has a DI with version 'v1'")
    admin.fails("di", "add", "osf=one", contains="parameter 'path' is mandatory")
    admin.fails("di", "add", f"path={image}", contains="either parameter 'osf_id' or 'osf' is mandatory")
    admin.fails("di", "add", f"path={image}", "osf=one", "expire-hard=someday", contains="invalid datetime")
    assert os.listdir(tmp_path / "storage" / "images") == ["10000-vm-init"]


def test_di_tag_and_untag(admin, db, image):
    admin.ok("osf", "add", "name=one")
    admin.ok("di", "add", f"path={image}", "osf=one", "version=a")
    admin.ok("di", "add", f"path={image}", "osf=one", "version=b")
    assert admin.ok("di", "tag", "di_id=10000", "tag=stable").out == "DI tagged\n"
    assert admin.ok("di", "tag", "di_id=10001", "tag=stable").out == "DI tagged\n"
    assert tags(db, 10000) == ["a", "default"] and tags(db, 10001) == ["b", "head", "stable"]
    admin.ok("di", "tag", "di_id=10000", "tag=head")
    assert tags(db, 10000) == ["a", "default", "head"]
    admin.fails("di", "tag", "di_id=10001", "tag=a", contains="tag 'a' is fixed on DI 10000")
    admin.fails("di", "tag", "di_id=999", "tag=x", contains="DI 999 does not exist")
    admin.fails("di", "tag", "di_id=ten", "tag=x", contains="not a whole number")
    admin.fails("di", "tag", "di_id=10000", contains="parameter 'tag' is mandatory")
    admin.fails("di", "untag", "di_id=10000", "tag=stable", contains="DI 10000 is not tagged as 'stable'")
    admin.fails("di", "untag", "di_id=10000", "tag=a", contains="fixed")
    assert admin.ok("di", "untag", "di_id=10001", "tag=stable").out == ""
    assert tags(db, 10001) == ["b"]


def test_di_tag_sets_expirations_of_running_vms_on_another_di(admin, db, image):
    admin.ok("osf", "add", "name=one")
    admin.ok("di", "add", f"path={image}", "osf=one", "version=a")
    admin.ok("di", "add", f"path={image}", "osf=one", "version=b")
    admin.ok("user", "add", "login=u", "password=p")
    admin.ok("vm", "add", "name=v", "user=u", "osf=one", "di_tag=stable")
    db.execute("UPDATE vm_runtimes SET vm_state = 'running', current_di_id = 10000")
    admin.ok("di", "tag", "di_id=10001", "tag=stable", "expire-soft=now", "expire-hard=now + 1 hour")
    [(soft, hard)] = db.query("SELECT vm_expiration_soft, vm_expiration_hard FROM vm_runtimes")
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    assert abs((soft - now).total_seconds()) < 60 and abs((hard - now).total_seconds() - 3600) < 60
    out = admin.ok("vm", "list").out
    assert soft.replace(tzinfo=datetime.UTC).astimezone().strftime("%Y-%m-%d %H:%M") in out


def test_di_del_moves_head_and_default_and_keeps_running_dis(admin, db, image, tmp_path):
    admin.ok("osf", "add", "name=one")
    for version in ("a", "b", "c"):
        admin.ok("di", "add", f"path={image}", "osf=one", f"version={version}")
    admin.ok("user", "add", "login=u", "password=p")
    admin.ok("vm", "add", "name=v", "user=u", "osf=one")
    db.execute("UPDATE vm_runtimes SET vm_state = 'running', current_di_id = 10001")
    admin.fails("di", "del", "-f", "version=zzz", contains="matches no di")
    res = admin.ok("di", "del", "-f", "version=a")
    assert res.out == "Deleting 1 di(s)\n1 DIs deleted.\n"
    assert tags(db, 10002) == ["c", "default", "head"]  # default moved to the last remaining DI
    res = admin.ok("di", "del", "-f", "id=10001")  # in use by a running VM: kept
    assert res.out == "Deleting 1 di(s)\n0 DIs deleted.\n"
    admin.ok("di", "del")  # unconfirmed
    assert db.query("SELECT count(*) FROM dis") == [(2,)]
    assert sorted(os.listdir(tmp_path / "storage" / "images")) == ["10000-vm-init", "10001-vm-init",
                                                                   "10002-vm-init"]  # files stay, as the original
