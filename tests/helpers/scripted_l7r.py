"""A scripted stand-in for the L7R: the original L7R's bytes (docs/protocol.md#the-original-client)
over real TLS on 127.0.0.1, splicing VM 10 to a real VMA's display port after the 101.

Used while this project's own L7R is not available to a test; it also records the
requests the client sent so tests can check them byte for byte.
"""
import datetime
import ipaddress
import os
import re
import socket
import ssl

import gevent
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from gevent.server import StreamServer

from qvd_gevent.vma import display_gate
from qvd_gevent.vma.client import VmaClient, open_display

GOOD_AUTH = "Basic cXZkOnF2ZA=="  # qvd:qvd, as in the transcript
LIST_BODY = (b'[\n   {\n      "name" : "qvd-vm1",\n      "state" : "running",\n      "id" : 10,\n'
             b'      "blocked" : 0,\n      "is_application" : 0\n   }\n]\n')
PROGRESS = [b"Session acquired for VM_ID: 10", b"Starting X session at VM 10",
            b"Waiting for X session to come up on VM 10", b"Connecting X session for VM_ID: 10",
            b"Connection established"]
SLAVE_KEY = b"xz5oll8X2tXIvd5yzR3avsrXRLoJfGlyUhlSn1zqvAzPkvnClXma7K6I6djFiCwK"
UNAUTHORIZED = (b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"QVD\"\r\n"
                b"Content-Type: text/plain\r\nContent-Length: 17\r\n\r\n401 Unauthorized\n")


def make_cert(folder):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qvd-test-l7r")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return cert_path, key_path


class ScriptedL7R:
    """Answers like the original L7R; VM 10 works (spliced to a real VMA echo desktop),
    VM 11 fails with 503 after progress, VM 12 answers 426, others 404."""

    def __init__(self, cert, key, vma, x_port=4100, x_start_params=None):
        self.vma = vma
        self.x_port = x_port
        self.x_start_params = x_start_params or {}
        self.requests = []  # (connection number, request head bytes)
        self.connections = 0
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert, key)
        self.server = StreamServer(("127.0.0.1", 0), self.handle, ssl_context=context)
        self.server.start()
        self.port = self.server.server_port
        self.early_bytes = b""

    def handle(self, sock, peer):
        self.connections += 1
        number = self.connections
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                self.requests.append((number, head))
                lines = head.split(b"\r\n")
                headers = dict(line.split(b": ", 1) for line in lines[1:])
                target = lines[0].split(b" ")[1]
                if headers.get(b"Authorization") != GOOD_AUTH.encode():
                    sock.sendall(UNAUTHORIZED)
                    continue
                if target.startswith(b"/qvd/list_of_vm"):
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(LIST_BODY), LIST_BODY))
                    continue
                vm_id = re.search(rb"[?&]id=(\d+)", target).group(1)
                if vm_id == b"10":
                    self.connect_vm(sock)
                    return
                if vm_id == b"11":
                    body = b"The requested virtual machine is not available: VM didn't reach state 'running'. Timeout, retry later."
                    sock.sendall(b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: Starting virtual machine\r\n\r\n"
                                 b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                elif vm_id == b"12":
                    body = b"426 Upgrade Required\n"
                    sock.sendall(b"HTTP/1.1 426 Upgrade Required\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                else:
                    body = b"The requested virtual machine does not exist"
                    sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        finally:
            sock.close()

    def connect_vm(self, sock):
        # a VMA with an agent key answers only with it, and its display admits the
        # connection armed by this connect's x_start (docs/protocol.md#display-gate)
        client = VmaClient(self.vma.address, self.vma.port, key=self.vma.key)
        display_key = None if self.vma.key is None else display_gate.new_key()
        state = client.x_state()
        if state != "listening" or display_key is not None:
            client.x_start(**self.x_start_params, **({display_gate.PARAM: display_key} if display_key else {}))
        deadline = gevent.get_hub().loop.now() + 15
        while client.x_state() != "listening" and gevent.get_hub().loop.now() < deadline:
            gevent.sleep(0.1)  # like the L7R's wait for the X session (docs/protocol.md#connect-to-vm)
        answer = b"".join(b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: %s\r\n\r\n" % text for text in PROGRESS)
        answer += b"HTTP/1.1 101 Switching Protocols\r\nX-QVD-Slave-Key: %s\r\n\r\n" % SLAVE_KEY
        vm = open_display(self.vma.address, self.x_port, display_key, timeout=5)
        vm.settimeout(None)
        sock.sendall(answer + self.early_bytes)  # early bytes in the same write as the 101

        def pump(src, dst):
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            try:
                dst.shutdown(socket.SHUT_WR) if dst is vm else None
            except OSError:
                pass

        up = gevent.spawn(pump, sock, vm)
        down = gevent.spawn(pump, vm, sock)
        gevent.joinall([up, down], timeout=120)
        gevent.killall([up, down])
        vm.close()

    def stop(self):
        self.server.stop(timeout=1)
