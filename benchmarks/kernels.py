"""Kernel benchmark: median ms (triton.testing.do_bench), bf16, B=1.

    python benchmarks/kernels.py            # full table (H100: a few minutes)
    python benchmarks/kernels.py --quick    # 4k only

Rows: (shape, L). Shapes: "32h" = 32 query/KV heads, head dim 128, feature dim 128;
"smollm2" = 9 query heads, 3 KV heads, head dim 64, feature dim 128 (fla gets KV expanded to 9 heads;
fla's chunk_linear_attn needs dk == dv so it runs with feature dim = head dim there).
Columns: ours (linear, gated, hybrid window 64), torch SDPA causal (flash), fla chunk_linear_attn and
chunk_simple_gla when fla is importable; forward (f) and forward+backward (fb). Then decode-step
latency at 1k vs 128k context.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F_
from triton.testing import do_bench

from attnswap.kernels.gated_attn.chunk import triton_gated_linear_attn
from attnswap.kernels.hybrid_attn.chunk import triton_hybrid_attn
from attnswap.kernels.hybrid_attn.fused_recurrent import fused_recurrent_hybrid_step
from attnswap.kernels.hybrid_attn.naive import hybrid_cache_from_prefill
from attnswap.kernels.linear_attn.chunk import triton_linear_attn
from attnswap.kernels.linear_attn.fused_recurrent import fused_recurrent_linear_step

try:
    # load fla.ops without fla/__init__ (which pulls in fla.layers -> transformers, a circular import
    # with recent transformers); fla.ops reads fla.__version__, so the stand-in carries it. fla.ops
    # also needs einops.
    import importlib.metadata
    import importlib.util
    import sys
    import types

    _spec = importlib.util.find_spec("fla")
    if _spec is not None and "fla" not in sys.modules:
        _m = types.ModuleType("fla")
        _m.__path__ = list(_spec.submodule_search_locations)
        _m.__version__ = importlib.metadata.version("fla-core")
        sys.modules["fla"] = _m
    from fla.ops.linear_attn import chunk_linear_attn as fla_linear
    from fla.ops.simple_gla import chunk_simple_gla as fla_gla
except Exception as e:  # noqa: BLE001
    print(f"# fla not importable ({type(e).__name__}: {e}); fla columns skipped")
    fla_linear = fla_gla = None

SHAPES = {"32h": dict(H=32, Hk=32, D=128, F=128), "smollm2": dict(H=9, Hk=3, D=64, F=128)}
DT = torch.bfloat16
dev = "cuda"


def bench(fn, grad_of=None):
    """(fwd ms, fwd+bwd ms)."""
    import sys, time
    t0 = time.time()
    f = do_bench(lambda: fn(), warmup=10, rep=50, return_mode="median")
    print(f"#   fwd {f:.3f} ms (bench {time.time() - t0:.1f}s)", file=sys.stderr, flush=True)
    if grad_of is None:
        return f, None

    def fb():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(do_cache.setdefault(out.shape, torch.randn_like(out)))
        for t in grad_of:
            t.grad = None

    do_cache = {}
    return f, do_bench(fb, warmup=10, rep=50, return_mode="median")


def row(name, L):
    s = SHAPES[name]
    H, Hk, D, F = s["H"], s["Hk"], s["D"], s["F"]
    r = lambda *sh, pos=False: ((torch.rand(*sh, device=dev) if pos else torch.randn(*sh, device=dev)) * (1 if pos else 0.5)).to(DT).requires_grad_()  # noqa: E731
    fq, fk, v = r(1, L, H, F, pos=True), r(1, L, Hk, F, pos=True), r(1, L, Hk, D)
    q, k = r(1, L, H, D), r(1, L, Hk, D)
    g = (-torch.rand(1, L, Hk, device=dev) * 0.05).requires_grad_()
    gamma = torch.full((H,), 0.5, device=dev, dtype=DT, requires_grad=True)
    res = {}
    print(f"# row {name} L={L}", file=__import__("sys").stderr, flush=True)
    res["lin"] = bench(lambda: triton_linear_attn(fq, fk, v)[0], [fq, fk, v])
    res["gated"] = bench(lambda: triton_gated_linear_attn(fq, fk, v, g)[0], [fq, fk, v, g])
    res["hyb64"] = bench(lambda: triton_hybrid_attn(q, k, v, fq, fk, gamma, window=64, scale=D**-0.5), [q, k, v, fq, fk, gamma])
    G = H // Hk
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    res["sdpa"] = bench(lambda: F_.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=G > 1), [qt, kt, vt])
    if fla_linear is not None:
        ke, ve = (x.detach().repeat_interleave(G, 2).contiguous().requires_grad_() for x in (fk, v))
        qf = fq.detach().clone().requires_grad_()
        if F != D:  # fla's linear attention wants dk == dv
            qf, ke = (x.detach()[..., :D].contiguous().requires_grad_() for x in (qf, ke))
        ge = g.detach().repeat_interleave(G, 2).contiguous().requires_grad_()
        try:
            res["fla_lin"] = bench(lambda: fla_linear(qf, ke, ve, normalize=True)[0], [qf, ke, ve])
        except Exception as e:  # noqa: BLE001
            print(f"# fla linear failed: {e}")
        try:
            qg, kg = (fq.detach().clone().requires_grad_(), fk.detach().repeat_interleave(G, 2).contiguous().requires_grad_())
            res["fla_gla"] = bench(lambda: fla_gla(qg, kg, ve, g=ge)[0], [qg, kg, ve, ge])
        except Exception as e:  # noqa: BLE001
            print(f"# fla simple_gla failed: {e}")
    return res


def fmt(x):
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def decode(name):
    s = SHAPES[name]
    H, Hk, D, F = s["H"], s["Hk"], s["D"], s["F"]
    out = []
    for ctx in (1024, 131072):
        fk = torch.rand(1, ctx, Hk, F, device=dev, dtype=DT)
        k, v = torch.randn(1, ctx, Hk, D, device=dev, dtype=DT), torch.randn(1, ctx, Hk, D, device=dev, dtype=DT)
        _, st = triton_linear_attn(torch.rand(1, ctx, H, F, device=dev, dtype=DT), fk, v, output_final_state=True)
        cache = hybrid_cache_from_prefill(k, v, fk, 64)
        q1, f1 = torch.randn(1, H, D, device=dev, dtype=DT), torch.rand(1, H, F, device=dev, dtype=DT)
        k1, v1, fk1 = torch.randn(1, Hk, D, device=dev, dtype=DT), torch.randn(1, Hk, D, device=dev, dtype=DT), torch.rand(1, Hk, F, device=dev, dtype=DT)
        gamma = torch.full((H,), 0.5, device=dev, dtype=DT)
        t_lin = do_bench(lambda: fused_recurrent_linear_step(f1, fk1, v1, st), warmup=10, rep=50, return_mode="median")
        t_hyb = do_bench(lambda: fused_recurrent_hybrid_step(q1, k1, v1, f1, fk1, gamma, cache, scale=D**-0.5), warmup=10, rep=50, return_mode="median")
        out.append((ctx, t_lin, t_hyb))
        del fk, k, v, st, cache
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    Ls = [4096] if a.quick else [4096, 16384, 65536]
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  bf16  B=1  median ms (f = forward, fb = forward+backward)")
    cols = ["lin", "gated", "hyb64", "sdpa", "fla_lin", "fla_gla"]
    print("| shape | L | " + " | ".join(f"{c} f | {c} fb" for c in cols) + " | lin/fla_lin f | gated/fla_gla f | hyb64/fla_lin f | sdpa/hyb64 f |")
    print("|" + "---|" * (2 + 2 * len(cols) + 4))
    for name in SHAPES:
        for L in Ls:
            res = row(name, L)
            cells = []
            for c in cols:
                f, fb = res.get(c, (None, None))
                cells += [fmt(f), fmt(fb)]
            ratio = lambda a_, b_: "-" if a_ not in res or b_ not in res else f"{res[a_][0] / res[b_][0]:.2f}"  # noqa: E731
            print(f"| {name} | {L // 1024}k | " + " | ".join(cells) + f" | {ratio('lin', 'fla_lin')} | {ratio('gated', 'fla_gla')} | {ratio('hyb64', 'fla_lin')} | {ratio('sdpa', 'hyb64')} |", flush=True)
            torch.cuda.empty_cache()
    print("\n# decode step (one token, B=1), median ms")
    print("| shape | ctx | linear step | hybrid(w64) step |")
    print("|---|---|---|---|")
    for name in SHAPES:
        for ctx, tl_, th in decode(name):
            print(f"| {name} | {ctx // 1024}k | {tl_ * 1e3:.1f} us | {th * 1e3:.1f} us |", flush=True)


if __name__ == "__main__":
    main()
