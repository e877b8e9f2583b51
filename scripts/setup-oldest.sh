#!/usr/bin/env bash
# Idempotent: the oldest supported transformers (5.17.0) and the huggingface-hub it needs, as an overlay
# on .venv (PYTHONPATH=.venv/oldest-transformers); everything else comes from .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
dir=.venv/oldest-transformers
want="transformers==5.17.0 huggingface-hub==1.33.0"
if [ "$(cat "$dir/.stamp" 2>/dev/null)" != "$want" ]; then
  rm -rf "$dir"
  quiet() { "$@" 2>&1 | grep -vE "^WARNING: (Location|Target directory)|^\s*$" || true; }
  quiet python -m pip install -q --no-deps --target "$dir" $want
  quiet python -m pip install -q --target "$dir" httpx  # huggingface-hub 1.x talks httpx
  PYTHONPATH=$dir python -c "import transformers, sys; sys.exit(transformers.__version__ != '5.17.0')"
  echo "$want" > "$dir/.stamp"
fi
