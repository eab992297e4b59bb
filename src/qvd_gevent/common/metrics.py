"""The node's Prometheus metrics, kept and rendered by prometheus_client.

Components record by name (``metrics.inc("qvd_l7r_connects_total", result="ok")``,
``metrics.observe("qvd_l7r_tls_handshake_seconds", seconds)``); every name is declared
once below, so a typo fails at once instead of creating a new series. Values that the
node already holds (open sessions, VMs by state, bytes spliced) are read at scrape time
from one callback per name, registered when its component starts, never per session.
The node serves ``render()`` on ``l7r.metrics.address``, away from the public port.
The process collector adds the usual ``process_*`` series (resident memory, open file
descriptors and their limit, CPU seconds, start time).
"""
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# The *_created samples double every counter's series and no dashboard of ours uses them.
prometheus_client.disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# name -> (help, label name, the label values shown from the start at 0, so that a rate or
# a dashboard panel has a series before the first event)
_COUNTERS = {
    "qvd_l7r_connects_total": ("connect_to_vm requests by result", "result", ["ok", "failed", "denied", "error"]),
    "qvd_l7r_auth_failures_total": ("Failed authentications by reason", "reason",
                                    ["bad_password", "unknown_user", "no_credentials", "throttled"]),
    "qvd_l7r_http_requests_total": ("HTTP requests by path", "path", []),
    "qvd_hkd_vm_starts_total": ("VM starts by result", "result", ["ok", "error"]),
    "qvd_hkd_heartbeats_total": ("Heartbeats written by result", "result", ["ok", "error", "lost"]),
}

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_HISTOGRAMS = {
    "qvd_l7r_tls_handshake_seconds": ("Completed TLS handshakes of client connections", _FAST),
    "qvd_l7r_list_of_vm_seconds": ("list_of_vm requests, authentication included, until the answer", _FAST),
    "qvd_l7r_connect_to_vm_seconds": ("connect_to_vm, from the request to the 101 Switching Protocols", _SLOW),
    "qvd_hkd_vm_start_seconds": ("VM starts, from the start until the VM runs (its agent answers)", _SLOW),
}

# name -> (kind, help, label names); values come from a callback at scrape time
_CALLBACKS = {
    "qvd_l7r_sessions_open": ("gauge", "Client sessions currently spliced to a VM", []),
    "qvd_l7r_connections_open": ("gauge", "Client TCP connections currently open", []),
    "qvd_hkd_vms": ("gauge", "VMs handled by this node by state", ["state"]),
    "qvd_l7r_splice_bytes_total": ("counter", "Bytes moved through sessions by direction", ["direction"]),
}

_counters = {name: Counter(name, text, [label], registry=REGISTRY) for name, (text, label, _) in _COUNTERS.items()}
for _name, (_, _label, _values) in _COUNTERS.items():
    for _value in _values:
        _counters[_name].labels(**{_label: _value})
_histograms = {name: Histogram(name, text, buckets=buckets, registry=REGISTRY)
               for name, (text, buckets) in _HISTOGRAMS.items()}
_sources = {}


class _CallbackCollector:
    """The values a component holds anyway, read when Prometheus scrapes."""

    def collect(self):
        for name, (kind, text, labels) in _CALLBACKS.items():
            if kind == "counter":
                family = CounterMetricFamily(name.removesuffix("_total"), text, labels=labels)
            else:
                family = GaugeMetricFamily(name, text, labels=labels)
            source = _sources.get(name)
            if source is not None:
                for label_pairs, value in source().items():
                    family.add_metric([str(v) for _, v in label_pairs], value)
            yield family

    def describe(self):
        return []


REGISTRY.register(_CallbackCollector())

NAMES = frozenset(_COUNTERS) | frozenset(_HISTOGRAMS) | frozenset(_CALLBACKS)


_children = {}      # (name, label value) -> the labelled counter: labels() costs a lock and checks per call


def inc(name, amount=1, **labels):
    if not labels:
        _counters[name].inc(amount)
        return
    (value,) = labels.values()          # every counter has one label
    child = _children.get((name, value))
    if child is None:
        child = _children[(name, value)] = _counters[name].labels(**labels)
    child.inc(amount)


def observe(name, seconds):
    _histograms[name].observe(seconds)


def register_gauge_function(name, fn):
    """fn() -> {tuple of (label, value) pairs: number}, read at scrape time. One per name:
    a later registration (a restarted component) replaces the earlier one."""
    if name not in _CALLBACKS:
        raise KeyError(f"{name} is not a declared callback metric")
    _sources[name] = fn


def get(name, **labels):
    """Current value of one sample (0 when it was never recorded)."""
    return REGISTRY.get_sample_value(name, labels) or 0


def render():
    """The Prometheus text exposition of every metric of this process."""
    return prometheus_client.generate_latest(REGISTRY).decode()


# Samples of a node's processes (its own and its L7R workers', README Operations) that are
# not added up: the node's own value is the node's.
_NOT_SUMMED = frozenset(("process_start_time_seconds", "process_max_fds", "python_info"))


def merge(texts):
    """One exposition for a node of several processes: texts[0] is this (the node's) process,
    the others its L7R workers'. Every sample with the same name and labels is added up
    (sessions, connections, requests, histogram buckets, CPU seconds, memory), but those of
    _NOT_SUMMED, which are the node process's own."""
    from prometheus_client.parser import text_string_to_metric_families
    families, order = {}, []
    for position, text in enumerate(texts):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = (family, {})
                order.append(family.name)
            target, values = merged
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in values:
                    values[key] = sample
                elif sample.name not in _NOT_SUMMED or position == 0:
                    old = values[key]
                    value = old.value + sample.value if sample.name not in _NOT_SUMMED else sample.value
                    values[key] = old._replace(value=value)
    registry = CollectorRegistry(auto_describe=False)

    class _Merged:
        def collect(self):
            for name in order:
                family, values = families[name]
                family.samples = list(values.values())
                yield family

    registry.register(_Merged())
    return prometheus_client.generate_latest(registry).decode()


CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
