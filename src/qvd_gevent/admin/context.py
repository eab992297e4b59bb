"""What every verb gets: the parsed invocation, configuration, database and output."""
import sys

from .tables import render_table


class AdminError(Exception):
    """A user-facing failure: printed as one line ``Error: <message>``, exit 1."""


class Invocation:
    """The command line after option parsing (options may appear anywhere)."""

    def __init__(self):
        self.config = None
        self.filters = []       # [(key, value)] from every -f, in order
        self.tenant = None      # int or None
        self.force = False
        self.quiet = False
        self.help = False
        self.debug = False
        self.obj = None
        self.verb = None
        self.args = []          # [(key, value or None)] in order

    def arg(self, key, default=None):
        for k, v in self.args:
            if k == key:
                return v
        return default

    def has(self, key):
        return any(k == key for k, _ in self.args)


class Context:
    def __init__(self, inv, cfg=None, db=None, out=None, err=None, stdin=None):
        self.inv = inv
        self.cfg = cfg
        self.db = db
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.stdin = stdin or sys.stdin

    # --- invocation shortcuts ------------------------------------------------------
    @property
    def quiet(self):
        return self.inv.quiet

    @property
    def filters(self):
        return self.inv.filters

    def tenant(self, default):
        return default if self.inv.tenant is None else self.inv.tenant

    # --- output --------------------------------------------------------------------
    def say(self, message):
        """An informational message (suppressed by -q)."""
        if not self.inv.quiet:
            self.out.write(message + "\n")
            self.out.flush()

    def warn(self, message):
        """Something asked for was not done: always said, on stderr, even under -q."""
        self.err.write(message + "\n")
        self.err.flush()

    def print(self, text):
        """Data output (never suppressed): propget lines, config get lines."""
        self.out.write(text)
        self.out.flush()

    def table(self, titles, rows):
        self.out.write(render_table(titles, rows, quiet=self.inv.quiet))
        self.out.flush()

    # --- database ------------------------------------------------------------------
    def tx(self, fn, *args, **kwargs):
        """fn(cursor, ...) in one serializable transaction (retried on conflicts)."""
        return self.db.transaction(fn, *args, **kwargs)

    # --- confirmation --------------------------------------------------------------
    def confirm(self, question):
        """'Are you sure ...? [y/N]' unless --force. Without a terminal the answer is no."""
        if self.inv.force:
            return True
        self.out.write(f"{question} [y/N] ")
        self.out.flush()
        isatty = getattr(self.stdin, "isatty", None)
        if not (isatty and isatty()):
            self.out.write("\n")
            self.warn("Not confirmed (standard input is not a terminal); use --force to skip the question.")
            return False
        answer = self.stdin.readline()
        return answer.strip().lower().startswith("y")
