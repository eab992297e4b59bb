"""tox's lint environment, run by the suite too so CI keeps the tree clean."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff")
    if not ruff:
        pytest.skip("ruff is not installed (it is in the `test` extra: pip install -e '.[test]')")
    run = subprocess.run([ruff, "check", "src", "tests", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
