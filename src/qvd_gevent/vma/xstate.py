"""X session state of the VMA, without I/O (docs/protocol.md#x-session-states).

nxagent announces its session state in log lines (``Session: Starting session at ...``,
``Session: Session started at ...``); the VMA maps those NX states to the x_state values
the L7R understands and enforces per-state timeouts. The echo desktop reuses the same
tracker by feeding NX state names directly, so both desktops answer alike.
"""
import re

# NX state -> x_state, exactly the original's %nx2x.
NX_TO_X = {
    "initiating": "starting",
    "provisioning": "provisioning",
    "starting": "listening",
    "resuming": "listening",
    "started": "connected",
    "resumed": "connected",
    "suspending": "suspending",
    "suspended": "suspended",
    "terminating": "stopping",
    "aborting": "stopping",
    "aborted": "stopped",
    "terminated": "stopped",
    "stopped": "stopped",
}

RUNNING_STATES = frozenset({"listening", "connected", "suspending", "suspended"})

# x_state -> config key of its timeout. The original keyed the start timeout on
# "initiating", a name that never survives the mapping (docs/differences.md#nxagent-start-timeout); we apply it to
# "starting", which is what was meant.
TIMEOUT_KEYS = {
    "starting": "internal.nxagent.timeout.starting",
    "listening": "internal.nxagent.timeout.listening",
    "suspending": "internal.nxagent.timeout.suspending",
    "stopping": "internal.nxagent.timeout.stopping",
}

_SESSION_LINE = re.compile(r"Session: (?:(\w+) session at|Session (\w+) at)")
_OPTION_VALUE = re.compile(r"[\w/\-+]+", re.ASCII)     # matched whole: no newline, no non-ASCII
# What a client may set through qvd.client.nxagent.extra_args (``name=value,...``): options
# of its own link and display only, each value matched whole. Listening, ports, files,
# sessions, printing, audio, the clipboard and the keyboard stay the server's
# (docs/differences.md#nxagent-options-from-an-allowlist).
CLIENT_NX_OPTIONS = {
    "cache": r"[0-9]{1,6}[kKmM]?",
    "images": r"[0-9]{1,6}[kKmM]?",
    "pack": r"[a-z0-9\-]{1,32}",
    "limit": r"[0-9]{1,9}[kK]?",
    "defer": r"[0-3]",
    "tile": r"[0-9]{1,4}x[0-9]{1,4}",
    "copysize": r"[0-9]{1,9}",
    "keyconv": r"on|off|auto",
    **{name: r"[01]" for name in ("render", "taint", "strict", "resize", "composite", "shmem", "shpix", "menu",
                                  "autodpi", "xinerama")},
}
_SOCKET_PATH = re.compile(r"^/[\w/.\-]{1,100}$")     # no ',' or ':' (option separators); fits sun_path


def nx_state_from_log_line(line):
    """'Session: Starting session at ...' -> 'starting'; 'Session: Session started at' ->
    'started'; any other line -> None."""
    match = _SESSION_LINE.search(line)
    if not match:
        return None
    return (match.group(1) or match.group(2)).lower()


def x_state_of(nx_state):
    """Unknown or missing NX states read as 'stopped' (as the original)."""
    return NX_TO_X.get(nx_state or "stopped", "stopped")


class StateTracker:
    """Current NX state with the time it was entered; answers x_state with timeouts.

    ``timeouts`` maps x_state -> seconds (from TIMEOUT_KEYS). ``x_state(now, alive)``
    returns (state, expired): expired True means the caller must stop the session (the
    original SIGTERMs nxagent and reports 'stopping').
    """

    __slots__ = ("nx_state", "since", "timeouts")

    def __init__(self, timeouts, now=0.0):
        self.timeouts = dict(timeouts)
        self.nx_state = "stopped"
        self.since = now

    def set(self, nx_state, now):
        self.nx_state = nx_state
        self.since = now

    def feed_line(self, line, now):
        """Feed one nxagent log line; returns the new NX state when it changed one."""
        nx_state = nx_state_from_log_line(line)
        if nx_state is None:
            return None
        self.set(nx_state, now)
        return nx_state

    @property
    def current(self):
        return x_state_of(self.nx_state)

    def x_state(self, now, alive):
        state = self.current
        if state in RUNNING_STATES and not alive:
            return "stopped", False
        limit = self.timeouts.get(state)
        if limit is not None and now - self.since > limit:
            if state == "stopping":
                return "stopping", alive  # keep reporting it while the kill goes on
            return "stopping", True
        return state, False


class InvalidOption(ValueError):
    pass


def client_extra_options(extra):
    """qvd.client.nxagent.extra_args -> ["name=value", ...]; InvalidOption unless every item
    is an option of CLIENT_NX_OPTIONS with a value its pattern matches whole."""
    if extra in (None, ""):
        return []
    options = []
    for item in str(extra).split(","):
        name, sep, value = item.partition("=")
        pattern = CLIENT_NX_OPTIONS.get(name)
        if not sep or pattern is None or not re.fullmatch(pattern, value, re.ASCII):
            raise InvalidOption(f"Invalid value {extra!r} for qvd.client.nxagent.extra_args ({item!r} is not an "
                                f"option a client may set: {', '.join(sorted(CLIENT_NX_OPTIONS))})")
        options.append(f"{name}={value}")
    return options


def nxagent_options(params, cfg_get, display, listen_socket=None):
    """The one-line nxagent options file ``nx/nx,<opts>:<display>`` for x_start params.

    cfg_get(key) reads configuration. Client values must match ``[\\w/\\-+]+`` whole, in
    ASCII (else InvalidOption, the x_start fails as in the original); extra_args may only
    name CLIENT_NX_OPTIONS. The client's options come first and the server's last, so that
    none of the client's can stand in for one of the server's. Keyboard and link fall back to
    vma.default.client.keyboard/link: the original looked those up under a wrong name and
    never found them (docs/differences.md#vma-default-client-keys); we apply them.
    """
    fallbacks = {
        "keyboard": cfg_get("vma.default.client.keyboard"),
        "link": cfg_get("vma.default.client.link"),
    }
    opts = []
    for nx_key, client_key in (("keyboard", "qvd.client.keyboard"), ("client", "qvd.client.os"),
                               ("link", "qvd.client.link"), ("geometry", "qvd.client.geometry"),
                               ("fullscreen", "qvd.client.fullscreen")):
        value = params.get(client_key)
        if value in (None, ""):
            value = fallbacks.get(nx_key)
        if value in (None, ""):
            continue
        value = str(value)
        if not _OPTION_VALUE.fullmatch(value):
            raise InvalidOption(f"Invalid value {value!r} for {client_key}")
        opts.append(f"{nx_key}={value}")
    opts += client_extra_options(params.get("qvd.client.nxagent.extra_args"))
    if cfg_get("vma.audio.enable"):
        opts.append("media=1")
    if cfg_get("vma.slave.enable"):
        opts.append("slave=1")
    if listen_socket:
        # nxagent listens on this unix socket only (no TCP port); the VMA's display gate relays to it
        if not _SOCKET_PATH.match(listen_socket):
            raise InvalidOption(f"nxagent socket path {listen_socket!r} must match {_SOCKET_PATH.pattern}")
        opts.append(f"listen=unix:{listen_socket}")
    tolerance = cfg_get("internal.vma.nxagent.tolerancechecks")
    if tolerance:
        opts.append(f"tolerancechecks={tolerance}")
    if cfg_get("vma.printing.enable") and str(params.get("qvd.client.printing.enabled", "")) in ("1", "true"):
        opts.append("smb=2100" if params.get("qvd.client.os") == "windows" else "cups=2100")
    return f"nx/nx,{','.join(opts)}:{display}"
