"""One way to run a node: ``run_node(cfg, parts)`` for qvd-node, the demo, the HKD alone and the tests.

parts says which of the node's parts run in this process: ``HKD`` (VMs, heartbeat,
dnsmasq), ``L7R`` (the TLS front door) and ``METRICS`` (the /metrics endpoint); qvd-node
runs ``ALL``. Around them: the database pool (retried while PostgreSQL is unreachable),
the LISTEN connection and the live configuration from the ``configs`` table.

SIGTERM drains: stop accepting, let live sessions finish up to l7r.drain.grace seconds,
stop the VMs by the HKD's rules, mark the host stopped. SIGINT stops without grace.
SIGHUP re-reads node.conf.

With ``l7r.workers`` above 1, ``run_node`` runs the L7R in that many worker processes
(node/workers.py, node/l7r_worker.py) beside this one, which keeps the HKD, LISTEN, the
configuration and /metrics (the workers' samples added up), and passes the signals on.
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
from .workers import L7RWorkers, WorkerError, worker_count

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

    def __init__(self, cfg, parts=ALL, workers=0, l7r_options=None, pool_size=None, worker_index=None):
        """workers: L7R worker processes to run (the L7R is then not one of parts);
        l7r_options: L7RService keywords, pool_size: the database pool's, worker_index: the
        number of the worker this process is (node/l7r_worker.py)."""
        unknown = set(parts) - ALL
        if unknown:
            raise ValueError(f"unknown node parts {sorted(unknown)}; the parts are {sorted(ALL)}")
        if workers and L7R in parts:
            raise ValueError("the L7R runs either here or in workers")
        self.cfg = cfg
        self.parts = frozenset(parts)
        self.workers_count = workers
        self.workers = None
        self.l7r_options = l7r_options or {}
        self.pool_size = pool_size
        self.worker_index = worker_index
        self.db = None
        self.listener = None
        self.watcher = None
        self.hkd = None
        self.l7r = None
        self.metrics_server = None
        self.watchdog = None
        self.stopped = gevent.event.Event()
        self._stopping = False
        self._signals_installed = False
        self.fenced = False

    def start(self):
        cfg = self.cfg
        make_green()
        self.db = Database.from_config(cfg, size=self.pool_size)
        wait_for_database(self.db, cfg.get_int("internal.database.pool.connection.delay"),
                          cfg.get_int("internal.database.pool.connection.retries"))
        self.listener = Listener(self.db).start()
        self.watcher = ConfigWatcher(cfg, self.db, self.listener)
        self.watcher.load_now()
        self.watcher.start()
        if L7R in self.parts:
            # certificate, key and port before the HKD's start changes the host (bridge, dnsmasq)
            from ..l7r.server import L7RService
            self.l7r = L7RService(cfg, self.db, self.listener, **self.l7r_options).prepare()
        elif self.workers_count:
            from ..l7r.host import NodeHost
            from ..l7r.server import L7RError, check_material
            check_material(cfg, self.db)
            host = NodeHost(cfg, self.db)
            self.workers = L7RWorkers(cfg, self.db, self.workers_count, host.lookup)
            try:
                self.workers.prepare()
            except OSError as exc:
                raise L7RError(f"cannot listen on {cfg.get_str('l7r.address')}:{cfg.get_int('l7r.port')}: "
                               f"{exc.strerror or exc}") from None
        if HKD in self.parts:
            from ..hkd import HKD as HouseKeeper
            self.hkd = HouseKeeper(cfg, self.db, self.listener)
            self.hkd.on_stop_command = self.stop    # host command `stop` stops the whole node
            self.watcher.on_change(self.hkd.on_config_changed)
            self.hkd.start()
        if self.l7r is not None:
            self.l7r.start()
        if METRICS in self.parts:
            # before the workers: the port serves once the first of them does, /metrics with it
            try:
                self.metrics_server = start_metrics_server(cfg.get_str("l7r.metrics.address"),
                                                           self.workers.expositions if self.workers else None)
            except (OSError, ValueError) as exc:
                log.warning("metrics endpoint not started: %s", exc)
        if self.workers is not None:
            # the port serves from the first worker on, seconds before the last one does: a
            # signal meanwhile must drain or reload, not end the node (Python's default)
            self.install_signal_handlers()
            self.workers.start()
            if self._stopping:
                return self
        if self.worker_index is not None:
            log.info("L7R worker %d of node %s serving (pid %d)", self.worker_index, cfg.get("nodename"), os.getpid())
        else:
            log.info("node %s running (pid %d, qvd-gevent %s)", cfg.get("nodename"), os.getpid(), __version__)
        serving = [f"serving on port {self.l7r.port}"] if self.l7r is not None else []
        if self.workers is not None:
            serving = [f"serving on port {self.workers.port} ({self.workers.count} L7R workers)"]
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
        if self.worker_index is not None:
            log.info("L7R worker %d stopping: draining sessions (grace %s s)", self.worker_index, grace)
        elif fence:
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
            if self.workers is not None:
                if fence:
                    draining = gevent.spawn(self.workers.stop, 0)
                else:
                    self.workers.stop(grace)
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
            if self.worker_index is not None:
                log.info("L7R worker %d stopped", self.worker_index)
            else:
                log.info("node stopped")
            self.stopped.set()

    def reload(self):
        try:
            self.cfg.reload_file()
            log.info("configuration file re-read")
        except ConfigError as exc:
            log.error("configuration file not reloaded: %s", exc)
        if self.workers is not None:
            self.workers.signal(signal.SIGHUP)

    def install_signal_handlers(self):
        if self._signals_installed:
            return
        self._signals_installed = True
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
    code: 0 after a stop, 78 (EX_CONFIG) when the configuration stops it from starting, 1 when
    anything else does (one line on stderr, prefixed by prog) or it fenced itself (no
    heartbeat: a supervisor should start it again to rejoin).
    on_ready() is called once every part runs. With l7r.workers above 1 (and node.conf on
    disk for the workers to read), the L7R runs in that many worker processes."""
    try:
        workers = worker_count(cfg) if L7R in parts else 0
    except ConfigError as exc:
        say_error(prog, exc)
        return systemd.EXIT_CONFIG
    if workers > 1 and cfg.path:
        node = Node(cfg, frozenset(parts) - {L7R}, workers=workers)
    else:
        node = Node(cfg, parts)
    return serve(node, prog, on_ready)


def serve(node, prog="qvd-node", on_ready=None, on_failure=None):
    """Start node and serve until a signal stops it: run_node's exit codes. on_failure(message,
    exit code) is told why it could not start (an L7R worker tells its node)."""
    from ..hkd import HkdConfigError
    from ..l7r.server import L7RConfigError
    try:
        node.start()
    except (ConfigError, HkdConfigError, L7RConfigError) as exc:
        # systemd must not restart a node every few seconds for this (RestartPreventExitStatus=78)
        return _failed(node, prog, exc, systemd.EXIT_CONFIG, on_failure)
    except WorkerError as exc:
        return _failed(node, prog, exc, exc.exit_code, on_failure)
    except Exception as exc:
        # ours are one line already; a part's own error (HkdError ...) may carry more
        known = isinstance(exc, (NodeError, ConfigError, DatabaseUnavailable))
        return _failed(node, prog, exc if known else _first_line(exc), 1, on_failure)
    if on_ready is not None:
        on_ready()
    node.run_forever()
    return 1 if node.fenced else 0


def _failed(node, prog, message, code, on_failure):
    log.error("cannot start: %s", message)
    say_error(prog, message)
    if on_failure is not None:
        on_failure(str(message), code)
    node.stop(0)
    return code


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
