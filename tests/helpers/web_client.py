"""What the browser client does, in Python: the web login and the desktop's WebSocket
(wsproto as the client), over real TLS to a node on loopback."""
import base64
import json
import os
import socket
import ssl

import gevent
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping


def tls_context(cert):
    ctx = ssl.create_default_context(cafile=cert)
    ctx.check_hostname = False
    return ctx


def tls_connect(port, cert):
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return tls_context(cert).wrap_socket(raw, server_hostname="localhost")


def read_response(sock):
    """(status, {header: value}, body, bytes after the head) of one answer (no chunked bodies)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0] else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if status == 101:
        return status, headers, b"", rest
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:length], rest[length:]


def web_login(port, cert, login, password, origin="default", method="POST"):
    """(status, headers, parsed JSON or text) of POST /qvd/web/login."""
    origin = f"https://127.0.0.1:{port}" if origin == "default" else origin
    sock = tls_connect(port, cert)
    try:
        basic = base64.b64encode(f"{login}:{password}".encode()).decode()
        lines = [f"{method} /qvd/web/login HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Authorization: Basic {basic}",
                 "Content-Length: 0"]
        if origin is not None:
            lines.append(f"Origin: {origin}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        status, headers, body, _ = read_response(sock)
    finally:
        sock.close()
    try:
        return status, headers, json.loads(body)
    except ValueError:
        return status, headers, body.decode(errors="replace")


class Desktop:
    """An open desktop WebSocket: send bytes, receive bytes, see how it closed."""

    def __init__(self, sock, leftover):
        self.sock = sock
        self.ws = Connection(ConnectionType.CLIENT)
        self.closed = None
        self.buffer = b""
        if leftover:
            self._feed(leftover)

    def _feed(self, data):
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, BytesMessage):
                self.buffer += event.data
            elif isinstance(event, Ping):
                self.sock.sendall(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self.closed = (event.code, event.reason)

    def send(self, data):
        self.sock.sendall(self.ws.send(BytesMessage(data=data)))

    def recv_until(self, predicate, timeout=15):
        self.sock.settimeout(timeout + 1)       # silence until then is not an end: the Timeout says so
        with gevent.Timeout(timeout):
            while not predicate(self) and self.closed is None:
                try:
                    data = self.sock.recv(65536)
                except (ssl.SSLError, OSError):
                    data = b""
                if not data:
                    self.closed = self.closed or ("eof", "")
                    break
                self._feed(data)
        return self

    # the RFB viewer of tests/helpers/rfb.py reads through recv/sendall
    def recv(self, n):
        self.recv_until(lambda d: d.buffer, timeout=15)
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def sendall(self, data):
        self.send(data)

    def settimeout(self, seconds):
        pass

    def close(self):
        self.sock.close()


def open_desktop(port, cert, vm_id, token, origin="default", extra_query="", protocols=None, headers=(), sock=None):
    """(status, headers, Desktop or the refusal's body) of the WebSocket handshake (on sock, a
    TLS connection to the node, else a new one)."""
    origin = f"https://127.0.0.1:{port}" if origin == "default" else origin
    sock = sock or tls_connect(port, cert)
    key = base64.b64encode(os.urandom(16)).decode()
    offered = protocols if protocols is not None else (["binary", f"qvd-token.{token}"] if token else ["binary"])
    lines = [f"GET /qvd/web/desktop?id={vm_id}{extra_query} HTTP/1.1", f"Host: 127.0.0.1:{port}",
             "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if offered:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(offered))
    if origin is not None:
        lines.append(f"Origin: {origin}")
    lines.extend(f"{k}: {v}" for k, v in headers)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    status, answer_headers, body, rest = read_response(sock)
    if status != 101:
        sock.close()
        return status, answer_headers, body.decode(errors="replace")
    return status, answer_headers, Desktop(sock, rest)


class Spliced:
    """A socket after the 101, with the bytes that came behind the head given first."""

    def __init__(self, sock, leftover):
        self.sock = sock
        self.leftover = leftover

    def recv(self, n):
        if self.leftover:
            data, self.leftover = self.leftover[:n], self.leftover[n:]
            return data
        return self.sock.recv(n)

    def sendall(self, data):
        self.sock.sendall(data)

    def settimeout(self, seconds):
        self.sock.settimeout(seconds)

    def close(self):
        self.sock.close()


def native_connect(port, cert, vm_id, login="demo", password="demo"):
    """connect_to_vm as the original client does; returns the spliced connection after the 101."""
    sock = tls_connect(port, cert)
    basic = base64.b64encode(f"{login}:{password}".encode()).decode()
    sock.sendall((f"GET /qvd/connect_to_vm?id={vm_id} HTTP/1.1\r\nAuthorization: Basic {basic}\r\n"
                  "Connection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n").encode())
    data = b""
    with gevent.Timeout(60):
        while True:
            at = data.find(b"HTTP/1.1 101 ")
            end = data.find(b"\r\n\r\n", at) if at >= 0 else -1
            if end >= 0:
                return Spliced(sock, data[end + 4:])
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
