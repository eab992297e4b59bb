"""Process-wide counters and gauges, exposed in Prometheus text format on /metrics.

Every component records here (``metrics.inc("qvd_l7r_connects_total", result="ok")``);
the node serves ``render()`` on l7r.metrics.address, away from the public port.
"""
import threading
from collections import defaultdict

_HELP = {
    "qvd_l7r_sessions_open": ("gauge", "Client sessions currently spliced to a VM"),
    "qvd_l7r_connections_open": ("gauge", "Client TCP connections currently open"),
    "qvd_l7r_connects_total": ("counter", "connect_to_vm requests by result"),
    "qvd_l7r_auth_failures_total": ("counter", "Failed authentications by reason"),
    "qvd_l7r_http_requests_total": ("counter", "HTTP requests by path"),
    "qvd_l7r_splice_bytes_total": ("counter", "Bytes moved through sessions by direction"),
    "qvd_hkd_vms": ("gauge", "VMs handled by this node by state"),
    "qvd_hkd_vm_starts_total": ("counter", "VM starts by result"),
    "qvd_hkd_heartbeats_total": ("counter", "Heartbeats written by result"),
}

_lock = threading.Lock()
_values = defaultdict(float)   # (name, frozenset(labels)) -> value
_gauge_functions = {}          # name -> callable returning {labels-tuple: value}


def _key(name, labels):
    return name, tuple(sorted(labels.items()))


def inc(name, amount=1, **labels):
    with _lock:
        _values[_key(name, labels)] += amount


def set_gauge(name, value, **labels):
    with _lock:
        _values[_key(name, labels)] = value


def register_gauge_function(name, fn):
    """fn() -> {tuple(sorted((label, value))): number}, evaluated at scrape time."""
    _gauge_functions[name] = fn


def get(name, **labels):
    return _values.get(_key(name, labels), 0)


def reset():
    with _lock:
        _values.clear()
        _gauge_functions.clear()


def _fmt_labels(labels):
    if not labels:
        return ""
    inner = ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace('"', '\\"')) for k, v in labels)
    return "{" + inner + "}"


def render():
    with _lock:
        items = list(_values.items())
    for name, fn in list(_gauge_functions.items()):
        try:
            for labels, value in fn().items():
                items.append(((name, tuple(labels)), value))
        except Exception:
            pass
    by_name = defaultdict(list)
    for (name, labels), value in items:
        by_name[name].append((labels, value))
    lines = []
    for name in sorted(by_name):
        kind, text = _HELP.get(name, ("untyped", name))
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in sorted(by_name[name]):
            number = int(value) if float(value).is_integer() else value
            lines.append(f"{name}{_fmt_labels(labels)} {number}")
    return "\n".join(lines) + "\n"
