"""python -m qvd_gevent.hkd --config FILE: the HKD alone (no L7R), for tests and debugging.

Prints READY on stdout once the host is running; SIGTERM or SIGINT stop it gracefully.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m qvd_gevent.hkd")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    from ..config import Config, ConfigError
    from ..db import Database, DatabaseUnavailable, make_green
    from ..db.listen import Listener
    from . import HKD, HkdError
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    make_green()
    try:
        cfg = Config.load(args.config)
        db = Database.from_config(cfg)
        listener = Listener(db).start()
        listener.wait_connected(30)
        hkd = HKD(cfg, db, listener)
        hkd.start()
    except (ConfigError, DatabaseUnavailable, HkdError) as exc:
        print(f"qvd-hkd: {exc}", file=sys.stderr)
        return 1
    print("READY", flush=True)
    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(hkd.stop))
    gevent.signal_handler(signal.SIGINT, lambda: gevent.spawn(hkd.stop))
    hkd.stopped.wait()
    listener.stop()
    db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
