"""One L7R worker of a node (``l7r.workers``): the L7R alone, started and supervised by the
node's process (node/workers.py), never by hand.

    python -m qvd_gevent.node.l7r_worker --config FILE --index N --parent PID [--siblings P,P]

It listens on the node's L7R port beside its siblings (SO_REUSEPORT: the kernel spreads
connections over them), with a database pool and a LISTEN connection of its own, and
talks to the node over two pipes, one JSON object per line:

- fd 3, from the node: ``{"op": "pids", "pids": [...]}`` the node's live L7R workers (a
  session row one of them holds is live, not a dead run's: db/runtime.py decide_claim),
  ``{"op": "metrics", "id": N}`` (answered with this process's exposition), ``{"op":
  "ping", "id": N}``;
- fd 4, to the node: ``{"op": "ready", "port": P}`` once it serves, ``{"op": "error",
  "message": ...}`` when it cannot start, the answers.

Signals as the node's: SIGTERM drains, SIGINT stops, SIGHUP re-reads node.conf (blocked
until the worker serves, so one sent while it starts waits instead of ending it). When the
node process dies the kernel kills the worker (PR_SET_PDEATHSIG), as the node's own L7R
would die with it: the node's next start releases their rows.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.fileobject  # noqa: E402

from ..common import metrics  # noqa: E402
from ..common.logs import say_error  # noqa: E402
from ..config import ConfigError  # noqa: E402
from . import run  # noqa: E402
from .workers import worker_pool_size  # noqa: E402

log = logging.getLogger("qvd.node.worker")

CONTROL_FD, REPORT_FD = 3, 4
PR_SET_PDEATHSIG = 1
NODE_GONE_GRACE = 0.5        # s: the kernel's SIGKILL to a worker whose node died comes well before


def die_with_parent(parent):
    """SIGKILL when the node process dies (Linux); False when the node is gone already."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    return os.getppid() == parent


class Link:
    """The worker's end of the two pipes."""

    def __init__(self, siblings):
        self.siblings = frozenset(siblings)
        self.me = os.getpid()
        self._out = gevent.fileobject.FileObjectPosix(REPORT_FD, "wb", close=True)
        self._reader = None
        self.on_gone = None

    def node_pids(self):
        return self.siblings

    def send(self, message):
        self._out.write((json.dumps(message) + "\n").encode())
        self._out.flush()

    def start(self):
        self._reader = gevent.spawn(self._read)

    def _read(self):
        control = gevent.fileobject.FileObjectPosix(CONTROL_FD, "rb", close=True)
        for line in control:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            op = message.get("op")
            if op == "pids":
                self.siblings = frozenset(pid for pid in message["pids"] if pid != self.me)
            elif op == "metrics":
                self.send({"op": "metrics", "id": message.get("id"), "text": metrics.render()})
            elif op == "ping":
                self.send({"op": "pong", "id": message.get("id")})
        # the node closed its end: it is stopping us, or gone
        if self.on_gone is not None:
            self.on_gone()


def node_gone(node, parent):
    """The node closed its end of the control pipe. A node that stops its workers signals
    them first, so this is mostly the node dying: its exit closes its files before the
    kernel sends the SIGKILL of PR_SET_PDEATHSIG, and a stop begun in between would send
    session releases that land after the kill (the node's next start releases those rows
    itself; a test saw the row of a live session released by the dying worker). So wait
    for that SIGKILL; a worker whose node is gone and which is still alive leaves at once
    without a database write; one whose node is alive stops."""
    gevent.sleep(NODE_GONE_GRACE)
    if os.getppid() != parent:
        os._exit(1)
    node.stop(0)


def ready(node, link):
    """Serving: the signal handlers in place, then SIGHUP unblocked (the node starts its
    workers with it blocked: one sent while this one started, which Python's default would
    have ended, is handled now and re-reads node.conf), then the node told."""
    node.install_signal_handlers()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    link.send({"op": "ready", "port": node.l7r.port})


def main(argv=None):
    parser = argparse.ArgumentParser(prog="qvd-node l7r worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--siblings", default="")
    args = parser.parse_args(argv)
    if not die_with_parent(args.parent):
        return 1
    prog = f"qvd-node (L7R worker {args.index})"
    link = Link(int(p) for p in args.siblings.split(",") if p)
    try:
        cfg = run.load_node_config(args.config)
    except (ConfigError, OSError) as exc:
        link.send({"op": "error", "message": str(exc), "exit": 78})
        say_error(prog, exc)
        return 78
    run.raise_file_limit()
    node = run.Node(cfg, {run.L7R}, l7r_options={"node_pids": link.node_pids, "reuse_port": True},
                    pool_size=worker_pool_size(cfg), worker_index=args.index)
    link.on_gone = lambda: gevent.spawn(node_gone, node, args.parent)
    link.start()
    code = run.serve(node, prog, on_ready=lambda: ready(node, link),
                     on_failure=lambda message, exit_code: link.send({"op": "error", "message": message,
                                                                      "exit": exit_code}))
    return code


if __name__ == "__main__":
    sys.exit(main())
