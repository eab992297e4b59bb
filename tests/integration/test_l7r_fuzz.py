"""Hypothesis fuzzing of the L7R's request handling: whatever bytes arrive, the server
answers with a well-formed HTTP/1.1 status line or closes, keeps serving, and leaks no
connection, file descriptor or greenlet."""
import gc
import socket

import greenlet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.l7r_env import Reader, fds_open, get
from helpers.nodes import seeded_node, wait_for

TOKENS = st.sampled_from([b"GET", b"POST", b"/qvd/ping", b"/qvd/list_of_vm", b"/qvd/connect_to_vm?id=1",
                          b"/qvd/stop_vm?id=", b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b"\n", b" ", b":",
                          b"Authorization: Basic cXZkOnF2ZA==", b"Authorization: Bearer ", b"Connection: Upgrade",
                          b"Upgrade: QVD/1.0", b"Content-Length: 5", b"Transfer-Encoding: chunked", b"Host: x",
                          b"\x00", b"%zz", b"?id=abc&id=", b"Auth-zz: !!"])
RAW = st.one_of(
    st.binary(max_size=300),
    st.lists(TOKENS, max_size=25).map(b"".join),
    st.tuples(st.sampled_from([b"GET /qvd/ping HTTP/1.1\r\n", b"GET /qvd/list_of_vm? HTTP/1.1\r\n"]),
              st.lists(st.tuples(st.binary(min_size=0, max_size=20), st.binary(max_size=40)), max_size=6))
    .map(lambda t: t[0] + b"".join(k + b": " + v + b"\r\n" for k, v in t[1]) + b"\r\n"),
)


def greenlets():
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and not o.dead)


def test_fuzz_request_handling(tmp_path, pg_server, fresh_db_name):
    node = seeded_node(tmp_path, pg_server, fresh_db_name, extra={"l7r.use_ssl": 0, "l7r.timeout.request": 2,
                                                                  "l7r.timeout.idle": 2})
    port = node.svc.port
    try:
        def ping_ok():
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            get(s, "/qvd/ping")
            ok = Reader(s).response().status == 200
            s.close()
            return ok
        assert ping_ok()
        wait_for(lambda: node.svc.connections_open == 0)
        base_fds, base_greenlets = fds_open(), greenlets()

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(RAW)
        def one(raw):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                s.sendall(raw)
                s.shutdown(socket.SHUT_WR)
                data = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except ConnectionResetError:
                data = b""
            finally:
                s.close()
            if data:
                assert data.startswith(b"HTTP/1.1 "), data[:100]
                code = int(data[9:12])
                assert 100 <= code <= 599
                assert code != 500, data
        one()
        assert ping_ok()
        wait_for(lambda: node.svc.connections_open == 0 and node.svc.sessions_open == 0)
        wait_for(lambda: fds_open() <= base_fds + 2)
        gc.collect()
        assert greenlets() <= base_greenlets + 3
    finally:
        node.close()
