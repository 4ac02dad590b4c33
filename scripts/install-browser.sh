#!/usr/bin/env bash
# Best effort: install Debian's `chromium` (headless) when no Chromium is on PATH and apt is there, so the
# test that renders `mifa report` in a real browser (tests/test_report.py) runs instead of skipping.
# Never fails the setup: without a browser that one test skips and says why.
set -u
for b in chromium chromium-browser google-chrome google-chrome-stable chrome headless_shell; do
  if command -v "$b" >/dev/null 2>&1; then exit 0; fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "no Chromium and no apt-get: the report's browser test will skip" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "no Chromium, and apt-get needs root: run 'sudo apt-get install -y chromium' for the report's browser test" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
($SUDO apt-get install -y -q chromium || ($SUDO apt-get update -q && $SUDO apt-get install -y -q chromium)) >/dev/null \
  || echo "could not install chromium: the report's browser test will skip" >&2
exit 0
