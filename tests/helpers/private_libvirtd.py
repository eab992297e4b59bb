"""A private libvirtd inside a test network namespace, so a guest's tap and address never reach the machine.

Why not the machine's libvirtd: its qemu driver creates every tap in libvirtd's own network
namespace (the machine's), where a bridge with a private gateway must never exist. Why not
the embedded driver (qemu:///embed) in the gevent process: libvirt then waits for its own
children (capability probes, qemu launch) with waitpid(pid), while gevent's libev loop reaps
every child on SIGCHLD as soon as the process has started one subprocess (dnsmasq, qemu-img):
libvirt fails with "unable to wait for process: No child processes".

So: ``libvirtd`` runs entered into the test namespace's network (nsenter --net) and in a
private mount namespace where /run/libvirt, /var/lib/libvirt, /var/cache/libvirt,
/var/log/libvirt and /etc/libvirt are folders of the test (nothing is shared with the
machine's libvirtd); its socket is in the test's folder; its qemu.conf runs qemu as root
without the DAC relabelling (the test's files sit under a 0700 tmp dir) and writes qemu's
stdout to files instead of virtlogd. Every qemu it starts inherits the test namespace.
The node connects with ``qemu:///system?socket=<dir>/sock/libvirt-sock`` -- the same
remote driver path as production's qemu:///system.
"""
import os
import signal
import subprocess
import time

LIBVIRT_DIRS = ("/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt", "/etc/libvirt")

QEMU_CONF = """# written by tests/helpers/private_libvirtd.py
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
stdio_handler = "file"
"""


class PrivateLibvirtd:
    def __init__(self, netns_name, folder):
        self.netns_name = netns_name
        self.folder = str(folder)
        self.proc = None
        self.socket = os.path.join(self.folder, "sock", "libvirt-sock")

    def uri(self, driver="qemu"):
        return f"{driver}:///system?socket={self.socket}"

    def start(self, timeout=30):
        binds = []
        for target in LIBVIRT_DIRS:
            source = os.path.join(self.folder, target.strip("/").replace("/", "_"))
            os.makedirs(source, exist_ok=True)
            os.makedirs(target, exist_ok=True)
            binds.append(f"mount --bind {source} {target}")
        etc = os.path.join(self.folder, "etc_libvirt")
        with open(os.path.join(etc, "qemu.conf"), "w") as fh:
            fh.write(QEMU_CONF)
        os.makedirs(os.path.join(self.folder, "sock"), exist_ok=True)
        for stale in ("libvirt-sock", "libvirt-sock-ro", "libvirt-admin-sock"):   # from a previous run
            try:
                os.unlink(os.path.join(self.folder, "sock", stale))
            except FileNotFoundError:
                pass
        conf = os.path.join(self.folder, "libvirtd.conf")
        with open(conf, "w") as fh:
            fh.write(f'unix_sock_dir = "{self.folder}/sock"\nunix_sock_rw_perms = "0700"\n'
                     'auth_unix_rw = "none"\nauth_unix_ro = "none"\n')
        script = " && ".join(binds + [f"exec libvirtd -f {conf} -p {self.folder}/libvirtd.pid"])
        argv = ["nsenter", f"--net=/run/netns/{self.netns_name}", "--",
                "unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        self.log_path = os.path.join(self.folder, "libvirtd.log")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"private libvirtd did not start: {self.log_text()}")
            time.sleep(0.1)
        return self

    def log_text(self):
        try:
            return open(self.log_path, errors="replace").read()[-3000:]
        except OSError as exc:
            return str(exc)

    def stop(self, timeout=20):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout)
