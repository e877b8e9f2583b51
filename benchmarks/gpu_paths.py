"""On a GPU: the converted model's logits through the Triton kernels vs the PyTorch path (issue 3's
wiring check). Usage: python benchmarks/gpu_paths.py MODEL_DIR [LENGTH]"""

import sys

import torch

import attnswap  # noqa: F401
from attnswap.kernels import force_backend
from transformers import AutoModelForCausalLM

path = sys.argv[1]
L = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
ids = torch.randint(100, 40000, (2, L), generator=torch.Generator().manual_seed(0)).cuda()
with torch.no_grad():
    with force_backend("torch"):
        ref = m(ids).logits.float()
    with force_backend("triton"):
        tri = m(ids).logits.float()
err = (tri - ref).abs().max().item()
rel = err / ref.abs().max().item()
agree = (tri.argmax(-1) == ref.argmax(-1)).float().mean().item()
print(f"{path} L={L}: max |triton - torch| = {err:.4g} (relative to max |logit| {rel:.3g}); "
      f"top-1 agreement {agree:.4f}")
