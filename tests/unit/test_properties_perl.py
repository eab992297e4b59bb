"""node.conf is read as the original reads it: generated files go to our parser and to
Perl's Config::Properties (Debian's libconfig-properties-perl, the module the original QVD
loads node.conf with), and both must give the same keys and values, the same ${key}
expansions, or both refuse the file.

Encodings: a pure ASCII file or one that is not valid UTF-8 is given to Perl exactly as the
original reads it (Latin-1); a valid UTF-8 file with other characters is given to Perl with
`encoding => 'UTF-8'`, because there we deliberately read UTF-8 where the original turns it
into mojibake (src/qvd_gevent/config/properties.py).

CI runs a fixed set of 300 examples per test (seconds). For a longer random search:
QVD_TEST_FUZZ_RANDOM=1 QVD_TEST_FUZZ_EXAMPLES=15000 pytest tests/unit/test_properties_perl.py
(15,000 random examples per test found no disagreement when this test was written).
"""
import json
import os
import pathlib
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qvd_gevent.config import Config, ConfigError
from qvd_gevent.config.properties import PropertiesError, decode_properties, parse_properties

HELPER = pathlib.Path(__file__).resolve().parents[1] / "helpers" / "perl_properties.pl"


@pytest.fixture(scope="module")
def perl(tmp_path_factory):
    if shutil.which("perl") is None or subprocess.run(
            ["perl", "-MConfig::Properties", "-e", "1"], capture_output=True).returncode != 0:
        pytest.skip("Perl's Config::Properties is missing (apt-get install libconfig-properties-perl; "
                    "scripts/install-test-deps.sh installs it)")
    proc = subprocess.Popen(["perl", str(HELPER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    folder = tmp_path_factory.mktemp("properties")
    counter = iter(range(10**9))

    def read(data):
        path = folder / f"{next(counter)}.conf"
        path.write_bytes(data)
        encoding = "UTF-8" if not data.isascii() and _valid_utf8(data) else "latin1"
        proc.stdin.write(f"{encoding}\t{path}\n".encode())
        proc.stdin.flush()
        answer = json.loads(proc.stdout.readline())
        path.unlink()
        return answer

    yield read
    proc.stdin.close()
    proc.wait(timeout=10)


def _valid_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def ours(data):
    try:
        values = parse_properties(decode_properties(data))
    except PropertiesError:
        return {"error": True}
    cfg = Config(values)
    expanded = {}
    for key, value in values.items():
        try:
            expanded[key] = cfg.expand(value, (key,))
        except ConfigError:
            expanded[key] = None
    return {"values": values, "expanded": expanded}


def perls(answer):
    return {"error": True} if "error" in answer else answer


# Characters where the two readings could part: separators, Perl's blanks (and Python's
# extra ones, \x1c), comment marks, escapes, quotes, ${}, non-ASCII letters, a BOM, an
# Arabic-Indic digit (a "digit" to Perl's \d) and an emoji.
_CHARS = list("ab.Z9_-=: \t\f\x0b#!\"'${}utnrF0") + [
    "\\", "\xe9", "\u4e2d", "\U0001f600", "\xa0", "\x85", "\u2003", "\u3000", "\ufeff", "\u0661", "\x1c",
]
_REF_NAMES = ["a", "b", "k.x"]
_fragment = st.one_of(
    st.sampled_from(_CHARS),
    st.sampled_from(_CHARS).map(lambda c: "\\" + c),
    st.text("0123456789abcdefABCDEFg\u0661", min_size=0, max_size=4).map(lambda h: "\\u" + h),
    st.sampled_from(_REF_NAMES + ["{", "", "nope"]).map(lambda n: "${" + n + "}"),
)
_text = st.lists(_fragment, max_size=8).map("".join)
_blanks = st.text(" \t\f\x0b\xa0\u3000", max_size=3)
_key = st.one_of(st.sampled_from(_REF_NAMES), _text)
_separator = st.sampled_from(["=", ":", " ", "\t", "", " = ", "==", ": "])
_property = st.builds(lambda b1, k, b2, s, b3, v, b4: b1 + k + b2 + s + b3 + v + b4,
                      _blanks, _key, _blanks, _separator, _blanks, _text, _blanks)
_comment = st.builds(lambda b, mark, t: b + mark + t, _blanks, st.sampled_from("#!"), _text)
_line = st.one_of(_property, _property, _property, _comment, _blanks, _text)
_continued = st.tuples(_line, st.sampled_from(["", "", "", "\\", "\\\\", "\\\\\\"]))


@st.composite
def properties_files(draw):
    lines = draw(st.lists(_continued, max_size=8))
    text = "\ufeff" if draw(st.booleans()) and draw(st.booleans()) else ""
    for line, tail in lines:
        text += line + tail + draw(st.sampled_from(["\n", "\r\n", "\r"]))
    if lines and draw(st.booleans()):
        text = text.rstrip("\r\n")
    return text


_SETTINGS = settings(max_examples=int(os.environ.get("QVD_TEST_FUZZ_EXAMPLES", "300")), deadline=None,
                     suppress_health_check=[HealthCheck.too_slow],
                     derandomize=os.environ.get("QVD_TEST_FUZZ_RANDOM") is None)


@_SETTINGS
@given(text=properties_files())
def test_utf8_files_read_as_perl_reads_them(perl, text):
    data = text.encode("utf-8")
    assert ours(data) == perls(perl(data)), text


@_SETTINGS
@given(text=properties_files().map(lambda t: "".join(c if ord(c) < 256 else "\xff" for c in t)))
def test_latin1_files_read_exactly_as_the_original_reads_them(perl, text):
    data = text.encode("latin-1")
    assert ours(data) == perls(perl(data)), text


@pytest.mark.parametrize("line, key, value", [
    ("a = C:\\foo\\bar", "a", "C:\\foo\\bar"),          # \f and \b are not escapes
    ("database.password = s3cr\\et\\\\x", "database.password", "s3cr\\et\\x"),
    ("database.password = pa\\ss\\ word  ", "database.password", "pa\\ss word  "),  # trailing blanks kept
    ("key\\ with\\ blanks\\:=v", "key with blanks:", "v"),
    ("u = \\u00e9\\u4E2D\\u12", "u", "\xe9\u4e2d\\u12"),   # a short \u stays as written
    ("spaced   value here", "spaced", "value here"),
    ("a:=b", "a", "=b"),
])
def test_concrete_lines_read_as_perl_reads_them(perl, line, key, value):
    data = (line + "\n").encode()
    assert perls(perl(data))["values"] == {key: value}
    assert parse_properties(decode_properties(data)) == {key: value}


def test_a_key_without_a_separator_is_refused_with_its_line_number(perl):
    data = b"nodename = n1\njustakey\n"
    assert "error" in perl(data)
    with pytest.raises(PropertiesError, match="line 2"):
        parse_properties(decode_properties(data))


def test_node_conf_with_backslashes_loads_and_typed_getters_still_work(tmp_path):
    conf = tmp_path / "node.conf"
    conf.write_text("path.run = /srv/run\\\n    /qvd\nl7r.port = 9443   \nl7r.use_ssl = 1 \n"
                    "database.password = back\\slash\\\\ \nnodename = n1\n"
                    "log.filename = ${{}path.run}\n")
    cfg = Config.load(str(conf))
    assert cfg.get("path.run") == "/srv/run/qvd"
    assert cfg.get("path.l7r.ssl.key") == "/srv/run/qvd/l7r/ssl/key.pem"
    assert cfg.get("l7r.port") == 9443
    assert cfg.get("l7r.use_ssl") is True
    assert cfg.get("database.password") == "back\\slash\\ "
    assert cfg.get("log.filename") == "${path.run}"


def test_a_latin1_node_conf_loads(tmp_path):
    conf = tmp_path / "node.conf"
    conf.write_bytes("nodename = n\xf1\n".encode("latin-1"))
    assert Config.load(str(conf)).get("nodename") == "n\xf1"
