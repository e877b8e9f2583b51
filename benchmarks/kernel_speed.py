"""Kernel suite: the attention operators (median ms, triton.testing.do_bench, bf16, B=1) and the
numerics of the execution paths a converted model can take. Needs a CUDA GPU.

    python benchmarks/kernel_speed.py            # full table (H100: a few minutes)
    python benchmarks/kernel_speed.py --quick    # 4k only
    python benchmarks/kernel_speed.py --sweep    # forward under each tuning knob (linear_attn.chunk.TUNING)
    python benchmarks/kernel_speed.py --warps-sweep --shapes 32h,smollm2 --lengths 16384
        # our operators with each kernel launch's warps changed in turn (TUNING's *_warps knobs)
    python benchmarks/kernel_speed.py --paths llama --path-lengths 1024 --path-speed 4096,16384
        # a converted model's logits through Triton vs PyTorch, in fp32 and bf16, each against fp32
        # PyTorch; with --path-speed also whole-model forward and forward+backward time on both paths
    python benchmarks/kernel_speed.py --decode-paths runs/lolcats
        # a converted model's decode logits through the CUDA graph / compiled step vs the eager step
    compute-sanitizer python benchmarks/kernel_speed.py --sanitize 4096,32,sinks
        # one hybrid / gated-hybrid forward (32 heads x 128, window 128, no_grad) with chosen knobs
    python benchmarks/kernel_speed.py --suite sparse [--lengths 16384,32768] [--no-flex] [--no-decode]

--paths and --decode-paths take a converted model directory as it is, or a teacher (alias, directory,
.gguf), which is converted here with each method of --attention at its default options (now lolcats:
window 256 and 4 sinks; lizard: window 256 and 4 meta tokens), with the feature maps, gates and meta
tokens moved off their initial values so that every branch carries weight.

Rows of the table: (shape, L). Shapes: "32h" = 32 query/KV heads, head dim 128, feature dim 128;
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
import contextlib
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
from _common import add_tuning_option, apply_tuning, commit as _commit  # noqa: E402  (benchmarks/_common.py)

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


def ours(x):
    """Our operators' columns of a row: {column: (forward ms, forward+backward ms or None)}."""
    fq, fk, v, q, k, g, gamma, D = (x[n] for n in ("fq", "fk", "v", "q", "k", "g", "gamma", "D"))
    res = {}
    res["lin"] = bench(lambda: triton_linear_attn(fq, fk, v)[0], [fq, fk, v])
    res["gated"] = bench(lambda: triton_gated_linear_attn(fq, fk, v, g)[0], [fq, fk, v, g])
    hyb = lambda: triton_hybrid_attn(q, k, v, fq, fk, gamma, window=64, scale=D**-0.5)  # noqa: E731
    res["hyb64"] = bench(hyb, [q, k, v, fq, fk, gamma])
    res["hyb64 inf"] = inference(hyb)
    liz = lambda: triton_gated_hybrid_attn(q, k, v, fq, fk, g, gamma, window=128, scale=D**-0.5,  # noqa: E731
                                           meta_k=x["meta_k"], meta_v=x["meta_v"])
    res["lizard"] = bench(liz, [q, k, v, fq, fk, g, gamma, x["meta_k"], x["meta_v"]])
    res["lizard inf"] = inference(liz)
    return res


def row(name, L):
    x = inputs(name, L)
    fq, fk, v, q, k, g, H, Hk, D, F = (x[n] for n in ("fq", "fk", "v", "q", "k", "g", "H", "Hk", "D", "F"))
    print(f"# row {name} L={L}", file=sys.stderr, flush=True)
    res = ours(x)
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
        qg, kg = fq.detach().clone().requires_grad_(), fk.detach().repeat_interleave(G, 2).contiguous().requires_grad_()
        gla = lambda: fla_gla(qg, kg, ve, g=ge)[0]  # noqa: E731
        try:
            res["fla_gla"] = bench(gla, [qg, kg, ve, ge])
        except Exception as e:  # noqa: BLE001
            # fla 0.6 refuses the gated backward on Hopper with Triton 3.4 to 3.7.0 (its dq / dk / dg kernel
            # gives wrong results there); its forward is not affected, so the forward column is still timed
            print(f"# fla simple_gla forward+backward failed: {e}")
            try:
                res["fla_gla"] = (ms(gla), None)
            except Exception as e2:  # noqa: BLE001
                print(f"# fla simple_gla forward failed too: {e2}")
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


@contextlib.contextmanager
def tuned(**knobs):
    """``linear_attn.chunk.TUNING`` with ``knobs`` set inside the block, as it was after it."""
    from attnswap.kernels.linear_attn import chunk as lc

    base = dict(lc.TUNING)
    lc.TUNING.update(knobs)
    try:
        yield
    finally:
        lc.TUNING.clear()
        lc.TUNING.update(base)


def sweep(Ls):
    """Forward ms of our kernels under the tuning knobs in linear_attn.chunk.TUNING (32h shape)."""
    variants = [{}, {"programs_per_sm": 2}, {"programs_per_sm": 8}, {"programs_per_sm": 16},
                {"min_segment_chunks": 4}, {"hybrid_bv": 32}, {"hybrid_warps": 8},
                {"state_elems": 128 * 128}, {"bwd_split": False}, {"bwd_dq_warps": 4}]
    print("| L | knobs | lin f | lin C=128 f | hyb64 train f | hyb64 inf f | hyb64 fb | lizard inf f |")
    print("|---|---|---|---|---|---|---|---|")
    for L in Ls:
        x = inputs("32h", L)
        fq, fk, v, q, k, g, gamma, D = (x[n] for n in ("fq", "fk", "v", "q", "k", "g", "gamma", "D"))
        hyb = lambda: triton_hybrid_attn(q, k, v, fq, fk, gamma, window=64, scale=D**-0.5)  # noqa: E731
        for var in variants:
            with tuned(**var):
                cells = [ms(lambda: triton_linear_attn(fq, fk, v)[0]),
                         ms(lambda: triton_linear_attn(fq, fk, v, chunk_size=128)[0]), ms(hyb), inference(hyb)[0]]
                cells.append(bench(hyb, [q, k, v, fq, fk, gamma])[1] if ("bwd" in str(var) or not var) else None)
                cells.append(inference(lambda: triton_gated_hybrid_attn(q, k, v, fq, fk, g, gamma, window=128,
                                                                        scale=D**-0.5, meta_k=x["meta_k"],
                                                                        meta_v=x["meta_v"]))[0])
            print(f"| {L // 1024}k | {var or 'default'} | " + " | ".join(fmt(c) for c in cells) + " |", flush=True)
        torch.cuda.empty_cache()


# each launch's warps knob (linear_attn.chunk.TUNING; 0 keeps the launch's rule) and the values tried. The hybrid
# forward on 16 warps made an illegal memory access on the H100 (Triton 3.6, 32 heads x 16k), which leaves the
# process's CUDA context unusable, so it is not tried
WARPS_KNOBS = {"la_fwd_warps": (2, 4, 8, 16), "hybrid_warps": (2, 4, 8), "seg_state_warps": (4, 8),
               "la_bwd_warps": (4, 8), "la_bwd_dv_warps": (4, 8), "rev_seg_warps": (4, 8), "bwd_dq_warps": (4, 8),
               "hybrid_bwd_dkv_warps": (4, 8)}
WARPS_COLUMNS = ("lin", "gated", "hyb64", "hyb64 inf", "lizard", "lizard inf")


def warps_sweep(shapes, Ls, knobs=None):
    """Our operators' columns with one launch's warps changed at a time (every other knob at its
    default), each row against the defaults' row just before it; a setting that does not compile or
    fit prints ``err``."""
    heads = [h for c in WARPS_COLUMNS for h in ((f"{c} f",) if c.endswith("inf") else (f"{c} f", f"{c} fb"))]
    print("| shape | L | knob | " + " | ".join(heads) + " |")
    print("|" + "---|" * (3 + len(heads)))
    unknown = set(knobs or ()) - set(WARPS_KNOBS)
    if unknown:
        raise SystemExit(f"--warps-knobs: unknown {', '.join(sorted(unknown))}; known: {', '.join(WARPS_KNOBS)}")
    variants = [{}] + [{knob: w} for knob, values in WARPS_KNOBS.items() if not knobs or knob in knobs for w in values]
    for name in shapes:
        for L in Ls:
            x = inputs(name, L)
            for var in variants:
                try:
                    with tuned(**var):
                        res = ours(x)
                    cells = [fmt(v_) for c in WARPS_COLUMNS for v_ in (res[c][:1] if c.endswith("inf") else res[c])]
                except (triton.runtime.errors.OutOfResources, RuntimeError) as e:
                    print(f"# {var}: {type(e).__name__}: {str(e).splitlines()[0][:160]}", file=sys.stderr)
                    cells = ["err"] * len(heads)
                knob = ", ".join(f"{k_}={v_}" for k_, v_ in var.items()) or "defaults"
                print(f"| {name} | {L // 1024}k | {knob} | " + " | ".join(cells) + " |", flush=True)
            del x
            torch.cuda.empty_cache()


def prefill_sweep(Ls):
    """The hybrid forward as lolcats' prefill runs it on SmolLM2 (9 heads, 3 KV heads, head dim 64, 128
    features, window 256, 4 sinks, no gradients) under segment plans: median ms and the plan's segments."""
    from attnswap.kernels.linear_attn import chunk as lc

    # down to one chunk a segment: every chunk's state precomputed, every (chunk, head) a program of its own
    variants = [{}, {"programs_per_sm": 1}, {"min_segment_chunks": 4}, {"min_segment_chunks": 2},
                {"min_segment_chunks": 4, "programs_per_sm": 8}, {"min_segment_chunks": 2, "programs_per_sm": 8},
                {"min_segment_chunks": 1, "programs_per_sm": 16}, {"min_segment_chunks": 1, "programs_per_sm": 64},
                {"hybrid_warps": 8}, {"min_segment_chunks": 1, "programs_per_sm": 16, "hybrid_warps": 8},
                {"hybrid_stages": (1,)},
                # smaller chunks spill less in the sm_90 build (tests/compile_sm90.py, Triton 3.9: 776 bytes a
                # thread at 64, 280 at 32, 48 at 16) but walk more, smaller tiles; chunk_size is the call's own
                {"chunk_size": 32}, {"chunk_size": 32, "min_segment_chunks": 2, "programs_per_sm": 8},
                {"chunk_size": 16, "min_segment_chunks": 4, "programs_per_sm": 8}]
    print("| L | knobs | segments x chunks | programs | hybrid w256 + 4 sinks inf f ms |")
    print("|---|---|---|---|---|")
    for L in Ls:
        x = inputs("smollm2", L)
        fq, fk, v, q, k, gamma = (x[n].detach() for n in ("fq", "fk", "v", "q", "k", "gamma"))
        D = x["D"]
        for var in variants:
            knobs = {key: val for key, val in var.items() if key != "chunk_size"}
            C = var.get("chunk_size", 64)
            with tuned(**knobs):
                nch, nseg = lc.plan_segments(L, C, x["H"], None, q.device)
                t = inference(lambda: triton_hybrid_attn(q, k, v, fq, fk, gamma, window=256, scale=D**-0.5, sinks=4,
                                                         chunk_size=C))[0]
            print(f"| {L // 1024}k | {var or 'default'} | {nseg} x {nch} | {nseg * x['H']} | {fmt(t)} |", flush=True)
        torch.cuda.empty_cache()


# --- execution paths of a converted model (were benchmarks/gpu_paths.py and decode_paths.py) ---------
def _converted_models(spec: str, methods: str, dtype):
    """(name, model) pairs on CUDA: the model itself when ``spec`` is already converted, else one fresh,
    perturbed conversion of it per method."""
    import copy

    from attnswap import loading
    from attnswap.convert.swap import make_swap
    from attnswap.modeling import convert_model

    m, _ = loading.load_model(loading.resolve(spec), dtype=dtype, device=torch.device(dev))
    if getattr(m.config, "model_type", "").startswith("attnswap_"):
        yield spec, m.eval()
        return
    for method in methods.split(","):
        c = copy.deepcopy(m)
        convert_model(c, [make_swap(method, list(range(c.config.num_hidden_layers)), {}, c.config)], spec)
        torch.manual_seed(0)
        with torch.no_grad():
            for n, p in c.named_parameters():
                if any(s in n for s in ("feature_map", "meta_", "gate")):
                    p.add_(0.05 * torch.randn_like(p))
        yield method, c.eval()
        del c
        torch.cuda.empty_cache()


def _agreement(x, ref) -> str:
    err = (x - ref).abs().max().item()
    return (f"max |diff| {err:.4g} (relative to max |logit| {err / ref.abs().max().item():.3g}), "
            f"top-1 agreement {(x.argmax(-1) == ref.argmax(-1)).float().mean().item():.4f}")


def model_paths(spec: str, methods: str, lengths: list[int], speed_lengths: list[int]):
    """Prefill logits through Triton and PyTorch, in fp32 and bf16, each against fp32 PyTorch (kernel
    faults and bf16 rounding told apart); then whole-model bf16 time of the decoder on both paths."""
    from attnswap.kernels import force_backend

    for name, m in _converted_models(spec, methods, torch.float32):
        for L in lengths:
            ids = torch.randint(100, 40000, (2, L), generator=torch.Generator().manual_seed(L)).to(dev)
            res = {}
            for dt in (torch.float32, torch.bfloat16):
                torch.nn.Module.to(m, dt)  # (transformers refuses .to(dtype) on a model loaded from GGUF)
                for b in ("torch", "triton"):
                    with torch.no_grad(), force_backend(b):
                        res[(dt, b)] = m(ids).logits.float()
            torch.nn.Module.to(m, torch.float32)
            ref = res[(torch.float32, "torch")]
            for (dt, b), x in res.items():
                print(f"{name} L={L} {str(dt)[6:]:9s} {b:6s} vs fp32 torch: {_agreement(x, ref)}", flush=True)
            print(f"{name} L={L} bf16 triton vs bf16 torch: "
                  f"{_agreement(res[(torch.bfloat16, 'triton')], res[(torch.bfloat16, 'torch')])}", flush=True)
            del res
        torch.nn.Module.to(m, torch.bfloat16)
        for L in speed_lengths:
            ids = torch.randint(100, 40000, (1, L), generator=torch.Generator().manual_seed(1)).to(dev)
            for b in ("torch", "triton"):
                with force_backend(b):
                    with torch.no_grad():
                        f = do_bench(lambda: m.model(ids), warmup=5, rep=40, return_mode="median")

                    def fb():
                        m.model(ids).last_hidden_state.float().pow(2).mean().backward()
                        m.zero_grad(set_to_none=True)

                    t = do_bench(fb, warmup=5, rep=40, return_mode="median")
                print(f"{name} L={L} bf16 {b:6s}: forward {f:.2f} ms, forward+backward {t:.2f} ms "
                      "(decoder, no LM head)", flush=True)


def decode_paths(spec: str, methods: str, prompt_len: int, steps: int):
    """Teacher-forced decode logits after the same 2 x prompt_len prompt: the CUDA-graph step and the
    compiled steps in bf16 against the eager step in bf16 and in fp32 (runtime options set on the model;
    the ATTNSWAP_DECODE_GRAPH / ATTNSWAP_COMPILE_DECODE environment variables would override them)."""
    from attnswap.hf_compat import cache_kwargs, output_cache
    from attnswap.modeling import RuntimeOptions, reset_decode_graphs

    for name, m in _converted_models(spec, methods, torch.float32):
        ids = torch.randint(100, 40000, (2, prompt_len), generator=torch.Generator().manual_seed(0)).to(dev)
        forced = ids[:, -steps:].flip(1)  # the same tokens for every path

        @torch.no_grad()
        def run(graph: str, compiled: str):
            m.attnswap_runtime = RuntimeOptions(decode_graph=graph, compile_decode=compiled)
            reset_decode_graphs(m)
            past = output_cache(m(ids, use_cache=True, logits_to_keep=1))
            logits = []
            for t in range(steps):
                o = m(forced[:, t : t + 1], use_cache=True, **cache_kwargs(past))
                past = output_cache(o)
                logits.append(o.logits[:, -1].float())
            return torch.stack(logits, 1)

        torch.nn.Module.to(m, torch.float32)
        ref32 = run("off", "off")
        torch.nn.Module.to(m, torch.bfloat16)
        ref = run("off", "off")
        print(f"{name} prompt 2 x {prompt_len}, {steps} steps, bf16 eager vs fp32 eager: {_agreement(ref, ref32)}", flush=True)
        for graph, compiled, what in (("auto", "off", "cuda graph"), ("auto", "attn", "cuda graph + compiled attention"),
                                      ("auto", "model", "cuda graph + compiled step")):
            got = run(graph, compiled)
            print(f"{name} bf16 {what} vs bf16 eager: {_agreement(got, ref)}; vs fp32 eager: {_agreement(got, ref32)}",
                  flush=True)
        m.attnswap_runtime = RuntimeOptions()
        reset_decode_graphs(m)


def sanitize(spec: str):
    """T,VALUE_BLOCK,WHICH[,MIN_SINK_TILE[,STAGES]]: one forward of the 32h shape, window 128, no_grad,
    WHICH = lizard, lizard-nometa or sinks (hybrid with 4 sinks); VALUE_BLOCK 0 keeps the default. Run it
    under compute-sanitizer to look for illegal memory accesses (the launcher skips the 32-wide value
    block that read shared memory out of range with sinks on Triton 3.6, so asking for 32 gets 16 there)."""
    from attnswap.kernels.linear_attn import chunk as lc

    parts = spec.split(",")
    T, bv, which = int(parts[0]), int(parts[1]), parts[2]
    if bv:
        lc.TUNING["hybrid_bv"] = bv
    if len(parts) > 3:
        lc.TUNING["sink_tile_min"] = int(parts[3])
    if len(parts) > 4:
        lc.TUNING["hybrid_stages"] = (int(parts[4]),)
    H = Hk = 32
    D = 128

    def r(*sh, pos=False):
        return (torch.rand(*sh, device=dev) if pos else torch.randn(*sh, device=dev) * 0.5).to(DT)

    q, k, v, fq, fk = r(1, T, H, D), r(1, T, Hk, D), r(1, T, Hk, D), r(1, T, H, D, pos=True), r(1, T, Hk, D, pos=True)
    g = -torch.rand(1, T, Hk, device=dev) * 0.05
    gamma = torch.full((H,), 0.5, device=dev, dtype=DT)
    with torch.no_grad():
        if which == "lizard":
            o = triton_gated_hybrid_attn(q, k, v, fq, fk, g, gamma, window=128, scale=D**-0.5, meta_k=r(4, Hk, D), meta_v=r(4, Hk, D))
        elif which == "lizard-nometa":
            o = triton_gated_hybrid_attn(q, k, v, fq, fk, g, gamma, window=128, scale=D**-0.5)
        elif which == "sinks":
            o = triton_hybrid_attn(q, k, v, fq, fk, gamma, window=128, scale=D**-0.5, sinks=4)
        else:
            raise SystemExit(f"--sanitize: WHICH is lizard, lizard-nometa or sinks, not {which!r}")
    torch.cuda.synchronize()
    print(which, T, bv, "ok", lc._FITS, float(o.float().abs().max()), flush=True)



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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("linear", "sparse"), default="linear",
                    help="linear: the linear/hybrid table (default); sparse: block-sparse attention (issue 15)")
    ap.add_argument("--no-flex", action="store_true", help="sparse suite: skip FlexAttention")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true", help="tuning knobs at 16k/64k instead of the table")
    mode.add_argument("--warps-sweep", action="store_true",
                      help="our operators with each launch's warps changed in turn (--shapes, --lengths, default 16k)")
    ap.add_argument("--warps-knobs", default="", help="with --warps-sweep: only these knobs (comma-separated)")
    mode.add_argument("--prefill-sweep", action="store_true",
                      help="segment plans of lolcats' prefill kernel at SmolLM2's shape (--lengths, default 8k,32k)")
    mode.add_argument("--paths", metavar="MODEL", help="Triton vs PyTorch logits (and time) of a converted MODEL")
    mode.add_argument("--decode-paths", metavar="MODEL", help="CUDA-graph / compiled vs eager decode logits of MODEL")
    mode.add_argument("--sanitize", metavar="T,BV,WHICH[,SINK_TILE[,STAGES]]", help="one hybrid forward for compute-sanitizer")
    ap.add_argument("--attention", default="lolcats,lizard", help="--paths/--decode-paths: methods for a fresh conversion")
    ap.add_argument("--path-lengths", default="1024", help="--paths: prompt lengths of the logits check (2 sequences)")
    ap.add_argument("--path-speed", default="", help="--paths: lengths at which to time both paths (bf16)")
    ap.add_argument("--prompt-len", type=int, default=2048, help="--decode-paths: prompt length (2 sequences)")
    ap.add_argument("--decode-steps", type=int, default=32, help="--decode-paths: teacher-forced decode steps")
    ap.add_argument("--quick", action="store_true", help="4k only")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--no-fla", action="store_true", help="skip fla's columns (its autotuning compiles for minutes)")
    ap.add_argument("--lengths", default="", help="comma-separated L (default 4k,16k,64k)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of: " + ", ".join(SHAPES))
    add_tuning_option(ap)
    a = ap.parse_args()
    tuning = apply_tuning(a.tuning)
    if a.suite == "sparse":
        print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  bf16  B=1  "
              "32 heads  head dim 128  median ms (forward, no grad)")
        Ls = [int(x) for x in a.lengths.split(",")] if a.lengths else [16384, 32768, 65536]
        sparse_suite(Ls, flex=not a.no_flex, with_decode=not a.no_decode)
        return
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  attnswap commit {_commit()}  bf16  B=1  median ms "
          "(f = forward with gradients enabled, inf = forward under no_grad, fb = forward+backward)"
          + (f"  tuning {tuning}" if tuning else ""))
    if a.sweep:
        sweep([16384, 65536])
        return
    if a.warps_sweep:
        warps_sweep(a.shapes.split(","), [int(x) for x in a.lengths.split(",")] if a.lengths else [16384],
                    a.warps_knobs.split(",") if a.warps_knobs else None)
        return
    if a.prefill_sweep:
        prefill_sweep([int(x) for x in a.lengths.split(",")] if a.lengths else [8192, 32768])
        return
    nums = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    if a.paths:
        return model_paths(a.paths, a.attention, nums(a.path_lengths), nums(a.path_speed))
    if a.decode_paths:
        return decode_paths(a.decode_paths, a.attention, a.prompt_len, a.decode_steps)
    if a.sanitize:
        return sanitize(a.sanitize)
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
