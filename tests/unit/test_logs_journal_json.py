"""Log lines as journald and log shippers read them: a <priority> prefix when stderr is the
journal (JOURNAL_STREAM), and log.format = json."""
import json
import logging
import os

import pytest

from qvd_gevent.common.logs import say_error, setup_logging
from qvd_gevent.config import Config

log = logging.getLogger("qvd.test.journal")


@pytest.fixture(autouse=True)
def _root_logger_restored():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _journal_stream(path, monkeypatch, journal=True):
    stream = open(path, "w", encoding="utf-8")
    info = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino + (0 if journal else 1)}")
    return stream


def _emit():
    log.debug("not shown at INFO")
    log.info("node running")
    log.warning("network: no NAT interface")
    log.error("heartbeat failed: password=hunter2")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("step crashed")


def test_under_the_journal_every_line_carries_its_priority(tmp_path, monkeypatch):
    stream = _journal_stream(tmp_path / "journal", monkeypatch)
    setup_logging(Config({"log.preset": "stderr", "log.level": "INFO"}), stream=stream)
    _emit()
    stream.close()
    lines = (tmp_path / "journal").read_text().splitlines()
    assert lines[0] == "<6>INFO qvd.test.journal - node running"          # the journal adds time and pid
    assert lines[1] == "<4>WARNING qvd.test.journal - network: no NAT interface"
    assert lines[2] == "<3>ERROR qvd.test.journal - heartbeat failed: password=****"
    assert lines[3] == "<3>ERROR qvd.test.journal - step crashed"
    assert len(lines) > 5 and all(line.startswith("<3>") for line in lines[3:])   # the traceback too
    assert lines[-1] == "<3>RuntimeError: boom"


def test_another_stream_gets_no_prefix(tmp_path, monkeypatch):
    stream = _journal_stream(tmp_path / "plain", monkeypatch, journal=False)
    setup_logging(Config({"log.preset": "stderr", "log.level": "INFO"}), stream=stream)
    log.info("node running")
    stream.close()
    (line,) = (tmp_path / "plain").read_text().splitlines()
    assert not line.startswith("<") and line.endswith(f"{os.getpid()} INFO qvd.test.journal - node running")


def test_json_format_one_object_per_line(tmp_path, monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    path = tmp_path / "json"
    with open(path, "w", encoding="utf-8") as stream:
        setup_logging(Config({"log.preset": "stderr", "log.level": "INFO", "log.format": "json"}), stream=stream)
        _emit()
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["level"] for e in entries] == ["INFO", "WARNING", "ERROR", "ERROR"]
    assert entries[0]["logger"] == "qvd.test.journal" and entries[0]["pid"] == os.getpid()
    assert entries[0]["message"] == "node running" and entries[0]["time"].endswith("+00:00")
    assert entries[2]["message"] == "heartbeat failed: password=****"
    assert "RuntimeError: boom" in entries[3]["exception"]


def test_json_under_the_journal_is_prefixed_too(tmp_path, monkeypatch):
    stream = _journal_stream(tmp_path / "journal", monkeypatch)
    setup_logging(Config({"log.preset": "stderr", "log.level": "INFO", "log.format": "json"}), stream=stream)
    log.error("x")
    stream.close()
    (line,) = (tmp_path / "journal").read_text().splitlines()
    assert line.startswith("<3>{") and json.loads(line[3:])["message"] == "x"


def test_unknown_format_names_the_key():
    with pytest.raises(ValueError, match="log.format: 'xml' is not one of text, json"):
        setup_logging(Config({"log.format": "xml"}))


def test_a_commands_last_line_is_an_error_in_the_journal(tmp_path, monkeypatch):
    stream = _journal_stream(tmp_path / "journal", monkeypatch)
    say_error("qvd-node", "configuration file /etc/qvd/node.conf does not exist", stream=stream)
    stream.close()
    assert (tmp_path / "journal").read_text() == "<3>qvd-node: configuration file /etc/qvd/node.conf does not exist\n"
