"""Triton decoding step for the sliding-window + linear hybrid (and its gated variant).

Cache layout: see ``naive.py`` (ring buffers k/v/fk/g of the last W tokens, slot = position % W,
linear state S, z of the keys that left the window, ``pos`` = tokens seen). One launch per token:
a program per (sequence, KV head) evicts the oldest key of the ring into S, z (when pos >= W),
writes the new token into its slot, and computes the outputs of its G query heads from the W ring
entries and S, z. Work and memory are O(W * D + F * Dv) per head, independent of the context length.
The cache tensors are updated IN PLACE and cache["pos"] is advanced.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..host import cdiv
from ..linear_attn.chunk import p2


@triton.jit(do_not_specialize=["pos"])
def _hy_step_kernel(
    q, k, v, fq, fk, g, gamma, Kc, Vc, FKc, Gr, S, z, o,
    pos, Hk, GROUP, W, scale, eps,
    D: tl.constexpr, F: tl.constexpr, DV: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr,
    BF: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr,
    USE_LIN: tl.constexpr, GATED: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # b * Hk + hk
    b = pid // Hk
    hk = pid % Hk
    H = Hk * GROUP
    slot = pos % W
    rw = tl.arange(0, BW)
    rd = tl.arange(0, BD)
    mw = rw < W
    md = rd < D
    is_new = rw == slot
    valid = rw < tl.minimum(pos + 1, W)
    Kb = tl.load(Kc + pid * W * D + rw[:, None] * D + rd[None, :], mask=mw[:, None] & md[None, :], other=0.0)
    kn = tl.load(k + pid * D + rd, mask=md, other=0.0)
    Kb = tl.where(is_new[:, None], kn[None, :].to(Kb.dtype), Kb)
    if USE_LIN:
        rf = tl.arange(0, BF)
        mf = rf < F
        fko = tl.load(FKc + pid * W * F + slot * F + rf, mask=mf, other=0.0).to(tl.float32)
        fkn = tl.load(fk + pid * F + rf, mask=mf, other=0.0)
        w_ev = tl.where(pos >= W, 1.0, 0.0)
        zz = tl.load(z + pid * F + rf, mask=mf, other=0.0)
        if GATED:
            gn = tl.load(g + pid).to(tl.float32)
            gr = tl.load(Gr + pid * W + rw, mask=mw, other=0.0)
            gr = tl.where(is_new, gn, gr)
            w_ev = w_ev * tl.exp(tl.sum(tl.where(valid, gr, 0.0), 0))
            dec = tl.exp(gn)
            zz = zz * dec
        fko = fko * w_ev
        zz = zz + fko
    tl.debug_barrier()  # every read of the slot being replaced is done before it is overwritten
    tl.store(Kc + pid * W * D + slot * D + rd, kn, mask=md)
    if USE_LIN:
        tl.store(FKc + pid * W * F + slot * F + rf, fkn, mask=mf)
        tl.store(z + pid * F + rf, zz, mask=mf)
        if GATED:
            tl.store(Gr + pid * W + slot, gn)
    for vb in tl.static_range(NVB):
        rv = vb * BV + tl.arange(0, BV)
        mv = rv < DV
        Vb = tl.load(Vc + pid * W * DV + rw[:, None] * DV + rv[None, :], mask=mw[:, None] & mv[None, :], other=0.0)
        vn = tl.load(v + pid * DV + rv, mask=mv, other=0.0)
        vo = tl.load(Vc + pid * W * DV + slot * DV + rv, mask=mv, other=0.0).to(tl.float32)
        Vb = tl.where(is_new[:, None], vn[None, :].to(Vb.dtype), Vb)
        if USE_LIN:
            m2 = mf[:, None] & mv[None, :]
            Sb = tl.load(S + pid * F * DV + rf[:, None] * DV + rv[None, :], mask=m2, other=0.0)
            if GATED:
                Sb = Sb * dec
            Sb = Sb + fko[:, None] * vo[None, :]
        tl.debug_barrier()
        tl.store(Vc + pid * W * DV + slot * DV + rv, vn, mask=mv)
        if USE_LIN:
            tl.store(S + pid * F * DV + rf[:, None] * DV + rv[None, :], Sb, mask=m2)
        for gi in range(0, GROUP):
            h = hk * GROUP + gi
            qq = tl.load(q + (b * H + h) * D + rd, mask=md, other=0.0).to(tl.float32)
            s = tl.sum(qq[None, :] * Kb.to(tl.float32), 1) * scale
            s = tl.where(valid, s, -1.0e30)
            gam = tl.load(gamma + h).to(tl.float32)
            e = tl.where(valid, gam * tl.exp(s - tl.max(s, 0)), 0.0)
            num = tl.sum(e[:, None] * Vb.to(tl.float32), 0)
            den = tl.sum(e, 0)
            if USE_LIN:
                fqq = tl.load(fq + (b * H + h) * F + rf, mask=mf, other=0.0).to(tl.float32)
                num += tl.sum(fqq[:, None] * Sb, 0)
                den += tl.sum(fqq * zz, 0)
            tl.store(o + (b * H + h) * DV + rv, (num / (den + eps)).to(o.dtype.element_ty), mask=mv)


def fused_recurrent_hybrid_step(q, k, v, fq, fk, gamma, cache: dict, *, scale: float,
                                use_linear: bool = True, eps: float = 1e-6, g: torch.Tensor | None = None):
    """Decode one token (see module doc). q (B,H,D), k (B,Hk,D), v (B,Hk,Dv), fq (B,H,F),
    fk (B,Hk,F), gamma (H,), g (B,Hk) log-gate or None. Returns (out (B,H,Dv), cache)."""
    B, H, D = q.shape
    Hk, W, Dv = cache["k"].shape[1], cache["k"].shape[2], cache["v"].shape[-1]
    F = fq.shape[-1] if use_linear else 16
    o = torch.empty(B, H, Dv, device=q.device, dtype=q.dtype)
    BF = p2(F)
    BV = min(p2(Dv), max(16, 8192 // BF), max(16, 8192 // p2(W)))
    _hy_step_kernel[(B * Hk,)](
        q.contiguous(), k.contiguous(), v.contiguous(),
        fq.contiguous() if use_linear else None, fk.contiguous() if use_linear else None,
        g.contiguous() if g is not None else None, gamma.contiguous(),
        cache["k"], cache["v"], cache.get("fk") if use_linear else None, cache.get("g"),
        cache["S"], cache["z"], o,
        int(cache["pos"]), Hk, H // Hk, W, float(scale), float(eps),
        D=D, F=F, DV=Dv, BW=p2(W, 1), BD=p2(D), BF=BF, BV=BV, NVB=cdiv(Dv, BV),
        USE_LIN=use_linear, GATED=g is not None, num_warps=4,
    )
    cache["pos"] = int(cache["pos"]) + 1
    return o, cache
