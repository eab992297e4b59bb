"""A browser session's byte pump: WebSocket frames on the client's (TLS) connection, the
raw VNC stream on the VM's display connection (docs/protocol.md#the-websocket).

Built like splice.py, for the same reason (memory per idle session): no greenlet and no
buffer while idle, four event-loop watchers whose callbacks run on the hub and read into
one process-wide scratch buffer. wsproto (sans-I/O) parses and writes the frames; it
hands over a frame's payload as it arrives, so nothing is held for a whole message.

Backpressure, both ways, with at most one pending chunk per direction:
- VM -> browser: a read from the VM (at most 64 KiB) becomes one binary frame; while the
  browser has not taken all of it, the VM is not read, so a slow browser slows the VNC
  server (TCP flow control end to end);
- browser -> VM: the payload of one read (at most ~48 KiB of frames) goes to the VM; while
  the VM has not taken it, the browser is not read. Answers to pings queue behind the
  frame being written, and the browser is not read while more than 4 KiB of them wait.
A message longer than ``max_message`` bytes ends the session (close code 1009); text
frames end it too (1003): noVNC speaks binary only.

A TLS browser connection is one OpenSSL object read and written here, and TLS 1.3 lets
the browser ask for key updates, answered by a write OpenSSL makes inside a read: the
browser is not read while a frame to it is half written, and a read that must write first
waits for the socket to take data, not for more to read (the rules of the splice:
docs/design.md#the-splice-and-tls).

``close(reason)`` (a takeover, a drain, an admin's disconnect) sends a close frame with
code 4000 and the reason, if the connection can take it at once, then closes both sides.
``on_done(reason)`` is called once, on the hub; it must not block.
"""
import logging
import ssl

import gevent
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from .splice import tune_socket

log = logging.getLogger("qvd.l7r.ws")

_SCRATCH = bytearray(65536)
_VIEW = memoryview(_SCRATCH)
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_BURST = 16
CONTROL_BACKLOG = 4096      # bytes of control answers queued before the browser is no longer read
CLOSE_GRACE = 5.0           # seconds a closing browser gets to take its close frame
CLOSE_CODE_SERVER = 4000    # application code: the node ended the session (takeover, drain)


class WsRelay:
    """Relays between a browser's WebSocket (after the 101) and a VM's stream socket."""

    def __init__(self, client, vm, max_message, on_done=None):
        self.client = client
        self.vm = vm
        self.max_message = max_message
        self.on_done = on_done
        self.ws = Connection(ConnectionType.SERVER)
        self.closed = False
        self.closing = None          # reason: finish once the close frame is out
        self.reason = None
        self.bytes_to_vm = 0         # payload bytes from the browser
        self.bytes_to_client = 0     # stream bytes from the VM
        self._to_client = None       # (bytes, offset) not yet taken by the browser
        self._control = 0
        self._to_vm = None           # (bytes, offset) not yet taken by the VM
        self._client_tls = getattr(client, "pending", None) is not None   # tls.TlsStream, gevent's SSLSocket
        self._read_owes_write = False    # a read of the browser's TLS must write first: wait for the socket to take data
        self._message = 0
        self._grace = None
        for s in (client, vm):
            s.settimeout(0.0)
            tune_socket(s)
        loop = gevent.get_hub().loop
        self._client_in = loop.io(client.fileno(), 1)
        self._client_out = loop.io(client.fileno(), 2)
        self._vm_in = loop.io(vm.fileno(), 1)
        self._vm_out = loop.io(vm.fileno(), 2)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self, leftover=b""):
        if leftover:
            self._safe(self._from_client, bytes(leftover))
        self._update()
        if not self.closed and self._client_tls and self.client.pending():
            gevent.get_hub().loop.run_callback(self._safe, self._on_client_readable)
        return self

    def close(self, reason="closed by server"):
        """End the session now, telling the browser why if its connection takes it at once."""
        if self.closed:
            return
        if self._to_client is None and self.ws.state is ConnectionState.OPEN:
            frame = self.ws.send(CloseConnection(code=CLOSE_CODE_SERVER, reason=reason[:120]))
            try:
                self.client.send(frame)
            except (OSError, ValueError):
                pass
        self._finish(reason)

    def _finish(self, reason):
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        for w in (self._client_in, self._client_out, self._vm_in, self._vm_out, self._grace):
            if w is not None:
                w.stop()
                w.close()
        for s in (self.client, self.vm):
            try:
                s.close()
            except OSError:
                pass
        if self.on_done is not None:
            try:
                self.on_done(reason)
            except Exception:
                log.exception("ws relay on_done failed")

    def _safe(self, fn, *args):
        try:
            fn(*args)
        except Exception as exc:  # a callback on the hub must never raise
            self._finish(f"error: {exc}")

    def _update(self):
        """Start exactly the watchers the state calls for."""
        if self.closed:
            return
        reading_allowed = self.closing is None
        self._want(self._client_in, reading_allowed and self._may_read_client(), self._on_client_readable)
        self._want(self._vm_in, reading_allowed and self._to_client is None, self._on_vm_readable)
        self._want(self._client_out, self._to_client is not None or self._read_owes_write, self._on_client_writable)
        self._want(self._vm_out, self._to_vm is not None, self._on_vm_writable)

    def _want(self, watcher, on, callback):
        if on and not watcher.active:
            watcher.start(self._safe, callback)
        elif not on and watcher.active:
            watcher.stop()

    def _close_with(self, code, reason):
        """Send a close frame and end once it is out (or after CLOSE_GRACE)."""
        if self.ws.state is ConnectionState.OPEN:
            self._queue_client(self.ws.send(CloseConnection(code=code, reason=reason)))
        self._closing(reason)

    def _closing(self, reason):
        if self.closing is not None or self.closed:
            return
        self.closing = reason
        if self._to_client is None:
            self._finish(reason)
            return
        self._grace = gevent.get_hub().loop.timer(CLOSE_GRACE)
        self._grace.start(self._finish, reason)

    # --- browser -> VM -------------------------------------------------------------------
    def _may_read_client(self):
        # a TLS browser is not read while a frame to it is half written (OpenSSL fails a read
        # that has a key update to answer then) nor while a read waits to write first
        if self._client_tls and (self._to_client is not None or self._read_owes_write):
            return False
        return self._to_vm is None and self._control < CONTROL_BACKLOG

    def _on_client_readable(self):
        for _ in range(_BURST):
            if self.closed or self.closing is not None or not self._may_read_client():
                break
            filled, state = self._fill(self.client, len(_VIEW) - 16384)
            if filled:
                self._from_client(bytes(_VIEW[:filled]))
            if state == "eof":
                self._finish("the browser closed the connection")
                return
            if state == "owes-write":
                self._read_owes_write = True
                break
            if state != "more":
                break
        else:
            # more may wait inside the TLS object (already read off the fd): come back soon
            gevent.get_hub().loop.run_callback(self._safe, self._on_client_readable)
        self._update()

    def _from_client(self, data):
        self.ws.receive_data(data)
        payload = []
        for event in self.ws.events():
            if isinstance(event, BytesMessage):
                self._message += len(event.data)
                if self._message > self.max_message:
                    self._close_with(1009, f"message longer than {self.max_message} bytes")
                    return
                if event.message_finished:
                    self._message = 0
                payload.append(event.data)
            elif isinstance(event, TextMessage):
                self._close_with(1003, "binary messages only")
                return
            elif isinstance(event, Ping):
                self._queue_client(self.ws.send(event.response()), control=True)
            elif isinstance(event, CloseConnection):
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    self._queue_client(self.ws.send(event.response()))
                    self._closing(f"the browser closed the session ({event.code})")
                else:       # a protocol error wsproto found in the browser's frames
                    self._close_with(event.code, event.reason or "protocol error")
                return
        if payload:
            data = payload[0] if len(payload) == 1 else b"".join(payload)
            self.bytes_to_vm += len(data)
            self._to_vm = self._write(self.vm, data, 0, "to VM")

    def _on_vm_writable(self):
        data, offset = self._to_vm
        self._to_vm = self._write(self.vm, data, offset, "to VM")
        self._update()

    # --- VM -> browser -------------------------------------------------------------------
    def _on_vm_readable(self):
        for _ in range(_BURST):
            if self.closed or self.closing is not None or self._to_client is not None:
                break
            try:
                n = self.vm.recv_into(_VIEW)
            except _WOULD_BLOCK:
                break
            except OSError as exc:
                self._finish(f"VM read error: {exc.strerror or exc}")
                return
            if n == 0:
                self._close_with(1000, "the desktop closed the session")
                break
            self.bytes_to_client += n
            self._queue_client(self.ws.send(BytesMessage(data=bytes(_VIEW[:n]))))
        self._update()

    def _queue_client(self, frame, control=False):
        if self.closed:
            return
        if self._to_client is None:
            self._to_client = self._write(self.client, frame, 0, "to browser")
        else:
            data, offset = self._to_client
            self._to_client = (bytes(memoryview(data)[offset:]) + frame, 0)
        if control and self._to_client is not None:
            self._control += len(frame)

    def _on_client_writable(self):
        if self._read_owes_write:
            # the read that had to write first is tried again (the write it owes does not
            # show on the fd as readable)
            self._read_owes_write = False
            gevent.get_hub().loop.run_callback(self._safe, self._on_client_readable)
        if self._to_client is not None:
            data, offset = self._to_client
            self._to_client = self._write(self.client, data, offset, "to browser")
            if self._to_client is None:
                self._control = 0
                if self.closing is not None:
                    self._finish(self.closing)
                    return
        self._update()

    # --- socket I/O ----------------------------------------------------------------------
    def _fill(self, sock, limit):
        """Read into the scratch buffer until nearly full or dry: (bytes, more|dry|owes-write|eof|error)."""
        filled = 0
        while filled <= limit:
            try:
                n = sock.recv_into(_VIEW[filled:])
            except ssl.SSLWantWriteError:
                return filled, "owes-write"
            except _WOULD_BLOCK:
                return filled, "dry"
            except OSError as exc:
                self._finish(f"browser read error: {exc.strerror or exc}")
                return 0, "error"
            if n == 0:
                return filled, "eof"
            filled += n
        return filled, "more"

    def _write(self, sock, data, offset, label):
        """Write data[offset:] now; return what is left as (data, offset), or None."""
        view = memoryview(data)
        try:
            while offset < len(view):
                n = sock.send(view[offset:])
                if not n:
                    break
                offset += n
        except _WOULD_BLOCK:
            pass
        except OSError as exc:
            self._finish(f"write error {label}: {exc.strerror or exc}")
            return None
        return None if offset >= len(view) else (data, offset)
