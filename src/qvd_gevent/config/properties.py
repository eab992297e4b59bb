"""Java-properties parsing, as QVD's Config::Properties reads node.conf."""
import re


class PropertiesError(ValueError):
    pass


_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


def _unescape(text, lineno):
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        i += 1
        if i >= len(text):
            break
        ch = text[i]
        if ch == "u":
            digits = text[i + 1:i + 5]
            if not re.fullmatch(r"[0-9a-fA-F]{4}", digits):
                raise PropertiesError(f"line {lineno}: malformed \\u escape")
            out.append(chr(int(digits, 16)))
            i += 5
            continue
        out.append(_ESCAPES.get(ch, ch))
        i += 1
    return "".join(out)


def _logical_lines(text):
    """Join backslash-continued lines; yield (first line number, logical line)."""
    pending, start = None, 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if pending is None:
            stripped = line.lstrip()
            if not stripped or stripped[0] in "#!":
                continue
            pending, start = stripped, lineno
        else:
            pending += line.lstrip()
        trailing = len(pending) - len(pending.rstrip("\\"))
        if trailing % 2 == 1:
            pending = pending[:-1]
            continue
        yield start, pending
        pending = None
    if pending is not None:
        yield start, pending


def parse_properties(text):
    """Return an ordered dict of key -> value; later keys override earlier ones."""
    result = {}
    for lineno, line in _logical_lines(text):
        # The key ends at the first unescaped '=', ':' or whitespace.
        i = 0
        while i < len(line):
            if line[i] == "\\":
                i += 2
                continue
            if line[i] in "=: \t\f":
                break
            i += 1
        key = _unescape(line[:i], lineno)
        rest = line[i:].lstrip(" \t\f")
        if rest[:1] in ("=", ":"):
            rest = rest[1:].lstrip(" \t\f")
        if not key:
            raise PropertiesError(f"line {lineno}: missing key")
        result[key] = _unescape(rest.rstrip(" \t"), lineno)
    return result
