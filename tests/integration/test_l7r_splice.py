"""The splice on its own, over real socket pairs: byte-exact both ways, backpressure with
at most one pending chunk, half-close from either side, TLS leg."""
import os
import socket

import gevent
import pytest

from qvd_gevent.l7r.splice import Splice


def pair():
    a, b = socket.socketpair()
    return a, b


@pytest.mark.parametrize("use_os_splice", [False, True])
def test_backpressure_and_exact_bytes(use_os_splice):
    client_far, client_near = pair()
    vm_near, vm_far = pair()
    done = []
    sp = Splice(client_near, vm_near, on_done=done.append, use_os_splice=use_os_splice).start()
    assert sp.uses_os_splice == use_os_splice
    payload = os.urandom(8 * 1024 * 1024)
    writer = gevent.spawn(vm_far.sendall, payload)
    gevent.sleep(0.5)
    # the client reads nothing: the VM's writer is held back, the splice keeps one chunk at most
    assert not writer.ready()
    if not use_os_splice:
        assert sp.down.pending is None or len(sp.down.pending) <= 65536
    got = bytearray()
    while len(got) < len(payload):
        got += client_far.recv(1 << 20)
    assert bytes(got) == payload
    writer.join(5)
    # the other way, then a half-close from the VM side first
    client_far.sendall(b"abc")
    assert vm_far.recv(10) == b"abc"
    vm_far.shutdown(socket.SHUT_WR)
    assert client_far.recv(10) == b""          # EOF reached the client
    client_far.sendall(b"still open")          # the other direction still works
    assert vm_far.recv(100) == b"still open"
    client_far.shutdown(socket.SHUT_WR)
    assert vm_far.recv(10) == b""
    for _ in range(100):
        if done:
            break
        gevent.sleep(0.02)
    assert done == ["closed"]
    assert sp.bytes_to_client == len(payload) and sp.bytes_to_vm == 13


def test_close_ends_both_legs():
    client_far, client_near = pair()
    vm_near, vm_far = pair()
    done = []
    sp = Splice(client_near, vm_near, on_done=done.append).start(b"early")
    assert vm_far.recv(10) == b"early"
    sp.close("taken over")
    assert done == ["taken over"]
    assert client_far.recv(10) == b"" and vm_far.recv(10) == b""
