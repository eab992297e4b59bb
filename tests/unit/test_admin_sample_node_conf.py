"""etc/node.conf, the commented sample: it parses, and every key it shows is real with its true default."""
import pathlib
import re

from qvd_gevent.config import DEFAULTS, Config

SAMPLE = pathlib.Path(__file__).resolve().parents[2] / "etc" / "node.conf"


def _shown(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_sample_parses_with_the_mandatory_keys():
    cfg = Config.load(str(SAMPLE))
    assert set(cfg.file_values) == {"nodename", "database.host", "database.name", "database.user",
                                    "database.password"}
    assert cfg.get("nodename") == "node1"


def test_commented_keys_show_their_defaults():
    shown = re.findall(r"^#([a-z][\w.\-]+) = ?(.*)$", SAMPLE.read_text(), re.MULTILINE)
    assert len(shown) > 30
    for key, value in shown:
        assert key in DEFAULTS, f"{key} is not in the defaults table"
        assert value == _shown(DEFAULTS[key].default), f"{key}: sample says {value!r}"
