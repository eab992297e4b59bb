"""The node's L7R workers (``l7r.workers``): started, watched, restarted and stopped by the
node's process, which keeps the HKD, the LISTEN connection, the configuration and /metrics.

Each worker is node/l7r_worker.py in a process of its own, listening on the L7R port with
SO_REUSEPORT (the kernel spreads the connections); the node holds the port with a socket
of its own that never listens, so nothing else takes it while a worker restarts, and a
taken port stops the node before the HKD touches the host. The node tells every worker
the live workers' pids (a session row one of them holds is live: db/runtime.py
decide_claim); a worker that dies has its session rows released and is started again.
SIGTERM, SIGINT and SIGHUP are passed on; /metrics adds up every worker's samples.
"""
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time

import gevent
import gevent.event
import gevent.fileobject

from ..db import runtime

log = logging.getLogger("qvd.node.workers")

# auto: one per core up to this many (each worker has its own PostgreSQL connections and
# LISTEN backend; README Operations says how to go further)
AUTO_MAX = 8
START_TIMEOUT = 120.0
RESTART_DELAYS = (0.5, 1, 2, 5, 10, 30)     # seconds before the next start of a worker that keeps dying
# the environment of systemd's notification and socket protocols is the node's alone
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class WorkerError(Exception):
    """A worker could not start; the message is its own one line."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


def worker_count(cfg):
    """How many L7R workers l7r.workers asks for: 0 or 1 means none (the L7R runs in the
    node's own process)."""
    from ..config import ConfigError
    value = str(cfg.get_str("l7r.workers")).strip().lower()
    if value == "auto":
        return min(os.cpu_count() or 1, AUTO_MAX)
    try:
        count = int(value)
    except ValueError:
        raise ConfigError(f"l7r.workers must be a number or auto, not {value!r}") from None
    if count < 0:
        raise ConfigError(f"l7r.workers must not be negative ({count})")
    return count


def worker_pool_size(cfg):
    """Database connections of one worker: the node's pool size shared out (at least 2)."""
    count = max(1, worker_count(cfg))
    return max(2, -(-cfg.get_int("internal.database.pool.size") // count))


def guard_port(cfg):
    """Bind (never listen) the L7R port with SO_REUSEPORT: the port is ours from now on, and
    an OSError says it is taken."""
    address = cfg.get_str("l7r.address")
    address = "0.0.0.0" if address in ("*", "") else address
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, cfg.get_int("l7r.port")))
    except BaseException:
        sock.close()
        raise
    return sock


def _python_path():
    """The worker imports this very code: the interpreter's path as this process has it (a
    pex, an editable install, PYTHONPATH)."""
    return os.pathsep.join(p for p in sys.path if p and os.path.exists(p))


class Worker:
    """One worker process and its two pipes."""

    def __init__(self, index):
        self.index = index
        self.pid = None
        self.started = None
        self.ready = gevent.event.AsyncResult()
        self.exited = gevent.event.Event()
        self.returncode = None
        self._control = None
        self._answers = {}
        self._reader = None
        self._watcher = None

    def spawn(self, cfg, siblings):
        ctl_read, ctl_write = os.pipe2(os.O_CLOEXEC)
        rep_read, rep_write = os.pipe2(os.O_CLOEXEC)
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
        env["PYTHONPATH"] = _python_path()
        argv = [sys.executable, "-m", "qvd_gevent.node.l7r_worker", "--config", str(cfg.path),
                "--index", str(self.index), "--parent", str(os.getpid()),
                "--siblings", ",".join(str(p) for p in sorted(siblings))]
        try:
            # SIGHUP blocked until the worker handles it (l7r_worker.ready): one the node passes
            # on while the worker starts waits for it instead of ending it
            self.pid = os.posix_spawn(sys.executable, argv, env, file_actions=[
                (os.POSIX_SPAWN_DUP2, ctl_read, 3), (os.POSIX_SPAWN_DUP2, rep_write, 4)],
                setsigmask={signal.SIGHUP})
        finally:
            os.close(ctl_read)
            os.close(rep_write)
        self.started = time.monotonic()
        self._control = gevent.fileobject.FileObjectPosix(ctl_write, "wb", close=True)
        self._watcher = gevent.get_hub().loop.child(self.pid, False)
        self._watcher.start(self._on_exit)
        self._reader = gevent.spawn(self._read, rep_read)
        return self.pid

    def _on_exit(self):
        self.returncode = os.waitstatus_to_exitcode(self._watcher.rstatus)
        self._watcher.stop()
        self.exited.set()
        if not self.ready.ready():
            self.ready.set_exception(WorkerError(f"L7R worker {self.index} exited ({self.returncode}) before it "
                                                 "served", 1))

    def _read(self, fd):
        reports = gevent.fileobject.FileObjectPosix(fd, "rb", close=True)
        for line in reports:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            op = message.get("op")
            if op == "ready":
                self.ready.set(message.get("port"))
            elif op == "error" and not self.ready.ready():
                self.ready.set_exception(WorkerError(message.get("message", "failed"), message.get("exit", 1)))
            elif message.get("id") in self._answers:
                self._answers.pop(message["id"]).set(message)

    def send(self, message):
        if self._control is None or self.exited.is_set():
            return False
        try:
            self._control.write((json.dumps(message) + "\n").encode())
            self._control.flush()
            return True
        except OSError:
            return False

    def ask(self, message, ids, timeout):
        """Send a request and wait for its answer (None when none came)."""
        answer = gevent.event.AsyncResult()
        message = dict(message, id=next(ids))
        self._answers[message["id"]] = answer
        if not self.send(message):
            self._answers.pop(message["id"], None)
            return None
        try:
            return answer.get(timeout=timeout)
        except gevent.Timeout:
            self._answers.pop(message["id"], None)
            return None

    def signal(self, signum):
        if self.pid is not None and not self.exited.is_set():
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def close(self):
        if self._control is not None:
            try:
                self._control.close()
            except OSError:
                pass
            self._control = None


class L7RWorkers:
    """count workers for cfg; host_id() gives this node's host row (for the rows of a dead
    worker)."""

    def __init__(self, cfg, db, count, host_id):
        self.cfg = cfg
        self.db = db
        self.count = count
        self.host_id = host_id
        self.workers = []
        self.guard = None
        self.port = None
        self._stopping = False
        self._ids = itertools.count(1)
        self._restarts = {}              # index -> how many quick restarts in a row

    # --- start ---------------------------------------------------------------------------
    def prepare(self):
        """The port, before the HKD touches the host (OSError: taken)."""
        self.guard = guard_port(self.cfg)
        self.port = self.guard.getsockname()[1]
        return self

    def live_pids(self):
        return sorted(w.pid for w in self.workers if w.pid is not None and not w.exited.is_set())

    def start(self):
        """Start the workers one after the other, each serving before the next starts (a new
        worker's start-up sweep must know every sibling that may hold a row). Raises
        WorkerError with the first failure."""
        for index in range(self.count):
            if self._stopping:          # a signal stopped the node while its workers started
                return self
            worker = self._spawn(index)
            try:
                self._await_ready(worker)
            except WorkerError:
                if self._stopping:
                    return self
                raise
        log.info("%d L7R workers serving on port %s (pids %s)", self.count, self.port,
                 " ".join(str(p) for p in self.live_pids()))
        return self

    def _spawn(self, index):
        worker = Worker(index)
        worker.spawn(self.cfg, self.live_pids())
        if index < len(self.workers):
            self.workers[index] = worker
        else:
            self.workers.append(worker)
        # the others learn of it before it can claim anything
        self._announce()
        gevent.spawn(self._watch, worker)
        return worker

    def _await_ready(self, worker):
        try:
            worker.ready.get(timeout=START_TIMEOUT)
        except gevent.Timeout:
            worker.signal(signal.SIGKILL)
            raise WorkerError(f"L7R worker {worker.index} did not serve within {START_TIMEOUT:.0f} s") from None

    def _announce(self):
        pids = self.live_pids()
        for worker in self.workers:
            worker.send({"op": "pids", "pids": pids})

    # --- a worker's end ------------------------------------------------------------------------
    def _watch(self, worker):
        worker.exited.wait()
        worker.close()
        if self.workers[worker.index] is worker:
            self._announce()
        host_id = self.host_id()
        released = 0
        if host_id is not None:
            for attempt in range(10):
                try:
                    released = runtime.release_process_sessions(self.db, host_id, worker.pid)
                    break
                except Exception as exc:
                    log.warning("rows of L7R worker %s not released yet (%s)", worker.pid, exc)
                    gevent.sleep(min(0.5 * (attempt + 1), 5))
        if self._stopping:
            return
        log.error("L7R worker %d (pid %d) exited (%s); %d session rows released; starting it again",
                  worker.index, worker.pid, worker.returncode, released)
        quick = time.monotonic() - worker.started < 60
        self._restarts[worker.index] = self._restarts.get(worker.index, 0) + 1 if quick else 0
        delay = RESTART_DELAYS[min(self._restarts[worker.index], len(RESTART_DELAYS) - 1)]
        gevent.sleep(delay)
        if self._stopping:
            return
        fresh = self._spawn(worker.index)
        try:
            self._await_ready(fresh)
            log.info("L7R worker %d serving again (pid %d)", fresh.index, fresh.pid)
        except WorkerError as exc:
            if not self._stopping:
                log.error("L7R worker %d did not start again: %s", fresh.index, exc)

    # --- signals and stop ------------------------------------------------------------------
    def signal(self, signum):
        for worker in self.workers:
            worker.signal(signum)

    def stop(self, grace):
        """Drain every worker (grace seconds for its sessions; 0: close them now) and wait for
        them to exit; one that does not is killed."""
        self._stopping = True
        self.signal(signal.SIGTERM if grace else signal.SIGINT)
        deadline = time.monotonic() + grace + 30
        for worker in self.workers:
            if not worker.exited.wait(max(0.1, deadline - time.monotonic())):
                log.error("L7R worker %d (pid %d) did not stop; killing it", worker.index, worker.pid)
                worker.signal(signal.SIGKILL)
                worker.exited.wait(5)
        for worker in self.workers:
            worker.close()
        if self.guard is not None:
            self.guard.close()
            self.guard = None

    # --- metrics -----------------------------------------------------------------------------
    def expositions(self, timeout=2.0):
        """Every serving worker's metrics text (a worker that does not answer in time is left out)."""
        asks = [gevent.spawn(w.ask, {"op": "metrics"}, self._ids, timeout) for w in self.workers
                if not w.exited.is_set()]
        gevent.joinall(asks, timeout=timeout + 1)
        return [g.value["text"] for g in asks if g.value and "text" in g.value]
