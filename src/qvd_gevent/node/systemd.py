"""systemd's service notification protocol (sd_notify(3)) for ``Type=notify`` units.

``READY=1`` once the node serves (the L7R listens, the HKD runs), ``STOPPING=1`` when a
drain begins, ``STATUS=`` lines for ``systemctl status``, and ``WATCHDOG=1`` from a
greenlet on the hub every half ``WatchdogSec``: a hub that stops running (a blocking call
on it, a busy loop) stops the pings, and systemd restarts the node.

No library: the protocol is one datagram of text to the socket named by $NOTIFY_SOCKET;
the binding of libsystemd (systemd-python) needs its headers and a compiler, which a
`pip install` of the node must not need. Without $NOTIFY_SOCKET every call does nothing.
"""
import logging
import os
import socket

import gevent

log = logging.getLogger("qvd.node.systemd")

# sysexits.h EX_CONFIG: the unit's RestartPreventExitStatus=78 keeps systemd from
# restarting a node whose configuration is wrong every few seconds forever.
EXIT_CONFIG = 78


def notify(*fields):
    """Send fields ("READY=1", "STATUS=...") to systemd; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):        # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def watchdog_period():
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when systemd asks for none."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2


def start_watchdog():
    """A greenlet pinging systemd's watchdog from the hub; None when there is no watchdog."""
    period = watchdog_period()
    if period is None or not os.environ.get("NOTIFY_SOCKET"):
        return None

    def beat():
        while True:
            notify("WATCHDOG=1")
            gevent.sleep(period)

    log.info("systemd watchdog: a ping every %.1f s", period)
    return gevent.spawn(beat)
