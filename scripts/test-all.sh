#!/usr/bin/env bash
# Installs everything the tests need (Debian/Ubuntu packages and pip), starts the
# services they use, and runs the whole suite. Needs root (namespaces, bridges, libvirt).
# Usage: sudo bash scripts/test-all.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
bash scripts/start-test-services.sh
python3 -m pytest -p no:cacheprovider -ra "${@:-tests}"
