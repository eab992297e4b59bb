"""The PostgreSQL servers of `database.host` / `database.port`, in libpq's multi-host form.

`database.host = 10.0.0.5,10.0.0.6` names a primary and its standbys; `database.port` is
empty (the driver's default, 5432), one port for every host, or one port per host. The node
asks libpq for the read-write one (``target_session_attrs=read-write``), so after a failover
its new connections find the promoted standby (README.md, "Configuration").
"""
from collections import namedtuple

Server = namedtuple("Server", "host port")   # port: "" for libpq's default

MAX_PORT = 65535


class ServerListError(ValueError):
    """A malformed host or port list; the message names what is wrong."""


def _items(text, what):
    items = [item.strip() for item in str(text).split(",")]
    if any(not item for item in items):
        raise ServerListError(f"empty entry in the {what} list {text!r}")
    return items


def split_servers(host, port=""):
    """[Server] from the host and port settings (strings; port may be an int or empty)."""
    hosts = _items(host, "host")
    port_text = "" if port is None else str(port).strip()
    if not port_text:
        return [Server(h, "") for h in hosts]
    ports = _items(port_text, "port")
    for item in ports:
        if not item.isdigit() or not 0 < int(item) <= MAX_PORT:
            raise ServerListError(f"{item!r} is not a port number")
    if len(ports) == 1:
        ports = ports * len(hosts)
    elif len(ports) != len(hosts):
        raise ServerListError(f"{len(ports)} ports for {len(hosts)} hosts: give one port for all hosts "
                              "or one per host")
    return [Server(h, str(int(p))) for h, p in zip(hosts, ports, strict=True)]


def libpq_host_port(servers):
    """(host, port) values for psycopg2.connect in libpq's multi-host form."""
    host = ",".join(s.host for s in servers)
    ports = [s.port for s in servers]
    port = ",".join(ports) if any(ports) else ""
    return host, port


def describe(server):
    """host:port (or the host alone for the driver's default port) for messages."""
    return f"{server.host}:{server.port}" if server.port else server.host
