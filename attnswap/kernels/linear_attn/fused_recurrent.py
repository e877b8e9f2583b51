"""Triton decoding step for (gated) linear attention: one launch per token, state updated in place.

One program per (sequence, KV head) updates S (F x Dv, fp32) block by block of value columns and
produces the outputs of the G query heads that read this KV head. The work is O(F * Dv) per head,
independent of how many tokens came before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..host import cdiv
from .chunk import p2


@triton.jit
def _la_step_kernel(
    q, k, v, g, S, z, o, Hk, GROUP, eps,
    F: tl.constexpr, DV: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr,
    NORM: tl.constexpr, GATED: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # b * Hk + hk
    b = pid // Hk
    H = Hk * GROUP
    rf = tl.arange(0, BF)
    mf = rf < F
    kk = tl.load(k + pid * F + rf, mask=mf, other=0.0).to(tl.float32)
    zz = tl.load(z + pid * F + rf, mask=mf, other=0.0)
    if GATED:
        dec = tl.exp(tl.load(g + pid).to(tl.float32))
        zz = zz * dec
    zz = zz + kk
    tl.store(z + pid * F + rf, zz, mask=mf)
    for vb in tl.static_range(NVB):
        rv = vb * BV + tl.arange(0, BV)
        mv = rv < DV
        m2 = mf[:, None] & mv[None, :]
        Sb = tl.load(S + pid * F * DV + rf[:, None] * DV + rv[None, :], mask=m2, other=0.0)
        vv = tl.load(v + pid * DV + rv, mask=mv, other=0.0).to(tl.float32)
        if GATED:
            Sb = Sb * dec
        Sb = Sb + kk[:, None] * vv[None, :]
        tl.store(S + pid * F * DV + rf[:, None] * DV + rv[None, :], Sb, mask=m2)
        for gi in range(0, GROUP):
            h = b * H + (pid % Hk) * GROUP + gi
            qq = tl.load(q + h * F + rf, mask=mf, other=0.0).to(tl.float32)
            num = tl.sum(qq[:, None] * Sb, 0)
            if NORM:
                num = num / (tl.sum(qq * zz, 0) + eps)
            tl.store(o + h * DV + rv, num.to(o.dtype.element_ty), mask=mv)


def fused_recurrent_linear_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor],
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    g: torch.Tensor | None = None,
):
    """Decode one token: q (B, H, F), k (B, Hk, F), v (B, Hk, Dv), state = (S (B, Hk, F, Dv) fp32,
    z (B, Hk, F) fp32), optional log-gate g (B, Hk). S and z are updated IN PLACE (they must be
    contiguous fp32); returns (out (B, H, Dv), (S, z)). Same maths as ``naive.naive_linear_step``."""
    B, H, F = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    S, z = state
    assert S.dtype == torch.float32 and S.is_contiguous() and z.is_contiguous()
    o = torch.empty(B, H, Dv, device=q.device, dtype=q.dtype)
    BF = p2(F)
    BV = min(p2(Dv), max(16, 8192 // BF))
    _la_step_kernel[(B * Hk,)](
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous() if g is not None else None,
        S, z, o, Hk, H // Hk, eps,
        F=F, DV=Dv, BF=BF, BV=BV, NVB=cdiv(Dv, BV), NORM=normalize, GATED=g is not None,
        num_warps=4,
    )
    return o, (S, z)
