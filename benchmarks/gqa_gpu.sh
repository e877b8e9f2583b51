#!/usr/bin/env bash
# The issue-7 measurement on a lent GPU: `convert gqa --kv-heads 1 --steps 1000` on SmolLM2, the
# perplexity right after merging for every merge variant, and 8k-context decode timing.
# Writes gqa.json, merges.json, decode.json and logs under $OUT. Expects the GGUF at ${GGUF:-/root/smollm2.gguf}.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
gguf=${GGUF:-/root/smollm2.gguf}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"
start=$(date +%s.%N)
timeout "${GQA_TIMEOUT:-330}" python3 -m attnswap.cli gqa --model "$gguf" --kv-heads 1 --steps "${STEPS:-1000}" \
  --out /tmp/smollm2-mqa --overwrite --json "$out/gqa.json" "$@" 2>&1 | grep -v '━' | tee "$out/gqa.log"
end=$(date +%s.%N)
echo "gqa wall seconds: $(python3 -c "print(round($end - $start, 1))")" | tee -a "$out/gqa.log"
timeout "${MERGES_TIMEOUT:-110}" python3 benchmarks/gqa_merges.py --model "$gguf" --kv-heads 1 --json "$out/merges.json" \
  --save /tmp/smollm2-mqa-untrained 2>&1 | grep -v '━' | tee "$out/merges.log"
merged=/tmp/smollm2-mqa
test -f "$merged/config.json" || merged=/tmp/smollm2-mqa-untrained
timeout "${DECODE_TIMEOUT:-90}" python3 benchmarks/gqa_decode.py --teacher "$gguf" --merged "$merged" --context 8192 \
  --new-tokens 128 --batches 1,16 --json "$out/decode.json" 2>&1 | tee "$out/decode.log"
python3 - "$merged" <<'PY' 2>&1 | tee -a "$out/decode.log"
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).cuda()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok("The Python programming language is", return_tensors="pt").to("cuda")
print("kv heads", m.config.num_key_value_heads, "generate:", tok.decode(m.generate(**ids, max_new_tokens=30, do_sample=False)[0]))
PY
