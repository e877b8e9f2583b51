#!/usr/bin/env bash
# Second issue-7 GPU call: decode timing at 8k context (teacher vs an in-process MQA merge), the
# `--train attn` variant of `convert gqa --kv-heads 1 --steps 1000`, passkey at 4k for the teacher and
# that model. Writes logs/JSON under $OUT. Expects the GGUF at ${GGUF:-/root/smollm2.gguf}.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
gguf=${GGUF:-/root/smollm2.gguf}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv,noheader | tee "$out/gpu.txt"
timeout "${DECODE_TIMEOUT:-90}" python3 benchmarks/gqa_decode.py --teacher "$gguf" --merged auto:1 --context 8192 \
  --new-tokens 64 --batches 1,16 --json "$out/decode.json" 2>&1 | grep -v '━' | tee "$out/decode.log"
start=$(date +%s.%N)
[ "${TRAIN:-attn}" = skip ] || timeout "${GQA_TIMEOUT:-340}" python3 -m attnswap.cli gqa --model "$gguf" --kv-heads 1 --steps 1000 --train "${TRAIN:-attn}" \
  --out /tmp/smollm2-mqa-${TRAIN:-attn} --overwrite --json "$out/gqa_${TRAIN:-attn}.json" 2>&1 | grep -v '━' | tee "$out/gqa_${TRAIN:-attn}.log"
echo "gqa wall seconds: $(python3 -c "print(round($(date +%s.%N) - $start, 1))")" | tee -a "$out/gqa_${TRAIN:-attn}.log"
models="$gguf"
test -f /tmp/smollm2-mqa-${TRAIN:-attn}/config.json && models="$models,/tmp/smollm2-mqa-${TRAIN:-attn}"
timeout "${PASSKEY_TIMEOUT:-100}" python3 benchmarks/gqa_passkey.py --models "$models" --length 4096 --samples "${PASSKEY_SAMPLES:-4}" \
  --json "$out/passkey.json" 2>&1 | grep -v '━' | tee "$out/passkey.log"
