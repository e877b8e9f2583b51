#!/usr/bin/env bash
# The test suite: kernels under the Triton interpreter, conversion on tiny configs, the CLI, and a few
# end-to-end runs on the real SmolLM2; on the newest transformers pip resolves. Then the transformers
# contract tests (`-m compat`: generation, the decode step, the seam) again on the oldest supported
# transformers (5.17.0, the GPU image's), from an overlay in .venv/oldest-transformers.
# Extra arguments go to the first pytest run only, and skip the second.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
if [ $# -eq 0 ]; then
  bash scripts/setup-oldest.sh
  echo "--- the transformers contract on transformers $(PYTHONPATH=.venv/oldest-transformers python -c 'import transformers; print(transformers.__version__)')"
  PYTHONPATH=.venv/oldest-transformers python -m pytest -q -p no:cacheprovider -m compat
fi
