"""Database errors turned into one clear line for the operator."""
import psycopg2
import psycopg2.errors

# PostgreSQL's default names for the schema's unique constraints.
_UNIQUE = {
    "hosts_name_key": "a host named {v} already exists",
    "hosts_address_key": "a host with address {v} already exists",
    "users_login_tenant_id_key": "a user with login {v} already exists in this tenant",
    "osfs_name_tenant_id_key": "an OSF named {v} already exists in this tenant",
    "vms_name_user_id_key": "the user already has a VM named {v}",
    "vms_ip_key": "IP address {v} is already used by another VM",
    "dis_osf_id_version_key": "the OSF already has a DI with version {v}",
    "configs_pkey": "configuration key {v} is already set",
}


def _first_value(detail):
    """'Key (name, tenant_id)=(x, 1) already exists.' -> 'x' (best effort)."""
    if not detail or ")=(" not in detail:
        return "that value"
    values = detail.split(")=(", 1)[1].rsplit(")", 1)[0]
    return repr(values.split(", ")[0])


def describe(exc):
    """One line for a psycopg2 error."""
    diag = getattr(exc, "diag", None)
    constraint = getattr(diag, "constraint_name", None)
    detail = getattr(diag, "message_detail", None)
    if isinstance(exc, psycopg2.errors.UniqueViolation):
        template = _UNIQUE.get(constraint)
        if template:
            return template.format(v=_first_value(detail))
        return f"duplicate value: {detail or constraint}"
    if isinstance(exc, psycopg2.errors.ForeignKeyViolation):
        return f"still referenced: {detail or constraint}"
    if isinstance(exc, psycopg2.errors.StringDataRightTruncation):
        return "a value is too long for its column"
    if isinstance(exc, psycopg2.errors.InvalidTextRepresentation):
        return "malformed value: " + str(getattr(diag, "message_primary", "") or exc).strip()
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"database error: {first}"
