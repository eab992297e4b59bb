-- QVD-DB 4.3.0, the subset a server node uses, with QVD's own table, column and enum names.
-- Deployed in one transaction by qvd-deploy-db (qvd_gevent.db.deploy).

CREATE TYPE language_enum AS ENUM ('es', 'en', 'auto', 'default');
CREATE TYPE administrator_and_tenant_views_setups_qvd_object_enum AS ENUM
    ('user', 'vm', 'log', 'host', 'osf', 'di', 'role', 'administrator', 'tenant');
CREATE TYPE di_generation_state_enum AS ENUM
    ('new', 'generating', 'fail', 'uploading', 'upload_stalled', 'verifying', 'ready', 'published', 'retired');

CREATE TABLE versions (component varchar(100) PRIMARY KEY, version varchar(100) NOT NULL);

CREATE TABLE vm_states   (name varchar(12) PRIMARY KEY);
CREATE TABLE vm_cmds     (name varchar(20) PRIMARY KEY);
CREATE TABLE user_states (name varchar(20) PRIMARY KEY);
CREATE TABLE user_cmds   (name varchar(20) PRIMARY KEY);
CREATE TABLE host_states (name varchar(20) PRIMARY KEY);
CREATE TABLE host_cmds   (name varchar(20) PRIMARY KEY);

CREATE TABLE tenants (
    id          serial PRIMARY KEY,
    name        varchar(80) NOT NULL UNIQUE,
    description varchar(32768),
    blocked     boolean DEFAULT false
);

CREATE TABLE configs (
    tenant_id integer NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    key       varchar(64) NOT NULL,
    value     varchar(4096) NOT NULL,
    PRIMARY KEY (tenant_id, key)
);

CREATE TABLE ssl_configs (key varchar(64) PRIMARY KEY, value varchar(32768) NOT NULL);

CREATE TABLE hosts (
    id          serial PRIMARY KEY,
    name        varchar(127) NOT NULL UNIQUE,
    description varchar(32768),
    address     varchar(127) NOT NULL UNIQUE,
    frontend    boolean NOT NULL,
    backend     boolean NOT NULL
);

CREATE TABLE host_runtimes (
    host_id    integer PRIMARY KEY REFERENCES hosts(id) ON DELETE CASCADE,
    pid        integer,
    ok_ts      timestamp,
    usable_ram real,
    usable_cpu real,
    state      varchar(12) NOT NULL REFERENCES host_states(name),
    blocked    boolean NOT NULL,
    cmd        varchar(12) REFERENCES host_cmds(name)
);

CREATE TABLE host_counters (
    host_id        integer PRIMARY KEY REFERENCES hosts(id) ON DELETE CASCADE,
    http_requests  integer NOT NULL DEFAULT 0,
    auth_attempts  integer NOT NULL DEFAULT 0,
    auth_ok        integer NOT NULL DEFAULT 0,
    nx_attempts    integer NOT NULL DEFAULT 0,
    nx_ok          integer NOT NULL DEFAULT 0,
    short_sessions integer NOT NULL DEFAULT 0
);

CREATE TABLE users (
    id          serial PRIMARY KEY,
    description varchar(32768),
    tenant_id   integer NOT NULL REFERENCES tenants(id),
    login       varchar(64) NOT NULL,
    blocked     boolean NOT NULL DEFAULT false,
    -- the original holds 43-char SHA-256 tokens; scrypt strings need more room
    password    varchar(256),
    language    language_enum NOT NULL DEFAULT 'auto',
    UNIQUE (login, tenant_id)
);

CREATE TABLE osfs (
    tenant_id         integer NOT NULL REFERENCES tenants(id),
    id                serial PRIMARY KEY,
    name              varchar(64) NOT NULL,
    description       varchar(32768),
    memory            integer NOT NULL,
    use_overlay       boolean NOT NULL,
    is_application    boolean NOT NULL DEFAULT false,
    user_storage_size integer,
    osd_id            integer,
    UNIQUE (name, tenant_id)
);

CREATE TABLE dis (
    id          serial PRIMARY KEY,
    osf_id      integer NOT NULL REFERENCES osfs(id),
    blocked     boolean NOT NULL DEFAULT false,
    description varchar(32768),
    path        varchar(4096) NOT NULL,
    version     varchar(64) NOT NULL,
    UNIQUE (osf_id, version)
);

CREATE TABLE di_tags (
    id    serial PRIMARY KEY,
    di_id integer NOT NULL REFERENCES dis(id) ON DELETE CASCADE,
    tag   varchar(1024) NOT NULL,
    fixed boolean NOT NULL DEFAULT false
);

CREATE TABLE di_runtimes (
    di_id                integer PRIMARY KEY REFERENCES dis(id) ON DELETE CASCADE,
    state                di_generation_state_enum NOT NULL DEFAULT 'new',
    state_ts             integer,
    elapsed_time         integer,
    auto_publish         integer DEFAULT 0,
    foreign_id           integer,
    expiration_time_soft integer,
    expiration_time_hard integer,
    percentage           real DEFAULT 0,
    error_code           integer,
    status_message       text
);

CREATE TABLE vms (
    id          serial PRIMARY KEY,
    name        varchar(64) NOT NULL,
    description varchar(32768),
    user_id     integer NOT NULL REFERENCES users(id),
    osf_id      integer NOT NULL REFERENCES osfs(id),
    di_tag      varchar(128) NOT NULL,
    ip          varchar(15) UNIQUE,
    storage     varchar(4096),
    UNIQUE (name, user_id)
);

CREATE TABLE vm_runtimes (
    vm_id              integer PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
    host_id            integer REFERENCES hosts(id),
    current_osf_id     integer REFERENCES osfs(id),
    current_di_id      integer REFERENCES dis(id),
    user_ip            varchar(15),
    real_user_id       integer REFERENCES users(id) ON DELETE SET NULL,
    vm_state           varchar(12) NOT NULL REFERENCES vm_states(name),
    vm_state_ts        integer,
    vm_cmd             varchar(12) REFERENCES vm_cmds(name),
    vm_pid             integer,
    user_state         varchar(12) NOT NULL REFERENCES user_states(name),
    user_state_ts      integer,
    user_cmd           varchar(12) REFERENCES user_cmds(name),
    vma_ok_ts          integer,
    l7r_host_id        integer REFERENCES hosts(id),
    l7r_pid            integer,
    vm_address         varchar(127),
    vm_vma_port        integer,
    vm_x_port          integer,
    vm_ssh_port        integer,
    vm_vnc_port        integer,
    vm_mon_port        integer,
    vm_serial_port     integer,
    blocked            boolean,
    vm_expiration_soft timestamp,
    vm_expiration_hard timestamp
);
CREATE INDEX vm_runtimes_host_id_idx ON vm_runtimes (host_id);
CREATE INDEX vm_runtimes_l7r_host_id_idx ON vm_runtimes (l7r_host_id);

CREATE TABLE vm_counters (
    vm_id        integer PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
    run_attempts integer NOT NULL DEFAULT 0,
    run_ok       integer NOT NULL DEFAULT 0
);

-- Ours, not in the original schema: the secret a running VM's agent requires of every
-- caller (docs/hkd.md#vma-secret). One row while the VM runs; made at each start.
CREATE TABLE vm_agent_keys (
    vm_id   integer PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
    secret  varchar(64) NOT NULL,
    created integer NOT NULL
);

CREATE TABLE user_auth_parameters (id serial PRIMARY KEY, parameters json);

CREATE TABLE user_tokens (
    token          varchar(256) PRIMARY KEY,
    user_id        integer NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    vm_id          integer REFERENCES vms(id) ON DELETE CASCADE,
    expiration     integer NOT NULL,
    auth_params_id integer REFERENCES user_auth_parameters(id) ON DELETE SET NULL,
    multi_use      boolean NOT NULL DEFAULT false
);

-- 4.x property model: a catalogue of names, enabled per object kind, values per object.
CREATE TABLE properties_list (
    id          serial PRIMARY KEY,
    key         varchar(1024) NOT NULL,
    tenant_id   integer NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    description varchar(1024),
    UNIQUE (key, tenant_id)
);
CREATE TABLE qvd_object_properties_list (
    id          serial PRIMARY KEY,
    property_id integer NOT NULL REFERENCES properties_list(id) ON DELETE CASCADE,
    qvd_object  administrator_and_tenant_views_setups_qvd_object_enum NOT NULL,
    UNIQUE (property_id, qvd_object)
);
CREATE TABLE host_properties (
    host_id     integer NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
    property_id integer NOT NULL REFERENCES qvd_object_properties_list(id) ON DELETE CASCADE,
    value       varchar(32768) NOT NULL,
    PRIMARY KEY (host_id, property_id)
);
CREATE TABLE user_properties (
    user_id     integer NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    property_id integer NOT NULL REFERENCES qvd_object_properties_list(id) ON DELETE CASCADE,
    value       varchar(32768) NOT NULL,
    PRIMARY KEY (user_id, property_id)
);
CREATE TABLE vm_properties (
    vm_id       integer NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    property_id integer NOT NULL REFERENCES qvd_object_properties_list(id) ON DELETE CASCADE,
    value       varchar(32768) NOT NULL,
    PRIMARY KEY (vm_id, property_id)
);
CREATE TABLE osf_properties (
    osf_id      integer NOT NULL REFERENCES osfs(id) ON DELETE CASCADE,
    property_id integer NOT NULL REFERENCES qvd_object_properties_list(id) ON DELETE CASCADE,
    value       varchar(32768) NOT NULL,
    PRIMARY KEY (osf_id, property_id)
);
CREATE TABLE di_properties (
    di_id       integer NOT NULL REFERENCES dis(id) ON DELETE CASCADE,
    property_id integer NOT NULL REFERENCES qvd_object_properties_list(id) ON DELETE CASCADE,
    value       varchar(32768) NOT NULL,
    PRIMARY KEY (di_id, property_id)
);

-- Lookup rows (QVD::DB::Common INITIAL_VALUES)
INSERT INTO vm_states (name) VALUES ('stopped'), ('starting'), ('running'), ('stopping'), ('zombie'), ('debugging');
INSERT INTO vm_cmds (name) VALUES ('start'), ('stop'), ('busy');
INSERT INTO user_states (name) VALUES ('disconnected'), ('connecting'), ('connected');
INSERT INTO user_cmds (name) VALUES ('abort');
INSERT INTO host_states (name) VALUES ('stopped'), ('starting'), ('running'), ('stopping'), ('lost');
INSERT INTO host_cmds (name) VALUES ('stop');

-- Seed tenants: -1 owns the global configs, 0 is the supertenant, 1 the default tenant.
INSERT INTO tenants (id, name, description, blocked) VALUES
    (-1, '-', 'common settings', false),
    (0, '*', 'supertenant', false),
    (1, 'default', 'default tenant', false);
INSERT INTO configs (tenant_id, key, value) VALUES (-1, 'wat.multitenant', '1');

-- NOTIFY triggers, channel names and payloads as the original's.
CREATE FUNCTION qvd_notify_plain() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END $$;

CREATE FUNCTION qvd_notify_tenant() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    PERFORM pg_notify(TG_ARGV[0], 'tenant_id=' || r.tenant_id);
    RETURN NULL;
END $$;

CREATE FUNCTION qvd_notify_vm_tenant() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE r record; t integer;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    SELECT u.tenant_id INTO t FROM users u WHERE u.id = r.user_id;
    PERFORM pg_notify(TG_ARGV[0], 'tenant_id=' || coalesce(t::text, ''));
    RETURN NULL;
END $$;

CREATE FUNCTION qvd_notify_vm_runtime() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE t integer; u integer;
BEGIN
    SELECT us.tenant_id, us.id INTO t, u FROM vms v JOIN users us ON us.id = v.user_id WHERE v.id = NEW.vm_id;
    IF TG_ARGV[0] = 'desktop_changed' THEN
        PERFORM pg_notify('desktop_changed', 'user_id=' || coalesce(u::text, '') || ';vm_id=' || NEW.vm_id);
    ELSE
        PERFORM pg_notify(TG_ARGV[0], 'tenant_id=' || coalesce(t::text, ''));
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER hosts_changed AFTER UPDATE ON hosts FOR EACH ROW EXECUTE PROCEDURE qvd_notify_plain('host_changed');
CREATE TRIGGER hosts_created AFTER INSERT ON hosts FOR EACH ROW EXECUTE PROCEDURE qvd_notify_plain('host_created');
CREATE TRIGGER hosts_deleted AFTER DELETE ON hosts FOR EACH ROW EXECUTE PROCEDURE qvd_notify_plain('host_deleted');
CREATE TRIGGER host_runtimes_blocked AFTER UPDATE OF blocked ON host_runtimes FOR EACH ROW EXECUTE PROCEDURE qvd_notify_plain('host_blocked_or_unblocked');
CREATE TRIGGER host_runtimes_state AFTER UPDATE OF state ON host_runtimes FOR EACH ROW EXECUTE PROCEDURE qvd_notify_plain('host_changed');

CREATE TRIGGER users_blocked AFTER UPDATE OF blocked ON users FOR EACH ROW EXECUTE PROCEDURE qvd_notify_tenant('user_blocked_or_unblocked');
CREATE TRIGGER users_changed AFTER UPDATE ON users FOR EACH ROW EXECUTE PROCEDURE qvd_notify_tenant('user_changed');
CREATE TRIGGER users_created AFTER INSERT ON users FOR EACH ROW EXECUTE PROCEDURE qvd_notify_tenant('user_created');
CREATE TRIGGER users_deleted AFTER DELETE ON users FOR EACH ROW EXECUTE PROCEDURE qvd_notify_tenant('user_deleted');

CREATE TRIGGER vms_changed AFTER UPDATE ON vms FOR EACH ROW EXECUTE PROCEDURE qvd_notify_vm_tenant('vm_changed');
CREATE TRIGGER vms_created AFTER INSERT ON vms FOR EACH ROW EXECUTE PROCEDURE qvd_notify_vm_tenant('vm_created');
CREATE TRIGGER vms_deleted AFTER DELETE ON vms FOR EACH ROW EXECUTE PROCEDURE qvd_notify_vm_tenant('vm_deleted');

CREATE TRIGGER vm_runtimes_blocked AFTER UPDATE OF blocked ON vm_runtimes FOR EACH ROW EXECUTE PROCEDURE qvd_notify_vm_runtime('vm_blocked_or_unblocked');
CREATE TRIGGER vm_runtimes_changed AFTER UPDATE OF vm_state, user_state, vm_expiration_soft, vm_expiration_hard ON vm_runtimes FOR EACH ROW EXECUTE PROCEDURE qvd_notify_vm_runtime('vm_changed');
CREATE TRIGGER vm_runtimes_desktop AFTER UPDATE OF vm_state, user_state ON vm_runtimes FOR EACH ROW EXECUTE PROCEDURE qvd_notify_vm_runtime('desktop_changed');

-- Ours: the channel qvd_vm_runtime (payload: the vm_id) is made by db/functions.sql.

CREATE TRIGGER osfs_changed AFTER UPDATE ON osfs FOR EACH ROW EXECUTE PROCEDURE qvd_notify_tenant('osf_changed');
CREATE TRIGGER osfs_created AFTER INSERT ON osfs FOR EACH ROW EXECUTE PROCEDURE qvd_notify_tenant('osf_created');
CREATE TRIGGER osfs_deleted AFTER DELETE ON osfs FOR EACH ROW EXECUTE PROCEDURE qvd_notify_tenant('osf_deleted');

CREATE TRIGGER dis_blocked AFTER UPDATE OF blocked ON dis FOR EACH ROW EXECUTE PROCEDURE qvd_notify_plain('di_blocked_or_unblocked');
CREATE TRIGGER dis_changed AFTER UPDATE ON dis FOR EACH ROW EXECUTE PROCEDURE qvd_notify_plain('di_changed');
CREATE TRIGGER dis_created AFTER INSERT ON dis FOR EACH ROW EXECUTE PROCEDURE qvd_notify_plain('di_created');
CREATE TRIGGER dis_deleted AFTER DELETE ON dis FOR EACH ROW EXECUTE PROCEDURE qvd_notify_plain('di_deleted');
CREATE TRIGGER di_runtimes_changed AFTER UPDATE ON di_runtimes FOR EACH ROW EXECUTE PROCEDURE qvd_notify_plain('di_changed');

CREATE TRIGGER configs_changed AFTER INSERT OR UPDATE OR DELETE ON configs FOR EACH ROW EXECUTE PROCEDURE qvd_notify_tenant('qvd_config_changed');

-- Serial sequences start at 10000 on an empty table, as qvd-deploy-db.pl update_seqs does.
SELECT setval(pg_get_serial_sequence(t, 'id'), 10000, false)
  FROM unnest(ARRAY['hosts', 'users', 'osfs', 'dis', 'di_tags', 'vms', 'user_auth_parameters',
                    'properties_list', 'qvd_object_properties_list']) AS t;
SELECT setval(pg_get_serial_sequence('tenants', 'id'), 10000, false);

INSERT INTO versions (component, version) VALUES ('schema', '4.3.0');
