"""Keep a bench environment up for a locust run (or any client of your own).

    python -m bench.serve [--for SECONDS] [--target FILE]

Starts what `python -m bench` starts (embedded PostgreSQL, provisioned qvd-node, the farm
of stand-in VMs, HAProxy), writes FILE (default /tmp/qvd-bench-target.json: the L7R's
address, the CA certificate, and per farm user a bearer token and its VM ids), then waits
until SIGINT/SIGTERM or --for seconds (default 900) and removes everything.
"""
import argparse
import json
import os
import signal
import sys
import time

from .env import BenchEnv


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--for", dest="seconds", type=float, default=900, help="stop after this many seconds")
    parser.add_argument("--target", default="/tmp/qvd-bench-target.json", help="where to write the target file")
    args = parser.parse_args(argv)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    env = BenchEnv(farm_vms=200, connect_users=100)
    env.start()
    try:
        target = {"host": "127.0.0.1", "port": env.l7r_port, "ca": env.cert, "users": env.connect_users_spec,
                  "node_pid": env.node.pid}
        fd = os.open(args.target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(target, fh)
        print(f"bench environment up: L7R 127.0.0.1:{env.l7r_port}, node pid {env.node.pid}; "
              f"target file {args.target}; stopping in {args.seconds:.0f} s or on Ctrl-C", flush=True)
        deadline = time.monotonic() + args.seconds
        while not stop and time.monotonic() < deadline:
            time.sleep(1)
            if int(time.monotonic()) % 60 == 0:
                env.farm_heartbeat()
    except KeyboardInterrupt:
        pass
    finally:
        env.stop()
        try:
            os.unlink(args.target)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
