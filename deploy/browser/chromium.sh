#!/usr/bin/env bash
# The headless browser the dashboard's tests drive (tests/e2e/test_dashboard.py, through Playwright): Debian's
# chromium, installed with apt-get when it is missing. Playwright's own browser downloads are not used: the
# project installs only from PyPI and the distribution's packages.
#
#   deploy/browser/chromium.sh    install chromium if it is missing; print its path
#
# Exit code 77: this machine cannot have it (not root, or no apt-get): the tests skip with the reason.
set -euo pipefail

CHROMIUM=${CONTINUUM_CHROMIUM:-/usr/bin/chromium}

cannot() { echo "chromium: $*" >&2; exit 77; }

if [ ! -x "$CHROMIUM" ]; then
  [ "$(id -u)" = 0 ] || cannot "$CHROMIUM is not installed and installing it needs root"
  command -v apt-get >/dev/null || cannot "$CHROMIUM is not installed and there is no apt-get"
  log="${TMPDIR:-/tmp}/continuum-chromium-apt.log"
  echo "chromium: installing chromium (Debian package)..." >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >"$log" 2>&1 \
    || { apt-get update -q >>"$log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
         --no-install-recommends chromium >>"$log" 2>&1; } \
    || cannot "apt-get install failed: see $log"
  [ -x "$CHROMIUM" ] || cannot "apt-get installed chromium, but not at $CHROMIUM"
fi
echo "$CHROMIUM"
