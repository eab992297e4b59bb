import io
import logging
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qvd_gevent.common import metrics
from qvd_gevent.common.logs import escape_control_characters, mask_secrets, setup_logging
from qvd_gevent.config import Config


def test_secrets_are_masked():
    assert mask_secrets("user add login=al password=s3cr3t") == "user add login=al password=****"
    assert mask_secrets('{"password": "hunter2"}') == '{"password": "****"}'
    assert mask_secrets("Authorization: Basic cXZkOnF2ZA==") == "Authorization: Basic ****"
    assert mask_secrets("passwd=abc&x=1") == "passwd=****&x=1"
    assert mask_secrets("nothing secret") == "nothing secret"


def test_logged_password_never_reaches_the_stream():
    stream = io.StringIO()
    setup_logging(Config({"log.preset": "stderr", "log.level": "INFO"}), stream=stream)
    logging.getLogger("qvd.test").info("login attempt password=%s from %s", "topsecret", "10.0.0.1")
    out = stream.getvalue()
    assert "topsecret" not in out and "password=****" in out and "10.0.0.1" in out


def test_control_characters_are_escaped():
    assert escape_control_characters("al\r\nice\t\x1b[31m\x00\x7f\x85\u2028ok é") == \
        "al\\r\\nice\\t\\x1b[31m\\x00\\x7f\\x85\\u2028ok é"


def test_a_forged_line_in_an_argument_stays_on_its_record_s_line():
    stream = io.StringIO()
    setup_logging(Config({"log.preset": "stderr", "log.level": "INFO"}), stream=stream)
    forged = "mallory\r\n2030-01-01 00:00:00,000 1 INFO qvd.l7r - session open: user admin"
    logging.getLogger("qvd.test").info("authentication failed for %s from %s", forged, "10.0.0.1")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "mallory\\r\\n2030-01-01" in lines[0] and lines[0].endswith("from 10.0.0.1")


def _samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_text_format_counts_and_escapes_label_values(monkeypatch):
    monkeypatch.setattr(metrics, "_sources", dict(metrics._sources))  # the fake VM gauge ends with the test
    before = metrics.get("qvd_l7r_connects_total", result="ok")
    metrics.inc("qvd_l7r_connects_total", result="ok")
    metrics.inc("qvd_l7r_connects_total", result="ok")
    odd = 'a "quoted" back\\slash\nnewline'
    metrics.inc("qvd_l7r_auth_failures_total", reason=odd)
    metrics.register_gauge_function("qvd_hkd_vms", lambda: {(("state", "running"),): 2})
    text = metrics.render()
    assert "# TYPE qvd_l7r_connects_total counter" in text
    samples = _samples(text)   # a real Prometheus parser reads it back
    assert samples[("qvd_l7r_connects_total", (("result", "ok"),))] == before + 2
    assert samples[("qvd_l7r_auth_failures_total", (("reason", odd),))] == 1
    assert samples[("qvd_hkd_vms", (("state", "running"),))] == 2
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert samples[("process_open_fds", ())] > 0
    assert ("process_cpu_seconds_total", ()) in samples


def test_histograms_count_observations():
    before = metrics.get("qvd_l7r_tls_handshake_seconds_count")
    metrics.observe("qvd_l7r_tls_handshake_seconds", 0.004)
    samples = _samples(metrics.render())
    assert samples[("qvd_l7r_tls_handshake_seconds_count", ())] == before + 1
    assert samples[("qvd_l7r_tls_handshake_seconds_bucket", (("le", "+Inf"),))] == before + 1


def test_an_undeclared_metric_name_fails_at_once():
    with pytest.raises(KeyError):
        metrics.inc("qvd_l7r_conects_total", result="ok")
    with pytest.raises(KeyError):
        metrics.register_gauge_function("qvd_no_such_gauge", dict)


def test_a_session_registers_no_metric(monkeypatch):
    """The splice byte counter is registered once, when the module loads, not per session."""
    from qvd_gevent.l7r.splice import Splice

    def refuse(name, fn):
        raise AssertionError(f"{name} registered again by a session")

    monkeypatch.setattr(metrics, "register_gauge_function", refuse)
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        for _ in range(3):
            Splice(pairs[0][0], pairs[1][0])
    finally:
        for a, b in pairs:
            a.close()
            b.close()
