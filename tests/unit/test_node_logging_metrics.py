import io
import logging

from qvd_gevent.common import metrics
from qvd_gevent.common.logs import mask_secrets, setup_logging
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


def test_metrics_text_format():
    metrics.reset()
    metrics.inc("qvd_l7r_connects_total", result="ok")
    metrics.inc("qvd_l7r_connects_total", result="ok")
    metrics.inc("qvd_l7r_connects_total", result="failed")
    metrics.set_gauge("qvd_l7r_sessions_open", 3)
    metrics.register_gauge_function("qvd_hkd_vms", lambda: {(("state", "running"),): 2})
    text = metrics.render()
    assert "# TYPE qvd_l7r_connects_total counter" in text
    assert 'qvd_l7r_connects_total{result="ok"} 2' in text
    assert 'qvd_l7r_connects_total{result="failed"} 1' in text
    assert "qvd_l7r_sessions_open 3" in text
    assert 'qvd_hkd_vms{state="running"} 2' in text
    metrics.reset()
