"""Moving bytes between the upgraded TLS connection and a local end (socket or command).

Half-close: when the local side stops sending, we send a TCP FIN under the TLS stream
(the session stays readable) and keep passing the server's bytes for up to
``linger`` seconds, so an echo of the last bytes still arrives. (The original client
closed the TLS connection at once and lost them.) When the server closes, the local
side gets EOF on its input.
"""
import os
import socket

import gevent
from gevent import os as gos

CHUNK = 16384


def half_close(sock):
    """Send FIN on the TCP connection under sock (TLS or not) without tearing TLS down."""
    try:
        dup = socket.socket(fileno=os.dup(sock.fileno()))
    except OSError:
        return
    try:
        dup.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        dup.close()


class SocketEnd:
    """A local socket as one end of the splice."""

    def __init__(self, sock):
        self.sock = sock

    def read(self):
        return self.sock.recv(CHUNK)

    def write(self, data):
        self.sock.sendall(data)

    def close_write(self):
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        self.sock.close()


class PipeEnd:
    """A child's stdout (read) and stdin (write) as one end of the splice."""

    def __init__(self, read_fd, write_fd):
        self.read_fd = read_fd
        self.write_fd = write_fd
        gos.make_nonblocking(read_fd)
        gos.make_nonblocking(write_fd)

    def read(self):
        return gos.nb_read(self.read_fd, CHUNK)

    def write(self, data):
        view = memoryview(data)
        while view:
            written = gos.nb_write(self.write_fd, view)
            view = view[written:]

    def close_write(self):
        if self.write_fd is not None:
            try:
                os.close(self.write_fd)
            except OSError:
                pass
            self.write_fd = None

    def close(self):
        self.close_write()
        if self.read_fd is not None:
            try:
                os.close(self.read_fd)
            except OSError:
                pass
            self.read_fd = None


def splice(remote, local, initial=b"", linger=2.0):
    """Pass bytes both ways until the server closes, or the local side closed and the
    server said nothing more for `linger` seconds. Returns (bytes_up, bytes_down)."""
    counts = [0, 0]

    def up():
        try:
            while True:
                data = local.read()
                if not data:
                    break
                remote.sendall(data)
                counts[0] += len(data)
        except OSError:
            pass
        half_close(remote)

    def down():
        try:
            if initial:
                local.write(initial)
                counts[1] += len(initial)
            while True:
                data = remote.recv(CHUNK)
                if not data:
                    break
                local.write(data)
                counts[1] += len(data)
        except OSError:
            pass
        local.close_write()

    g_up = gevent.spawn(up)
    g_down = gevent.spawn(down)
    finished = gevent.wait([g_up, g_down], count=1)
    if g_down in finished:
        g_up.kill()  # the session is over; whatever the local side still sends has nowhere to go
    else:
        g_down.join(timeout=linger)
        g_down.kill()
    return counts[0], counts[1]
