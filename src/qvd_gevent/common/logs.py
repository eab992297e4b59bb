"""Logging for the node: one line per event, to stderr, stdout or log.filename; secrets masked,
control characters escaped.

``log.format = text`` (the default) writes ``time pid LEVEL logger - message``;
``log.format = json`` one JSON object per line (time, level, logger, pid, message, and the
traceback as ``exception``). When the stream is the systemd journal (JOURNAL_STREAM names
it), every line starts with its syslog priority (``<3>`` for errors ...), so
``journalctl -p err`` finds the errors; the journal adds time and pid itself.
"""
import datetime
import json
import logging
import os
import re
import sys

_LEVELS = {"FATAL": logging.CRITICAL, "ERROR": logging.ERROR, "WARN": logging.WARNING,
           "WARNING": logging.WARNING, "INFO": logging.INFO, "DEBUG": logging.DEBUG, "TRACE": logging.DEBUG}

# password=..., passwd: ..., "password": "...", Authorization: Basic/Bearer ...
_SECRET = re.compile(r"(?i)(passw(?:or)?d[\"']?\s*[=:]\s*[\"']?)([^\s&,;\"']+)|(authorization:\s*\w+\s+)(\S+)")


def mask_secrets(text):
    def repl(m):
        if m.group(1):
            return m.group(1) + "****"
        return m.group(3) + "****"
    return _SECRET.sub(repl, text)


class SecretMaskingFilter(logging.Filter):
    def filter(self, record):
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, ()
        return True


FORMATS = ("text", "json")

# syslog priorities (sd-daemon(3)), the prefix journald reads from a service's stream
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def priority_of(levelno):
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def is_journal(stream):
    """True when stream is the journal's socket: JOURNAL_STREAM is "device:inode" of it."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return bool(expected) and expected == f"{info.st_dev}:{info.st_ino}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; the message is masked before it gets here (the filter)."""

    def format(self, record):
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
                            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = mask_secrets(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


class JournalPrefix(logging.Formatter):
    """Wraps a formatter: each line of a record (a traceback has many) starts with <priority>."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def format(self, record):
        prefix = f"<{priority_of(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


# C0 (CR, LF, ESC...), DEL, C1 and the Unicode line and paragraph separators: a login, a
# header or a VM name carrying them must not start a forged log line or drive a terminal.
_CONTROL_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7f, 0xa0))}
_CONTROL_ESCAPES.update({0x09: "\\t", 0x0a: "\\n", 0x0d: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape_control_characters(text):
    """text with every control character written as an escape (``\\n``, ``\\x1b``...)."""
    return text.translate(_CONTROL_ESCAPES)


class ControlCharacterFilter(logging.Filter):
    """Keeps each record on one line: control characters in the message (and so in its
    arguments, wherever they came from) are escaped. Tracebacks are not the message."""

    def filter(self, record):
        message = record.getMessage()
        escaped = escape_control_characters(message)
        if escaped != message:
            record.msg, record.args = escaped, ()
        return True


def setup_logging(cfg, stream=None):
    """Log as cfg's log.* keys say; ValueError (naming the key) for a log.format we do not know."""
    level = _LEVELS.get(str(cfg.get("log.level")).upper(), logging.INFO)
    preset = str(cfg.get("log.preset")).lower()
    form = str(cfg.get("log.format", "text")).strip().lower()
    if form not in FORMATS:
        raise ValueError(f"configuration key log.format: {form!r} is not one of {', '.join(FORMATS)}")
    if preset == "file":
        handler = logging.FileHandler(cfg.get_str("log.filename"))
    else:
        handler = logging.StreamHandler(stream or (sys.stdout if preset == "stdout" else sys.stderr))
    journal = preset != "file" and is_journal(handler.stream)
    if form == "json":
        formatter = JsonFormatter()
    elif journal:
        formatter = logging.Formatter("%(levelname)s %(name)s - %(message)s")   # the journal adds time and pid
    else:
        formatter = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s - %(message)s")
    handler.setFormatter(JournalPrefix(formatter) if journal else formatter)
    handler.addFilter(SecretMaskingFilter())
    handler.addFilter(ControlCharacterFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def say_error(prog, message, stream=None):
    """The one line a command prints when it cannot go on; an error priority in the journal."""
    stream = stream or sys.stderr
    prefix = f"<{_PRIORITY[logging.ERROR]}>" if is_journal(stream) else ""
    print(f"{prefix}{prog}: {message}", file=stream)
