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
python3 - <<'PY' 2>&1 | tee "$out/paths.txt"
# Triton vs PyTorch on a freshly converted SmolLM2 (no sinks: the Triton hybrid kernel has none)
import os, torch, attnswap
from attnswap import loading
from attnswap.convert import convert_model
from attnswap.convert.swap import make_swap
from attnswap.kernels import force_backend
m, tok = loading.load_model(loading.resolve(os.environ.get("GGUF", "/root/smollm2.gguf")), dtype=torch.bfloat16, device="cuda")
convert_model(m, [make_swap("lolcats", list(range(30)), {"window": 64}, m.config)], "smollm2")
torch.manual_seed(0)
with torch.no_grad():
    for n, p in m.named_parameters():
        if "feature_map" in n:
            p.add_(0.05 * torch.randn_like(p))
for L in (1024, 4096):
    ids = torch.randint(100, 40000, (2, L), generator=torch.Generator().manual_seed(L)).cuda()
    with torch.no_grad():
        with force_backend("torch"):
            ref = m(ids).logits.float()
        with force_backend("triton"):
            tri = m(ids).logits.float()
    err = (tri - ref).abs().max().item()
    print(f"L={L}: max|triton-torch| {err:.4g}, relative {err / ref.abs().max().item():.3g}, "
          f"top-1 agreement {(tri.argmax(-1) == ref.argmax(-1)).float().mean().item():.4f}")
PY
