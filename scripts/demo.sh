#!/usr/bin/env bash
# Set up and run the main job: the whole pipeline, offline, on the demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mmsae demo "$@"
