"""libvirt under gevent: one connection per URI, blocking calls in the threadpool, events to the hub.

Why this shape (docs/design.md#libvirt-calls): every libvirt call blocks in C, so each one runs in
gevent's threadpool and the hub keeps serving. libvirt delivers domain lifecycle events
only to a process that runs an event loop: a native thread (not a greenlet) runs libvirt's
default implementation (virEventRegisterDefaultImpl + virEventRunDefaultImpl) and does
nothing but append the event to a thread-safe deque and wake the hub through a gevent
async watcher; the hub then sets the waiters' events and calls subscribers. When libvirt
reports the connection closed (libvirtd restarted), the hub forgets it and the next call
reopens it; remote connections send keepalives so a hung libvirtd is noticed.
Not usable here: the embedded qemu driver (``qemu:///embed``) in this process, because
gevent's SIGCHLD handler reaps libvirt's own children (docs/kvm-lxc-notes.md).

API:
    conn = LibvirtConnection.get(uri)     # shared per URI (opened lazily, in the threadpool)
    conn.open() / conn.conn               # the virConnect
    conn.call(fn, *args)                  # run fn in the threadpool, libvirtError -> HypervisorError
    conn.lookup(name) -> virDomain | None; conn.is_active(name); conn.domain_names(prefix)
    conn.wait_stopped(name, timeout, state_check_interval) -> bool
    conn.subscribe(callback(name, event_name, detail))   # called on the hub
    conn.close()
    LibvirtHypervisor                     # the Hypervisor lifecycle of a transient domain qvd-<vm_id>,
                                          # shared by KvmHypervisor and LxcHypervisor
"""
import collections
import logging
import re
import xml.etree.ElementTree as ET
from typing import ClassVar

import gevent
import gevent.event
import gevent.lock
from gevent import monkey

from .base import Hypervisor, HypervisorError, VmHandle

try:
    import libvirt
except ImportError:          # the `libvirt` extra is not installed; get_hypervisor says so
    libvirt = None

log = logging.getLogger("qvd.hypervisors.libvirt")

_native_start_new_thread = monkey.get_original("_thread", "start_new_thread")
_native_lock = monkey.get_original("_thread", "allocate_lock")

# libvirt lifecycle events after which the domain no longer runs
STOPPED_EVENTS = ("STOPPED", "UNDEFINED")
_CLOSED = -1            # our marker in the event queue: the connection itself closed


def require_libvirt():
    if libvirt is None:
        raise HypervisorError("libvirt-python is not installed (pip install 'qvd-gevent[libvirt]')")
    return libvirt


def event_name(event, detail=None):
    """Readable name of a lifecycle event (VIR_DOMAIN_EVENT_*)."""
    names = {0: "DEFINED", 1: "UNDEFINED", 2: "STARTED", 3: "SUSPENDED", 4: "RESUMED",
             5: "STOPPED", 6: "SHUTDOWN", 7: "PMSUSPENDED", 8: "CRASHED"}
    name = names.get(event, f"EVENT{event}")
    # SHUTDOWN detail 0 = the guest finished its shutdown (the process may still exit)
    if name == "SHUTDOWN" and detail == 0:
        return "SHUTDOWN_FINISHED"
    return name


def _in_threadpool(fn, *args):
    """fn(*args) on gevent's threadpool; its exception is re-raised here, on the calling greenlet.

    (The threadpool would also print the traceback of every exception it carries back,
    and "domain not found" is an ordinary answer here.)
    """
    def guarded():
        try:
            return True, fn(*args)
        except Exception as exc:    # noqa: BLE001 - handed back to the caller as is
            return False, exc
    ok, value = gevent.get_hub().threadpool.apply(guarded)
    if not ok:
        raise value
    return value


class _EventLoop:
    """libvirt's default event loop on one native thread, feeding the hub that started it."""

    _instance = None
    _guard = _native_lock()

    @classmethod
    def ensure(cls):
        with cls._guard:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def __init__(self):
        lv = require_libvirt()
        lv.virEventRegisterDefaultImpl()
        # libvirt prints every error to stderr by default; we raise and log them ourselves.
        lv.registerErrorHandler(lambda _ctx, _err: None, None)
        self.queue = collections.deque()          # appended by the native thread, drained by the hub
        self.handlers = []                        # callables(conn_key, name, event, detail), on the hub
        self.hub = gevent.get_hub()
        self.wakeup = self.hub.loop.async_()
        self.wakeup.ref = False                   # the watcher alone must not keep the hub alive
        self.wakeup.start(self._drain)
        self.running = True
        self.thread_id = _native_start_new_thread(self._run, ())

    def _run(self):
        lv = libvirt
        while self.running:
            try:
                lv.virEventRunDefaultImpl()
            except Exception:
                log.exception("libvirt event loop iteration failed")

    def push(self, item):
        """Called on the native thread: queue and wake the hub. Nothing else happens here."""
        self.queue.append(item)
        self.wakeup.send()

    def _drain(self):
        while self.queue:
            item = self.queue.popleft()
            for handler in list(self.handlers):
                try:
                    handler(*item)
                except Exception:
                    log.exception("libvirt event handler failed")


class LibvirtConnection:
    _by_uri: ClassVar[dict] = {}

    @classmethod
    def get(cls, uri, keepalive=(5, 3)):
        conn = cls._by_uri.get(uri)
        if conn is None:
            conn = cls._by_uri[uri] = cls(uri, keepalive)
        return conn

    def __init__(self, uri, keepalive=(5, 3)):
        require_libvirt()
        self.uri = uri
        self.keepalive = keepalive      # (interval s, missed answers) for remote URIs; None: off
        self.loop = _EventLoop.ensure()
        self._conn = None
        self._opening = gevent.lock.Semaphore()
        self._callback_id = None
        self._stopped = {}            # domain name -> gevent Event, set when it stops
        self._subscribers = []
        self.loop.handlers.append(self._on_event)

    # --- plumbing ---
    def _pool_call(self, fn, *args):
        exc = None
        try:
            return _in_threadpool(fn, *args)
        except libvirt.libvirtError as error:
            exc = error
        raise HypervisorError(f"libvirt ({self.uri}): {exc.get_error_message() or exc}") from None

    @property
    def conn(self):
        if self._conn is None:
            with self._opening:
                if self._conn is None:
                    self._open()
        return self._conn

    def open(self):
        """The virConnect, opened on first use (in the threadpool)."""
        return self.conn

    def _open(self):
        conn = self._pool_call(libvirt.open, self.uri)
        if conn is None:
            raise HypervisorError(f"libvirt: cannot open {self.uri}")

        def lifecycle(_conn, dom, event, detail, _opaque):
            # native thread: queue only
            self.loop.push((self, dom.name(), event, detail))

        def closed(_conn, reason, _opaque):
            # native thread: queue only; the hub forgets the connection and reopens on next use
            self.loop.push((self, None, _CLOSED, (conn, reason)))

        self._callback_id = self._pool_call(conn.domainEventRegisterAny, None,
                                            libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None)
        self._pool_call(conn.registerCloseCallback, closed, None)
        if self.keepalive:
            try:        # remote URIs: notice a dead or hung libvirtd (local drivers refuse it)
                self._pool_call(conn.setKeepAlive, *self.keepalive)
            except HypervisorError:
                pass
        self._conn = conn
        log.info("libvirt connection to %s open", self.uri)

    def call(self, fn, *args):
        """Run fn(*args) in the threadpool; libvirt errors become HypervisorError."""
        return self._pool_call(fn, *args)

    # --- events (on the hub) ---
    def _on_event(self, conn, name, event, detail):
        if conn is not self:
            return
        if event == _CLOSED:
            closed_conn, reason = detail
            if self._conn is closed_conn:
                log.warning("libvirt connection to %s closed (reason %s); it is reopened on next use",
                            self.uri, reason)
                self._conn = None
                self._callback_id = None
            return
        what = event_name(event, detail)
        log.debug("libvirt %s: domain %s %s", self.uri, name, what)
        if what in STOPPED_EVENTS:
            self._stopped.setdefault(name, gevent.event.Event()).set()
        for callback in list(self._subscribers):
            try:
                callback(name, what, detail)
            except Exception:
                log.exception("libvirt event subscriber failed")

    def subscribe(self, callback):
        """callback(domain_name, event_name, detail) on the hub for every lifecycle event."""
        self._subscribers.append(callback)

    def unsubscribe(self, callback):
        if callback in self._subscribers:
            self._subscribers.remove(callback)

    def arm_stop_event(self, name):
        """Forget an old stop of this domain name: call before (re)starting it."""
        self._stopped[name] = gevent.event.Event()

    # --- queries ---
    def lookup(self, name):
        try:
            return _in_threadpool(self.conn.lookupByName, name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"libvirt ({self.uri}): {exc.get_error_message()}") from None

    def is_active(self, name):
        dom = self.lookup(name)
        if dom is None:
            return False
        try:
            return bool(_in_threadpool(dom.isActive))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise HypervisorError(f"libvirt ({self.uri}): {exc.get_error_message()}") from None

    def domain_names(self, prefix="", active_only=True):
        flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE if active_only else 0
        doms = self.call(self.conn.listAllDomains, flags)
        return sorted(d.name() for d in doms if d.name().startswith(prefix))

    def wait_stopped(self, name, timeout, state_check_interval):
        """True once the domain is not running, False after timeout seconds.

        Lifecycle events are the fast path; every state_check_interval seconds the state is
        also read, so a lost event (reconnect, adoption) costs at most one interval.
        """
        event = self._stopped.setdefault(name, gevent.event.Event())
        deadline = None if timeout is None else gevent.get_hub().loop.now() + timeout
        while True:
            event.clear()       # cleared before the check, so a stop after it still wakes us
            if not self.is_active(name):
                return True
            wait = state_check_interval
            if deadline is not None:
                left = deadline - gevent.get_hub().loop.now()
                if left <= 0:
                    return False
                wait = min(wait, left)
            event.wait(wait)

    def close(self):
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        try:
            if self._callback_id is not None:
                self._pool_call(conn.domainEventDeregisterAny, self._callback_id)
            self._pool_call(conn.close)
        except HypervisorError as exc:
            log.warning("closing %s: %s", self.uri, exc)
        self._by_uri.pop(self.uri, None)
        if self._on_event in self.loop.handlers:
            self.loop.handlers.remove(self._on_event)


# --- what kvm and lxc share --------------------------------------------------------------

METADATA_NS = "https://qvd-gevent.invalid/libvirt/vm/1"
DOMAIN_PREFIX = "qvd-"
_DOMAIN_NAME = re.compile(r"^qvd-(\d+)$")


def domain_name(vm_id):
    return f"{DOMAIN_PREFIX}{vm_id}"


def vm_id_of(name):
    match = _DOMAIN_NAME.match(name)
    return int(match.group(1)) if match else None


def xml_sub(parent, tag, text=None, **attrs):
    """ElementTree SubElement with attributes as keywords (a trailing _ is dropped: type_)."""
    el = ET.SubElement(parent, tag, {k.rstrip("_"): str(v) for k, v in attrs.items()})
    if text is not None:
        el.text = str(text)
    return el


def add_metadata(domain, spec, **extra):
    """What adoption after a node restart needs, kept in the domain itself (<metadata>)."""
    meta = xml_sub(domain, "metadata")
    ET.register_namespace("qvd", METADATA_NS)
    xml_sub(meta, f"{{{METADATA_NS}}}vm", vm_id=spec.vm_id, ip=spec.ip or "", mac=spec.mac or "",
            di_id=spec.di_id, vma_port=spec.vma_port, x_port=spec.x_port,
            **{k: ("" if v is None else v) for k, v in extra.items()})


def parse_domain_metadata(xml_text):
    """{vm_id, ip, mac, di_id, ...} from a domain XML we wrote, or {} for others."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError:
        return {}
    el = root.find(f"metadata/{{{METADATA_NS}}}vm")
    return dict(el.attrib) if el is not None else {}


class LibvirtHypervisor(Hypervisor):
    """The lifecycle of a transient libvirt domain ``qvd-<vm_id>``; subclasses make the XML and storage.

    Subclasses implement prepare(spec) -> dict of extras (storage made for the VM, kept in
    VmHandle.extra and the domain metadata), domain_xml(spec, extras), release(extras) (undo
    prepare; called on a failed start and at cleanup), and may set shutdown_flags().
    """
    uri_key = None
    needs_root = True
    uses_bridge = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.uri = cfg.get_str(self.uri_key)

    @property
    def connection(self) -> LibvirtConnection:
        require_libvirt()
        return LibvirtConnection.get(self.uri, (self.cfg.get_int("internal.hkd.libvirt.keepalive.interval"),
                                                self.cfg.get_int("internal.hkd.libvirt.keepalive.count")))

    def check(self):
        self.check_port_prefix()
        require_libvirt()
        self.connection.open()          # fails here with libvirt's reason

    # --- for subclasses ---
    def prepare(self, spec):
        return {}

    def domain_xml(self, spec, extras):
        raise NotImplementedError

    def release(self, extras):
        pass

    def shutdown_flags(self):
        return 0

    # --- lifecycle ---
    def start(self, spec):
        lv = require_libvirt()
        conn = self.connection
        name = domain_name(spec.vm_id)
        if conn.is_active(name):
            raise HypervisorError(f"VM {spec.vm_id}: domain {name} already runs")
        self._undefine(name)
        extras = self.prepare(spec)
        try:
            xml = self.domain_xml(spec, extras)
            conn.arm_stop_event(name)
            log.info("VM %s: starting domain %s on %s", spec.vm_id, name, self.uri)
            conn.call(conn.conn.createXML, xml, lv.VIR_DOMAIN_NONE)
        except BaseException:
            self.release(extras)
            raise
        extra = {k: ("" if v is None else v) for k, v in extras.items()}
        extra["uri"] = self.uri
        return VmHandle(vm_id=spec.vm_id, address=spec.ip or "", name=name, extra=extra)

    def _name(self, handle):
        return handle.name or domain_name(handle.vm_id)

    def shutdown(self, handle):
        dom = self.connection.lookup(self._name(handle))
        if dom is None:
            return
        try:
            self.connection.call(dom.shutdownFlags, self.shutdown_flags())
        except HypervisorError:
            if self.is_running(handle):
                raise

    def kill(self, handle):
        dom = self.connection.lookup(self._name(handle))
        if dom is None:
            return
        try:
            self.connection.call(dom.destroy)
        except HypervisorError:
            if self.is_running(handle):
                raise

    def is_running(self, handle):
        return self.connection.is_active(self._name(handle))

    def wait_exit(self, handle, timeout=None):
        return self.connection.wait_stopped(self._name(handle), timeout,
                                            self.cfg.get_int("internal.hkd.libvirt.state_check.interval"))

    def cleanup(self, handle):
        name = self._name(handle)
        if self.connection.is_active(name):
            log.warning("VM %s: cleanup of a running domain %s: destroying it", handle.vm_id, name)
            self.kill(handle)
        self._undefine(name)
        self.release(handle.extra)

    def _undefine(self, name):
        conn = self.connection
        dom = conn.lookup(name)
        if dom is None:
            return
        try:
            if not conn.call(dom.isActive) and conn.call(dom.isPersistent):
                conn.call(dom.undefine)
        except HypervisorError as exc:
            if conn.lookup(name) is not None:
                raise HypervisorError(f"cannot remove the definition of {name}: {exc}") from None

    def list_running(self):
        conn = self.connection
        running = {}
        for name in conn.domain_names(DOMAIN_PREFIX):
            vm_id = vm_id_of(name)
            dom = conn.lookup(name) if vm_id is not None else None
            if dom is None:
                continue
            meta = parse_domain_metadata(conn.call(dom.XMLDesc, 0))
            extra = {k: v for k, v in meta.items() if k not in ("vm_id", "ip", "mac", "di_id", "vma_port", "x_port")}
            extra.update(uri=self.uri, adopted=True)
            running[vm_id] = VmHandle(vm_id=vm_id, address=meta.get("ip", ""), name=name, extra=extra)
        return running

    def close(self):
        conn = LibvirtConnection._by_uri.get(self.uri)
        if conn is not None:
            conn.close()
