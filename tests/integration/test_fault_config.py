"""A malformed value in node.conf is a start-up error naming the key, not an agent that
dies later: a heartbeat greenlet killed by `internal.hkd.agent.ticker.delay = 0.5` (an int
key) left a node running VMs without a heartbeat, so it could never fence itself, and the
cluster would start its VMs elsewhere while they still ran here."""
import subprocess
import sys

from helpers.cluster import make_cert, node_values, pg_conf_lines, seed_host, seed_ssl, write_conf

from qvd_gevent.config import Config
from qvd_gevent.db import Database


def test_malformed_timer_refuses_start_with_one_line(tmp_path, pg_server, fresh_db_name):
    values = node_values(tmp_path, "cfg-node", **{"internal.hkd.agent.ticker.delay": "0.5"})
    conf = write_conf(tmp_path / "node.conf", pg_conf_lines(pg_server, fresh_db_name), "cfg-node", values)
    db = Database.from_config(Config.load(str(conf)))
    try:
        cert, key = make_cert(tmp_path / "ssl")
        seed_ssl(db, cert, key)
        host_id = seed_host(db, "cfg-node")
        run = subprocess.run([sys.executable, "-m", "qvd_gevent.node.main", "--config", str(conf)],
                             capture_output=True, text=True, timeout=60, check=False)
        assert run.returncode == 78, run.stderr[-2000:]
        assert run.stderr.strip().count("\n") == 0, run.stderr
        assert "internal.hkd.agent.ticker.delay" in run.stderr and "Traceback" not in run.stderr
        # it never came up: the host row was not touched
        assert db.query("SELECT state, ok_ts FROM host_runtimes WHERE host_id = %s", (host_id,)) == [("stopped", None)]
    finally:
        db.close()
