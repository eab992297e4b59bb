"""Choosing a node for a VM (the original's default load balancer plugin).

score = (W_ram * usable_ram + W_cpu * usable_cpu) / (assigned VMs + 1) + uniform(0, W_random)
over hosts with backend = true, not blocked, state 'running'. Used by the L7R (connect to
a VM without a host) and by `qvd-admin vm start`.
"""
import random


class NoHostAvailable(Exception):
    def __init__(self, message="Unable to assign vm to host, there is no host available"):
        super().__init__(message)


def weights(cfg):
    return (cfg.get_float("l7r.loadbalancer.plugin.default.weight.ram"),
            cfg.get_float("l7r.loadbalancer.plugin.default.weight.cpu"),
            cfg.get_float("l7r.loadbalancer.plugin.default.weight.random"))


def score(usable_ram, usable_cpu, assigned_vms, w_ram, w_cpu, w_random, rng=random):
    return (w_ram * (usable_ram or 0) + w_cpu * (usable_cpu or 0)) / (assigned_vms + 1) + rng.uniform(0, w_random)


def pick_host(cur, cfg, rng=random):
    """Return the id of the best running host; raise NoHostAvailable. Runs in the caller's transaction."""
    cur.execute("""
        SELECT h.id, hr.usable_ram, hr.usable_cpu,
               (SELECT count(*) FROM vm_runtimes vr WHERE vr.host_id = h.id)
          FROM hosts h JOIN host_runtimes hr ON hr.host_id = h.id
         WHERE h.backend AND NOT hr.blocked AND hr.state = 'running'
    """)
    rows = cur.fetchall()
    if not rows:
        raise NoHostAvailable()
    w_ram, w_cpu, w_random = weights(cfg)
    best = max(rows, key=lambda r: score(r[1], r[2], r[3], w_ram, w_cpu, w_random, rng))
    return best[0]
