#!/usr/bin/env bash
# The one-command demo: installs the package (no system packages needed) into .venv and
# starts `qvd-node demo`. Extra arguments go to the demo, e.g. --port 9443 --dir /tmp/d.
set -euo pipefail
cd "$(dirname "$0")/.."
if python3 -c "import ensurepip, venv" 2>/dev/null; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check .
  export PATH="$PWD/.venv/bin:$PATH"
  exec .venv/bin/qvd-node demo "$@"
fi
# No venv module (Debian without python3-venv): a per-user install instead.
python3 -m pip install -q --user --disable-pip-version-check . 2>/dev/null \
  || python3 -m pip install -q --user --break-system-packages --disable-pip-version-check .
export PATH="$HOME/.local/bin:$PATH"
exec qvd-node demo "$@"
