"""Small helpers shared by the verbs."""
from ..config.network import NetworkError, parse_ip
from .context import AdminError
from .objects import parse_bool, require_match, select_ids


def confirmed(ctx, question):
    """Destructive verbs ask when no filter narrows them (and --force is not given)."""
    if ctx.filters:
        return True
    return ctx.confirm(question)


def matching_ids(cur, ctx, kind):
    """Ids matched by -f within the tenant (-t, default 1); a filter matching none is an error."""
    tenant = ctx.tenant(kind.default_tenant) if kind.tenant_sql else None
    ids = select_ids(cur, kind, ctx.filters, tenant)
    return require_match(ids, kind, ctx.filters)


def text_arg(ctx, key, what, maxlen, default=None, required=False):
    value = ctx.inv.arg(key, default)
    if value is None:
        if required:
            raise AdminError(f"Syntax error: parameter '{key}' is mandatory")
        return None
    if required and not value.strip():
        raise AdminError(f"{what} must not be empty")
    if len(value) > maxlen:
        raise AdminError(f"{what} is longer than {maxlen} characters")
    return value


def int_arg(ctx, key, what, default=None, minimum=None):
    value = ctx.inv.arg(key)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise AdminError(f"{what}: {value!r} is not a whole number") from None
    if minimum is not None and number < minimum:
        raise AdminError(f"{what}: {number} is below {minimum}")
    if number > 2 ** 31 - 1:
        raise AdminError(f"{what}: {number} is too large")
    return number


def bool_arg(ctx, key, default):
    value = ctx.inv.arg(key)
    if value is None or value == "":
        return default
    return parse_bool(value, key)


def ip_arg(value, what="ip"):
    try:
        return str(parse_ip(value, what))
    except NetworkError as exc:
        raise AdminError(str(exc)) from None
