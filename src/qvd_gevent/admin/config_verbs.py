"""config set / get / del / ssl.

Which keys `config set` accepts:
- every key of the defaults table (config/defaults.py), its value checked with
  cfg.validate (plus: gateway and DNS server must be IPv4 addresses, and the VM range
  from ip.start and netmask must still make sense);
- except the bootstrap keys (database.*, nodename, log.*, path.run, hkd.pid_file,
  hkd.user.umask, hkd.as_*, internal.database.client.*): the node reads them only from
  node.conf, so a row in the DB would silently do nothing;
- except l7r.ssl.*, which `config ssl` stores (checked) in ssl_configs;
- plus free-form families an operator needs that our table cannot list: settings of
  other components sharing the configs table (wat.*, api.*, up-api.*), per-plugin
  settings (l7r.auth.plugin.<name>.*, l7r.loadbalancer.plugin.<name>.*), ssh options
  for `vm ssh` (admin.ssh.opt.*) and the lxc hypervisor's knobs (vm.lxc.*, which the
  original's sample install sets). Anything else is refused as unknown (typos).
"""
from ..config import DEFAULTS, ConfigError, is_bootstrap_key, is_file_only_key
from ..config.network import NetworkError, VmNetwork, parse_ip
from ..db import notify
from . import sslcheck
from .context import AdminError
from .registry import verb

FREE_FORM_PREFIXES = ("wat.", "api.", "up-api.", "l7r.auth.plugin.", "l7r.loadbalancer.plugin.",
                      "admin.ssh.opt.", "vm.lxc.")
IP_KEYS = ("vm.network.gateway", "vm.network.dns_server")
SSL_KEYS = ("key", "cert", "ca", "crl")


def _check_tenant(cur, tenant):
    cur.execute("SELECT 1 FROM tenants WHERE id = %s", (tenant,))
    if cur.fetchone() is None:
        raise AdminError(f"tenant {tenant} does not exist")


def check_key(key):
    if key.startswith("l7r.ssl.") or key == "l7r.ssl":
        raise AdminError(f"{key}: SSL material is set with 'config ssl key=<file> cert=<file>'")
    if is_bootstrap_key(key):
        raise AdminError(f"{key} is read only from node.conf; set it there")
    if is_file_only_key(key):
        raise AdminError(f"{key} names a program or file the node uses as root: it is read only from node.conf; "
                         "set it there")
    if key in DEFAULTS:
        return
    if any(key.startswith(p) and len(key) > len(p) for p in FREE_FORM_PREFIXES):
        return
    raise AdminError(f"unknown configuration key {key}")


def check_value(cfg, key, value):
    try:
        cfg.validate(key, value)
    except ConfigError as exc:
        raise AdminError(str(exc)) from None
    if key == "vm.hypervisor":
        known = cfg.get_list("internal.hkd.hypervisor_list")
        if value.strip() not in known:
            raise AdminError(f"vm.hypervisor: unknown hypervisor {value!r} (one of: {', '.join(known)})")
    if key in IP_KEYS and value.strip():
        try:
            parse_ip(value, key)
        except NetworkError as exc:
            raise AdminError(str(exc)) from None


@verb("config", "set", "key=value ...", "Sets configuration keys in the database (cluster-wide).", allowed=None)
def config_set(ctx):
    pairs = ctx.inv.args
    if not pairs:
        raise AdminError("Syntax error: nothing to set (usage: config set key=value ...)")
    tenant = ctx.tenant(-1)
    for key, value in pairs:
        check_key(key)
        check_value(ctx.cfg, key, value)
    new = dict(pairs)
    if tenant == -1 and ("vm.network.ip.start" in new or "vm.network.netmask" in new):
        start = new.get("vm.network.ip.start") or ctx.cfg.get_str("vm.network.ip.start")
        mask = new.get("vm.network.netmask") or ctx.cfg.get_str("vm.network.netmask")
        try:
            VmNetwork(start, mask)
        except NetworkError as exc:
            raise AdminError(f"{exc} (with vm.network.ip.start={start}, vm.network.netmask={mask})") from None

    def run(cur):
        _check_tenant(cur, tenant)
        for key, value in pairs:
            cur.execute("INSERT INTO configs (tenant_id, key, value) VALUES (%s, %s, %s)"
                        " ON CONFLICT (tenant_id, key) DO UPDATE SET value = EXCLUDED.value",
                        (tenant, key, value.strip()))
        notify(cur, "qvd_config_changed", f"tenant_id={tenant}")
    ctx.tx(run)


def _shown(key, value):
    if key.endswith(".password") and value:
        return "********"
    return value


def effective_text(cfg, key, overrides):
    """The value `config get` prints for key, or None when it has none."""
    if key in overrides:
        return overrides[key]
    try:
        raw = cfg.raw(key)
    except ConfigError:
        return None
    if raw is None:
        return None
    if isinstance(raw, bool):
        return "1" if raw else "0"
    if isinstance(raw, float):
        return f"{raw:.15g}"
    if not isinstance(raw, str):
        return str(raw)
    try:
        return str(cfg.expand(raw, (key,)))
    except ConfigError:
        return raw


@verb("config", "get", "[key ...]", "Prints configuration keys with their effective values.", allowed=None,
      bare="keys")
def config_get(ctx):
    tenant = ctx.tenant(-1)
    keys = [k for k, _ in ctx.inv.args]

    def run(cur):
        _check_tenant(cur, tenant)
        cur.execute("SELECT key, value FROM configs WHERE tenant_id = %s", (tenant,))
        return dict(cur.fetchall())
    rows = ctx.tx(run)
    if tenant == -1:  # a stray bootstrap row in the DB is ignored by the node; show what it uses
        rows = {k: v for k, v in rows.items() if not is_file_only_key(k)}
    cfg = ctx.cfg
    if keys:
        for key in keys:
            if key.startswith("l7r.ssl."):
                raise AdminError(f"{key} is kept in ssl_configs by 'config ssl' and is not shown")
            if key not in rows and not cfg.known(key):
                raise AdminError(f"unknown configuration key {key}")
        wanted = keys
    else:
        wanted = set(DEFAULTS) | set(cfg.file_values) | set(cfg.db_values) | set(rows)
        wanted = [k for k in wanted if not k.startswith("internal.")]
    lines = []
    for key in sorted(set(wanted)):
        value = effective_text(cfg, key, rows)
        if value is None:
            continue
        lines.append(f"{key}={_shown(key, value)}\n")
    ctx.print("".join(lines))


@verb("config", "del", "[key ...]", "Deletes configuration keys from the database (all without keys).",
      allowed=None, bare="keys")
def config_del(ctx):
    tenant = ctx.tenant(-1)
    keys = [k for k, _ in ctx.inv.args]
    if not keys and not ctx.confirm("Are you sure you want to delete all configuration variables?"):
        return 0

    def run(cur):
        _check_tenant(cur, tenant)
        if keys:
            cur.execute("DELETE FROM configs WHERE tenant_id = %s AND key = ANY(%s)", (tenant, keys))
        else:
            cur.execute("DELETE FROM configs WHERE tenant_id = %s", (tenant,))
        count = cur.rowcount
        notify(cur, "qvd_config_changed", f"tenant_id={tenant}")
        return count
    count = ctx.tx(run)
    ctx.say(f"{count} config entries deleted.")


@verb("config", "ssl", "key=<file> cert=<file> [ca=<file>] [crl=<file>]",
      "Stores the L7R's private key and certificate (and CA, CRL) in the database.",
      mandatory=("key", "cert"), allowed=("ca", "crl"))
def config_ssl(ctx):
    paths = {k: ctx.inv.arg(k) for k in SSL_KEYS if ctx.inv.has(k)}
    texts = {}
    what = {"key": "key", "cert": "cert", "ca": "ca", "crl": "crl"}
    for name in ("cert", "key", "ca", "crl"):
        if name in paths:
            texts[name] = sslcheck.read_text(paths[name], what[name])
    sslcheck.check_pair(texts["key"], texts["cert"], paths["key"], paths["cert"])
    if "ca" in texts:
        sslcheck.check_ca(texts["ca"], paths["ca"])
    if "crl" in texts:
        sslcheck.check_crl(texts["crl"], paths["crl"])

    def run(cur):
        for name in SSL_KEYS:
            row_key = f"l7r.ssl.{name}"
            if name in texts:
                cur.execute("INSERT INTO ssl_configs (key, value) VALUES (%s, %s)"
                            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (row_key, texts[name]))
            else:
                cur.execute("DELETE FROM ssl_configs WHERE key = %s", (row_key,))
        notify(cur, "qvd_config_changed", "tenant_id=-1")
    ctx.tx(run)
    ctx.say("SSL certificate, private key, ca and crl set.")
