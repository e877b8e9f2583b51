"""On a GPU: converted SmolLM2 logits through the Triton kernels vs the PyTorch path (issue 3's wiring
check), each against the PyTorch path in fp32, so bf16 rounding and kernel faults can be told apart.

    python benchmarks/gpu_paths.py --model /root/smollm2.gguf                      # fresh lolcats and lizard conversions
    python benchmarks/gpu_paths.py --model runs/x --saved                           # a saved converted model
    python benchmarks/gpu_paths.py --speed 4096,16384                               # also time both paths (bf16)

A fresh conversion uses each method's default options (lolcats: window 64 and 4 sink tokens; lizard:
window 128 and 4 learned meta tokens), with the feature maps, the gates' projections and the meta
tokens moved off their initial values so that every branch carries weight.
"""

import argparse
import copy

import torch
from triton.testing import do_bench

import attnswap  # noqa: F401
from attnswap import loading
from attnswap.modeling import convert_model
from attnswap.convert.swap import make_swap
from attnswap.kernels import force_backend


def load(path: str, dtype=torch.float32):
    m, _ = loading.load_model(loading.resolve(path), dtype=dtype, device=torch.device("cuda"))
    return m.eval()


def convert(base, method: str | None, path: str):
    if method is None:
        return base
    m = copy.deepcopy(base)
    convert_model(m, [make_swap(method, list(range(m.config.num_hidden_layers)), {}, m.config)], path)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if any(s in n for s in ("feature_map", "meta_", "gate")):
                p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def speed(m, L: int, name: str):
    """Median ms of a bf16 forward (no_grad) and of forward + backward of the decoder (no LM head)."""
    ids = torch.randint(100, 40000, (1, L), generator=torch.Generator().manual_seed(1)).cuda()
    for b in ("torch", "triton"):
        with force_backend(b):
            with torch.no_grad():
                f = do_bench(lambda: m.model(ids), warmup=5, rep=40, return_mode="median")

            def fb():
                m.model(ids).last_hidden_state.float().pow(2).mean().backward()
                m.zero_grad(set_to_none=True)

            t = do_bench(fb, warmup=5, rep=40, return_mode="median")
        print(f"{name} L={L} bf16 {b:6s}: forward {f:.2f} ms, forward+backward {t:.2f} ms", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/root/smollm2.gguf")
    ap.add_argument("--saved", action="store_true", help="--model is a converted model; do not convert")
    ap.add_argument("--attention", default="lolcats,lizard", help="methods to convert to (without --saved)")
    ap.add_argument("--lengths", default="1024")
    ap.add_argument("--speed", default="", help="lengths at which to time both paths")
    a = ap.parse_args()
    base = load(a.model)
    for method in [None] if a.saved else a.attention.split(","):
        name = method or a.model
        m = convert(base, method, a.model)
        for L in (int(x) for x in a.lengths.split(",")):
            ids = torch.randint(100, 40000, (2, L), generator=torch.Generator().manual_seed(L)).cuda()
            res = {}
            for dt in (torch.float32, torch.bfloat16):
                torch.nn.Module.to(m, dt)  # (transformers refuses .to(dtype) on a model loaded from GGUF)
                for b in ("torch", "triton"):
                    with torch.no_grad(), force_backend(b):
                        res[(dt, b)] = m(ids).logits.float()
            torch.nn.Module.to(m, torch.float32)
            ref = res[(torch.float32, "torch")]
            for (dt, b), x in res.items():
                err = (x - ref).abs().max().item()
                print(f"{name} L={L} {str(dt)[6:]:9s} {b:6s} vs fp32 torch: max|diff| {err:.4g} "
                      f"(rel {err / ref.abs().max().item():.3g}), "
                      f"top-1 {(x.argmax(-1) == ref.argmax(-1)).float().mean().item():.4f}", flush=True)
            tb, pb = res[(torch.bfloat16, "triton")], res[(torch.bfloat16, "torch")]
            print(f"{name} L={L} bf16 triton vs bf16 torch: max|diff| {(tb - pb).abs().max().item():.4g}, "
                  f"top-1 {(tb.argmax(-1) == pb.argmax(-1)).float().mean().item():.4f}", flush=True)
            del res
        if a.speed:
            torch.nn.Module.to(m, torch.bfloat16)
            for L in (int(x) for x in a.speed.split(",")):
                speed(m, L, name)
        del m
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
