#!/usr/bin/env bash
# After benchmarks/gpu_variants.sh made /tmp/v-*: generation speed/memory vs context for each
# converted model and the teacher, and the Triton-vs-PyTorch logits check.
set -uo pipefail
out=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
models=()
for d in /tmp/v-*; do [ -f "$d/config.json" ] && models+=(--model "$d"); done
python3 benchmarks/generation.py "${models[@]}" --baseline "${GGUF:-/root/smollm2.gguf}" \
  --lengths "${LENGTHS:-2048,8192,32768}" --new-tokens 32 --repeats 2 --json "$out/generation.json" 2>&1 | tee "$out/generation.txt"
python3 benchmarks/gpu_paths.py --model "${GGUF:-/root/smollm2.gguf}" --lengths 1024,4096 2>&1 | tee "$out/paths.txt"
