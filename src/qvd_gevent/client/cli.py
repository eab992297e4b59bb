"""qvd-client: list a user's VMs and connect to one through the L7R (README.md, Commands).

  qvd-client --host H [--port 8443] --user U (--password P | --password-file F | env
             QVD_PASSWORD) [--ca FILE | --insecure] [--token T] list
  qvd-client ... connect --vm ID (--listen HOST:PORT | --exec CMD...)

Progress (102 ``X-QVD-VM-Info``) and errors go to stderr, one line each; the VM list
goes to stdout. With --listen every local connection opens its own connect_to_vm on a
new TLS connection (like the original client's local proxy for nxproxy); with --exec
CMD's stdin/stdout are the session and qvd-client exits with CMD's status.
Exit status: 0 ok, 1 the server refused or the connection failed, 2 bad usage.
"""
import argparse
import os
import socket
import ssl
import sys

from gevent import subprocess

from .. import add_version_option
from . import protocol
from .forward import PipeEnd, SocketEnd, splice


class ClientError(Exception):
    """A one-line failure for the user; exit status 1."""


class UsageError(Exception):
    """Bad arguments; exit status 2."""


def _defaults():
    from ..config import Config
    return Config({}, None)


class Session:
    """One user's view of one L7R: TLS settings, credentials, request helpers."""

    def __init__(self, host, port, authorization, context, connect_timeout, out=sys.stderr):
        self.host = host
        self.port = port
        self.authorization = authorization
        self.context = context
        self.connect_timeout = connect_timeout
        self.out = out

    def open(self):
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            raise ClientError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.context is None:
            return raw
        try:
            tls = self.context.wrap_socket(raw, server_hostname=self.host)
        except ssl.SSLCertVerificationError as exc:
            raw.close()
            raise ClientError(f"TLS: the server's certificate is not trusted ({exc.verify_message});"
                              " use --ca FILE (or --insecure)") from None
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            raise ClientError(f"TLS handshake with {self.host}:{self.port} failed: {exc}") from None
        tls.settimeout(None)
        return tls

    def exchange(self, sock, request, on_progress=None):
        """Send request, read until 101 or a final response. Returns the event."""
        reader = protocol.ResponseReader()
        try:
            sock.sendall(request)
            while True:
                data = sock.recv(65536)
                events = reader.feed(data) if data else reader.feed_eof()
                for event in events:
                    if isinstance(event, protocol.Progress):
                        if on_progress:
                            on_progress(event.text)
                    else:
                        return event
        except protocol.ProtocolError as exc:
            raise ClientError(f"bad answer from the server: {exc}") from None
        except OSError as exc:
            raise ClientError(f"connection to {self.host}:{self.port} lost: {exc}") from None

    def list_vms(self):
        sock = self.open()
        try:
            event = self.exchange(sock, protocol.build_request(
                "/qvd/list_of_vm", [], self.authorization, host=self.host, accept_json=True))
        finally:
            sock.close()
        if isinstance(event, protocol.Switched) or event.status != 200:
            raise ClientError(protocol.error_message(event, "list") if isinstance(event, protocol.Final)
                              else "the server switched protocols on list_of_vm")
        try:
            return protocol.parse_vm_list(event.body)
        except protocol.ProtocolError as exc:
            raise ClientError(str(exc)) from None

    def connect(self, vm_id, params):
        """connect_to_vm on a new connection. Returns (socket, bytes after the 101)."""
        sock = self.open()
        query = [("id", str(vm_id))] + list(params)
        request = protocol.build_request("/qvd/connect_to_vm", query, self.authorization,
                                         host=self.host, upgrade=True)
        try:
            event = self.exchange(sock, request, on_progress=self._progress)
        except ClientError:
            sock.close()
            raise
        if isinstance(event, protocol.Final):
            sock.close()
            raise ClientError(protocol.error_message(event, "connect", vm_id), event.status)
        return sock, event.rest

    def _progress(self, text):
        print(f"qvd-client: {text}", file=self.out, flush=True)


def tls_context(args):
    if args.no_tls:
        return None
    if args.insecure:
        print("qvd-client: warning: --insecure: the server's certificate is NOT verified", file=sys.stderr)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            context = ssl.create_default_context(cafile=args.ca)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load CA file {args.ca}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def authorization(args):
    if args.token:
        return protocol.bearer_auth(args.token)
    if not args.user:
        raise UsageError("--user is required (or --token)")
    password = args.password
    if password is None and args.password_file:
        try:
            with open(args.password_file, encoding="utf-8") as fh:
                password = fh.readline().rstrip("\r\n")
        except OSError as exc:
            raise UsageError(f"cannot read password file {args.password_file}: {exc.strerror}") from None
    if password is None:
        password = os.environ.get("QVD_PASSWORD")
    if password is None:
        raise UsageError("no password: give --password, --password-file or set QVD_PASSWORD")
    return protocol.basic_auth(args.user, password)


def client_params(args):
    params = [("qvd.client.os", args.os), ("qvd.client.link", args.link),
              ("qvd.client.geometry", args.geometry),
              ("qvd.client.fullscreen", "1" if args.fullscreen else "")]
    if args.keyboard:
        params.append(("qvd.client.keyboard", args.keyboard))
    for item in args.param or []:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith(("qvd.client.", "custom.")):
            raise UsageError(f"--param {item!r}: expected qvd.client.KEY=VALUE or custom.KEY=VALUE")
        params.append((key, value))
    return params


def parse_listen(text):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--listen {text!r}: expected HOST:PORT")
    return host or "127.0.0.1", int(port)


def cmd_list(session, args):
    vms = session.list_vms()
    print(f"{'ID':>6}  {'NAME':<24} {'STATE':<10} BLOCKED")
    for vm in vms:
        print(f"{vm['id']:>6}  {vm['name']:<24} {vm['state']:<10} {'yes' if vm['blocked'] else 'no'}")
    return 0


def cmd_connect_exec(session, args, params, linger):
    sock, rest = session.connect(args.vm, params)
    try:
        proc = subprocess.Popen(args.exec, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    except OSError as exc:
        sock.close()
        raise ClientError(f"cannot run {args.exec[0]}: {exc.strerror}") from None
    # Take the raw fds so the splice owns them; the Popen file objects must not close them.
    end = PipeEnd(os.dup(proc.stdout.fileno()), os.dup(proc.stdin.fileno()))
    proc.stdout.close()
    proc.stdin.close()
    try:
        splice(sock, end, rest, linger)
    finally:
        end.close()
        sock.close()
    return proc.wait()


def cmd_connect_listen(session, args, params, linger):
    host, port = parse_listen(args.listen)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(4)
    except OSError as exc:
        raise ClientError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound = listener.getsockname()
    print(f"qvd-client: listening on {bound[0]}:{bound[1]} for VM {args.vm}", file=sys.stderr, flush=True)
    served = 0
    try:
        while args.count is None or served < args.count:
            local, _ = listener.accept()
            served += 1
            try:
                sock, rest = session.connect(args.vm, params)
            except ClientError as exc:
                local.close()
                status = exc.args[1] if len(exc.args) > 1 else None
                print(f"qvd-client: {exc.args[0]}", file=sys.stderr, flush=True)
                if status in (401, 426):
                    return 1
                continue
            up, down = splice(sock, SocketEnd(local), rest, linger)
            local.close()
            sock.close()
            print(f"qvd-client: session closed ({up} bytes sent, {down} received)", file=sys.stderr, flush=True)
    finally:
        listener.close()
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="qvd-client", description="QVD client: list VMs, connect to one")
    add_version_option(p)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--password-file")
    p.add_argument("--token", help="bearer token instead of login and password")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--ca", help="CA certificate file to verify the server (default: system store)")
    tls.add_argument("--insecure", action="store_true", help="do not verify the server's certificate")
    tls.add_argument("--no-tls", action="store_true", help=argparse.SUPPRESS)  # an L7R with l7r.use_ssl=0
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the user's VMs")
    c = sub.add_parser("connect", help="connect to a VM and forward its session")
    c.add_argument("--vm", required=True, type=int)
    how = c.add_mutually_exclusive_group(required=True)
    how.add_argument("--listen", metavar="HOST:PORT", help="serve local connections, each a new session")
    how.add_argument("--exec", nargs=argparse.REMAINDER, metavar="CMD", help="run CMD on the session")
    c.add_argument("--count", type=int, help="with --listen: exit after this many connections")
    c.add_argument("--geometry", default="1024x768")
    c.add_argument("--keyboard", help="e.g. pc105/es (default: the VM's vma.default.client.keyboard)")
    c.add_argument("--link", default="adsl")
    c.add_argument("--os", default="linux", choices=("linux", "windows", "darwin"))
    c.add_argument("--fullscreen", action="store_true")
    c.add_argument("--param", action="append", metavar="KEY=VALUE", help="extra qvd.client.* or custom.* parameter")
    return p


def run(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "connect" and args.exec is not None and not args.exec:
            raise UsageError("--exec needs a command")
        auth = authorization(args)
        context = tls_context(args)
        cfg = _defaults()
        session = Session(args.host, args.port, auth, context, cfg.get("client.timeout.connect"))
        if args.command == "list":
            return cmd_list(session, args)
        params = client_params(args)
        linger = cfg.get("client.timeout.linger")
        if args.exec is not None:
            return cmd_connect_exec(session, args, params, linger)
        return cmd_connect_listen(session, args, params, linger)
    except UsageError as exc:
        print(f"qvd-client: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"qvd-client: {exc.args[0]}", file=sys.stderr)
        return 1


def main(argv=None):
    from gevent import monkey
    monkey.patch_all()
    try:
        sys.exit(run(argv))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
