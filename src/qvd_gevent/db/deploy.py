"""qvd-deploy-db: create the QVD-DB schema. Exit 0 deployed, 2 already deployed, 3 failed."""
import argparse
import sys
from importlib import resources

import psycopg2

from .. import add_version_option
from . import SCHEMA_VERSION, Database, DatabaseUnavailable
from .runtime import install_functions_tx
from ..config import Config, ConfigError

EXIT_OK, EXIT_ALREADY, EXIT_FAILED = 0, 2, 3

# Every object the schema creates, dropped by --force before it deploys again.
_DROP = """
DROP TABLE IF EXISTS host_properties, user_properties, vm_properties, osf_properties, di_properties,
    qvd_object_properties_list, properties_list, vm_agent_keys, user_tokens, user_auth_parameters, vm_counters,
    vm_runtimes, vms, di_runtimes, di_tags, dis, osfs, users, host_counters, host_runtimes, hosts,
    ssl_configs, configs, tenants, vm_states, vm_cmds, user_states, user_cmds, host_states, host_cmds,
    versions CASCADE;
DROP FUNCTION IF EXISTS qvd_notify_plain(), qvd_notify_tenant(), qvd_notify_vm_tenant(),
    qvd_notify_vm_runtime(), qvd_notify_vm_id(),
    qvd_claim_session_v1(integer, integer, integer, integer, boolean, integer),
    qvd_claim_session_v2(integer, integer, integer, integer, boolean, integer),
    qvd_claim_session_v3(integer, integer, integer, integer, boolean, integer, integer[]),
    qvd_session_params_v1(integer, integer, integer, varchar, integer, json, boolean) CASCADE;
DROP TYPE IF EXISTS language_enum, administrator_and_tenant_views_setups_qvd_object_enum,
    di_generation_state_enum CASCADE;
"""


def schema_sql():
    return resources.files("qvd_gevent.db").joinpath("schema.sql").read_text()


def is_deployed(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('configs') IS NOT NULL")
        return cur.fetchone()[0]


def schema_version(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('versions') IS NOT NULL")
        if not cur.fetchone()[0]:
            return None
        cur.execute("SELECT version FROM versions WHERE component = 'schema'")
        row = cur.fetchone()
        return row[0] if row else None


def deploy(db, force=False):
    """Deploy the schema in one transaction. Returns EXIT_OK or EXIT_ALREADY."""
    conn = db.connect()
    try:
        if is_deployed(conn) and not force:
            return EXIT_ALREADY
        with conn.cursor() as cur:
            if force:
                cur.execute(_DROP)
            cur.execute(schema_sql())
            cur.execute("SELECT current_database()")
            dbname = cur.fetchone()[0]
            # As the original: every session defaults to SERIALIZABLE.
            cur.execute("ALTER DATABASE %s SET default_transaction_isolation TO serializable"
                        % psycopg2.extensions.quote_ident(dbname, cur))
            install_functions_tx(cur)
        conn.commit()
        return EXIT_OK
    finally:
        conn.close()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="qvd-deploy-db", description="Create the QVD-DB schema "
                                     f"(version {SCHEMA_VERSION}).")
    parser.add_argument("--config", help="node.conf (default $QVD_CONFIG or /etc/qvd/node.conf)")
    add_version_option(parser)
    parser.add_argument("-f", "--force", action="store_true", help="drop an existing QVD schema and all its data first")
    args = parser.parse_args(argv)
    try:
        cfg = Config.load(args.config)
        db = Database.from_config(cfg)
        code = deploy(db, force=args.force)
    except (ConfigError, DatabaseUnavailable) as exc:
        print(f"[ERROR] Code 3: Unable to deploy the database: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except psycopg2.Error as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"[ERROR] Code 3: Unable to deploy the database: {msg}", file=sys.stderr)
        return EXIT_FAILED
    if code == EXIT_ALREADY:
        print("[ERROR] Code 2: Database already contains QVD tables, use '--force' to redeploy the database",
              file=sys.stderr)
        return EXIT_ALREADY
    print(f"Database deployed (schema {SCHEMA_VERSION}).")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
