#!/usr/bin/env bash
# Refreshes the packaged copy of noVNC (src/qvd_gevent/l7r/webclient/novnc) from the npm
# registry: the library only (core/, vendor/pako), unmodified, with its licence files.
# The browser client loads nothing from another site, so pip and the pex carry this copy.
# Usage: bash scripts/vendor-novnc.sh [VERSION]   (then commit the folder and VERSION)
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-1.7.0}"
dest=src/qvd_gevent/l7r/webclient/novnc
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "@novnc/novnc@$version" >/dev/null && tar xzf novnc-novnc-"$version".tgz)
rm -rf "$dest"
mkdir -p "$dest/docs"
cp -r "$work/package/core" "$work/package/vendor" "$dest/"
cp "$work/package/LICENSE.txt" "$work/package/AUTHORS" "$dest/"
cp "$work/package/docs/"LICENSE.* "$dest/docs/"
echo "$version" > "$dest/VERSION"
echo "noVNC $version in $dest"
