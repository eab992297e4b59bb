"""Client of the VMA's SimpleRPC interface (docs/protocol.md#simplerpc).

GET /vma/<method>?k=v... ; 200 with a JSON body; an error is the body `"",<json error>`.
Cooperative under gevent's monkey patching (http.client over patched sockets).
"""
import http.client
import json
import urllib.parse


class VmaError(Exception):
    """The VMA could not be reached or its method failed."""


class VmaClient:
    def __init__(self, address, port=3030, timeout=4.0):
        self.address = address
        self.port = port
        self.timeout = timeout

    def url(self, method, params=None):
        query = urllib.parse.urlencode(params or {})
        return f"/vma/{method}" + (f"?{query}" if query else "")

    def call(self, method, **params):
        conn = http.client.HTTPConnection(self.address, self.port, timeout=self.timeout)
        try:
            conn.request("GET", self.url(method, params), headers={"Connection": "close"})
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise VmaError(f"VMA at {self.address}:{self.port} unreachable: {exc}") from None
        finally:
            conn.close()
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
