"""20 netns VMs on one bridge: all leased and reachable; start time and CPU printed (not asserted).

Run: python3 -m pytest -q -s -m slow tests/system/test_netns_density.py
The figures go to stdout ("DENSITY ..."); the 200-VM run belongs in bench/.
"""
import json
import os

import pytest
from helpers.netns import run_driver, test_host, write_http_di  # noqa: F401

pytestmark = [pytest.mark.root, pytest.mark.slow]

COUNT = int(os.environ.get("QVD_DENSITY_COUNT", "20"))   # at most 254


def test_twenty_netns_vms(test_host, tmp_path):  # noqa: F811
    di = write_http_di(tmp_path)
    result, _ = run_driver(test_host, tmp_path, f"""
        import resource
        from gevent.pool import Pool
        COUNT = {COUNT}

        def cpu_of(pid):
            with open(f"/proc/{{pid}}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        def own_cpu():
            r = resource.getrusage(resource.RUSAGE_SELF)
            return r.ru_utime + r.ru_stime

        def children_cpu():
            r = resource.getrusage(resource.RUSAGE_CHILDREN)
            return r.ru_utime + r.ru_stime

        boot()
        gaps = []

        def hub_watch():                 # the longest time the hub was not free (blocking calls)
            last = time.monotonic()
            while True:
                gevent.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last - 0.005)
                last = now
        watcher = gevent.spawn(hub_watch)
        ips = [f"10.77.1.{{i}}" for i in range(1, COUNT + 1)]
        per_vm = {{}}

        def one(i):
            t = time.monotonic()
            h = start_vm(100 + i, ips[i])
            per_vm[i] = time.monotonic() - t
            return h

        def mem_available_mb():
            with open("/proc/meminfo") as fh:
                return next(int(l.split()[1]) for l in fh if l.startswith("MemAvailable:")) / 1024

        mem0 = mem_available_mb()
        cpu0, child0, dns0, t0 = own_cpu(), children_cpu(), cpu_of(dns.pid), time.monotonic()
        handles = Pool(10).map(one, range(COUNT))        # internal.hkd.max_heavy VMs at once
        wall = time.monotonic() - t0
        max_hub_block = max(gaps)
        watcher.kill()
        cpu_start, child_start, dns_start = own_cpu() - cpu0, children_cpu() - child0, cpu_of(dns.pid) - dns0
        statuses = [wait_http(h.address)[0] for h in handles]
        mem_used_mb = mem0 - mem_available_mb()      # machine-wide, so only indicative

        # idle: 5 s with every VM up, nothing to do
        cpu1, t1 = own_cpu(), time.monotonic()
        gevent.sleep(5)
        idle_cpu = (own_cpu() - cpu1) / (time.monotonic() - t1)

        t2 = time.monotonic()
        for h in handles:
            hv.shutdown(h)
        exited = all(hv.wait_exit(h, timeout=10) for h in handles)
        def clean(h):
            hv.cleanup(h)
            dns.remove_host(vm_spec(h.vm_id, h.address).mac)
        Pool(10).map(clean, handles)                     # as the HKD does, max_heavy at once
        stop_wall = time.monotonic() - t2
        dns.stop()
        setup.remove()
        report(dict(wall=wall, max_hub_block=max_hub_block, mem_used_mb=mem_used_mb, per_vm_first=[per_vm[i] for i in range(5)],
                    per_vm_last=[per_vm[i] for i in range(COUNT - 5, COUNT)], cpu_node=cpu_start,
                    cpu_children=child_start, cpu_dnsmasq=dns_start, idle_cpu=idle_cpu, statuses=statuses,
                    addresses=sorted(h.address for h in handles), exited=exited, stop_wall=stop_wall))
    """, di=di, timeout=240)
    print("DENSITY", json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()
                                 if k not in ("statuses", "addresses", "per_vm_first", "per_vm_last")}))
    print("DENSITY per-VM start s, first 5:", [round(x, 3) for x in result["per_vm_first"]],
          "last 5:", [round(x, 3) for x in result["per_vm_last"]])
    assert result["statuses"] == [200] * COUNT
    assert result["addresses"] == sorted(f"10.77.1.{i}" for i in range(1, COUNT + 1))
    assert result["exited"]
    assert test_host.vm_namespaces() == []
