"""Kernel benchmark: median ms (triton.testing.do_bench), bf16, B=1.

    python benchmarks/kernels.py            # full table (H100: a few minutes)
    python benchmarks/kernels.py --quick    # 4k only
    python benchmarks/kernels.py --sweep    # forward under each tuning knob (linear_attn.chunk.TUNING)
    python benchmarks/kernels.py --suite sparse [--lengths 16384,32768] [--no-flex] [--no-decode]

Rows: (shape, L). Shapes: "32h" = 32 query/KV heads, head dim 128, feature dim 128;
"smollm2" = 9 query heads, 3 KV heads, head dim 64, feature dim 128 (fla gets KV expanded to 9 heads;
fla's chunk_linear_attn needs dk == dv so it runs with feature dim = head dim there).
Columns: ours (linear, gated, hybrid window 64, Lizard's gated hybrid window 128 + 4 meta tokens),
torch SDPA causal (flash), fla chunk_linear_attn and chunk_simple_gla when fla is importable; forward
with gradients enabled (f), forward under no_grad (inf: the hybrids then skip what only the backward
needs) and forward+backward (fb). Then decode-step latency at 1k vs 128k context.

``--suite sparse`` (block-sparse attention, issue 15): B=1, 32 query/KV heads, head dim 128, bf16,
L = 16k, 32k, 64k; random causal block masks (one per head, block_sparse.masks.random_block_mask: each
causal block besides the sink and the diagonal kept with the probability that leaves 50/90/95% of the
causal blocks out) of 128-token blocks and of 64 (our default). Columns: our Triton forward from the
index list (idx) and from the boolean mask (mask: the conversion included), FlexAttention compiled with
a BlockMask of the same blocks (block_sparse.masks.flex_block_mask), torch SDPA dense causal (flash
backend), the ratios, and the dense attention + pooled block map kernel (the gate's training target)
once per L and block. Then one decoding step at 32k context, 90% of the blocks skipped per head:
ours vs SDPA over the whole cache (do_bench, and do_bench_cudagraph for launch-free numbers;
SPARSE_DECODE_CTX overrides the 32k context).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F_
import triton
from triton.testing import do_bench

from attnswap.kernels.gated_attn.chunk import triton_gated_hybrid_attn, triton_gated_linear_attn
from attnswap.kernels.hybrid_attn.chunk import triton_hybrid_attn
from attnswap.kernels.hybrid_attn.fused_recurrent import fused_recurrent_hybrid_step
from attnswap.kernels.hybrid_attn.naive import hybrid_cache_from_prefill
from attnswap.kernels.linear_attn.chunk import triton_linear_attn
from attnswap.kernels.linear_attn.fused_recurrent import fused_recurrent_linear_step

try:
    # load fla.ops without running fla/__init__ (it pulls in fla.layers -> transformers, a circular
    # import with recent transformers): an empty package module from fla's own spec, carrying the
    # __version__ that fla.ops reads. fla.ops also needs einops.
    import importlib.metadata
    import importlib.util

    _spec = importlib.util.find_spec("fla")
    if _spec is not None and "fla" not in sys.modules:
        _m = importlib.util.module_from_spec(_spec)
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


def ms(fn):
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def bench(fn, grad_of=None):
    """(forward ms, forward+backward ms); the forward runs with gradients enabled (training)."""
    f = ms(fn)
    if grad_of is None:
        return f, None
    do_cache = {}

    def fb():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(do_cache.setdefault(out.shape, torch.randn_like(out)))
        for t in grad_of:
            t.grad = None

    return f, ms(fb)


def inference(fn):
    with torch.no_grad():
        return ms(fn), None


def inputs(name, L):
    s = SHAPES[name]
    H, Hk, D, F = s["H"], s["Hk"], s["D"], s["F"]

    def r(*sh, pos=False):
        x = torch.rand(*sh, device=dev) if pos else torch.randn(*sh, device=dev) * 0.5
        return x.to(DT).requires_grad_()

    return dict(
        fq=r(1, L, H, F, pos=True), fk=r(1, L, Hk, F, pos=True), v=r(1, L, Hk, D), q=r(1, L, H, D), k=r(1, L, Hk, D),
        g=(-torch.rand(1, L, Hk, device=dev) * 0.05).requires_grad_(),
        gamma=torch.full((H,), 0.5, device=dev, dtype=DT, requires_grad=True),
        meta_k=r(4, Hk, D), meta_v=r(4, Hk, D), H=H, Hk=Hk, D=D, F=F,
    )


def row(name, L):
    x = inputs(name, L)
    fq, fk, v, q, k, g, gamma, H, Hk, D, F = (x[n] for n in ("fq", "fk", "v", "q", "k", "g", "gamma", "H", "Hk", "D", "F"))
    res = {}
    print(f"# row {name} L={L}", file=sys.stderr, flush=True)
    res["lin"] = bench(lambda: triton_linear_attn(fq, fk, v)[0], [fq, fk, v])
    res["gated"] = bench(lambda: triton_gated_linear_attn(fq, fk, v, g)[0], [fq, fk, v, g])
    hyb = lambda: triton_hybrid_attn(q, k, v, fq, fk, gamma, window=64, scale=D**-0.5)  # noqa: E731
    res["hyb64"] = bench(hyb, [q, k, v, fq, fk, gamma])
    res["hyb64 inf"] = inference(hyb)
    liz = lambda: triton_gated_hybrid_attn(q, k, v, fq, fk, g, gamma, window=128, scale=D**-0.5,  # noqa: E731
                                           meta_k=x["meta_k"], meta_v=x["meta_v"])
    res["lizard"] = bench(liz, [q, k, v, fq, fk, g, gamma, x["meta_k"], x["meta_v"]])
    res["lizard inf"] = inference(liz)
    G = H // Hk
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    res["sdpa"] = bench(lambda: F_.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=G > 1), [qt, kt, vt])
    if fla_linear is not None:
        ke, ve = (t.detach().repeat_interleave(G, 2).contiguous().requires_grad_() for t in (fk, v))
        qf = fq.detach().clone().requires_grad_()
        if F != D:  # fla's linear attention wants dk == dv
            qf, ke = (t.detach()[..., :D].contiguous().requires_grad_() for t in (qf, ke))
        ge = g.detach().repeat_interleave(G, 2).contiguous().requires_grad_()
        try:
            res["fla_lin"] = bench(lambda: fla_linear(qf, ke, ve, normalize=True)[0], [qf, ke, ve])
        except Exception as e:  # noqa: BLE001
            print(f"# fla linear failed: {e}")
        try:
            qg, kg = fq.detach().clone().requires_grad_(), fk.detach().repeat_interleave(G, 2).contiguous().requires_grad_()
            res["fla_gla"] = bench(lambda: fla_gla(qg, kg, ve, g=ge)[0], [qg, kg, ve, ge])
        except Exception as e:  # noqa: BLE001
            print(f"# fla simple_gla failed: {e}")
    return res


def fmt(x):
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def decode(name):
    s = SHAPES[name]
    H, Hk, D, F = s["H"], s["Hk"], s["D"], s["F"]
    steps = {}
    for ctx in (1024, 131072):
        fk = torch.rand(1, ctx, Hk, F, device=dev, dtype=DT)
        k, v = torch.randn(1, ctx, Hk, D, device=dev, dtype=DT), torch.randn(1, ctx, Hk, D, device=dev, dtype=DT)
        _, st = triton_linear_attn(torch.rand(1, ctx, H, F, device=dev, dtype=DT), fk, v, output_final_state=True)
        cache = hybrid_cache_from_prefill(k, v, fk, 64)
        q1, f1 = torch.randn(1, H, D, device=dev, dtype=DT), torch.rand(1, H, F, device=dev, dtype=DT)
        k1, v1, fk1 = torch.randn(1, Hk, D, device=dev, dtype=DT), torch.randn(1, Hk, D, device=dev, dtype=DT), torch.rand(1, Hk, F, device=dev, dtype=DT)
        gamma = torch.full((H,), 0.5, device=dev, dtype=DT)
        steps[ctx] = (lambda f1=f1, fk1=fk1, v1=v1, st=st: fused_recurrent_linear_step(f1, fk1, v1, st),
                      lambda q1=q1, k1=k1, v1=v1, f1=f1, fk1=fk1, gamma=gamma, cache=cache:
                      fused_recurrent_hybrid_step(q1, k1, v1, f1, fk1, gamma, cache, scale=D**-0.5))
        del fk, k, v
    rounds = {ctx: ([], []) for ctx in steps}
    for _ in range(3):
        for ctx, (lin, hyb) in steps.items():
            rounds[ctx][0].append(ms(lin))
            rounds[ctx][1].append(ms(hyb))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return [(ctx, med(a_), med(b_)) for ctx, (a_, b_) in rounds.items()]


def sweep(Ls):
    """Forward ms of our kernels under the tuning knobs in linear_attn.chunk.TUNING (32h shape)."""
    from attnswap.kernels.linear_attn import chunk as lc

    base = dict(lc.TUNING)
    variants = [{}, {"programs_per_sm": 2}, {"programs_per_sm": 8}, {"programs_per_sm": 16},
                {"min_segment_chunks": 4}, {"hybrid_bv": 32}, {"hybrid_warps": 4},
                {"state_elems": 128 * 128}, {"bwd_split": False}, {"bwd_dq_warps": 4}]
    print("| L | knobs | lin f | lin C=128 f | hyb64 train f | hyb64 inf f | hyb64 fb | lizard inf f |")
    print("|---|---|---|---|---|---|---|---|")
    for L in Ls:
        x = inputs("32h", L)
        fq, fk, v, q, k, g, gamma, D = (x[n] for n in ("fq", "fk", "v", "q", "k", "g", "gamma", "D"))
        hyb = lambda: triton_hybrid_attn(q, k, v, fq, fk, gamma, window=64, scale=D**-0.5)  # noqa: E731
        for var in variants:
            lc.TUNING.clear()
            lc.TUNING.update(base, **var)
            cells = [ms(lambda: triton_linear_attn(fq, fk, v)[0]),
                     ms(lambda: triton_linear_attn(fq, fk, v, chunk_size=128)[0]), ms(hyb), inference(hyb)[0]]
            cells.append(bench(hyb, [q, k, v, fq, fk, gamma])[1] if ("bwd" in str(var) or not var) else None)
            cells.append(inference(lambda: triton_gated_hybrid_attn(q, k, v, fq, fk, g, gamma, window=128, scale=D**-0.5,
                                                                    meta_k=x["meta_k"], meta_v=x["meta_v"]))[0])
            print(f"| {L // 1024}k | {var or 'default'} | " + " | ".join(fmt(c) for c in cells) + " |", flush=True)
        torch.cuda.empty_cache()
    lc.TUNING.clear()
    lc.TUNING.update(base)


def sparse_suite(Ls, flex: bool = True, with_decode: bool = True):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench_cudagraph

    from attnswap.kernels.block_sparse.chunk import triton_attn_with_block_map, triton_block_sparse_attn
    from attnswap.kernels.block_sparse.decode import triton_block_sparse_decode
    from attnswap.kernels.block_sparse.masks import (block_mask_to_index, decode_index, density, flex_block_mask,
                                                     random_block_mask)

    flex_attn = None
    if flex:
        from torch.nn.attention.flex_attention import flex_attention
        flex_attn = torch.compile(flex_attention, dynamic=False)
    H, D = 32, 128
    g = torch.Generator().manual_seed(0)
    print("| L | block | sparsity | density | ours idx | ours mask | flex | sdpa dense | sdpa/ours | flex/ours | dense+map |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for L in Ls:
        q, k, v = (torch.randn(1, L, H, D, device=dev, dtype=DT) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
            sdpa = ms(lambda: F_.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
        for block in (128, 64):
            dmap = ms(lambda: triton_attn_with_block_map(q, k, v, block=block))
            for sp in (0.5, 0.9, 0.95):
                print(f"# L={L} block={block} sparsity={sp}", file=sys.stderr, flush=True)
                mask = random_block_mask(1, H, L, L, block, sp, generator=g, device=dev)
                index = block_mask_to_index(mask)
                ours = ms(lambda: triton_block_sparse_attn(q, k, v, block=block, index=index))
                ours_m = ms(lambda: triton_block_sparse_attn(q, k, v, mask, block=block))
                fl = None
                if flex_attn is not None:
                    bm = flex_block_mask(mask, H, L, L, block)
                    try:
                        with torch.no_grad():
                            fl = ms(lambda: flex_attn(qt, kt, vt, block_mask=bm))
                    except Exception as e:  # noqa: BLE001
                        print(f"# flex failed: {type(e).__name__}: {e}", file=sys.stderr)
                print(f"| {L // 1024}k | {block} | {sp:.2f} | {density(mask):.3f} | {fmt(ours)} | {fmt(ours_m)} | "
                      f"{fmt(fl)} | {fmt(sdpa)} | {sdpa / ours:.2f} | {'-' if fl is None else f'{fl / ours:.2f}'} | "
                      f"{fmt(dmap) if sp == 0.5 else ''} |", flush=True)
                del mask, index
        del q, k, v, qt, kt, vt
        torch.cuda.empty_cache()
    if not with_decode:
        return
    ctx = int(os.environ.get("SPARSE_DECODE_CTX", 32768))
    print(f"\n# decode step, B=1, {H} heads, head dim {D}, {ctx // 1024}k cache (the HF (B, H, L, D) layout, "
          "passed as a transposed view), 90% of the blocks skipped per head; median us")
    print("| block | density | ours | ours graph | sdpa full | sdpa graph | sdpa/ours | graph ratio |")
    print("|---|---|---|---|---|---|---|---|")
    kc, vc = (torch.randn(1, H, ctx, D, device=dev, dtype=DT) for _ in range(2))
    q1 = torch.randn(1, H, D, device=dev, dtype=DT)
    for block in (64, 128):
        nK = ctx // block
        sel = torch.rand(1, H, nK, generator=g) < (0.1 * nK - 2) / (nK - 2)
        sel[..., 0] = sel[..., -1] = True
        idx, cnt = decode_index(sel.to(dev))
        ours = lambda: triton_block_sparse_decode(q1, kc.transpose(1, 2), vc.transpose(1, 2), idx, cnt, block=block)  # noqa: E731
        sd = lambda: F_.scaled_dot_product_attention(q1[:, :, None], kc, vc)  # noqa: E731
        with torch.no_grad():
            t = [ms(ours), do_bench_cudagraph(ours, rep=50, return_mode="median"),
                 ms(sd), do_bench_cudagraph(sd, rep=50, return_mode="median")]
        print(f"| {block} | {sel.float().mean():.3f} | " + " | ".join(f"{x * 1e3:.1f}" for x in t)
              + f" | {t[2] / t[0]:.2f} | {t[3] / t[1]:.2f} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", choices=("linear", "sparse"), default="linear",
                    help="linear: the linear/hybrid table (default); sparse: block-sparse attention (issue 15)")
    ap.add_argument("--no-flex", action="store_true", help="sparse suite: skip FlexAttention")
    ap.add_argument("--quick", action="store_true", help="4k only")
    ap.add_argument("--sweep", action="store_true", help="tuning knobs at 16k/64k instead of the table")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--no-fla", action="store_true", help="skip fla's columns (its autotuning compiles for minutes)")
    ap.add_argument("--lengths", default="", help="comma-separated L (default 4k,16k,64k)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of: " + ", ".join(SHAPES))
    a = ap.parse_args()
    if a.suite == "sparse":
        print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  bf16  B=1  "
              "32 heads  head dim 128  median ms (forward, no grad)")
        Ls = [int(x) for x in a.lengths.split(",")] if a.lengths else [16384, 32768, 65536]
        sparse_suite(Ls, flex=not a.no_flex, with_decode=not a.no_decode)
        return
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  bf16  B=1  median ms "
          "(f = forward with gradients enabled, inf = forward under no_grad, fb = forward+backward)")
    if a.sweep:
        sweep([16384, 65536])
        return
    global fla_linear, fla_gla
    if a.no_fla:
        fla_linear = fla_gla = None
    Ls = [int(x) for x in a.lengths.split(",")] if a.lengths else [4096] if a.quick else [4096, 16384, 65536]
    cols = [("lin", 2), ("gated", 2), ("hyb64", 2), ("hyb64 inf", 1), ("lizard", 2), ("lizard inf", 1),
            ("sdpa", 2), ("fla_lin", 2), ("fla_gla", 2)]
    heads = []
    for c, n in cols:
        heads += [f"{c} f"] + ([f"{c} fb"] if n == 2 else [])
    ratios = [("lin", "fla_lin"), ("gated", "fla_gla"), ("hyb64 inf", "fla_lin"), ("hyb64", "fla_lin"), ("sdpa", "hyb64 inf")]
    print("| shape | L | " + " | ".join(heads) + " | " + " | ".join(f"{p}/{q_} f" for p, q_ in ratios) + " |")
    print("|" + "---|" * (2 + len(heads) + len(ratios)))
    shapes = a.shapes.split(",")
    for name in shapes:
        for L in Ls:
            res = row(name, L)
            cells = []
            for c, n in cols:
                f, fb = res.get(c, (None, None))
                cells += [fmt(f)] + ([fmt(fb)] if n == 2 else [])
            rat = ["-" if p not in res or q_ not in res else f"{res[p][0] / res[q_][0]:.2f}" for p, q_ in ratios]
            print(f"| {name} | {L // 1024}k | " + " | ".join(cells) + " | " + " | ".join(rat) + " |", flush=True)
            torch.cuda.empty_cache()
    if a.no_decode:
        return
    print("\n# decode step (one token, B=1), median us; contexts measured alternately, 3 rounds, median of rounds")
    print("| shape | ctx | linear step | hybrid(w64) step |")
    print("|---|---|---|---|")
    for name in shapes:
        for ctx, tl_, th in decode(name):
            print(f"| {name} | {ctx // 1024}k | {tl_ * 1e3:.1f} | {th * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
