"""Run bench.worker processes side by side and talk to them (JSON lines)."""
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

REPO = str(Path(__file__).resolve().parent.parent)


class WorkerError(Exception):
    pass


class Worker:
    def __init__(self, spec):
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.worker", json.dumps(spec)], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read(self, timeout):
        """The next JSON message, or WorkerError with the worker's stderr."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            try:
                self.proc.wait(5)
                err = self.proc.stderr.read()[-3000:].strip()
            except subprocess.TimeoutExpired:
                err = ""
            print(f"worker stderr:\n{err}", file=sys.stderr, flush=True)
            last = err.splitlines()[-1] if err else "no output"
            raise WorkerError(f"worker gave no answer in {timeout:.0f} s ({last})")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Crew:
    """Several workers doing one job; start() waits for all to be ready, run() sends go
    and collects every result (the measured window is between the two)."""

    def __init__(self, specs):
        self.workers = [Worker(spec) for spec in specs]

    def ready(self, timeout):
        deadline = time.monotonic() + timeout
        return [w.read(max(1, deadline - time.monotonic()))["ready"] for w in self.workers]

    def go(self):
        for w in self.workers:
            w.send("go")

    def results(self, timeout):
        deadline = time.monotonic() + timeout
        return [w.read(max(1, deadline - time.monotonic()))["result"] for w in self.workers]

    def send_all(self, line):
        for w in self.workers:
            w.send(line)

    def close(self):
        for w in self.workers:
            w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
