"""Concurrency: 200 clients connect at once to 50 VMs through two nodes, four clients per
VM owner, so most connections take another one over. Run several times (CI too).

Never two sessions on one VM, decided without timing: each VM's display gate records, in
the order it happens, every connection it admits (with the claim's generation) and every
connection it had to take away from a session whose L7R had not closed it yet. The L7R
closes a session's display connection before it releases the row, and a newer session
claims only after that release: so any "taken while open" is two sessions overlapping, and
the admitted generations must grow. Never one VM running on two nodes: every VM init of
both nodes is sampled from /proc all along. At the end the rows, the clients' sockets and
the hypervisors must agree: exactly one live session per VM, the one its row names.
"""
import random
import socket
import re
import time

import gevent
import gevent.event
import pytest
from helpers.cluster import (
    NodeProcess,
    SessionRefused,
    client_context,
    echo_roundtrip,
    kill_vm_processes,
    make_cert,
    node_values,
    open_session,
    pg_conf_lines,
    seed_host,
    seed_ssl,
    seed_users_and_vms,
    vm_processes,
    write_conf,
)
from helpers.nodes import wait_for

from qvd_gevent.config import Config
from qvd_gevent.db import Database

VMS = 50
CLIENTS_PER_VM = 4
X_PORT = 4100


def display_events(run_dir, vm_id):
    """What the VM's display gate recorded (tests/helpers/tiny_vm.py, in the order it happened):
    [("admitted", generation) | ("taken while open", generation) | ("stale", generation)]."""
    path = run_dir / "process-vms" / f"vm-{vm_id}.log"
    events = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        m = re.match(r"display: (admitted|taken while open by|stale x_start) generation=(\d+|None)", line)
        if m:
            kind = {"admitted": "admitted", "taken while open by": "taken while open", "stale x_start": "stale"}
            events.append((kind[m.group(1)], None if m.group(2) == "None" else int(m.group(2))))
    return events


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("run", range(3))
def test_200_clients_50_vms_two_nodes_with_takeovers(tmp_path, pg_server, fresh_db_name, run):
    names = ("conc-a", "conc-b")
    bases = random.sample(range(101, 250), 2)
    confs, values = {}, {}
    for name, second in zip(names, bases):
        values[name] = node_values(tmp_path, name, **{
            "vm.process.address.base": f"127.{second}.{random.randint(0, 255)}.0/24",
            "internal.l7r.timeout.vm_start": 120,
            "internal.l7r.timeout.takeover": 60,
            "internal.l7r.poll_time.vm": 1,
            "internal.hkd.vmhandler.vma_monitor.delay.after.ok": 2,
        })
        confs[name] = write_conf(tmp_path / f"{name}.conf", pg_conf_lines(pg_server, fresh_db_name), name, values[name])
    db = Database.from_config(Config.load(str(confs[names[0]])))
    cert, key = make_cert(tmp_path / "ssl")
    seed_ssl(db, cert, key)
    host_ids = {name: seed_host(db, name, f"127.0.0.{i + 2}") for i, name in enumerate(names)}
    owners = [(f"owner{i}", f"pw {i}") for i in range(VMS)]
    vm_of = {login: ids[0] for login, ids in seed_users_and_vms(db, owners).items()}
    nodes = {name: NodeProcess(confs[name], tmp_path / f"{name}.log") for name in names}
    run_dirs = {name: tmp_path / f"run-{name}" for name in names}
    clients = []
    violations = []
    try:
        for node in nodes.values():
            node.start()
        for node in nodes.values():
            node.wait_running()
        ctx = client_context(cert)

        # --- the hypervisors, watched all along ---------------------------------------------------
        watching = gevent.event.Event()
        samples = [0]

        def watch():
            while not watching.is_set():
                per_node = {name: set(vm_processes(run_dirs[name])) for name in names}
                both = per_node[names[0]] & per_node[names[1]]
                if both:
                    violations.append(("VM processes on both nodes", sorted(both)))
                samples[0] += 1
                gevent.sleep(0.05)
        watcher = gevent.spawn(watch)

        # --- 200 clients at once -------------------------------------------------------------------
        gate = gevent.event.Event()

        class Client:
            def __init__(self, login, password, node):
                self.login, self.password, self.node = login, password, node
                self.vm_id = vm_of[login]
                self.sock = None
                self.outcome = None
                self.connected_at = None

            def run(self):
                gate.wait()
                gevent.sleep(random.uniform(0, 0.5))
                try:
                    self.sock, _ = open_session(values[self.node]["l7r.port"], ctx, self.login, self.password,
                                                self.vm_id, timeout=150)
                    self.connected_at = time.monotonic()
                    payload = f"{self.login} via {self.node}\n".encode()
                    self.outcome = "echo" if echo_roundtrip(self.sock, payload, timeout=30) == payload else "bad echo"
                except SessionRefused as exc:
                    self.outcome = f"refused {exc.status}: {exc.body[:80]!r}"
                except (OSError, EOFError) as exc:
                    # taken over between 101 and the echo
                    self.outcome = f"closed: {exc!r}"

        for login, password in owners:
            for _ in range(CLIENTS_PER_VM):
                clients.append(Client(login, password, random.choice(names)))
        greenlets = [gevent.spawn(c.run) for c in clients]
        started = time.monotonic()
        gate.set()
        gevent.joinall(greenlets, timeout=300)
        elapsed = time.monotonic() - started
        assert all(g.dead for g in greenlets), "some clients never finished"
        for g in greenlets:
            if g.exception is not None:
                raise g.exception

        # --- settle, then look at everything --------------------------------------------------------
        unsettled = []

        def rows_settled():
            unsettled[:] = db.query("SELECT vm_id, vm_state, vm_cmd, user_state, user_cmd, l7r_host_id, host_id "
                                    "FROM vm_runtimes WHERE user_state = 'connecting' "
                                    "OR vm_state NOT IN ('stopped', 'running')")
            return not unsettled
        try:
            wait_for(rows_settled, 30, what="no session or VM in transit")
        except AssertionError:
            raise AssertionError(f"rows in transit: {unsettled}; client outcomes: "
                                 f"{[(c.login, c.node, c.outcome) for c in clients]}") from None
        gevent.sleep(1)
        live, silent = {}, []
        for c in clients:
            if c.sock is None:
                continue
            try:
                echo_roundtrip(c.sock, b"still there?\n", timeout=30)
                live.setdefault(c.vm_id, []).append(c)
            except socket.timeout:
                silent.append(c.login)                # open but not answering: neither live nor closed
            except (OSError, EOFError):
                c.sock.close()
                c.sock = None
        watching.set()
        watcher.join(5)

        # the display gates' own record: never taken from a session still open, in claim order
        gates = {vm_id: display_events(run_dirs[name], vm_id) for name in names for vm_id in vm_of.values()
                 if (run_dirs[name] / "process-vms" / f"vm-{vm_id}.log").exists()}
        stale = sum(kind == "stale" for ev in gates.values() for kind, _ in ev)
        outcomes = {}
        for c in clients:
            key = c.outcome.split(":")[0] if c.outcome else "none"
            outcomes[key] = outcomes.get(key, 0) + 1
        taken_over = sum(1 for c in clients if c.connected_at is not None) - sum(len(v) for v in live.values())
        print(f"\nMEASURED: {len(clients)} clients on {VMS} VMs through 2 nodes in {elapsed:.1f} s; outcomes "
              f"{outcomes}; sessions taken over after their 101: {taken_over}; {samples[0]} hypervisor samples; "
              f"{sum(len(ev) for ev in gates.values())} display events, {stale} stale x_starts refused")
        assert violations == [], violations[:5]
        assert silent == [], f"sessions neither answering nor closed: {silent}"
        assert sorted(gates) == sorted(vm_of.values()), "a VM without its display record"
        overlapped = {vm: ev for vm, ev in gates.items() if any(kind == "taken while open" for kind, _ in ev)}
        assert overlapped == {}, f"two sessions on one VM (a display taken from an open one): {overlapped}"
        for vm_id, events in gates.items():
            admitted = [g for kind, g in events if kind == "admitted"]
            assert admitted and all(g is not None for g in admitted), (vm_id, events)
            assert admitted == sorted(set(admitted)), f"VM {vm_id} admitted sessions out of claim order: {events}"
        internal = [c.outcome for c in clients if c.outcome and c.outcome.startswith("refused 5") and
                    not c.outcome.startswith("refused 503")]
        assert internal == [], f"internal errors seen by clients: {internal[:5]}"
        assert samples[0] > 5
        # exactly one live session per VM, and it is the one the row names
        assert sorted(live) == sorted(vm_of.values()), f"VMs without a live session: {set(vm_of.values()) - set(live)}"
        doubles = {vm: [c.login for c in cs] for vm, cs in live.items() if len(cs) > 1}
        assert doubles == {}, f"two live sessions on one VM: {doubles}"
        assert taken_over > 0 or any("refused" in k for k in outcomes), "no takeover happened: the test proves nothing"
        rows = db.query("SELECT vm_id, user_state, l7r_host_id, vm_state, host_id FROM vm_runtimes")
        by_vm = {r[0]: r for r in rows}
        for vm_id, (client,) in live.items():
            _, user_state, l7r_host, vm_state, host = by_vm[vm_id]
            assert (user_state, l7r_host, vm_state) == ("connected", host_ids[client.node], "running"), by_vm[vm_id]
        # the hypervisors agree with the rows: each VM runs on exactly the node its row names
        procs = {name: vm_processes(run_dirs[name]) for name in names}
        assert not set(procs[names[0]]) & set(procs[names[1]])
        for vm_id in vm_of.values():
            host = by_vm[vm_id][4]
            where = [name for name in names if vm_id in procs[name]]
            assert where == [name for name in names if host_ids[name] == host], (vm_id, where, host)

        # clients leave: every row disconnected
        for cs in live.values():
            for c in cs:
                c.sock.close()
                c.sock = None
        wait_for(lambda: db.query_one("SELECT count(*) FROM vm_runtimes WHERE user_state <> 'disconnected' "
                                      "OR l7r_host_id IS NOT NULL")[0] == 0, 30, what="all rows disconnected")
        for name in names:
            text = nodes[name].log_text()
            assert "Traceback" not in text, text[text.find("Traceback") - 300:][:3000]
        for node in nodes.values():
            assert node.terminate(timeout=120) == 0
        assert all(not vm_processes(run_dirs[name]) for name in names)
    finally:
        for c in clients:
            if c.sock is not None:
                c.sock.close()
        for node in nodes.values():
            node.cleanup()
        for name in names:
            kill_vm_processes(run_dirs[name])
        db.close()
