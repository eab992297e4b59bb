"""Logging for the node: one line per event, to stderr, stdout or log.filename; secrets masked."""
import logging
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


def setup_logging(cfg, stream=None):
    level = _LEVELS.get(str(cfg.get("log.level")).upper(), logging.INFO)
    preset = str(cfg.get("log.preset")).lower()
    if preset == "file":
        handler = logging.FileHandler(cfg.get_str("log.filename"))
    else:
        handler = logging.StreamHandler(stream or (sys.stdout if preset == "stdout" else sys.stderr))
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s - %(message)s"))
    handler.addFilter(SecretMaskingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
