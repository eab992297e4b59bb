-- Server-side steps of a connect_to_vm (db/runtime.py), so that each costs one round trip:
-- the claim (with the access check and the row the connect goes on with) and the x_start
-- parameters (with the session's token). Versioned names: nodes of two versions can share
-- a database during an upgrade. Installed by qvd-deploy-db and again at every L7R start
-- (CREATE OR REPLACE), so an existing database gets them without a migration step.

-- Ours: one channel whose payload is the vm_id, so a greenlet waiting on one VM (an L7R
-- waiting for 'running', a session holder watching for 'abort') wakes without polling;
-- ":abort" follows the id while user_cmd is 'abort', so a holder queries its rows only then.
CREATE OR REPLACE FUNCTION qvd_notify_vm_id() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('qvd_vm_runtime', NEW.vm_id::text || CASE WHEN NEW.user_cmd = 'abort' THEN ':abort' ELSE '' END);
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER vm_runtimes_vm_id AFTER UPDATE OF vm_state, vm_cmd, user_state, user_cmd, host_id
    ON vm_runtimes FOR EACH ROW EXECUTE PROCEDURE qvd_notify_vm_id();

-- The claim rule is db/runtime.py's decide_claim; tests/integration/test_runtime_rows.py
-- checks that both give the same answer for every case.
-- generation: the claim's transaction id, which grows with every claim of the cluster; the
-- VM's display gate refuses an x_start of an older claim than the one it serves
-- (docs/protocol.md#display-gate), so a contender aborted mid-way can never arm the display
-- over the session that took the VM from it.
CREATE OR REPLACE FUNCTION qvd_claim_session_v2(p_vm integer, p_host integer, p_pid integer, p_user integer,
                                                p_live_here boolean, p_now integer)
RETURNS TABLE (outcome text, holder_host integer, holder_pid integer, generation bigint,
               vm_state varchar, vm_cmd varchar, user_state varchar, user_cmd varchar, host_id integer,
               l7r_host_id integer, l7r_pid integer, vm_address varchar, vm_vma_port integer, vm_x_port integer)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    SELECT v.user_id AS owner, vr.blocked AS blocked, vr.user_state AS us, vr.l7r_host_id AS hh,
           vr.l7r_pid AS hp, vr.user_cmd AS uc
      INTO r FROM vms v JOIN vm_runtimes vr ON vr.vm_id = v.id WHERE v.id = p_vm FOR UPDATE OF vr;
    IF NOT FOUND THEN
        outcome := 'gone';
        RETURN NEXT;
        RETURN;
    END IF;
    IF r.owner <> p_user THEN
        outcome := 'forbidden';
        RETURN NEXT;
        RETURN;
    END IF;
    IF r.blocked THEN
        outcome := 'blocked';
        RETURN NEXT;
        RETURN;
    END IF;
    holder_host := r.hh;
    holder_pid := r.hp;
    IF r.us = 'disconnected' OR r.hh IS NULL
       OR (r.hh = p_host AND (r.hp IS DISTINCT FROM p_pid OR NOT p_live_here)) THEN
        IF r.us <> 'disconnected' THEN
            DELETE FROM user_tokens t WHERE t.vm_id = p_vm;      -- the dead holder's session ends here
        END IF;
        UPDATE vm_runtimes SET user_state = 'connecting', user_state_ts = p_now, l7r_pid = p_pid,
                               l7r_host_id = p_host, user_cmd = NULL, real_user_id = p_user
         WHERE vm_runtimes.vm_id = p_vm;
        outcome := 'claim';
        generation := txid_current();
        SELECT vr.vm_state, vr.vm_cmd, vr.user_state, vr.user_cmd, vr.host_id, vr.l7r_host_id, vr.l7r_pid,
               vr.vm_address, vr.vm_vma_port, vr.vm_x_port
          INTO vm_state, vm_cmd, user_state, user_cmd, host_id, l7r_host_id, l7r_pid, vm_address, vm_vma_port,
               vm_x_port
          FROM vm_runtimes vr WHERE vr.vm_id = p_vm;
    ELSIF r.uc = 'abort' THEN
        outcome := 'wait';
        -- re-announce: the holder may have missed the first NOTIFY (LISTEN reconnect)
        PERFORM pg_notify('qvd_cmd_for_user_on_host' || r.hh, p_vm::text);
    ELSE
        outcome := 'abort';
        UPDATE vm_runtimes SET user_cmd = 'abort' WHERE vm_runtimes.vm_id = p_vm;
        PERFORM pg_notify('qvd_cmd_for_user_on_host' || r.hh, p_vm::text);
    END IF;
    RETURN NEXT;
END
$$;

-- v3: a node with several L7R processes (l7r.workers) names the live ones in p_live_pids;
-- a holder on this host is dead only if its pid is none of them (v2: any other pid).
CREATE OR REPLACE FUNCTION qvd_claim_session_v3(p_vm integer, p_host integer, p_pid integer, p_user integer,
                                                p_live_here boolean, p_now integer, p_live_pids integer[])
RETURNS TABLE (outcome text, holder_host integer, holder_pid integer, generation bigint,
               vm_state varchar, vm_cmd varchar, user_state varchar, user_cmd varchar, host_id integer,
               l7r_host_id integer, l7r_pid integer, vm_address varchar, vm_vma_port integer, vm_x_port integer)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    SELECT v.user_id AS owner, vr.blocked AS blocked, vr.user_state AS us, vr.l7r_host_id AS hh,
           vr.l7r_pid AS hp, vr.user_cmd AS uc
      INTO r FROM vms v JOIN vm_runtimes vr ON vr.vm_id = v.id WHERE v.id = p_vm FOR UPDATE OF vr;
    IF NOT FOUND THEN
        outcome := 'gone';
        RETURN NEXT;
        RETURN;
    END IF;
    IF r.owner <> p_user THEN
        outcome := 'forbidden';
        RETURN NEXT;
        RETURN;
    END IF;
    IF r.blocked THEN
        outcome := 'blocked';
        RETURN NEXT;
        RETURN;
    END IF;
    holder_host := r.hh;
    holder_pid := r.hp;
    IF r.us = 'disconnected' OR r.hh IS NULL
       OR (r.hh = p_host AND r.hp IS DISTINCT FROM p_pid AND NOT coalesce(r.hp = ANY(p_live_pids), false))
       OR (r.hh = p_host AND r.hp = p_pid AND NOT p_live_here) THEN
        IF r.us <> 'disconnected' THEN
            DELETE FROM user_tokens t WHERE t.vm_id = p_vm;      -- the dead holder's session ends here
        END IF;
        UPDATE vm_runtimes SET user_state = 'connecting', user_state_ts = p_now, l7r_pid = p_pid,
                               l7r_host_id = p_host, user_cmd = NULL, real_user_id = p_user
         WHERE vm_runtimes.vm_id = p_vm;
        outcome := 'claim';
        generation := txid_current();
        SELECT vr.vm_state, vr.vm_cmd, vr.user_state, vr.user_cmd, vr.host_id, vr.l7r_host_id, vr.l7r_pid,
               vr.vm_address, vr.vm_vma_port, vr.vm_x_port
          INTO vm_state, vm_cmd, user_state, user_cmd, host_id, l7r_host_id, l7r_pid, vm_address, vm_vma_port,
               vm_x_port
          FROM vm_runtimes vr WHERE vr.vm_id = p_vm;
    ELSIF r.uc = 'abort' THEN
        outcome := 'wait';
        -- re-announce: the holder may have missed the first NOTIFY (LISTEN reconnect)
        PERFORM pg_notify('qvd_cmd_for_user_on_host' || r.hh, p_vm::text);
    ELSE
        outcome := 'abort';
        UPDATE vm_runtimes SET user_cmd = 'abort' WHERE vm_runtimes.vm_id = p_vm;
        PERFORM pg_notify('qvd_cmd_for_user_on_host' || r.hh, p_vm::text);
    END IF;
    RETURN NEXT;
END
$$;

-- What x_start gets from the database: this node's address, the VM's agent key (unless
-- p_with_key is false), the VM's combined properties (OSF < current DI < user < VM), and the
-- session's token stored (its digest; its login parameters only when p_params is not null).
-- With p_with_key and no key, nothing is written and agent_key comes back null.
CREATE OR REPLACE FUNCTION qvd_session_params_v1(p_vm integer, p_host integer, p_user integer,
                                                 p_token varchar, p_expiration integer, p_params json,
                                                 p_with_key boolean)
RETURNS TABLE (host_address varchar, agent_key varchar, properties jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    v_osf integer;
    v_owner integer;
    v_di integer;
    v_tag varchar;
    v_params_id integer;
BEGIN
    SELECT h.address INTO host_address FROM hosts h WHERE h.id = p_host;
    IF p_with_key THEN
        SELECT k.secret INTO agent_key FROM vm_agent_keys k WHERE k.vm_id = p_vm;
        IF agent_key IS NULL THEN
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    SELECT v.osf_id, v.user_id, vr.current_di_id, v.di_tag INTO v_osf, v_owner, v_di, v_tag
      FROM vms v JOIN vm_runtimes vr ON vr.vm_id = v.id WHERE v.id = p_vm;
    IF v_di IS NULL THEN
        SELECT d.id INTO v_di FROM dis d JOIN di_tags t ON t.di_id = d.id
         WHERE d.osf_id = v_osf AND t.tag = v_tag ORDER BY d.id DESC LIMIT 1;
    END IF;
    SELECT coalesce(jsonb_object_agg(x.k, x.v ORDER BY x.rank), '{}'::jsonb) INTO properties FROM (
        SELECT l.key AS k, p.value AS v, 1 AS rank FROM osf_properties p
          JOIN qvd_object_properties_list q ON q.id = p.property_id JOIN properties_list l ON l.id = q.property_id
         WHERE p.osf_id = v_osf
        UNION ALL
        SELECT l.key, p.value, 2 FROM di_properties p
          JOIN qvd_object_properties_list q ON q.id = p.property_id JOIN properties_list l ON l.id = q.property_id
         WHERE p.di_id = v_di
        UNION ALL
        SELECT l.key, p.value, 3 FROM user_properties p
          JOIN qvd_object_properties_list q ON q.id = p.property_id JOIN properties_list l ON l.id = q.property_id
         WHERE p.user_id = v_owner
        UNION ALL
        SELECT l.key, p.value, 4 FROM vm_properties p
          JOIN qvd_object_properties_list q ON q.id = p.property_id JOIN properties_list l ON l.id = q.property_id
         WHERE p.vm_id = p_vm) x;
    IF p_params IS NOT NULL THEN
        INSERT INTO user_auth_parameters (parameters) VALUES (p_params) RETURNING id INTO v_params_id;
    END IF;
    INSERT INTO user_tokens (token, user_id, vm_id, expiration, auth_params_id, multi_use)
         VALUES (p_token, p_user, p_vm, p_expiration, v_params_id, true);
    RETURN NEXT;
END
$$;
