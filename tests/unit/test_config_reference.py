"""docs/config-keys.md is exactly what the generator prints from the defaults table now."""
from pathlib import Path

from qvd_gevent.config.defaults import DEFAULTS
from qvd_gevent.config.reference import COMMAND, render

PAGE = Path(__file__).resolve().parents[2] / "docs" / "config-keys.md"


def test_config_key_page_is_current():
    assert PAGE.read_text(encoding="utf-8") == render(), (
        f"docs/config-keys.md is not what the defaults table gives now; regenerate it: {COMMAND}")


def test_every_key_is_on_the_page_once_with_its_default_and_file_only_flag():
    rows = {line.split("|")[1].strip().strip("`"): line for line in render().splitlines()
            if line.startswith("| `")}
    assert sorted(rows) == sorted(DEFAULTS)
    assert "| `nodename` | *(required)* | str | yes |" in rows["nodename"]
    assert "| `l7r.port` | `8443` | int | no | QVD |" in rows["l7r.port"]
    assert "| `l7r.timeout.request` | `30` | int | no | ours |" in rows["l7r.timeout.request"]
