"""qvd-node: the HKD, the L7R and dnsmasq supervision in one process and one gevent hub.

    qvd-node [--config FILE]                  run until SIGTERM (graceful) or SIGINT
    qvd-node demo [--dir DIR] [--port N]      the one-command demo (see node/demo.py)

SIGTERM drains: stop accepting, let live sessions finish up to l7r.drain.grace seconds,
stop the VMs by the HKD's rules, mark the host stopped. SIGHUP re-reads node.conf.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

from .. import __version__  # noqa: E402
from ..config import Config, ConfigError  # noqa: E402
from ..config.live import ConfigWatcher  # noqa: E402
from ..db import Database, DatabaseUnavailable, make_green  # noqa: E402
from ..db.listen import Listener  # noqa: E402
from ..common.logs import setup_logging  # noqa: E402
from .metrics_server import start_metrics_server  # noqa: E402

log = logging.getLogger("qvd.node")


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
    def __init__(self, cfg):
        self.cfg = cfg
        self.db = None
        self.listener = None
        self.watcher = None
        self.hkd = None
        self.l7r = None
        self.metrics_server = None
        self.stopped = gevent.event.Event()
        self._stopping = False

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
        from ..hkd import HKD
        from ..l7r.server import L7RService
        self.hkd = HKD(cfg, self.db, self.listener)
        self.hkd.on_stop_command = self.stop    # host command `stop` stops the whole node
        self.watcher.on_change(self.hkd.on_config_changed)
        self.hkd.start()
        self.l7r = L7RService(cfg, self.db, self.listener)
        self.l7r.start()
        try:
            self.metrics_server = start_metrics_server(cfg.get_str("l7r.metrics.address"))
        except (OSError, ValueError) as exc:
            log.warning("metrics endpoint not started: %s", exc)
        log.info("node %s running (pid %d, qvd-gevent %s)", cfg.get("nodename"), os.getpid(), __version__)

    def stop(self, grace=None, fence=False):
        """fence: no heartbeat for too long; the other nodes will take our VMs over once they
        call us lost, so the VMs go now, sessions end with them, no grace (their rows cannot
        be released without the database anyway; the cluster monitor releases them)."""
        if self._stopping:
            return
        self._stopping = True
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
        finally:
            if self.watcher is not None:
                self.watcher.stop()
            if self.listener is not None:
                self.listener.stop()
            if self.db is not None:
                self.db.close()
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


def run_node(cfg):
    """Start a node for cfg and serve until a signal stops it. Returns an exit code."""
    node = Node(cfg)
    try:
        node.start()
    except (NodeError, ConfigError, DatabaseUnavailable) as exc:
        log.error("cannot start: %s", exc)
        print(f"qvd-node: {exc}", file=sys.stderr)
        node.stop(0)
        return 1
    except Exception as exc:  # a component's start-up error, e.g. HkdError
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.error("cannot start: %s", message)
        print(f"qvd-node: {message}", file=sys.stderr)
        node.stop(0)
        return 1
    node.run_forever()
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        from .demo import main as demo_main
        return demo_main(argv[1:])
    parser = argparse.ArgumentParser(prog="qvd-node", description="Run a QVD server node (L7R + HKD).")
    parser.add_argument("--config", help="node.conf (default $QVD_CONFIG, else /etc/qvd/node.conf)")
    parser.add_argument("--version", action="version", version=f"qvd-gevent {__version__}")
    args = parser.parse_args(argv)
    try:
        cfg = Config.load(args.config)
        cfg.get("nodename")
        for key in list(cfg.file_values):
            cfg.get(key)        # a malformed value fails here, not later in an agent
        setup_logging(cfg)
    except (ConfigError, OSError) as exc:
        print(f"qvd-node: {exc}", file=sys.stderr)
        return 1
    raise_file_limit()
    return run_node(cfg)


if __name__ == "__main__":
    sys.exit(main())
