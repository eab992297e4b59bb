"""An L7R worker whose node closed the control pipe (src/qvd_gevent/node/l7r_worker.py,
node_gone): a node that died is followed by the kernel's SIGKILL, and the worker must not
begin a stop (its session releases would land after the kill); a node that is alive and
closed the pipe gets its worker stopped."""
import os

import pytest

from qvd_gevent.node import l7r_worker


class Node:
    def __init__(self):
        self.stops = []

    def stop(self, grace):
        self.stops.append(grace)


class Exited(Exception):
    pass


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(l7r_worker, "NODE_GONE_GRACE", 0.01)

    def exit_(code):
        raise Exited(code)
    monkeypatch.setattr(l7r_worker.os, "_exit", exit_)


def test_a_worker_whose_node_died_leaves_without_stopping(fast, monkeypatch):
    monkeypatch.setattr(l7r_worker.os, "getppid", lambda: 1)        # reparented: the node is gone
    node = Node()
    with pytest.raises(Exited):
        l7r_worker.node_gone(node, parent=os.getpid() + 1)
    assert node.stops == []


def test_a_worker_whose_node_lives_stops_at_once(fast):
    node = Node()
    l7r_worker.node_gone(node, parent=os.getppid())
    assert node.stops == [0]
