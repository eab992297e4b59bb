"""node.conf syntax, read exactly as the original reads it with Perl's Config::Properties.

The rules (Config::Properties 1.80, which the original QVD loads node.conf with), checked
against that module by tests/unit/test_properties_perl.py:

- Lines end at CR LF, LF or CR. A byte-order mark at the start is dropped.
- A line that is blank or whose first non-blank character is ``#`` or ``!`` is a comment.
- An odd number of backslashes at the end of a line joins the next line to it, without
  that line's leading blanks (the joined line is never a comment, whatever it starts with).
- A property line is: blanks, the key (one or more characters other than blanks, ``:``,
  ``=`` and backslash, or a backslash and any character), blanks, ONE separator (``:``,
  ``=`` or a blank), blanks, then the value up to the end of the line. Trailing blanks
  belong to the value. A line with a key and no separator is an error.
- Only these escapes exist: ``\\t \\n \\r``, ``\\uXXXX``, and a backslash before one of
  ``\\ " ' space = : # !`` for that character. Any other backslash stays as it is, so
  ``a = C:\\foo\\bar`` gives ``C:\\foo\\bar``.
- "Blank" is Perl's ``\\s`` on a character string: tab, LF, VT, FF, CR, space, U+0085,
  U+00A0 and the Unicode space separators.

One deliberate difference: Config::Properties decodes the file as Latin-1, which turns
UTF-8 text into mojibake; we decode a file that is valid UTF-8 as UTF-8 and any other
file as Latin-1 (so a Latin-1 file reads exactly as in the original, and a pure ASCII
file, the usual node.conf, reads the same either way).
"""
import re


class PropertiesError(ValueError):
    pass


# Perl's \s under Unicode rules (Config::Properties works on decoded character strings).
BLANKS = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
          "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_EOL = re.compile(r"\r\n|\n|\r")
_COMMENT_OR_BLANK = re.compile(rf"[{BLANKS}]*(?:[#!]|\Z)")
_PROPERTY = re.compile(rf"[{BLANKS}]*((?:[^{BLANKS}:=\\]|\\.)+)[{BLANKS}]*[:={BLANKS}][{BLANKS}]*(.*)")
# \d is Unicode here as in Perl; a non-ASCII digit after \u makes Perl's hex() die.
_ESCAPE = re.compile(r"""\\([tnr\\"' =:#!])|\\u([\da-fA-F]{4})""")
_ESCAPED = {"t": "\t", "n": "\n", "r": "\r"}


def decode_properties(data):
    """The text of a node.conf given as bytes: UTF-8 when it is valid UTF-8, else Latin-1."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _unescape(text, lineno):
    def replace(match):
        if match.group(1) is not None:
            return _ESCAPED.get(match.group(1), match.group(1))
        digits = match.group(2)
        if not digits.isascii():
            raise PropertiesError(f"line {lineno}: malformed \\u escape")
        return chr(int(digits, 16))

    return _ESCAPE.sub(replace, text)


def _odd_trailing_backslashes(line):
    return (len(line) - len(line.rstrip("\\"))) % 2 == 1


def parse_properties(text):
    """Return a dict of key -> value (later lines win), or raise PropertiesError."""
    lines = _EOL.split(text)
    if lines[-1] == "":
        lines.pop()
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    result = {}
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        lineno = index
        if _COMMENT_OR_BLANK.match(line):
            continue
        pieces = []
        while _odd_trailing_backslashes(line):
            pieces.append(line[:-1])
            line = lines[index].lstrip(BLANKS) if index < len(lines) else ""
            index += 1
        line = "".join(pieces) + line
        match = _PROPERTY.fullmatch(line)
        if match is None:
            raise PropertiesError(f"line {lineno}: not a property (expected: key = value)")
        key = _unescape(match.group(1), lineno)
        result[key] = _unescape(match.group(2), lineno)
    return result
