#!/usr/bin/env bash
# Create bench/.venv-sparsify: a separate environment holding eai-sparsify for bench_sae.py's
# comparison (kept out of the main venv). CPU torch is pinned and installed first so that
# sparsify's bare `torch` requirement does not pull a multi-gigabyte CUDA build.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-sparsify"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q eai-sparsify
"$venv/bin/python" -c "import sparsify, torch; print('sparsify ready, torch', torch.__version__)"
