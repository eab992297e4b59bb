"""The node's rtnetlink socket (pyroute2), shared by the HKD's network set-up and the netns hypervisor."""
import socket

import gevent.lock

IFF_UP = 0x1


class Netlink:
    """One rtnetlink socket of the current namespace, used by one greenlet at a time.

    pyroute2 0.9 works under monkey.patch_all() (docs/design.md#pyroute2-under-gevent); each call takes a few
    milliseconds. The lock keeps two greenlets from interleaving requests on the socket.
    """

    def __init__(self):
        self._ipr = None
        self._lock = gevent.lock.RLock()

    def __enter__(self):
        self._lock.acquire()
        if self._ipr is None:
            from pyroute2 import IPRoute
            self._ipr = IPRoute()
        return self._ipr

    def __exit__(self, *exc):
        self._lock.release()

    def close(self):
        with self._lock:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

    # --- small queries ---
    def index(self, ifname):
        with self as ipr:
            found = ipr.link_lookup(ifname=ifname)
        return found[0] if found else None

    def link(self, ifname):
        """{'index', 'kind', 'up', 'addresses': [(ip, prefixlen)]} or None."""
        with self as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return None
            msg = ipr.get_links(found[0])[0]
            info = msg.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            addrs = [(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                     for a in ipr.get_addr(index=found[0], family=socket.AF_INET)]
        return {"index": found[0], "kind": kind, "up": bool(msg["flags"] & IFF_UP), "addresses": addrs}


_shared = None


def shared_netlink():
    global _shared
    if _shared is None:
        _shared = Netlink()
    return _shared
