"""Children of the node: started with posix_spawn and reaped by the hub, and waiting for
processes that are not our children (VMs adopted after a node restart).

gevent's Popen forks this whole process in Python (about 4 ms of CPU per child for a node
of ~100 MB, measured); posix_spawn uses vfork and costs a fraction of a millisecond, which
matters when a VM start runs three children.
"""
import os
import shutil
import signal
import time

import gevent
import gevent.event
import gevent.fileobject
import gevent.socket
from gevent import subprocess

from . import procfs


class SpawnError(OSError):
    """The program to run was not found; the message names it."""


class SpawnedChild:
    """A child started with posix_spawn and reaped by the hub (Popen's poll/wait/kill subset).

    The exit is reported by a libev child watcher started before the hub runs again, so an
    early exit is not lost.
    """

    def __init__(self, argv, env, output_fd=None, setsid=False):
        path = argv[0] if os.sep in argv[0] else shutil.which(argv[0], path=env.get("PATH"))
        if not path:
            raise SpawnError(f"{argv[0]} not found")
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        out = devnull if output_fd is None else output_fd
        try:
            self.pid = os.posix_spawn(path, argv, env, setsid=setsid, file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, out, 2)])
        finally:
            os.close(devnull)
        self.args = argv
        self.returncode = None
        self._exited = gevent.event.Event()
        self._watcher = gevent.get_hub().loop.child(self.pid, False)
        self._watcher.start(self._on_exit)

    def _on_exit(self):
        self.returncode = os.waitstatus_to_exitcode(self._watcher.rstatus)
        self._watcher.stop()
        self._exited.set()

    def _reaped_elsewhere(self):
        """Someone else's waitpid(-1) took our child's status: the pid is simply gone."""
        if self._exited.is_set() or procfs.process_state(self.pid) is not None:
            return False
        self._watcher.stop()
        self._exited.set()
        return True

    def poll(self):
        if self.returncode is None:
            self._reaped_elsewhere()
        return self.returncode

    @property
    def exited(self):
        return self._exited.is_set() or self._reaped_elsewhere()

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._exited.wait(1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))):
            if self._reaped_elsewhere():
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def kill(self):
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_collect(argv, env, timeout):
    """(exit code, stdout+stderr) of a short command; on timeout it is killed and TimeoutExpired raised."""
    read_end, write_end = os.pipe()
    try:
        child = SpawnedChild(argv, env, output_fd=write_end)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    try:
        with gevent.Timeout(timeout, subprocess.TimeoutExpired(argv, timeout)):
            reader = gevent.fileobject.FileObjectPosix(read_end, "rb", close=True)
            read_end = None
            with reader:
                output = reader.read()          # until EOF: the child (and its children) exited
            return child.wait(), output
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(5)
        raise
    finally:
        if read_end is not None:
            os.close(read_end)



def wait_exit(pid, alive, timeout=None):
    """Wait until alive() is false for pid, a process that is not our child: a pidfd wakes us
    when it exits, alive() guards against pid reuse. True once gone, False on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError, TypeError):
        pidfd = None
    try:
        while alive():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if pidfd is not None:
                try:
                    gevent.socket.wait_read(pidfd, timeout=min(left, 1.0) if left is not None else 1.0)
                except gevent.socket.timeout:
                    pass
            else:
                gevent.sleep(min(left, 0.2) if left is not None else 0.2)
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)
