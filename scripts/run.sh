#!/usr/bin/env bash
# The main job on the embedded default model, sized for a 2-core CPU (about 6 minutes with set-up):
# linearize SmolLM2-135M-Instruct with LoLCATs attention, distil briefly on a 256 K-token slice of --data
# general (tokenised once, then cached), save, report in-domain and out-of-domain perplexity.
# Extra arguments go to `convert linearize` (e.g. --steps 1000 --seq-len 1024 on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# --window 128: half of the CPU job's 256-token rows (the default, 256, would cover them whole and leave
# the linear part untrained)
exec convert linearize --model llama --steps 40 --seq-len 256 --batch-size 2 --window 128 --eval-tokens 8192 \
  --out runs/smollm2-linear --overwrite "$@"
