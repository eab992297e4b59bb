"""Client of the VMA's SimpleRPC interface (docs/protocol.md#simplerpc), and the opening of
its display port (docs/protocol.md#display-gate).

GET /vma/<method>?k=v... with ``Authorization: Bearer <agent key>``; 200 with a JSON body;
an error is the body `"",<json error>`; 401 when the key is missing or wrong.
Cooperative under gevent's monkey patching (http.client over patched sockets).
"""
import http.client
import ipaddress
import json
import logging
import socket
import urllib.parse

from .display_gate import ACK, preamble, recv_exactly


LEGACY_KEY = "vm.vma.legacy_unauthenticated"


def legacy_unauthenticated(cfg, who=None):
    """vm.vma.legacy_unauthenticated; with who (the part starting: HKD, L7R) a warning is
    logged while it is on."""
    legacy = cfg.get_bool(LEGACY_KEY)
    if legacy and who:
        logging.getLogger("qvd.vma").warning(
            "%s: %s is on: VMAs are called without their secret and displays opened without a key, "
            "so anyone who reaches the VM network drives every VM and its desktop (meant only for "
            "images that carry the original VMA)", who, LEGACY_KEY)
    return legacy


class VmaError(Exception):
    """The VMA could not be reached or its method failed."""


def connect_to(address, port, timeout):
    """A TCP connection to address:port. A VM's address is an IP address: it is connected to
    as such, without the resolver (gevent's resolver hands every lookup, even of an address,
    to a thread: two thread hand-offs per VMA call and per display)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    except ValueError:
        return socket.create_connection((address, int(port)), timeout=timeout)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((address, int(port)))
    except BaseException:
        sock.close()
        raise
    return sock


class _VmaConnection(http.client.HTTPConnection):
    def connect(self):
        self.sock = connect_to(self.host, self.port, self.timeout)


class VmaClient:
    """key: the VM's agent key (vm_agent_keys); None calls as the original did, without one."""

    def __init__(self, address, port=3030, timeout=4.0, key=None):
        self.address = address
        self.port = port
        self.timeout = timeout
        self.key = key

    def url(self, method, params=None):
        query = urllib.parse.urlencode(params or {})
        return f"/vma/{method}" + (f"?{query}" if query else "")

    def call(self, method, **params):
        conn = _VmaConnection(self.address, self.port, timeout=self.timeout)
        headers = {"Connection": "close"}
        if self.key is not None:
            headers["Authorization"] = f"Bearer {self.key}"
        try:
            conn.request("GET", self.url(method, params), headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise VmaError(f"VMA at {self.address}:{self.port} unreachable: {exc}") from None
        finally:
            conn.close()
        if resp.status == 401:
            raise VmaError(f"VMA {method} refused: {'wrong' if self.key else 'no'} agent key (401)")
        if resp.status != 200:
            raise VmaError(f"VMA {method} failed: HTTP request failed ({resp.status})")
        try:
            decoded = json.loads("[" + body.decode("utf-8").strip() + "]")
        except ValueError:
            raise VmaError(f"VMA {method}: malformed answer {body[:80]!r}") from None
        if len(decoded) >= 2:
            raise VmaError(f"VMA {method}: {decoded[1]}")
        return decoded[0] if decoded else None

    def ping(self):
        self.call("ping")
        return True

    def x_state(self):
        return self.call("x_state")

    def x_start(self, **params):
        return self.call("x_start", **params)


def open_display(address, port, display_key, timeout):
    """A connection to the VM's display port that its gate admitted with display_key (the
    key the last x_start armed); None opens it as the original did, with no preamble.
    Raises OSError when it cannot be opened or the gate refuses it."""
    sock = connect_to(address, port, timeout)
    if display_key is None:
        return sock
    try:
        sock.sendall(preamble(display_key))
        answer = recv_exactly(sock, len(ACK))
        if answer != ACK:
            raise ConnectionRefusedError(0, "the VM's display refused the key" if not answer
                                         else "the VM's display did not acknowledge the key")
    except BaseException:
        sock.close()
        raise
    return sock
