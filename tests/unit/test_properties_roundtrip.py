"""Properties of the node.conf parser (src/qvd_gevent/config/properties.py) that hold for
any Java-properties reader: a file written with the format's escapes reads back as the
keys and values it was written from, whatever the line ends, comments and continuation
lines; a later line wins; any text reads as a dict or a PropertiesError. (Agreement with
Perl's Config::Properties, line by line, is tests/unit/test_properties_perl.py.)"""
from hypothesis import given
from hypothesis import strategies as st

from qvd_gevent.config.properties import BLANKS, PropertiesError, parse_properties

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
KEY = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\\": "\\\\"}


def escape(text, key):
    """The format's escapes: backslash, tab, LF, CR by name; other blanks as \\uXXXX (a
    raw one would end a key or be trimmed at a value's start); in a key, and at a value's
    start (where it would read as the separator), the separators and comment marks."""
    out = []
    for i, ch in enumerate(text):
        if ch in _NAMED:
            out.append(_NAMED[ch])
        elif ch in BLANKS and (key or i == 0 or ch in "\x0b\x0c\x85\u2028\u2029"):
            out.append(f"\\u{ord(ch):04x}")
        elif ch in ":=#!" and (key or i == 0):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def write(pairs, separator=" = ", eol="\n"):
    return "".join(f"{escape(k, True)}{separator}{escape(v, False)}{eol}" for k, v in pairs)


@given(values=st.dictionaries(KEY, TEXT, max_size=8), separator=st.sampled_from([" = ", "=", ":", " : ", " ", "\t"]),
       eol=st.sampled_from(["\n", "\r\n", "\r"]))
def test_what_is_written_with_escapes_reads_back(values, separator, eol):
    assert parse_properties(write(values.items(), separator, eol)) == values


@given(first=st.dictionaries(KEY, TEXT, max_size=5), second=st.dictionaries(KEY, TEXT, max_size=5))
def test_a_later_line_wins(first, second):
    assert parse_properties(write(first.items()) + write(second.items())) == {**first, **second}


@given(values=st.dictionaries(KEY, TEXT, min_size=1, max_size=5), comment=st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x0b\x0c\x85\u2028\u2029"), max_size=20),
    mark=st.sampled_from(["#", "!", "  #", "\t!"]))
def test_comment_and_blank_lines_change_nothing(values, comment, mark):
    lines = [f"{mark}{comment}\n{line}\n\n" for line in write(values.items()).split("\n")[:-1]]
    assert parse_properties("".join(lines)) == values


@given(key=KEY, value=TEXT, cut=st.integers(0, 40), indent=st.sampled_from(["", "  ", "\t"]))
def test_a_continued_line_reads_as_one(key, value, cut, indent):
    escaped = escape(value, False)
    cut = min(cut, len(escaped))
    while cut and escaped[cut - 1] == "\\":    # never split inside an escape
        cut -= 1
    rest = escaped[cut:]
    if rest[:1] in tuple(BLANKS) or not rest:
        return                                  # the next line's leading blanks are dropped by the format
    text = f"{escape(key, True)} = {escaped[:cut]}\\\n{indent}{rest}\n"
    assert parse_properties(text) == {key: value}


@given(text=st.text(max_size=120))
def test_any_text_reads_as_a_dict_or_a_properties_error(text):
    try:
        result = parse_properties(text)
    except PropertiesError as exc:
        assert str(exc).startswith("line ")
    else:
        assert isinstance(result, dict) and all(isinstance(k, str) and k for k in result)
