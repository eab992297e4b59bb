"""qvd-node demo: a working node from one command, without root.

In DIR (default ./qvd-demo): an embedded PostgreSQL, the deployed schema, a self-signed
certificate, this machine registered as a host, user `demo` (password `demo`) with one VM
on the `process` hypervisor whose image is `qvd-vm-init`; then the node runs. It writes
DIR/node.conf, so `qvd-admin --config DIR/node.conf ...` administers it while it runs.
Run again, it reuses DIR.
"""
import argparse
import ipaddress
import os
import secrets
import shutil
import socket
import sys

from ..config import Config, ConfigError

DEMO_USER, DEMO_PASSWORD, DEMO_DB, DEMO_DB_USER = "demo", "demo", "qvd", "qvd"


def _say(text):
    print(f"[demo] {text}", flush=True)


def _admin(conf, *args):
    from ..admin.cli import main as admin_main
    code = admin_main(["--config", str(conf), "-q", *args])
    if code != 0:
        raise RuntimeError(f"qvd-admin {' '.join(args)} failed (exit {code})")


def installed_script(name, directory=None):
    """The console script to print or run: from the .pex we run in (a small wrapper in
    DIR/bin), else beside this interpreter (a venv), else on PATH."""
    pex = os.environ.get("PEX")
    if pex and directory is not None:
        bindir = directory / "bin"
        bindir.mkdir(exist_ok=True)
        wrapper = bindir / name
        wrapper.write_text(f'#!/bin/sh\nPEX_SCRIPT={name} exec "{os.path.abspath(pex)}" "$@"\n')
        wrapper.chmod(0o755)
        return str(wrapper)
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.access(beside, os.X_OK) else shutil.which(name)


def write_node_conf(path, pg, password, directory, port, nodename, metrics_port, listen="127.0.0.1"):
    lines = [
        "# node.conf written by `qvd-node demo`",
        f"nodename = {nodename}",
        *pg.node_conf_lines(DEMO_DB, DEMO_DB_USER, password),
        f"path.run = {directory}/run",
        f"path.log = {directory}/log",
        f"path.storage.root = {directory}/storage",
        "log.preset = stderr",
        f"l7r.address = {listen}",
        f"l7r.port = {port}",
        f"l7r.metrics.address = 127.0.0.1:{metrics_port}",
        "# what VMs must not see besides node.conf and path.run: the database (its socket takes",
        "# local logins without a password), its password and the certificate's key",
        f"vm.hidden_paths = {directory}/pg, {directory}/db.password, {directory}/ssl",
        # from a .pex the VM's init unpacks the pex where the node did, not in its own fresh home
        *(["vm.environment.pass = PEX_ROOT"] if os.environ.get("PEX") else []),
        "# process VMs live on loopback: no bridge, no DHCP, no node address check",
        "internal.hkd.address_check.enabled = 0",
        "vm.network.use_dhcp = 0",
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def provision(directory, conf, desktop):
    """Schema, certificate, host, OSF, DI, user and VM: once per DIR."""
    from ..db import Database
    from ..db.deploy import deploy
    cfg = Config.load(str(conf))
    db = Database.from_config(cfg)
    try:
        if deploy(db) == 0:
            _say("schema deployed")
    finally:
        db.close()
    ensure_certificate(directory, conf)
    init = installed_script("qvd-vm-init", directory)
    if not init:
        raise RuntimeError("qvd-vm-init is not on PATH; install the package first")
    load_certificate(directory, conf)
    _admin(conf, "config", "set", "vm.hypervisor=process", "vm.network.ip.start=10.240.0.10",
           "vm.network.netmask=16", "vm.network.gateway=10.240.0.1")
    _admin(conf, "host", "add", f"name={cfg.get('nodename')}", "address=127.0.0.1")
    _admin(conf, "osf", "add", "name=demo", "memory=256")
    _admin(conf, "di", "add", f"path={init}", "osf=demo")
    _admin(conf, "user", "add", f"login={DEMO_USER}", f"password={DEMO_PASSWORD}")
    _admin(conf, "vm", "add", "name=demo", f"user={DEMO_USER}", "osf=demo")
    if desktop != "echo":
        _admin(conf, "vm", "propset", f"qvd.vm.desktop={desktop}")
    (directory / ".provisioned").write_text("1\n")


def ensure_certificate(directory, conf, address="127.0.0.1"):
    """A self-signed certificate for localhost, this host's name, 127.0.0.1 and the address
    the demo listens on; made again when that address is new. True when it was made."""
    from .certs import certificate_names, make_self_signed
    ssl_dir = directory / "ssl"
    ssl_dir.mkdir(mode=0o700, exist_ok=True)
    cert, key = ssl_dir / "cert.pem", ssl_dir / "key.pem"
    addresses = tuple(dict.fromkeys(("127.0.0.1", address)))
    if cert.exists() and set(addresses) <= certificate_names(str(cert)):
        return False
    make_self_signed(str(cert), str(key), dns_names=("localhost", socket.gethostname()), ip_addresses=addresses)
    _say(f"self-signed certificate {cert}")
    return True


def load_certificate(directory, conf):
    _admin(conf, "config", "ssl", f"key={directory / 'ssl' / 'key.pem'}", f"cert={directory / 'ssl' / 'cert.pem'}")


def listen_address(value):
    """--listen: an IP address of this machine, or 0.0.0.0 / :: / * for all of them."""
    if value == "*":
        return "0.0.0.0"
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an IP address") from None


def demo_vm_id(conf):
    from ..db import Database
    db = Database.from_config(Config.load(str(conf)))
    try:
        row = db.query_one("SELECT v.id FROM vms v JOIN users u ON u.id = v.user_id "
                           "WHERE u.login = %s ORDER BY v.id LIMIT 1", (DEMO_USER,))
        return row[0] if row else None
    finally:
        db.close()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="qvd-node demo", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="qvd-demo", help="folder for the demo's database and files (default ./qvd-demo)")
    parser.add_argument("--port", type=int, default=8443, help="L7R port (default 8443)")
    parser.add_argument("--listen", type=listen_address, default="127.0.0.1", metavar="ADDR",
                        help="address the L7R listens on (default 127.0.0.1: only this machine; "
                             "0.0.0.0 for every address)")
    parser.add_argument("--desktop", choices=("echo", "nx", "x"), default="echo",
                        help="echo: a line-echo desktop; nx: a real nxagent desktop; "
                             "x: a graphical desktop for the browser client (Xvnc)")
    args = parser.parse_args(argv)
    from pathlib import Path

    from ..db.embedded import EmbeddedPostgres, EmbeddedPostgresError
    directory = Path(args.dir).resolve()
    if os.environ.get("PEX"):
        os.environ.setdefault("PEX_ROOT", os.path.expanduser("~/.pex"))
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "node.conf"
    try:
        pg = EmbeddedPostgres(directory / "pg").start()
        _say(f"PostgreSQL running on {pg.host}:{pg.port} (data in {pg.pgdata})")
        password_file = directory / "db.password"
        if not password_file.exists():
            fd = os.open(password_file, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(18))
        password = password_file.read_text().strip()
        pg.create_database(DEMO_DB, DEMO_DB_USER, password)
        nodename = "demo-" + socket.gethostname().split(".")[0]
        write_node_conf(conf, pg, password, directory, args.port, nodename, args.port + 1000, args.listen)
        if not (directory / ".provisioned").exists():
            provision(directory, conf, args.desktop)
        wildcard = ipaddress.ip_address(args.listen).is_unspecified
        if not wildcard and ensure_certificate(directory, conf, args.listen):
            load_certificate(directory, conf)
        # every run: the VM's desktop is the one asked for now (its VMA picks it at its first x_start)
        _admin(conf, "vm", "propset", f"qvd.vm.desktop={args.desktop}")
    except (EmbeddedPostgresError, RuntimeError, ConfigError, OSError) as exc:
        print(f"qvd-node demo: {exc}", file=sys.stderr)
        return 1
    vm_id = demo_vm_id(conf)
    cert = directory / "ssl" / "cert.pem"
    admin_cmd = installed_script("qvd-admin", directory) or "qvd-admin"
    _say(f"node.conf: {conf}  (try: {admin_cmd} --config {conf} vm list)")
    host = socket.gethostname() if wildcard else args.listen     # the certificate names both
    url_host = f"[{host}]" if ":" in host else host
    _say(f"L7R: https://{url_host}:{args.port}/qvd/   metrics: http://127.0.0.1:{args.port + 1000}/metrics")
    if wildcard:
        _say(f"listening on every address of this machine ({args.listen}): anyone who reaches it may log in "
             f"as {DEMO_USER}/{DEMO_PASSWORD}")
    _say("list your VMs:")
    client_cmd = installed_script("qvd-client", directory) or "qvd-client"
    print(f"  {client_cmd} --host {host} --port {args.port} --user {DEMO_USER} --password {DEMO_PASSWORD} "
          f"--ca {cert} list", flush=True)
    client = (f"{client_cmd} --host {host} --port {args.port} --user {DEMO_USER} --password {DEMO_PASSWORD} "
              f"--ca {cert} connect --vm {vm_id}")
    if args.desktop == "echo":
        _say("connect to the demo VM: its desktop echoes every line, so this prints the line back:")
        print(f"  {client} --exec sh -c 'echo hello from the demo VM; head -n 1 >&2'", flush=True)
        _say("or keep a local port open for any client:")
        print(f"  {client} --listen 127.0.0.1:4040", flush=True)
        _say(f"the browser client (https://{url_host}:{args.port}/) shows a graphical desktop with --desktop x")
    elif args.desktop == "nx":
        _say("connect to the demo VM's NX desktop: keep a local port open for nxproxy:")
        print(f"  {client} --listen 127.0.0.1:4040", flush=True)
    else:
        missing = [tool for tool in ("Xvnc", "xsetroot", "xclock") if shutil.which(tool) is None]
        if missing:
            _say(f"the x desktop needs {', '.join(missing)}: apt-get install tigervnc-standalone-server "
                 "x11-xserver-utils x11-apps")
        _say(f"in a browser, open the URL below, accept the self-signed certificate, log in as "
             f"{DEMO_USER}/{DEMO_PASSWORD} and open the desktop:")
        print(f"  https://{url_host}:{args.port}/", flush=True)
        _say("or keep a local port open for a VNC viewer (the desktop speaks VNC):")
        print(f"  {client} --listen 127.0.0.1:5901", flush=True)
    from .run import run_node_from_file
    try:
        return run_node_from_file(str(conf))
    finally:
        _say("stopping PostgreSQL (run the same command again to restart the demo)")
        pg.stop()
