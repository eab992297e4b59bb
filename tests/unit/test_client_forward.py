"""qvd-client's splice on socket pairs: early bytes first, half-close both ways, linger."""
import socket
import time

import gevent

from qvd_gevent.client.forward import SocketEnd, splice


def test_early_bytes_then_both_directions_then_server_close():
    remote, remote_peer = socket.socketpair()   # remote_peer plays the L7R
    local, local_peer = socket.socketpair()     # local_peer plays nxproxy
    job = gevent.spawn(splice, remote, SocketEnd(local), b"early", 5.0)
    assert local_peer.recv(100) == b"early"
    local_peer.sendall(b"to the vm")
    assert remote_peer.recv(100) == b"to the vm"
    remote_peer.sendall(b"from the vm")
    assert local_peer.recv(100) == b"from the vm"
    remote_peer.close()                          # the server ends the session
    assert local_peer.recv(100) == b""           # the local side sees EOF
    assert job.get(timeout=5) == (len(b"to the vm"), len(b"early") + len(b"from the vm"))


def test_local_half_close_still_delivers_the_servers_last_bytes():
    remote, remote_peer = socket.socketpair()
    local, local_peer = socket.socketpair()
    job = gevent.spawn(splice, remote, SocketEnd(local), b"", 5.0)
    local_peer.sendall(b"last line\n")
    local_peer.shutdown(socket.SHUT_WR)
    assert remote_peer.recv(100) == b"last line\n"
    assert remote_peer.recv(100) == b""          # the FIN went through
    remote_peer.sendall(b"echo of last line\n")  # ...and the answer still comes back
    remote_peer.close()
    got = b""
    while True:
        chunk = local_peer.recv(100)
        if not chunk:
            break
        got += chunk
    assert got == b"echo of last line\n"
    job.get(timeout=5)


def test_linger_bounds_the_wait_for_a_silent_server():
    remote, remote_peer = socket.socketpair()
    local, local_peer = socket.socketpair()
    started = time.monotonic()
    job = gevent.spawn(splice, remote, SocketEnd(local), b"", 0.3)
    local_peer.shutdown(socket.SHUT_WR)
    job.get(timeout=5)
    assert 0.25 < time.monotonic() - started < 3
    remote_peer.close()
