#!/usr/bin/env bash
# Install what tests/test_browser.py needs: Debian's chromium and the Python playwright package
# (which drives that chromium through executable_path, so no browser is downloaded). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
PYTHON=${PYTHON:-.venv/bin/python}
if ! "$PYTHON" -c "import playwright.sync_api" 2>/dev/null; then
  "$PYTHON" -m pip --disable-pip-version-check -q install "playwright>=1.40"
fi
