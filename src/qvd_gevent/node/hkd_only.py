"""python -m qvd_gevent.node.hkd_only --config FILE: the HKD alone (no L7R, no /metrics), for tests and debugging.

Prints READY on stdout once the host is running; SIGTERM or SIGINT stop it gracefully,
SIGHUP re-reads node.conf (node/run.py, as for qvd-node).
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import sys  # noqa: E402

from .run import HKD, run_node_from_file  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m qvd_gevent.node.hkd_only")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    return run_node_from_file(args.config, {HKD}, on_ready=lambda: print("READY", flush=True), prog="qvd-hkd")


if __name__ == "__main__":
    sys.exit(main())
