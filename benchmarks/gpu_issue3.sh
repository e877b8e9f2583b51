#!/usr/bin/env bash
# Issue 3 on the lent GPU, in phases (one call each; docs/BENCHMARKS.md has the figures):
#   tests  the CUDA (bf16) kernel tests, five files side by side, errors logged to $OUT/errs.tsv;
#          then benchmarks/kernels.py --sweep (tuning knobs, forward at 16k/64k)
#   table  benchmarks/kernels.py (ours vs SDPA vs fla, decode steps)
#   model  benchmarks/gpu_paths.py: converted SmolLM2 (lolcats, lizard) logits on both paths and
#          their forward / forward+backward time at 4k and 16k (needs the GGUF at $GGUF)
# Needs the fla wheels and einops installed (python3 -m pip install --no-deps .gpu/w/*.whl).
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv,noheader | tee -a "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$out/gpu.txt"
case "${1:-tests}" in
tests)
  for f in linear_attn hybrid_attn gated_attn segments dispatch; do
    ATTNSWAP_ERRLOG="$out/errs.tsv" timeout 330 python3 -m pytest -q -p no:cacheprovider "tests/kernels/test_$f.py" \
      -k cuda --tb=line > "$out/t_$f.txt" 2>&1 &
  done
  wait
  tail -n 3 "$out"/t_*.txt > "$out/kernel_tests.txt"; cat "$out/kernel_tests.txt"
  timeout "${SWEEP_TIMEOUT:-200}" python3 benchmarks/kernels.py --sweep 2>&1 | tee "$out/sweep.txt"
  ;;
table)
  timeout 560 python3 benchmarks/kernels.py 2>&1 | grep -v "^# row" | tee "$out/kernels.txt"
  ;;
model)
  timeout 560 python3 benchmarks/gpu_paths.py --model "${GGUF:-/root/smollm2.gguf}" --lengths 1024 --speed 4096,16384 2>&1 \
    | grep -v Warn | tee "$out/paths.txt"
  ;;
esac
