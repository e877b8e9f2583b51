"""On a GPU: converted SmolLM2 logits through the Triton kernels vs the PyTorch path (issue 3's wiring
check), each against the PyTorch path in fp32, so bf16 rounding and kernel faults can be told apart.

    python benchmarks/gpu_paths.py --model /root/smollm2.gguf            # fresh conversion: no sinks, perturbed maps
    python benchmarks/gpu_paths.py --model runs/x --saved                 # a saved converted model (must have no sinks)
"""

import argparse

import torch

import attnswap  # noqa: F401
from attnswap import loading
from attnswap.convert import convert_model
from attnswap.convert.swap import make_swap
from attnswap.kernels import force_backend


def load(path: str, saved: bool, dtype):
    m, _ = loading.load_model(loading.resolve(path), dtype=dtype, device=torch.device("cuda"))
    if not saved:  # window 64 without sinks (the Triton hybrid kernel has none), maps moved off the identity
        convert_model(m, [make_swap("lolcats", list(range(m.config.num_hidden_layers)), {"window": 64, "sinks": 0},
                                    m.config)], path)
        torch.manual_seed(0)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "feature_map" in n:
                    p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/root/smollm2.gguf")
    ap.add_argument("--saved", action="store_true", help="--model is a converted model; do not convert")
    ap.add_argument("--lengths", default="1024")
    a = ap.parse_args()
    for L in (int(x) for x in a.lengths.split(",")):
        ids = torch.randint(100, 40000, (2, L), generator=torch.Generator().manual_seed(L)).cuda()
        res = {}
        for dt in (torch.float32, torch.bfloat16):
            m = load(a.model, a.saved, dt)
            for b in ("torch", "triton"):
                with torch.no_grad(), force_backend(b):
                    res[(dt, b)] = m(ids).logits.float()
            del m
        ref = res[(torch.float32, "torch")]
        for (dt, b), x in res.items():
            err = (x - ref).abs().max().item()
            print(f"L={L} {str(dt)[6:]:9s} {b:6s} vs fp32 torch: max|diff| {err:.4g} (rel {err / ref.abs().max().item():.3g}), "
                  f"top-1 {(x.argmax(-1) == ref.argmax(-1)).float().mean().item():.4f}")


if __name__ == "__main__":
    main()
