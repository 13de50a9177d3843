#!/usr/bin/env bash
# Unpack Debian's `prometheus` package into $LORAPLEX_CACHE/prometheus/ for the scrape test
# (tests/loadtest/test_prometheus.py). `apt-get download` + `dpkg -x`: no root, no service, no
# dependencies installed (the binary is static Go; the web UI's JavaScript packages are not needed for
# the HTTP API the test queries). Only the package index has to be reachable. Idempotent.
# Exit status 1 when the binary cannot be had (no apt-get, or the download fails); setup.sh reports it and
# goes on, and the scrape test then fails saying so.
set -euo pipefail

export LORAPLEX_CACHE=${LORAPLEX_CACHE:-$HOME/.cache/loraplex}
DEST="$LORAPLEX_CACHE/prometheus"
BINARY="$DEST/usr/bin/prometheus"

if [ -x "$BINARY" ] && "$BINARY" --version >/dev/null 2>&1; then
  echo "    prometheus: $BINARY ($("$BINARY" --version 2>&1 | head -n1))"
  exit 0
fi
for tool in apt-get dpkg; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "    prometheus: $tool not found; cannot fetch Debian's prometheus package" >&2
    exit 1
  fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt's download sandbox user cannot write into a private temp folder; downloading as ourselves is fine.
(cd "$work" && apt-get download -q -o APT::Sandbox::User="$(id -un)" prometheus)
rm -rf "$DEST.partial"
dpkg -x "$work"/prometheus_*.deb "$DEST.partial"
rm -rf "$DEST"
mv "$DEST.partial" "$DEST"
echo "    prometheus: $BINARY ($("$BINARY" --version 2>&1 | head -n1))"
