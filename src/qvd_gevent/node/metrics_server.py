"""Serves the node's metrics as GET /metrics on l7r.metrics.address (off the public port)."""
import logging

from gevent.pywsgi import WSGIServer
from prometheus_client import make_wsgi_app

from ..common import metrics

log = logging.getLogger("qvd.node.metrics")


_exposition = make_wsgi_app(metrics.REGISTRY)


def _app(environ, start_response):
    if environ.get("PATH_INFO") != "/metrics" or environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    return _exposition(environ, start_response)


def parse_address(text):
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"l7r.metrics.address {text!r} is not host:port")
    return host.strip("[]"), int(port)


def _node_app(expositions):
    """/metrics of a node with L7R workers: this process's samples and every worker's, added up
    (common/metrics.py merge)."""
    def app(environ, start_response):
        if environ.get("PATH_INFO") != "/metrics" or environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        body = metrics.merge([metrics.render(), *expositions()]).encode()
        start_response("200 OK", [("Content-Type", metrics.CONTENT_TYPE), ("Content-Length", str(len(body)))])
        return [body if environ["REQUEST_METHOD"] == "GET" else b""]
    return app


def start_metrics_server(address_text, workers_expositions=None):
    """Start and return the server, or None when the address is empty. workers_expositions()
    -> the L7R workers' metrics texts, added to this process's."""
    if not address_text:
        return None
    app = _app if workers_expositions is None else _node_app(workers_expositions)
    server = WSGIServer(parse_address(address_text), app, log=None, error_log=log)
    server.start()
    log.info("metrics on http://%s:%d/metrics", server.server_host, server.server_port)
    return server
