"""Reproduce one hybrid / gated-hybrid forward (32 heads x 128, window 128, bf16, no_grad) with chosen
tuning knobs, to look for illegal memory accesses under compute-sanitizer (docs/BENCHMARKS.md, third
GPU session: a 32-wide value block with sink tokens read shared memory out of range on Triton 3.6).

    compute-sanitizer python3 benchmarks/sanitize_hybrid.py T VALUE_BLOCK {lizard,lizard-nometa,sinks} [MIN_SINK_TILE [STAGES]]

VALUE_BLOCK 0 keeps the default. Prints "ok" and the launch configuration that was used. The
launcher now skips the faulty width when sinks are present, so asking for 32 gets 16 there.
"""
import sys, torch
from attnswap.kernels.linear_attn import chunk as lc
from attnswap.kernels.gated_attn.chunk import triton_gated_hybrid_attn
from attnswap.kernels.hybrid_attn.chunk import triton_hybrid_attn
T = int(sys.argv[1]); bv = int(sys.argv[2]); which = sys.argv[3]
if bv: lc.TUNING["hybrid_bv"] = bv
if len(sys.argv) > 4: lc.TUNING["sink_tile_min"] = int(sys.argv[4])
if len(sys.argv) > 5: lc.TUNING["hybrid_stages"] = (int(sys.argv[5]),)
H = Hk = 32; D = F = 128
r = lambda *s, pos=False: (torch.rand(*s, device="cuda") if pos else torch.randn(*s, device="cuda") * 0.5).bfloat16()
q, k, v, fq, fk = r(1, T, H, D), r(1, T, Hk, D), r(1, T, Hk, D), r(1, T, H, F, pos=True), r(1, T, Hk, F, pos=True)
g = -torch.rand(1, T, Hk, device="cuda") * 0.05
gamma = torch.full((H,), 0.5, device="cuda", dtype=torch.bfloat16)
mk, mv = r(4, Hk, D), r(4, Hk, D)
with torch.no_grad():
    if which == "lizard":
        o = triton_gated_hybrid_attn(q, k, v, fq, fk, g, gamma, window=128, scale=D**-0.5, meta_k=mk, meta_v=mv)
    elif which == "lizard-nometa":
        o = triton_gated_hybrid_attn(q, k, v, fq, fk, g, gamma, window=128, scale=D**-0.5)
    else:
        o = triton_hybrid_attn(q, k, v, fq, fk, gamma, window=128, scale=D**-0.5, sinks=4)
torch.cuda.synchronize()
print(which, T, bv, "ok", lc._FITS, float(o.float().abs().max()), flush=True)
