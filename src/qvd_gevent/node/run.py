"""One way to run a node: ``run_node(cfg, parts)`` for qvd-node, the demo, the HKD alone and the tests.

parts says which of the node's parts run in this process: ``HKD`` (VMs, heartbeat,
dnsmasq), ``L7R`` (the TLS front door) and ``METRICS`` (the /metrics endpoint); qvd-node
runs ``ALL``. Around them: the database pool (retried while PostgreSQL is unreachable),
the LISTEN connection and the live configuration from the ``configs`` table.

SIGTERM drains: stop accepting, let live sessions finish up to l7r.drain.grace seconds,
stop the VMs by the HKD's rules, mark the host stopped. SIGINT stops without grace.
SIGHUP re-reads node.conf.
"""
import logging
import os
import resource
import signal

import gevent
import gevent.event

from .. import __version__
from ..common.logs import say_error, setup_logging
from ..config import Config, ConfigError
from ..config.live import ConfigWatcher
from ..db import Database, DatabaseUnavailable, make_green
from ..db.listen import Listener
from . import systemd
from .metrics_server import start_metrics_server

log = logging.getLogger("qvd.node")

HKD, L7R, METRICS = "hkd", "l7r", "metrics"
ALL = frozenset((HKD, L7R, METRICS))


class NodeError(Exception):
    """The node cannot start; the message is one line for the operator."""


def raise_file_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def load_node_config(path):
    """node.conf (path, else $QVD_CONFIG, else /etc/qvd/node.conf) with every value checked, so a
    malformed one fails here and not later in an agent; logging set up by its log.* keys.
    Raises ConfigError or OSError."""
    cfg = Config.load(path)
    cfg.get("nodename")
    for key in list(cfg.file_values):
        cfg.get(key)
    try:
        setup_logging(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cfg


def wait_for_database(db, delay, retries):
    """PostgreSQL unreachable at start: a clear line per attempt and a retry, not a crash."""
    for attempt in range(1, retries + 1):
        try:
            db.ping()
            return
        except DatabaseUnavailable as exc:
            if attempt == retries:
                raise NodeError(f"{exc} (gave up after {retries} attempts)") from None
            log.error("%s; retrying in %s s (attempt %d of %d)", exc, delay, attempt, retries)
            gevent.sleep(delay)


class Node:
    """The parts of one node in this process: ``start()`` returns once they run (or raises),
    ``stop()`` drains and stops them, ``run_forever()`` serves until a signal stops it."""

    def __init__(self, cfg, parts=ALL):
        unknown = set(parts) - ALL
        if unknown:
            raise ValueError(f"unknown node parts {sorted(unknown)}; the parts are {sorted(ALL)}")
        self.cfg = cfg
        self.parts = frozenset(parts)
        self.db = None
        self.listener = None
        self.watcher = None
        self.hkd = None
        self.l7r = None
        self.metrics_server = None
        self.watchdog = None
        self.stopped = gevent.event.Event()
        self._stopping = False
        self.fenced = False

    def start(self):
        cfg = self.cfg
        make_green()
        self.db = Database.from_config(cfg)
        wait_for_database(self.db, cfg.get_int("internal.database.pool.connection.delay"),
                          cfg.get_int("internal.database.pool.connection.retries"))
        self.listener = Listener(self.db).start()
        self.watcher = ConfigWatcher(cfg, self.db, self.listener)
        self.watcher.load_now()
        self.watcher.start()
        if L7R in self.parts:
            # certificate, key and port before the HKD's start changes the host (bridge, dnsmasq)
            from ..l7r.server import L7RService
            self.l7r = L7RService(cfg, self.db, self.listener).prepare()
        if HKD in self.parts:
            from ..hkd import HKD as HouseKeeper
            self.hkd = HouseKeeper(cfg, self.db, self.listener)
            self.hkd.on_stop_command = self.stop    # host command `stop` stops the whole node
            self.watcher.on_change(self.hkd.on_config_changed)
            self.hkd.start()
        if self.l7r is not None:
            self.l7r.start()
        if METRICS in self.parts:
            try:
                self.metrics_server = start_metrics_server(cfg.get_str("l7r.metrics.address"))
            except (OSError, ValueError) as exc:
                log.warning("metrics endpoint not started: %s", exc)
        log.info("node %s running (pid %d, qvd-gevent %s)", cfg.get("nodename"), os.getpid(), __version__)
        serving = [f"serving on port {self.l7r.port}"] if self.l7r is not None else []
        serving += [f"{len(self.hkd.vms)} VMs"] if self.hkd is not None else []
        systemd.notify("READY=1", "STATUS=" + ", ".join(serving or ["running"]))
        self.watchdog = systemd.start_watchdog()
        return self

    def stop(self, grace=None, fence=False):
        """fence: no heartbeat for too long; the other nodes will take our VMs over once they
        call us lost, so the VMs go now, sessions end with them, no grace (their rows cannot
        be released without the database anyway; the cluster monitor releases them)."""
        if self._stopping:
            return
        self._stopping = True
        self.fenced = fence
        systemd.notify("STOPPING=1", "STATUS=stopping: draining sessions, then stopping VMs")
        grace = 0 if fence else self.cfg.get_int("l7r.drain.grace") if grace is None else grace
        if fence:
            log.info("stopping at once: VMs stopped while sessions are closed")
        else:
            log.info("stopping: draining sessions (grace %s s), then stopping VMs", grace)
        try:
            draining = None
            if self.l7r is not None:
                if fence:
                    draining = gevent.spawn(self.l7r.drain, 0)
                else:
                    self.l7r.drain(grace)
            if self.metrics_server is not None:
                self.metrics_server.stop(timeout=1)
            if self.hkd is not None:
                self.hkd.stop()
            if draining is not None:
                draining.join(timeout=20)
            if self.l7r is not None:
                # the counts since the last periodic flush (sessions the drain just ended) reach
                # host_counters; a fenced node has no database to write them to
                self.l7r.stop(flush_counters=not fence)
        finally:
            if self.watcher is not None:
                self.watcher.stop()
            if self.listener is not None:
                self.listener.stop()
            if self.db is not None:
                self.db.close()
            if self.watchdog is not None:
                self.watchdog.kill(block=False)
            log.info("node stopped")
            self.stopped.set()

    def reload(self):
        try:
            self.cfg.reload_file()
            log.info("configuration file re-read")
        except ConfigError as exc:
            log.error("configuration file not reloaded: %s", exc)

    def install_signal_handlers(self):
        gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(self.stop))
        gevent.signal_handler(signal.SIGINT, lambda: gevent.spawn(self.stop, 0))
        gevent.signal_handler(signal.SIGHUP, self.reload)

    def run_forever(self):
        self.install_signal_handlers()
        self.stopped.wait()


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_node(cfg, parts=ALL, on_ready=None, prog="qvd-node"):
    """Start the parts of a node for cfg and serve until a signal stops them. Returns an exit
    code: 0 after a stop, 1 when the node cannot start (one line on stderr, prefixed by prog)
    or fenced itself (no heartbeat: a supervisor should start it again to rejoin).
    code: 0 after a stop, 78 (EX_CONFIG) when the configuration stops it from starting, 1 when
    anything else does (one line on stderr, prefixed by prog).
    on_ready() is called once every part runs."""
    from ..hkd import HkdConfigError
    from ..l7r.server import L7RConfigError
    node = Node(cfg, parts)
    try:
        node.start()
    except (ConfigError, HkdConfigError, L7RConfigError) as exc:
        # systemd must not restart a node every few seconds for this (RestartPreventExitStatus=78)
        log.error("cannot start: %s", exc)
        say_error(prog, exc)
        node.stop(0)
        return systemd.EXIT_CONFIG
    except Exception as exc:
        # ours are one line already; a part's own error (HkdError ...) may carry more
        known = isinstance(exc, (NodeError, ConfigError, DatabaseUnavailable))
        message = exc if known else _first_line(exc)
        log.error("cannot start: %s", message)
        say_error(prog, message)
        node.stop(0)
        return 1
    if on_ready is not None:
        on_ready()
    node.run_forever()
    return 1 if node.fenced else 0


def run_node_from_file(path, parts=ALL, on_ready=None, prog="qvd-node"):
    """run_node for the node.conf at path (see load_node_config), with the open-file limit raised;
    a configuration error is one line on stderr and exit code 78 (EX_CONFIG)."""
    try:
        cfg = load_node_config(path)
    except (ConfigError, OSError) as exc:
        say_error(prog, exc)
        return systemd.EXIT_CONFIG
    raise_file_limit()
    return run_node(cfg, parts, on_ready, prog)
