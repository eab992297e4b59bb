"""Configuration: built-in defaults < node.conf < the configs table (tenant -1).

``database.*``, ``nodename``, ``log.*`` and the other bootstrap keys come only from the
file. ``${key}`` references are expanded when a value is read, as the original's HKD does:
``${`` up to the next ``}`` names a key, and ``${{}`` stands for a literal ``${``.
"""
import logging
import os
import re

from .db_servers import ServerListError, libpq_host_port, split_servers
from .defaults import BOOTSTRAP_PREFIXES, DEFAULTS
from .network import NetworkError, VmNetwork, parse_ip, parse_netmask
from .properties import BLANKS, PropertiesError, decode_properties, parse_properties

DEFAULT_PATH = "/etc/qvd/node.conf"

__all__ = ["Config", "ConfigError", "DEFAULTS", "resolve_config_path", "is_bootstrap_key", "is_file_only_key"]

log = logging.getLogger("qvd.config")


class ConfigError(Exception):
    """A configuration problem, with a message fit for one line on stderr."""


_REF = re.compile(r"\$\{(.*?)\}")
_TRUE = {"1", "yes", "true", "on", "y"}
_FALSE = {"0", "no", "false", "off", "n", ""}


def is_bootstrap_key(key):
    return any(key == p or key.startswith(p) for p in BOOTSTRAP_PREFIXES)


# Keys that name a program the node runs, or a file it reads or writes, as root. From the
# configs table, whoever can write the database would run anything on every node; so they
# are read from node.conf only, like the bootstrap keys (docs/differences.md#file-only-keys).
EXECUTABLE_KEYS = ("vm.network.netns.udhcpc", "vma.poweroff.command")
# Keys that say what a VM runs as and what it sees of the node (docs/hkd.md#vm-confinement).
CONFINEMENT_KEYS = ("vm.uid.base", "vm.uid.count", "vm.hidden_paths", "vm.environment.pass")


def is_file_only_key(key):
    """True for keys the node never takes from the configs table."""
    if is_bootstrap_key(key) or key.startswith("command.") or key in EXECUTABLE_KEYS or key in CONFINEMENT_KEYS:
        return True
    spec = DEFAULTS.get(key)
    return spec is not None and spec.type == "path"


def resolve_config_path(path=None):
    """--config, else $QVD_CONFIG, else /etc/qvd/node.conf. Returns (path, explicit)."""
    if path:
        return path, True
    env = os.environ.get("QVD_CONFIG")
    if env:
        return env, True
    return DEFAULT_PATH, False


def _convert(key, typ, value):
    text = str(value).strip() if not isinstance(value, (bool, int, float)) else value
    try:
        if typ == "int":
            return int(text)
        if typ == "float":
            return float(text)
        if typ == "bool":
            if isinstance(text, bool):
                return text
            if isinstance(text, (int, float)):
                return bool(text)
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if typ == "list":
            return [item.strip() for item in str(text).split(",") if item.strip()]
        if typ == "ip":
            return str(parse_ip(text, key))
        if typ == "netmask":
            parse_netmask(text)
            return str(text)
        if typ == "octal":
            return int(str(text), 8)
        return str(value)
    except (ValueError, NetworkError):
        raise ConfigError(f"configuration key {key}: malformed {typ} value {value!r}") from None


class Config:
    def __init__(self, file_values=None, path=None):
        self.path = path
        self.file_values = dict(file_values or {})
        self.db_values = {}
        self.generation = 0

    # --- loading ---------------------------------------------------------------------
    @classmethod
    def load(cls, path=None):
        path, explicit = resolve_config_path(path)
        if not os.path.exists(path):
            if explicit:
                raise ConfigError(f"configuration file {path} does not exist")
            return cls({}, None)
        try:
            with open(path, "rb") as fh:
                text = decode_properties(fh.read())
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
        try:
            values = parse_properties(text)
        except PropertiesError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return cls(values, path)

    def reload_file(self):
        """Re-read node.conf (SIGHUP); DB overrides stay."""
        if self.path:
            fresh = Config.load(self.path)
            self.file_values = fresh.file_values
            self.generation += 1

    def set_db_overrides(self, rows):
        """rows: mapping or iterable of (key, value) from configs where tenant_id = -1."""
        values = dict(rows)
        for key in sorted(k for k in values if is_file_only_key(k) and not is_bootstrap_key(k)):
            log.warning("configs table: %s is read only from node.conf; the value in the database is ignored", key)
        self.db_values = {k: v for k, v in values.items() if not is_file_only_key(k)}
        self.generation += 1

    # --- lookup ----------------------------------------------------------------------
    def known(self, key):
        return key in DEFAULTS or key in self.file_values or key in self.db_values

    def raw(self, key):
        """The unexpanded string (or default object) for key, or None when unset."""
        if key in self.db_values and not is_file_only_key(key):
            return self.db_values[key]
        if key in self.file_values:
            return self.file_values[key]
        if key in DEFAULTS:
            return DEFAULTS[key].default
        raise ConfigError(f"unknown configuration key {key}")

    def expand(self, value, _seen=()):
        if not isinstance(value, str):
            return value

        def sub(match):
            ref = match.group(1)
            if ref == "{":
                return "${"
            if ref in _seen:
                raise ConfigError(f"configuration key {ref} refers to itself")
            inner = self.raw(ref)
            if inner is None:
                raise ConfigError(f"configuration key {ref} has no value")
            return str(self.expand(inner, _seen + (ref,)))

        return _REF.sub(sub, value)

    def get(self, key, default=...):
        """Typed value of key. Raises ConfigError naming the key if unset or malformed."""
        try:
            value = self.raw(key)
        except ConfigError:
            if default is not ...:
                return default
            raise
        if value is None:
            if default is not ...:
                return default
            raise ConfigError(f"configuration key {key} has no value; set it in node.conf")
        value = self.expand(value, (key,))
        typ = DEFAULTS[key].type if key in DEFAULTS else "str"
        return _convert(key, typ, value)

    __getitem__ = get

    def get_str(self, key, default=...):
        value = self.get(key, default)
        return value if value is None else str(value)

    def get_int(self, key, default=...):
        return _convert(key, "int", self.get(key, default))

    def get_float(self, key, default=...):
        return _convert(key, "float", self.get(key, default))

    def get_bool(self, key, default=...):
        return _convert(key, "bool", self.get(key, default))

    def get_list(self, key, default=...):
        value = self.get(key, default)
        return value if isinstance(value, list) else _convert(key, "list", value)

    def validate(self, key, value):
        """Check value is well formed for key (admin `config set`); returns it converted."""
        typ = DEFAULTS[key].type if key in DEFAULTS else "str"
        return _convert(key, typ, value)

    def effective_items(self, include_internal=False):
        """All known keys with their effective (expanded) value, for `config get`."""
        keys = set(DEFAULTS) | set(self.file_values) | set(self.db_values)
        out = {}
        for key in sorted(keys):
            if key.startswith("internal.") and not include_internal:
                continue
            try:
                value = self.get(key)
            except ConfigError:
                value = None
            out[key] = value
        return out

    def vm_network(self):
        try:
            return VmNetwork(self.get("vm.network.ip.start"), self.get("vm.network.netmask"))
        except NetworkError as exc:
            raise ConfigError(str(exc)) from None

    def dsn_kwargs(self):
        """psycopg2.connect keyword arguments from database.* (bootstrap keys only).

        database.host and database.port may be comma-separated lists (libpq's multi-host
        form): one port for every host, or one per host.
        """
        try:
            servers = split_servers(self.get_str("database.host"), self.get_str("database.port"))
        except ServerListError as exc:
            raise ConfigError(f"configuration keys database.host/database.port: {exc}") from None
        host, port = libpq_host_port(servers)
        # The original pastes the name unquoted into a libpq conninfo string, where blanks
        # around a value do not count; user and password are passed as they are.
        kw = {
            "host": host,
            "dbname": self.get_str("database.name").strip(BLANKS),
            "user": self.get_str("database.user"),
            "connect_timeout": self.get_int("internal.database.client.connect.timeout"),
            "keepalives": 1,
            "keepalives_idle": self.get_int("internal.database.client.socket.keepidle"),
            "keepalives_interval": self.get_int("internal.database.client.socket.keepintvl"),
            "keepalives_count": self.get_int("internal.database.client.socket.keepcnt"),
            "application_name": "qvd-gevent",
        }
        password = self.get_str("database.password")
        if password:
            kw["password"] = password
        if port:
            kw["port"] = port
        return kw
