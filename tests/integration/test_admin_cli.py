"""qvd-admin as a command: dispatch, help, options anywhere, and one-line errors."""
import subprocess

import pytest
from helpers.admin import Admin
from helpers.database import write_node_conf


@pytest.fixture
def admin(node_conf, db):
    return Admin(node_conf, db)


def test_no_object_or_verb_lists_subcommands(admin):
    res = admin()
    assert res.rc == 1 and res.out.startswith("Valid command expected, available subcommands:\n   config del\n")
    res = admin("vm")
    assert res.rc == 1 and res.out.startswith("vm: Valid command expected, available subcommands:\n   vm add\n")
    assert "host add" not in res.out and "vm disconnect_user" in res.out


def test_unknown_object_and_verb_are_one_line_errors(admin):
    assert admin.fails("bogus", "list") == "Error: unknown object 'bogus'"
    assert admin.fails("vm", "explode") == "Error: vm: 'explode' not implemented"
    res = admin("vm", "explode")
    assert "available subcommands" in res.out and "vm start" in res.out


def test_help(admin):
    res = admin("vm", "add", "-h")
    assert res.rc == 0 and res.out.startswith("vm add: ") and "usage: vm add name=<name>" in res.out


def test_options_anywhere_and_quiet(admin, db):
    admin.ok("-q", "host", "add", "name=a", "address=10.0.0.1")
    assert db.query("SELECT name FROM hosts") == [("a",)]
    res = admin("host", "-f", "name=a", "list", "-q")
    assert (res.rc, res.out) == (0, "10000 a    10.0.0.1 -   -          -          0            0       stopped\n")
    res = admin("-q", "host", "add", "name=a", "address=10.0.0.2")
    assert (res.rc, res.out) == (1, "")
    assert res.err.startswith("Error: ") and res.err.count("\n") == 1  # -q never silences an error


def test_quiet_still_says_why_a_command_failed(node_conf):
    """As an operator's script runs it: a separate process, -q first."""
    res = subprocess.run(["qvd-admin", "--config", str(node_conf), "-q", "config", "set", "no.such.key=1"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and res.stdout == ""
    assert res.stderr == "Error: unknown configuration key no.such.key\n"
    res = subprocess.run(["qvd-admin", "--config", str(node_conf), "-q", "vm", "frobnicate"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and res.stderr.splitlines() == ["Error: vm: 'frobnicate' not implemented"]


def test_unreachable_database_is_one_line(tmp_path):
    conf = tmp_path / "node.conf"
    conf.write_text("database.host = 127.0.0.1\ndatabase.port = 1\ndatabase.password = x\n"
                    "internal.database.client.connect.timeout = 2\n")
    res = Admin(conf, None)("host", "list")
    assert res.rc == 1 and res.err.count("\n") == 1
    assert res.err.startswith("Error: cannot connect to database") and "Traceback" not in res.err


def test_database_without_schema(tmp_path, pg_server, empty_db_name):
    conf = write_node_conf(tmp_path / "node.conf", pg_server, empty_db_name)
    res = Admin(conf, None)("host", "list")
    assert (res.rc, res.err) == (1, "Error: the database has no QVD schema; run qvd-deploy-db first\n")


def test_malformed_node_conf_value(tmp_path, pg_server, fresh_db_name):
    conf = write_node_conf(tmp_path / "node.conf", pg_server, fresh_db_name,
                           {"internal.database.client.connect.timeout": "soon"})
    res = Admin(conf, None)("host", "list")
    assert res.rc == 1 and res.err.count("\n") == 1 and "internal.database.client.connect.timeout" in res.err
