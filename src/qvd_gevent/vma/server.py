"""qvd-vma: the agent inside a VM (docs/protocol.md#the-vma).

Plain HTTP SimpleRPC on --address:--port (internal.vm.port.vma, 3030) with the methods
ping, x_state, x_start, x_suspend, x_stop, poweroff and expire. Every call must carry
``Authorization: Bearer <agent key>``, the secret the HKD made for this start of the VM
(QVD_VMA_SECRET in the environment, or --key-file); a call without it, or with another,
gets 401 and changes nothing. The display port is a gate (vma/display_gate.py) that
admits only the connection armed by the last x_start. ``--unauthenticated`` serves
without a key, as the original did. The desktop is the
line-echo service (``echo``), nxagent (``nx``), or ``auto``: chosen at the first x_start
from the VM property ``qvd.vm.desktop`` in its params (``nx`` -> nx, anything else ->
echo) and kept for the VMA's life.

One greenlet per HTTP connection, no per-VM threads; a VMA holds a few hundred KB on top
of the interpreter, so qvd-vm-init runs it in its own process for hundreds of VMs.
"""
import argparse
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile

import gevent
import gevent.event
from gevent.server import StreamServer

from .. import add_version_option
from . import rpc
from .desktop import DesktopError, EchoDesktop
from .display_gate import GENERATION_PARAM as DISPLAY_GENERATION_PARAM
from .display_gate import PARAM as DISPLAY_KEY_PARAM
from .display_gate import StaleSession, check_generation
from .display_gate import DisplayGate, DisplayKeyError, check_key
from .xstate import TIMEOUT_KEYS, InvalidOption, nxagent_options

log = logging.getLogger("qvd.vma")

DISPLAY_PROTOCOL_PARAM = "qvd.display.protocol"   # "rfb" from the L7R for a browser session

METHODS = ("ping", "x_state", "x_start", "x_suspend", "x_stop", "poweroff", "expire")
KEY_ENV = "QVD_VMA_SECRET"
MIN_KEY_LENGTH = 32     # characters; the HKD makes 43 (256 bits, base64url)


class VmaService:
    """The RPC methods over one desktop. on_poweroff() is called after the answer went out.

    key: the agent key every call must carry, and the display gate armed per x_start; None
    serves everyone, as the original VMA did."""

    def __init__(self, cfg, address="0.0.0.0", port=None, desktop="echo", run_dir=None,
                 on_poweroff=None, x_port=None, key=None):
        if key is not None and cfg.get("vma.nxagent.direct"):
            raise ValueError("vma.nxagent.direct puts nxagent on the display port, past the display gate: "
                             "it needs an unauthenticated VMA (--unauthenticated)")
        self.key = key
        self.cfg = cfg
        self.address = address
        self.port = cfg.get("internal.vm.port.vma") if port is None else port
        # The display port is 4000 + display (docs/protocol.md#ports-inside-the-vm); x_port overrides it.
        self.display = cfg.get("internal.nxagent.display") if x_port is None else x_port - 4000
        self.desktop_kind = desktop
        self.run_dir = run_dir
        self.on_poweroff = on_poweroff
        self.timeouts = {state: cfg.get(key) for state, key in TIMEOUT_KEYS.items()}
        self._own_run_dir = False
        self.desktop = None if desktop == "auto" else self._make_desktop(desktop)
        self.gate = DisplayGate(address, self.display + 4000, self._serve_display, keyed=key is not None,
                                key_timeout=cfg.get("internal.vma.display.key_timeout"))
        self.server = None

    # --- desktops ----------------------------------------------------------------------
    def _make_desktop(self, kind):
        if kind == "echo":
            return EchoDesktop(self.timeouts, validate=self._validate)
        if kind == "nx":
            from .nx import NxDesktop  # only VMs with a real desktop pay for it
            if self.run_dir is None:
                self.run_dir = tempfile.mkdtemp(prefix="qvd-vma-")
                self._own_run_dir = True
            return NxDesktop(self.cfg, self.run_dir, self.display, self.timeouts, address=self.address)
        if kind == "x":
            from .xvnc import XvncDesktop  # the browser client's desktop: Xvnc
            self._ensure_run_dir()
            return XvncDesktop(self.cfg, self.run_dir, self.timeouts, validate=self._validate)
        raise ValueError(f"unknown desktop {kind!r} (echo, nx, x or auto)")

    def _ensure_run_dir(self):
        if self.run_dir is None:
            self.run_dir = tempfile.mkdtemp(prefix="qvd-vma-")
            self._own_run_dir = True

    def _validate(self, params):
        try:
            nxagent_options(params, self.cfg.get, self.display)
        except InvalidOption as exc:
            raise DesktopError(str(exc)) from None

    # --- methods -------------------------------------------------------------------------
    def call(self, method, params):
        """Returns (result, error_message); exactly one of them is meaningful."""
        if method not in METHODS:
            raise KeyError(method)
        try:
            return getattr(self, "rpc_" + method)(params), None
        except DesktopError as exc:
            return None, str(exc)

    def rpc_ping(self, params):
        return 1

    def rpc_x_state(self, params):
        return self.desktop.x_state() if self.desktop else "stopped"

    def rpc_x_start(self, params):
        params = dict(params)
        display_key = params.pop(DISPLAY_KEY_PARAM, None)
        generation = params.pop(DISPLAY_GENERATION_PARAM, None)
        if self.key is not None:
            try:
                check_key(display_key)
                generation = check_generation(generation)
            except DisplayKeyError as exc:
                raise DesktopError(str(exc)) from None
            if generation is not None and self.gate.generation is not None and generation < self.gate.generation:
                raise DesktopError(f"a newer session (claim {self.gate.generation}) holds the display")
        if self.desktop is None:
            kind = params.get("qvd.vm.desktop") if params.get("qvd.vm.desktop") in ("nx", "x") else "echo"
            log.info("desktop %s chosen by the first x_start", kind)
            self.desktop = self._make_desktop(kind)
        log.info("x_start %s", rpc.mask_params(params))
        if params.pop(DISPLAY_PROTOCOL_PARAM, None) == "rfb" and self.desktop.kind == "nx":
            # a browser session needs VNC: the x desktop gives it, nxagent does not
            raise DesktopError("The nx desktop cannot be shown in a browser; use qvd.vm.desktop=x")
        self._validate(params)
        self._open_display()
        if self.key is not None:
            try:
                self.gate.arm(display_key, generation)     # the previous session's connection ends here
            except StaleSession as exc:
                raise DesktopError(str(exc)) from None
        return self.desktop.x_start(params)

    def rpc_x_suspend(self, params):
        self.gate.disarm()
        return self.desktop.x_suspend() if self.desktop else "stopped"

    def rpc_x_stop(self, params):
        self.gate.disarm()
        return self.desktop.x_stop() if self.desktop else "stopped"

    # --- the display port ----------------------------------------------------------------
    def _open_display(self):
        if self.desktop.kind == "nx" and not self.desktop.relayed:
            return                  # nxagent listens on the display port itself (unauthenticated only)
        try:
            self.gate.start()
        except OSError as exc:
            raise DesktopError(f"cannot listen on display port {self.address}:{self.gate.port}: {exc.strerror}") from None

    def _serve_display(self, conn, ack):
        if self.desktop is not None:
            self.desktop.serve(conn, ack)

    def rpc_poweroff(self, params):
        log.info("poweroff requested")
        gevent.spawn_later(0.05, self._poweroff)
        return 1

    def rpc_expire(self, params):
        log.info("expire: soft %s hard %s", params.get("vm.expiration.soft"), params.get("vm.expiration.hard"))
        return 1

    def _poweroff(self):
        if self.on_poweroff is not None:
            self.on_poweroff()
            return
        command = self.cfg.get("vma.poweroff.command")
        log.info("running %s", command)
        os.system(command)

    # --- HTTP ----------------------------------------------------------------------------
    def start(self):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.address, self.port))
        listener.listen(64)
        self.server = StreamServer(listener, self._handle)
        self.server.start()
        self.port = listener.getsockname()[1]
        log.info("VMA listening on %s:%d", self.address, self.port)
        return self

    def stop(self):
        if self.server is not None:
            self.server.stop(timeout=1)
            self.server = None
        self.gate.stop()
        if self.desktop is not None:
            self.desktop.close()
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _handle(self, conn, peer):
        conn.settimeout(self.cfg.get("internal.vma.http.timeout"))
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
                    if len(buf) > rpc.MAX_HEAD:
                        conn.sendall(rpc.response(b"request too large\r\n", 431, content_type="text/plain"))
                        return
                    data = conn.recv(8192)
                    if not data:
                        return
                    buf += data
                end, sep_len = _head_end(buf)
                head, buf = buf[:end], buf[end + sep_len:]
                try:
                    request = rpc.parse_request_head(head)
                except rpc.BadRequest as exc:
                    conn.sendall(rpc.response(f"{exc}\r\n".encode(), exc.status, content_type="text/plain"))
                    return
                if self.key is not None and not rpc.bearer_matches(request.headers, self.key):
                    log.warning("refused %s %s from %s: %s", request.method, request.path, peer[0],
                                "wrong key" if "authorization" in request.headers else "no key")
                    conn.sendall(rpc.response(b"Unauthorized\r\n", 401, content_type="text/plain",
                                              headers=('WWW-Authenticate: Bearer realm="qvd-vma"',)))
                    return
                keep = request.keep_alive
                conn.sendall(self._answer(request, keep))
                if not keep:
                    return
        except OSError:
            pass
        finally:
            conn.close()

    def _answer(self, request, keep):
        method = request.rpc_method
        if request.method != "GET" or method not in METHODS:
            return rpc.response(b"Not Found\r\n", 404, keep, content_type="text/plain")
        try:
            result, error = self.call(method, request.params)
        except Exception as exc:
            log.exception("VMA method %s failed", method)
            result, error = None, f"internal error: {exc}"
        body = rpc.encode_error(error) if error is not None else rpc.encode_result(result)
        return rpc.response(body, 200, keep)


def _head_end(buf):
    crlf = buf.find(b"\r\n\r\n")
    lf = buf.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf <= lf):
        return crlf, 4
    return lf, 2


def load_vma_config(path):
    """vma.conf (the original's /etc/qvd/vma.conf) if given or present, else defaults."""
    from ..config import Config
    if path:
        return Config.load(path)
    default = "/etc/qvd/vma.conf"
    return Config.load(default) if os.path.exists(default) else Config({}, None)


def build_parser(prog="qvd-vma"):
    p = argparse.ArgumentParser(prog=prog, description="QVD VM agent (SimpleRPC on HTTP)")
    add_version_option(p)
    p.add_argument("--config", help="vma.conf (default /etc/qvd/vma.conf when present)")
    p.add_argument("--address", default="0.0.0.0", help="bind address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=None, help="port (default internal.vm.port.vma, 3030)")
    p.add_argument("--desktop", choices=("echo", "nx", "x", "auto"), default="echo",
                   help="echo: line echo on the display port; nx: nxagent; x: Xvnc (the browser client's); auto: chosen by qvd.vm.desktop at x_start")
    p.add_argument("--x-port", type=int, default=None,
                   help="display port (default 4000 + internal.nxagent.display = 4100)")
    p.add_argument("--run-dir", help="folder for nxagent's options file and log (default: a new temp folder)")
    p.add_argument("--poweroff-exits", action="store_true",
                   help="poweroff ends this process instead of running vma.poweroff.command")
    p.add_argument("--key-file", help=f"file holding the agent key (default: ${KEY_ENV}); on a kvm guest "
                   "/sys/firmware/qemu_fw_cfg/by_name/opt/qvd/vma-secret/raw")
    p.add_argument("--unauthenticated", action="store_true",
                   help="serve without an agent key, as the original VMA: anyone who reaches this VM drives it")
    return p


def read_agent_key(key_file, env):
    """The agent key from key_file or env[QVD_VMA_SECRET] (removed from env, so that nothing
    this VMA starts inherits it), or None. Raises ValueError for an unusable one."""
    secret = env.pop(KEY_ENV, None)
    if key_file:
        try:
            with open(key_file, encoding="ascii") as fh:
                secret = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the agent key from {key_file}: {getattr(exc, 'strerror', None) or exc}") from None
    if secret is None:
        return None
    secret = secret.strip()
    if len(secret) < MIN_KEY_LENGTH or not secret.isascii() or not secret.isprintable() or " " in secret:
        raise ValueError(f"the agent key must be at least {MIN_KEY_LENGTH} printable ASCII characters without blanks")
    return secret


def run(args, on_ready=None, prog="qvd-vma"):
    """Runs the VMA until SIGTERM/SIGINT (exit 0) or, with --poweroff-exits, poweroff."""
    from ..config import ConfigError
    try:
        cfg = load_vma_config(args.config)
        done = gevent.event.Event()
        if args.x_port is not None and not 4000 < args.x_port < 65536:
            raise ValueError(f"--x-port {args.x_port}: must be above 4000")
        key = read_agent_key(args.key_file, os.environ)
        if key is None and not args.unauthenticated:
            raise ValueError(f"no agent key (${KEY_ENV} or --key-file); --unauthenticated serves without one")
        if key is not None and args.unauthenticated:
            raise ValueError("--unauthenticated and an agent key contradict each other")
        service = VmaService(cfg, args.address, args.port, args.desktop, args.run_dir,
                             on_poweroff=done.set if args.poweroff_exits else None, x_port=args.x_port, key=key)
        service.start()
        if key is None:
            log.warning("no agent key: anyone who reaches %s:%d drives this VM and its display takes any "
                        "connection (the original VMA's behaviour)", args.address, service.port)
    except (ConfigError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prog}: cannot listen on {args.address}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, done.set)
    if on_ready:
        on_ready(service)
    done.wait()
    log.info("VMA stopping")
    service.stop()
    return 0


def patch_for_vma():
    """Cooperative sockets, signals, subprocesses and sleeps. The VMA needs neither TLS
    nor threads; leaving those unpatched spares about 1.7 MB private memory per VM."""
    from gevent import monkey
    monkey.patch_all(ssl=False, thread=False)


def main(argv=None):
    patch_for_vma()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    args = build_parser().parse_args(argv)
    sys.exit(run(args))


if __name__ == "__main__":
    main()
