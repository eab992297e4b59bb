"""Moving bytes between a client and a VM's display port once the 101 went out.

Memory is the point: an idle spliced session must cost little. So a session has no
greenlet and no buffer of its own while idle: each direction is an event-loop watcher
whose callback runs on the hub, reads into ONE process-wide scratch buffer
(``recv_into``), writes straight on, and keeps at most one pending chunk (a copy of what
the destination did not take yet) while it waits for the destination to drain; reading
from that source stops meanwhile, so a slow side holds back the fast one (TCP flow
control end to end).

When both legs are plaintext (``l7r.use_ssl = 0`` behind a TLS-terminating balancer) the
bytes go through a pipe with ``os.splice`` and never enter user space.

Half-close: EOF from one side is passed on as ``shutdown(SHUT_WR)`` to the other once its
pending chunk is written; the session ends when both directions are finished, on any
error, or on ``close()`` (takeover, drain). ``on_done(reason)`` is called once, on the
hub: it must not block (spawn a greenlet for database work).

A TLS leg is one OpenSSL object read by one pump and written by the other, and TLS 1.3
lets the client ask for key updates, which OpenSSL answers with a write of its own made
inside a later read. Two rules keep that safe (docs/design.md#the-splice-and-tls):

- a pump does not read a TLS source while the other pump's write into the same object is
  half done (its pending chunk): OpenSSL fails the connection ("bad length") when such a
  read has a key update to answer (openssl/openssl#8677);
- a read that wants to write (the key update's answer does not fit the socket now) waits
  for the socket to take data, not for more to read: the socket stays readable, so
  waiting for that would call the read again at once, for ever, at full CPU.
"""
import errno
import logging
import os
import socket
import ssl
import weakref

import gevent
import gevent.ssl

from ..common import metrics
from . import tls

log = logging.getLogger("qvd.l7r.splice")

_SCRATCH_SIZE = 65536
_SCRATCH = bytearray(_SCRATCH_SIZE)
_VIEW = memoryview(_SCRATCH)
_TLS_RECORD = 16384         # the most plaintext one TLS record carries
_GATHER_LIMIT = _SCRATCH_SIZE - _TLS_RECORD    # room for one more record
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_TLS_EOF = (ssl.SSLZeroReturnError, ssl.SSLEOFError)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_NONBLOCK", 2) | getattr(os, "SPLICE_F_MOVE", 1)
_BURST = 16  # reads per callback before yielding to other sessions

# qvd_l7r_splice_bytes_total is summed at scrape time (ended sessions + live ones), not
# counted per read: the hot path then costs one integer add.
_ended_bytes = {"to_vm": 0, "to_client": 0}
_live = weakref.WeakSet()


def _splice_bytes():
    totals = dict(_ended_bytes)
    for splice in list(_live):
        if not splice.closed:
            totals["to_vm"] += splice.up.moved
            totals["to_client"] += splice.down.moved
    return {(("direction", k),): v for k, v in totals.items()}


metrics.register_gauge_function("qvd_l7r_splice_bytes_total", _splice_bytes)


def tune_socket(sock, keepalive=True):
    """TCP_NODELAY and keepalives on a session leg."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass


def _leg(sock):
    """(the C-level object the pump reads and writes, the plain socket under it, TLS or not).

    The pump calls the C methods directly (``_ssl._SSLSocket.read/write``,
    ``_socket.socket.recv_into/send``): gevent's wrappers add several Python frames per
    call and nothing the pump needs, as it never blocks."""
    if isinstance(sock, tls.TlsStream):
        return sock.tls, sock.raw, True
    if isinstance(sock, gevent.ssl.SSLSocket):
        return sock._sslobj, sock._sock, True
    if isinstance(sock, ssl.SSLSocket):      # the standard library's (not monkey-patched)
        return sock._sslobj, sock, True
    raw = getattr(sock, "_sock", sock)       # gevent's socket wraps a _socket.socket
    return raw, raw, False


class _Pump:
    """One direction, src -> dst."""

    __slots__ = ("splice", "src", "dst", "raw_src", "raw_dst", "src_tls", "dst_tls", "label", "reader", "writer",
                 "pending", "pipe", "in_pipe", "eof", "finished", "moved", "sibling", "paused", "waker")

    def __init__(self, splice, src, dst, label, use_pipe):
        self.splice = splice
        self.src, self.raw_src, self.src_tls = _leg(src)
        self.dst, self.raw_dst, self.dst_tls = _leg(dst)
        self.label = label
        loop = gevent.get_hub().loop
        self.reader = loop.io(self.raw_src.fileno(), 1)
        self.writer = loop.io(self.raw_dst.fileno(), 2)
        self.pending = None          # bytes not yet taken by dst (user-space path)
        self.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) if use_pipe else None
        self.in_pipe = 0             # bytes sitting in the pipe (splice path)
        self.eof = False
        self.finished = False
        self.moved = 0
        self.sibling = None          # the pump writing into this one's source (one TLS object)
        self.paused = False          # not reading: the sibling's write into our TLS source is half done
        self.waker = None            # (TLS source) waits for the source to take data: a read wants to write

    # --- lifecycle ---------------------------------------------------------------------
    def start(self, initial=b""):
        if initial:
            self._write(memoryview(initial), copy=True)
        if self.pending is None and not self.in_pipe:
            self.reader.start(self._on_readable)
            if self.src_tls and self.src.pending():
                # bytes already decrypted inside the TLS object: the fd will not signal them
                gevent.get_hub().loop.run_callback(self._on_readable)

    def close(self):
        for w in (self.reader, self.writer, self.waker):
            if w is not None:
                w.stop()
                w.close()
        if self.pipe:
            for fd in self.pipe:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.pipe = None

    # --- reading -----------------------------------------------------------------------
    def _on_readable(self):
        """Read what the source has, write it on; per message this is the whole of the
        Python the relay runs (one frame: the read, the write and their checks inline).

        Called by the watcher and by the burst callback below: either may find that the
        other already left a pending chunk (or EOF); reading on would reorder or drop bytes.
        A callback on the hub must never raise: any error ends the session.

        A TLS read returns one record (16 KiB at most): several are gathered before one
        send, saving a system call and a trip through here per record. A read that returns
        less than it could have (a short record, a socket read that did not fill the
        buffer) means the source is dry for now: no second read just to be told so (an
        exception per message); should more have arrived meanwhile, the fd is still
        readable and the watcher (level-triggered) calls again."""
        try:
            if self.splice.closed or self.eof or self.pending is not None or self.in_pipe:
                return
            if self.src_tls and self.sibling.pending is not None and self.sibling.dst_tls:
                self.paused = True               # until the sibling's write is whole (see the module doc)
                self.reader.stop()
                return
            if self.pipe is not None:
                for _ in range(_BURST):
                    if not self._splice_in() or self.in_pipe:
                        return
                gevent.get_hub().loop.run_callback(self._on_readable)
                return
            src, dst, tls_src = self.src, self.dst, self.src_tls
            for _ in range(_BURST):
                filled, more, eof, wants_write = 0, False, False, False
                try:
                    if tls_src:
                        while True:
                            n = src.read(_TLS_RECORD, _VIEW[filled:] if filled else _SCRATCH)
                            if not n:
                                eof = True
                                break
                            filled += n
                            if n < _TLS_RECORD and not src.pending():
                                break
                            if filled > _GATHER_LIMIT:
                                more = True
                                break
                    else:
                        filled = src.recv_into(_SCRATCH)
                        eof = not filled
                        more = filled == _SCRATCH_SIZE
                except ssl.SSLWantWriteError:
                    wants_write = True           # a TLS read with a write of its own to finish
                except _WOULD_BLOCK:
                    pass
                except _TLS_EOF:
                    eof = True
                except OSError as exc:
                    self.splice._finish(f"{self.label} read error: {exc.strerror or exc}")
                    return
                if filled:
                    self.moved += filled
                    view = _VIEW[:filled]
                    try:
                        sent = dst.write(view) if self.dst_tls else dst.send(view)
                    except _WOULD_BLOCK:
                        self._keep(bytes(view))
                        return
                    except OSError as exc:
                        self.splice._finish(f"{self.label} write error: {exc.strerror or exc}")
                        return
                    if sent < filled:
                        self._write(view[sent:], copy=True)     # the rest, or keep it pending
                        if self.splice.closed:
                            return
                if eof:
                    self._on_eof()
                    return
                if wants_write and self.pending is None:
                    self._read_when_writable()
                    return
                if not more or self.pending is not None:
                    return
            # more may wait inside the TLS object (already read off the fd): come back soon
            gevent.get_hub().loop.run_callback(self._on_readable)
        except Exception as exc:
            self.splice._finish(f"error: {exc}")

    def _read_when_writable(self):
        """The TLS source's read must write first and the socket takes nothing now: read
        again once it does (its fd stays readable meanwhile, the reader would spin)."""
        self.reader.stop()
        if self.waker is None:
            self.waker = gevent.get_hub().loop.io(self.raw_src.fileno(), 2)
        self.waker.start(self._on_src_writable)

    def _on_src_writable(self):
        try:
            self.waker.stop()
            self._resume()
        except Exception as exc:
            self.splice._finish(f"error: {exc}")

    def _resume(self):
        """Read again (after a pause for the sibling, or a read that had to write first)."""
        self.paused = False
        if self.splice.closed or self.eof or self.pending is not None or self.in_pipe:
            return
        self.reader.start(self._on_readable)
        # what the TLS object holds, or the write it owes, does not show on the fd: try now
        gevent.get_hub().loop.run_callback(self._on_readable)

    def _splice_in(self):
        try:
            n = os.splice(self.src.fileno(), self.pipe[1], 65536, flags=_SPLICE_FLAGS)
        except _WOULD_BLOCK:
            return False
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return False
            self.splice._finish(f"{self.label} read error: {exc.strerror}")
            return False
        if n == 0:
            self._on_eof()
            return False
        self.moved += n
        self.in_pipe += n
        self._flush_pipe()
        return True

    def _on_eof(self):
        self.eof = True
        self.reader.stop()
        if self.pending is None and not self.in_pipe:
            self._shutdown_dst()

    # --- writing -----------------------------------------------------------------------
    def _write(self, view, copy):
        """Write view to dst now; keep what it does not take as the one pending chunk.

        A TLS write that would block must be retried with the same bytes (OpenSSL has
        already sent some of its records): the pending chunk is exactly that."""
        dst, sent, size = self.dst, 0, len(view)
        try:
            if self.dst_tls:
                sent = dst.write(view)          # all of it, or SSLWantWriteError
            else:
                while sent < size:
                    n = dst.send(view[sent:] if sent else view)
                    if not n:
                        break
                    sent += n
        except _WOULD_BLOCK:
            pass
        except OSError as exc:
            self.splice._finish(f"{self.label} write error: {exc.strerror or exc}")
            return
        if sent < size:
            self._keep(bytes(view[sent:]) if copy else view[sent:])

    def _keep(self, chunk):
        """dst takes no more now: hold chunk, stop reading, write it when dst drains."""
        self.pending = chunk
        self.reader.stop()
        self.writer.start(self._on_writable)

    def _flush_pipe(self):
        while self.in_pipe:
            try:
                n = os.splice(self.pipe[0], self.dst.fileno(), self.in_pipe, flags=_SPLICE_FLAGS)
            except _WOULD_BLOCK:
                break
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    break
                self.splice._finish(f"{self.label} write error: {exc.strerror}")
                return
            self.in_pipe -= n
        if self.in_pipe:
            self.reader.stop()
            self.writer.start(self._on_writable)

    def _on_writable(self):
        try:
            if self.splice.closed:
                return
            if self.pipe is not None:
                self._flush_pipe()
                drained = not self.in_pipe
            else:
                chunk, self.pending = self.pending, None
                self.writer.stop()
                self._write(memoryview(chunk), copy=False)
                drained = self.pending is None
                if not drained:
                    self.pending = bytes(self.pending)
            if self.splice.closed or not drained:
                return
            self.writer.stop()
            if self.sibling.paused:
                self.sibling._resume()
            if self.eof:
                self._shutdown_dst()
            else:
                self.reader.start(self._on_readable)
        except Exception as exc:
            self.splice._finish(f"error: {exc}")

    def _shutdown_dst(self):
        self.finished = True
        try:
            # a TLS half-close: TCP FIN without close_notify (the client sees EOF); the
            # TLS object stays, the other direction still reads through it
            self.raw_dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.splice._direction_finished()


class Splice:
    """Bidirectional splice of client and vm sockets; see the module docstring."""

    def __init__(self, client, vm, on_done=None, use_os_splice=None):
        self.client = client
        self.vm = vm
        self.on_done = on_done
        self.closed = False
        self.reason = None
        plain = not _leg(client)[2] and not _leg(vm)[2]
        use_pipe = plain if use_os_splice is None else (use_os_splice and plain)
        use_pipe = use_pipe and hasattr(os, "splice")
        for s in (client, vm):
            if isinstance(s, tls.TlsStream):
                s.drop_watchers()
            raw = _leg(s)[1]
            raw.settimeout(0.0)
            tune_socket(raw)
        self.up = _Pump(self, client, vm, "to_vm", use_pipe)
        self.down = _Pump(self, vm, client, "to_client", use_pipe)
        self.up.sibling, self.down.sibling = self.down, self.up
        self.uses_os_splice = use_pipe
        _live.add(self)

    def start(self, initial_to_vm=b""):
        self.up.start(initial_to_vm)
        self.down.start()
        return self

    @property
    def bytes_to_vm(self):
        return self.up.moved

    @property
    def bytes_to_client(self):
        return self.down.moved

    def _direction_finished(self):
        if self.up.finished and self.down.finished:
            self._finish("closed")

    def close(self, reason="closed by server"):
        self._finish(reason)

    def _finish(self, reason):
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        _ended_bytes["to_vm"] += self.up.moved
        _ended_bytes["to_client"] += self.down.moved
        self.up.close()
        self.down.close()
        for s in (self.client, self.vm):
            try:
                s.close()
            except OSError:
                pass
        if self.on_done is not None:
            try:
                self.on_done(reason)
            except Exception:
                log.exception("splice on_done failed")
