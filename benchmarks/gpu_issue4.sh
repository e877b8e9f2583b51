#!/usr/bin/env bash
# Issue 3/4/7 GPU session, in phases (one lent-GPU call each; see docs/BENCHMARKS.md):
#   train  lolcats and lizard `convert linearize --steps 1000` side by side (checkpoint every 100 steps;
#          a rerun resumes), plus the CUDA kernel/graph tests and the Triton-vs-PyTorch logits check
#   evals  recall (passkey 1k-8k, MQAR) and perplexity of both against the teacher; generation speed and
#          memory at 2k/8k/32k (CUDA graphs, eager, compiled)
#   gqa    `convert gqa --kv-heads 1 --steps 1000 --train all`, passkey at 4k, decode at 8k
#   kernels benchmarks/kernels.py
# Expects the GGUF at ${GGUF:-/root/smollm2.gguf}; writes under $OUT.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
gguf=${GGUF:-/root/smollm2.gguf}
runs=${RUNS:-/root/runs}
mkdir -p "$runs"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv,noheader | tee -a "$out/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$out/gpu.txt"
clean() { grep -v '━' | grep -v '^\s*$'; }

train_one() {  # name, extra args...
  local name=$1; shift
  local ck="$runs/ck-$name" resume=()
  [ -f "$runs/$name/config.json" ] && { echo "$name: done already"; return; }
  [ -d "$ck" ] && resume=(--resume)
  local start; start=$(date +%s.%N)
  timeout -s INT "${TRAIN_TIMEOUT:-540}" python3 -m attnswap.cli linearize --model "$gguf" --steps 1000 --out "$runs/$name" \
    --overwrite --save-every 100 --checkpoint-dir "$ck" "${resume[@]}" --json "$out/$name.json" "$@" 2>&1 | clean > "$out/$name.log"
  echo "$name: exit ${PIPESTATUS[0]}, $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s this call" | tee -a "$out/$name.log"
}

case "${1:-train}" in
train)
  train_one lolcats &
  train_one lizard --attention lizard &
  sleep 60  # let both start, then the short GPU checks beside them
  python3 -m pytest -q -p no:cacheprovider tests/test_decode_graph.py tests/kernels -k "cuda" 2>&1 | tail -25 | tee "$out/cuda_tests.txt"
  python3 benchmarks/gpu_paths.py --model "$gguf" --lengths 1024,4096 2>&1 | tee "$out/paths.txt"
  wait
  ls "$runs" | tee "$out/runs.txt"
  ;;
evals)
  for name in lolcats lizard; do
    test -f "$runs/$name/config.json" || { echo "$name: not trained"; continue; }
    timeout 120 python3 benchmarks/decode_paths.py "$runs/$name" 2048 32 2>&1 | clean | tee -a "$out/decode_paths.txt"
  done
  base=(--baseline "$gguf")
  for name in lolcats lizard; do
    test -f "$runs/$name/config.json" || continue
    timeout "${EVAL_TIMEOUT:-150}" python3 -m attnswap.cli eval "$runs/$name" "${base[@]}" --tasks ppl,passkey,mqar \
      --lengths 1024,2048,4096,8192 --samples "${SAMPLES:-10}" --report-dir "$out/eval-$name" 2>&1 | clean | tail -40 | tee "$out/eval-$name.log"
    [ -f "$out/eval-$name/report.json" ] && base=(--baseline-report "$out/eval-$name/report.json")
  done
  models=()
  for name in lolcats lizard; do test -f "$runs/$name/config.json" && models+=(--model "$runs/$name"); done
  timeout "${GEN_TIMEOUT:-200}" python3 benchmarks/generation.py "${models[@]}" --baseline "$gguf" --lengths 2048,8192,32768 \
    --new-tokens 64 --repeats 3 --modes "${MODES:-auto,off,compile}" --json "$out/generation.json" 2>&1 | clean | tee "$out/generation.txt"
  timeout 120 python3 benchmarks/generation_memory.py "${models[@]}" --baseline "$gguf" --lengths 1024,32768 --prefill-chunk 1024 \
    --json "$out/generation_memory.json" 2>&1 | clean | tee "$out/generation_memory.txt"
  ;;
gqa)
  TRAIN=${TRAIN:-all} GQA_TIMEOUT=${GQA_TIMEOUT:-400} bash benchmarks/gqa_gpu_final.sh
  ;;
kernels)
  timeout 400 python3 benchmarks/kernels.py 2>&1 | tee "$out/kernels.txt"
  ;;
speed)  # decode paths on short conversions (tokens/s does not depend on the trained values)
  for m in lolcats lizard; do
    [ -f "$runs/fast-$m/config.json" ] || python3 -m attnswap.cli linearize --model "$gguf" --attention $m --steps 4 --seq-len 256 \
      --batch-size 2 --eval-tokens 2048 --out "$runs/fast-$m" --overwrite 2>&1 | clean | tail -2
    timeout 150 python3 benchmarks/decode_paths.py "$runs/fast-$m" 2048 32 2>&1 | grep "vs eager" | tee -a "$out/decode_paths.txt"
  done
  timeout "${GEN_TIMEOUT:-300}" python3 benchmarks/generation.py --model "$runs/fast-lolcats" --model "$runs/fast-lizard" --baseline "$gguf" \
    --lengths 2048,8192,32768 --new-tokens 64 --repeats 3 --modes "${MODES:-auto,compile}" --json "$out/generation.json" 2>&1 | clean | grep -v Warn | tee "$out/generation.txt"
  ;;
triton)  # is the Triton/PyTorch gap on SmolLM2 a kernel error or bf16 noise amplified by 30 layers?
  python3 benchmarks/gpu_paths.py --model "$gguf" --lengths 1024 2>&1 | tee "$out/paths32.txt"
  ATTNSWAP_ERRLOG="$out/errs.tsv" timeout 300 python3 -m pytest -q -p no:cacheprovider tests/kernels -k "cuda and hybrid" --tb=line 2>&1 | tail -15 | tee "$out/kernel_tests.txt"
  ;;
esac
