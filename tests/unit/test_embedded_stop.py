"""EmbeddedPostgres.stop: a pg_ctl that fails is not taken for a stopped server.

pg_ctl is replaced here by a recorder (the one function under test is stop's decision);
the real server's start and stop run in every integration suite through tests/conftest.py."""
import subprocess

import pytest

from qvd_gevent.db import embedded
from qvd_gevent.db.embedded import EmbeddedPostgres, EmbeddedPostgresError


class Recorded(EmbeddedPostgres):
    def __init__(self, tmp_path, outcomes, stops_after=None):
        super().__init__(tmp_path)
        self.outcomes = list(outcomes)   # per pg_ctl call: a return code or an exception
        self.stops_after = stops_after   # the pg_ctl call after which the server is gone
        self.calls = []

    def is_initialized(self):
        return True

    def is_running(self):
        return self.stops_after is None or len(self.calls) < self.stops_after

    def _run(self, args, check=True, timeout=60):
        self.calls.append(args[args.index("-m") + 1])
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return subprocess.CompletedProcess(args, outcome, stdout="pg_ctl: could not send stop signal")


@pytest.fixture(autouse=True)
def _no_binaries(monkeypatch):
    monkeypatch.setattr(embedded, "_bin", lambda name: name)


def test_a_fast_stop_that_works_is_all(tmp_path):
    pg = Recorded(tmp_path, [0], stops_after=1)
    pg.stop()
    assert pg.calls == ["fast"]


def test_a_failed_fast_stop_is_followed_by_an_immediate_one(tmp_path):
    pg = Recorded(tmp_path, [1, 0], stops_after=2)
    pg.stop()
    assert pg.calls == ["fast", "immediate"]


def test_a_hung_fast_stop_is_followed_by_an_immediate_one(tmp_path):
    pg = Recorded(tmp_path, [subprocess.TimeoutExpired("pg_ctl", 60), 0], stops_after=2)
    pg.stop()
    assert pg.calls == ["fast", "immediate"]


def test_a_server_that_does_not_stop_is_an_error_naming_the_data_directory(tmp_path):
    pg = Recorded(tmp_path, [1, 1])
    with pytest.raises(EmbeddedPostgresError) as caught:
        pg.stop()
    assert pg.calls == ["fast", "immediate"]
    assert "did not stop" in str(caught.value) and str(pg.pgdata) in str(caught.value)
    assert "could not send stop signal" in str(caught.value)


def test_an_immediate_stop_is_tried_once(tmp_path):
    pg = Recorded(tmp_path, [1])
    with pytest.raises(EmbeddedPostgresError):
        pg.stop("immediate")
    assert pg.calls == ["immediate"]
