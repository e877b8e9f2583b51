#!/usr/bin/env bash
# The test suite: kernels under the Triton interpreter, conversion on tiny configs, the CLI, and a few
# end-to-end runs on the real SmolLM2; on the newest transformers pip resolves. Then the transformers
# contract tests (`-m compat`: generation, the decode step, the seam) again on the oldest supported
# transformers (5.17.0, the GPU image's), from an overlay in .venv/oldest-transformers.
# Extra arguments go to the first pytest run only, and skip the second. Tests run in one pytest-xdist
# worker per core (ATTNSWAP_TEST_WORKERS overrides; 0 runs them in this process), each with one
# intra-op thread: most tests are small and Python-bound, so workers beat threads.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
workers=${ATTNSWAP_TEST_WORKERS:-$(nproc)}
par=()
# What several tests read and costs tens of seconds is built once per run for all workers
# (tests/conftest.py: built_once).
if [ "$workers" -gt 1 ]; then par=(-n "$workers"); export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
python -m pytest -q -p no:cacheprovider --durations=15 "${par[@]}" "$@"
if [ $# -eq 0 ]; then
  bash scripts/setup-oldest.sh
  echo "--- the transformers contract on transformers $(PYTHONPATH=.venv/oldest-transformers python -c 'import transformers; print(transformers.__version__)')"
  PYTHONPATH=.venv/oldest-transformers python -m pytest -q -p no:cacheprovider "${par[@]}" -m compat
fi
