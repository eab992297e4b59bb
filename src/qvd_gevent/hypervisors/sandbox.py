"""How `process` and `netns` VMs are kept from the node and from each other
(docs/hkd.md#vm-confinement).

A VM's init is started through util-linux programs, each doing one thing, then exec'ing the
next (no fork of the node, no Python in between):

- the node as root (mode ``uid``): ``unshare`` makes the VM a mount namespace and a pid
  namespace of its own; ``sh`` runs ``CONFINE`` there, as root, which gives the VM a
  private /tmp and /dev/shm (VMs of other uids cannot reach its X display socket or its
  temporary files), lays empty read-only folders over the node's folders and
  /dev/null over the node's files (node.conf, path.run, path.log, the L7R's keys,
  vm.hidden_paths), puts the VM's own home back, and ``setpriv`` becomes the VM's uid
  (``vm.uid.base`` + vm id, vm_accounts.py) without groups, capabilities or any way to gain
  privileges (no_new_privs: setuid programs do not raise it) before it runs the init;
- the node as another user (mode ``user``, the demo): the same in a user namespace (the
  node's user is its root, so it may mount there) but the machine's /tmp (every VM is the
  node's user anyway, and a single-file build may run from /tmp); the init then runs in a nested user
  namespace as the node's uid without any capability, so it cannot undo the mounts. The VM
  is the node's user all the same: a warning at every start says so;
- without user namespaces (mode ``none``): the init runs as the node's user with only its
  environment scrubbed, and the warning says that too.

The environment is built from scratch (``vm_environment``): PATH, HOME, the locale, and the
QVD_* values of the hypervisor; nothing of the node's own (no QVD_CONFIG, no database
settings), except the names an operator lists in vm.environment.pass.
"""
import logging
import os
import shutil
import stat

from ..system.spawn import SpawnError, run_collect
from .base import HypervisorError
from .vm_accounts import VmUids

log = logging.getLogger("qvd.hypervisors.sandbox")

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOCALE = ("LANG", "LC_ALL", "TZ")
SHARED_FOLDERS = ("/tmp", "/dev/shm")       # world-writable on the host; each VM gets its own
PROBE_VM_ID = 0                             # VM ids start at 1: the start-up probe's home and uid

# $1 mode (uid/user), $2 uid, $3 gid, $4 the VM's home, $5 a file or folder under /tmp to
# keep (the DI's), $6 the size of the private /tmp and /dev/shm, $7 "private" for a private
# /tmp (mode uid) or "shared"; then the paths to hide, "--", the init.
# The home and the kept path are opened before anything is mounted and bound back from
# those descriptors (mount --no-canonicalize: a path would name the new, empty folder).
# A hidden file becomes a read-only mode-000 file (opening it fails), made on a scratch
# tmpfs on /dev/shm that the VM's own /dev/shm then covers.
CONFINE = r"""set -e
mode=$1 uid=$2 gid=$3 home=$4 keep=$5 tmp_size=$6 tmp=$7
shift 7
exec 3<"$home"
if [ -n "$keep" ]; then exec 4<"$keep"; fi
put_back() {
    case "$keep" in "$1"/*)
        if [ -d /proc/self/fd/4 ]; then mkdir -p "$keep"; else mkdir -p "${keep%/*}"; : >"$keep"; fi
        mount --no-canonicalize --bind /proc/self/fd/4 "$keep";;
    esac
    case "$home" in "$1"/*)
        mkdir -p "$home"
        mount --no-canonicalize --bind /proc/self/fd/3 "$home";;
    esac
}
mount -t tmpfs -o nosuid,nodev,noexec,mode=0700,size=16k qvd-hidden /dev/shm
: >/dev/shm/hidden
chmod 000 /dev/shm/hidden
if [ "$tmp" = private ]; then
    mount -t tmpfs -o "nosuid,nodev,mode=1777,size=$tmp_size" qvd-vm /tmp
    mkdir -m 1777 /tmp/.X11-unix /tmp/.ICE-unix    # as the system makes them: X servers not run by root need them
    put_back /tmp
fi
while [ "$1" != -- ]; do
    if [ -d "$1" ]; then
        mount -t tmpfs -o nosuid,nodev,noexec,mode=0755,size=1m qvd-hidden "$1"
        put_back "$1"
    elif [ -e "$1" ]; then
        mount --bind /dev/shm/hidden "$1"
    fi
    [ ! -e "$1" ] || mount -o remount,bind,ro "$1"
    shift
done
shift
mount -t tmpfs -o "nosuid,nodev,mode=1777,size=$tmp_size" qvd-vm /dev/shm
put_back /dev/shm
exec 3<&- 4<&-
cd "$home"
umask 077
if [ "$mode" = uid ]; then
    exec setpriv --reuid="$uid" --regid="$gid" --clear-groups --no-new-privs --inh-caps=-all \
        --bounding-set=-all -- "$@"
fi
exec unshare --user --map-user="$uid" --map-group="$gid" -- "$@"
"""


def vm_environment(cfg, home, values):
    """A VM's environment from scratch: PATH, HOME, the locale, vm.environment.pass, values."""
    env = {"PATH": DEFAULT_PATH, "HOME": home}
    for name in LOCALE + tuple(cfg.get_list("vm.environment.pass")):
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(values)
    return env


def _under(path, folder):
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _kept_path(di):
    """What of a DI under /tmp or /dev/shm the VM still sees under its private one: the
    DI's folder (its files beside it), or the DI alone when it lies in /tmp itself."""
    if not any(_under(di, folder) for folder in SHARED_FOLDERS):
        return None
    parent = os.path.dirname(di)
    return di if parent in SHARED_FOLDERS else parent


def closed_to_others(path, start="/"):
    """The first part of path, from the folder start on, that other users cannot pass (a
    folder without o+x, the file without o+x, a script without o+r), or None."""
    path = os.path.realpath(path)
    parts = path.split("/")
    for i in range(2, len(parts)):
        folder = "/".join(parts[:i])
        if _under(folder, start) and not os.stat(folder).st_mode & stat.S_IXOTH:
            return folder
    mode = os.stat(path).st_mode
    if not mode & stat.S_IXOTH:
        return path
    try:
        with open(path, "rb") as fh:
            script = fh.read(2) == b"#!"
    except OSError:
        script = False
    return path if script and not mode & stat.S_IROTH else None


class VmSandbox:
    """One per hypervisor: check() chooses the mode; prepare() and command() start each VM."""

    def __init__(self, cfg, pid_namespace=True):
        self.cfg = cfg
        self.run_dir = os.path.realpath(cfg.get_str("path.run"))
        self.homes = os.path.join(self.run_dir, "vms")
        self.uids = VmUids(cfg)
        self.mode = None                # "uid", "user" or "none", once checked
        self.pid_namespace = pid_namespace
        self._unshare = self._setpriv = None

    # --- what a VM must not see ------------------------------------------------------------
    def hidden_paths(self):
        cfg = self.cfg
        paths = [cfg.path] if getattr(cfg, "path", None) else []
        paths += [cfg.get_str(key) for key in ("path.run", "path.log", "path.l7r.ssl", "path.l7r.ssl.key",
                                               "path.l7r.ssl.cert", "path.l7r.ssl.ca", "path.l7r.ssl.crl")]
        paths += cfg.get_list("vm.hidden_paths")
        return list(dict.fromkeys(os.path.realpath(p) for p in paths if p))

    # --- start-up check --------------------------------------------------------------------
    def check(self):
        """Choose the mode and prove it works here (one line on failure), at every HKD start."""
        self._unshare = shutil.which("unshare", path=DEFAULT_PATH)
        self._setpriv = shutil.which("setpriv", path=DEFAULT_PATH)
        if os.geteuid() == 0:
            if not (self._unshare and self._setpriv and shutil.which("mount", path=DEFAULT_PATH)):
                raise HypervisorError("unshare, setpriv and mount (util-linux, mount) are needed to confine VMs")
            self.uids.check()
            self.mode = "uid"
            error = self._probe()
            if error and self.pid_namespace:
                log.warning("VMs: no pid namespace here (%s); each VM still gets its own mount namespace", error)
                self.pid_namespace = False
                error = self._probe()
            if error:
                raise HypervisorError(f"VMs cannot be confined here (a mount namespace and a uid of their own): "
                                      f"{error}")
            log.info("VMs run as uid %s + vm id, in mount%s namespaces of their own", self.uids.base,
                     " and pid" if self.pid_namespace else "")
            return
        self.mode = "user"
        error = self._probe() if self._unshare else "unshare (util-linux) not found"
        if error and self.pid_namespace:
            self.pid_namespace = False
            error = self._probe() if self._unshare else error
        if error:
            self.mode = "none"
            log.warning("VMs run as this node's user (uid %d) with nothing hidden from them: the node is not root "
                        "and user namespaces do not work here (%s); fine for a demo, not for sharing", os.getuid(),
                        error)
        else:
            log.warning("VMs run as this node's user (uid %d), in user and mount namespaces that hide the node's "
                        "files from them: the node is not root; fine for a demo, not for sharing", os.getuid())

    def _probe(self):
        """Start `true` exactly as a VM's init is started; None, or why it failed (one line)."""
        home = self.prepare(PROBE_VM_ID)
        try:
            code, out = run_collect(self.command(PROBE_VM_ID, shutil.which("true", path=DEFAULT_PATH), 16),
                                    vm_environment(self.cfg, home, {}), 30)
        except (SpawnError, OSError) as exc:
            return str(exc)
        finally:
            self.remove_home(PROBE_VM_ID)
        if code == 0:
            return None
        lines = [line.strip() for line in out.decode("utf-8", "replace").splitlines() if line.strip()]
        return lines[0] if lines else f"exit status {code}"

    # --- each VM -----------------------------------------------------------------------------
    def uid_for(self, vm_id):
        return self.uids.uid_for(vm_id) if self.mode == "uid" else os.getuid()

    def home_for(self, vm_id):
        return os.path.join(self.homes, str(int(vm_id)))

    def check_di(self, vm_id, di_path):
        """The DI must be runnable by the VM's uid and not hidden from it."""
        real = os.path.realpath(di_path)
        for hidden in self.hidden_paths() if self.mode != "none" else ():
            if _under(real, hidden):
                raise HypervisorError(f"DI {di_path} of VM {vm_id} lies in {hidden}, which VMs do not see")
        if self.mode == "uid":
            # the VM's /tmp is private: of a DI under it only its folder is real (command())
            keep = _kept_path(real)
            closed = closed_to_others(real, keep or "/")
            if closed:
                raise HypervisorError(f"DI {di_path} of VM {vm_id} cannot be run by the VM's uid "
                                      f"{self.uid_for(vm_id)}: {closed} is closed to other users (chmod o+rx)")

    def prepare(self, vm_id):
        """A fresh home for the VM: owned by its uid, mode 0700, in a folder only root lists."""
        os.makedirs(self.homes, exist_ok=True)
        os.chmod(self.homes, 0o711 if self.mode == "uid" else 0o700)
        home = self.home_for(vm_id)
        self.remove_home(vm_id)
        os.mkdir(home, 0o700)
        if self.mode == "uid":
            uid = self.uid_for(vm_id)
            os.chown(home, uid, uid)
        return home

    def remove_home(self, vm_id):
        # rmtree does not follow links the VM may have planted (it works on descriptors)
        shutil.rmtree(self.home_for(vm_id), ignore_errors=True)

    def command(self, vm_id, di_path, memory_mb):
        """argv that runs di_path as VM vm_id's init (after prepare())."""
        di = os.path.realpath(di_path)
        if self.mode == "none":
            return [di]
        flags = ["--mount", "--propagation", "private"]
        if self.mode == "user":
            flags = ["--user", "--map-root-user"] + flags
        if self.pid_namespace:
            flags += ["--pid", "--fork", "--kill-child", "--mount-proc"]
        uid = self.uid_for(vm_id)
        gid = uid if self.mode == "uid" else os.getgid()
        private_tmp = self.mode == "uid"
        return [self._unshare, *flags, "--", "/bin/sh", "-c", CONFINE, "qvd-vm-confine", self.mode, str(uid),
                str(gid), os.path.realpath(self.home_for(vm_id)), (private_tmp and _kept_path(di)) or "",
                f"{max(int(memory_mb or 0), 16)}m", "private" if private_tmp else "shared",
                *self.hidden_paths(), "--", di]
