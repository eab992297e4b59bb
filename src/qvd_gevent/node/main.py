"""qvd-node: the HKD, the L7R and dnsmasq supervision in one process and one gevent hub.

    qvd-node [--config FILE]                  run until SIGTERM (graceful) or SIGINT
    qvd-node demo [--dir DIR] [--port N]      the one-command demo (see node/demo.py)

How the node starts, drains and stops: node/run.py.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import sys  # noqa: E402

from .. import __version__  # noqa: E402
from .run import run_node_from_file  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        from .demo import main as demo_main
        return demo_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="qvd-node", description="Run a QVD server node (L7R + HKD) until SIGTERM (drain) or SIGINT; "
                                     "SIGHUP re-reads node.conf.",
        epilog="qvd-node demo [--dir DIR] [--port N] [--desktop echo|nx]: the one-command demo (an embedded "
               "PostgreSQL, a user demo/demo with one VM, then the node); see 'qvd-node demo --help'.")
    parser.add_argument("--config", help="node.conf (default $QVD_CONFIG, else /etc/qvd/node.conf)")
    parser.add_argument("--version", action="version", version=f"qvd-gevent {__version__}")
    args = parser.parse_args(argv)
    return run_node_from_file(args.config)


if __name__ == "__main__":
    sys.exit(main())
