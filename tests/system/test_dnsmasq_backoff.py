"""The supervisor's restart back-off, with a 'dnsmasq' that dies at once (a real child process, no network)."""
import sys
import time

import gevent

from qvd_gevent.config import Config
from qvd_gevent.hkd.dnsmasq import DnsmasqSupervisor

DYING = """
import sys, time
with open(sys.argv[1], "a") as fh:
    fh.write("%f\\n" % time.time())
sys.exit(3)
"""


def test_restart_delay_doubles_from_the_configured_base(tmp_path):
    script = tmp_path / "dying.py"
    script.write_text(DYING)
    starts = tmp_path / "starts"
    cfg = Config({"path.run": str(tmp_path / "run"), "vm.network.ip.start": "10.77.0.100",
                  "vm.network.netmask": "16", "internal.hkd.agent.dhcpdhandler.delay": "1",
                  # the fake takes its log path as first argument; dnsmasq's flags follow and are ignored
                  "command.dhcpd": f"{sys.executable} {script} {starts}"})
    sup = DnsmasqSupervisor(cfg).start()
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if starts.exists() and len(starts.read_text().split()) >= 3:
                break
            gevent.sleep(0.05)
    finally:
        sup.stop()
    stamps = [float(x) for x in starts.read_text().split()]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert len(stamps) >= 3, stamps
    assert 1.0 <= gaps[0] < 1.9, gaps          # base delay (plus interpreter start-up)
    assert 2.0 <= gaps[1] < 2.9, gaps          # doubled
    assert sup.restarts >= 2
    assert sup.pid is None
