#!/usr/bin/env bash
# The issue-2 measurement on a lent GPU: `convert linearize --steps 1000` on SmolLM2 with its wall
# time, then the saved model reloaded and generating. Writes report.json and log.txt under $OUT.
# Expects the GGUF at ${GGUF:-/root/smollm2.gguf} (see DEVELOPERS.md for staging it).
set -euo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
gguf=${GGUF:-/root/smollm2.gguf}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
start=$(date +%s.%N)
python3 -m attnswap.cli linearize --model "$gguf" --steps "${STEPS:-1000}" --out /tmp/smollm2-linear --overwrite \
  --json "$out/report.json" "$@" 2>&1 | tee "$out/log.txt"
end=$(date +%s.%N)
echo "linearize wall seconds: $(python3 -c "print(round($end - $start, 1))")" | tee -a "$out/log.txt"
python3 - <<'PY' 2>&1 | tee -a "$out/log.txt"
import attnswap, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained("/tmp/smollm2-linear", dtype=torch.bfloat16).cuda()
tok = AutoTokenizer.from_pretrained("/tmp/smollm2-linear")
ids = tok("The Python programming language is", return_tensors="pt").to("cuda")
print("generate:", tok.decode(m.generate(**ids, max_new_tokens=30, do_sample=False)[0]))
PY
