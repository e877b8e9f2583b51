#!/usr/bin/env bash
# The test suite: kernels under the Triton interpreter, conversion on tiny configs, the CLI,
# and one end-to-end run on the real SmolLM2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q -p no:cacheprovider "$@"
