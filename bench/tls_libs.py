"""The same small TLS server under gevent on two TLS libraries: the standard library's
``ssl`` (what the L7R uses) and pyOpenSSL (what the project card first named).

    python -m bench.tls_libs --lib ssl|pyopenssl --cert C --key K

prints ``PORT <n>`` and serves on 127.0.0.1 until stdin closes: each connection does a
full handshake, then answers every ``GET`` with a short 200 (what the handshake scenario's
``/qvd/ping`` needs) and otherwise sits idle, as a held session does. The two servers
differ only in the TLS object, so the bench (scenario ``tlslib``) compares the libraries'
cost under gevent: handshakes per CPU-second and memory per idle TLS connection.

pyOpenSSL is not cooperative under gevent by itself: its ``Connection`` raises
WantReadError/WantWriteError on a non-blocking socket, and the loop here waits on the
hub for the socket, as a pyOpenSSL-based L7R would have to.
"""
import argparse
import sys

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402
import gevent.server  # noqa: E402
import gevent.socket  # noqa: E402

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\nI am alive!\r\n"


def serve_stdlib(sock, context):
    import ssl
    try:
        tls = context.wrap_socket(sock, server_side=True)
    except (ssl.SSLError, OSError):
        sock.close()
        return
    _requests(tls.recv, tls.sendall, tls.close)


def serve_pyopenssl(sock, context):
    from OpenSSL import SSL
    sock.setblocking(False)
    conn = SSL.Connection(context, sock)
    conn.set_accept_state()

    def cooperative(fn, *args):
        while True:
            try:
                return fn(*args)
            except SSL.WantReadError:
                gevent.socket.wait_read(sock.fileno())
            except SSL.WantWriteError:
                gevent.socket.wait_write(sock.fileno())

    def recv(n):
        try:
            return cooperative(conn.recv, n)
        except (SSL.ZeroReturnError, SSL.SysCallError):
            return b""

    def sendall(data):
        view = memoryview(data)
        while view:
            sent = cooperative(conn.send, view)
            view = view[sent:]

    def close():
        try:
            conn.shutdown()
        except SSL.Error:
            pass
        sock.close()
    try:
        cooperative(conn.do_handshake)
    except (SSL.Error, OSError):
        sock.close()
        return
    _requests(recv, sendall, close)


def _requests(recv, sendall, close):
    buf = b""
    try:
        for _ in range(100000):
            data = recv(4096)
            if not data:
                break
            buf += data
            while b"\r\n\r\n" in buf:
                _head, buf = buf.split(b"\r\n\r\n", 1)
                sendall(ANSWER)
    except OSError:
        pass
    finally:
        close()


def stdlib_context(cert, key):
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def pyopenssl_context(cert, key):
    from OpenSSL import SSL
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION)
    # the standard library's server has SSL_MODE_RELEASE_BUFFERS on; give pyOpenSSL the same
    ctx.set_mode(getattr(SSL, "MODE_RELEASE_BUFFERS", 0x10))
    ctx.use_certificate_chain_file(cert)
    ctx.use_privatekey_file(key)
    return ctx


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lib", choices=("ssl", "pyopenssl"), required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    a = p.parse_args(argv)
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if a.lib == "ssl":
        context, handler = stdlib_context(a.cert, a.key), serve_stdlib
    else:
        context, handler = pyopenssl_context(a.cert, a.key), serve_pyopenssl
    server = gevent.server.StreamServer(("127.0.0.1", 0), lambda sock, _addr: handler(sock, context), backlog=4096)
    server.start()
    print(f"PORT {server.server_port}", flush=True)
    gevent.get_hub().threadpool.apply(sys.stdin.read)     # until the bench closes our stdin
    server.stop(timeout=1)


if __name__ == "__main__":
    main()
