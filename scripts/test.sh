#!/usr/bin/env bash
# Set up and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_browser.sh  # Debian chromium for the real-browser test
exec .venv/bin/python -m pytest "$@"
