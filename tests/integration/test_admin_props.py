"""propset / propget / propdel for every object, on QVD 4's property tables."""
import pytest
from helpers.admin import Admin


@pytest.fixture
def admin(node_conf, db):
    return Admin(node_conf, db)

EVIL = "x'); DROP TABLE vms;--"


@pytest.fixture
def objects(admin, tmp_path):
    image = tmp_path / "img"
    image.write_text("x")
    admin.ok("host", "add", "name=node1", "address=10.3.15.2")
    admin.ok("host", "add", "name=node2", "address=10.3.15.3")
    admin.ok("user", "add", "login=u1", "password=p")
    admin.ok("user", "add", "login=u2", "password=p")
    admin.ok("osf", "add", "name=o1")
    admin.ok("osf", "add", "name=o2")
    admin.ok("di", "add", f"path={image}", "osf=o1")
    admin.ok("di", "add", f"path={image}", "osf=o2")
    admin.ok("vm", "add", "name=v1", "user=u1", "osf=o1")
    admin.ok("vm", "add", "name=v2", "user=u2", "osf=o2")
    return admin


CASES = [  # object, filter selecting the first, its label, plural as printed
    ("host", "name=node1", "node1", "hosts"),
    ("user", "login=u1", "u1", "users"),
    ("osf", "name=o1", "o1", "OSFs"),
    ("di", "osf=o1", "10000-img", "DIs"),
    ("vm", "name=v1", "v1", "virtual machines"),
]


@pytest.mark.parametrize("obj, flt, label, plural", CASES)
def test_prop_verbs(objects, db, obj, flt, label, plural):
    admin = objects
    assert admin.ok(obj, "propset", "-f", flt, "colour=blue", f"evil={EVIL}").out == f"propset in 1 {plural}.\n"
    assert admin.ok(obj, "propset", "size=big").out == f"propset in 2 {plural}.\n"
    admin.ok(obj, "propset", "-f", flt, "colour=green")  # overwrite
    assert admin.ok(obj, "propget", "-f", flt).out == (
        f"{label}\tcolour=green\n{label}\tevil={EVIL}\n{label}\tsize=big\n")
    assert admin.ok(obj, "propget", "-f", flt, "size", "colour").out == f"{label}\tcolour=green\n{label}\tsize=big\n"
    # the 4.x catalogue rows exist once per key and object kind
    assert db.query("SELECT count(*) FROM qvd_object_properties_list q JOIN properties_list l"
                    " ON l.id = q.property_id WHERE l.key = 'size' AND q.qvd_object = %s", (obj,)) == [(1,)]
    admin.fails(obj, "propset", "-f", "id=4242", "a=b", contains=f"No properties were set (filter matched 0 {plural})")
    admin.fails(obj, "propset", "-f", flt, contains="nothing to set")
    admin.fails(obj, "propset", "-f", flt, "novalue", contains="undefined value for key: 'novalue'")
    admin.fails(obj, "propget", "-f", "id=4242", contains=f"matches no {obj}")
    assert admin.ok(obj, "propdel", "-f", flt, "colour").out == "1 properties deleted.\n"
    assert "colour" not in admin.ok(obj, "propget").out
    res = admin.ok(obj, "propdel")  # all objects, not confirmed
    assert f"Are you sure you want to delete the prop in all {plural}? [y/N]" in res.out
    assert "size=big" in admin.ok(obj, "propget").out
    admin.ok(obj, "propdel", "--force")
    assert admin.ok(obj, "propget").out == ""


def test_property_filters_select_objects(objects):
    objects.ok("vm", "propset", "-f", "name=v2", "pool=gold")
    assert objects.ok("vm", "list", "-q", "-f", "property.pool=gold").out.split()[0] == "10001"
    objects.ok("di", "propset", "-f", "osf=o2", "arch=x86_64")
    assert objects.ok("di", "list", "-q", "-f", "property.arch=x86*").out.split()[0] == "10001"
