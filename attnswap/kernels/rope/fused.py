"""Rotary embeddings of queries and keys in one Triton launch (same result as ``naive.naive_rope``,
computed in fp32 and rounded once; transformers' form rounds after each of its operators in 16-bit).

transformers applies RoPE as about seven operators per tensor (two slices, a negation, a
concatenation, two products, a sum); in a converted model's prefill they were one of the larger
shares of device time at 32k and of launches at 2k (docs/BENCHMARKS.md, issue 17). One program here
takes a block of rows of one head of q or of k. RoPE rotates each (i, i + D/2) pair, so its gradient
is the same kernel with the rotation transposed (``BWD``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..host import cdiv, next_pow2


@triton.jit
def _rotate(x, rows, T, h, sxn, sxh, cs, sn, scb, sct, m, rd, D2: tl.constexpr, BWD: tl.constexpr):
    b, t = rows // T, rows % T
    xb = x + rows[:, None] * sxn + h * sxh + rd[None, :]
    cb = b[:, None] * scb + t[:, None] * sct + rd[None, :]
    x1 = tl.load(xb, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xb + D2, mask=m, other=0.0).to(tl.float32)
    c1 = tl.load(cs + cb, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cs + cb + D2, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sn + cb, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sn + cb + D2, mask=m, other=0.0).to(tl.float32)
    if BWD:  # the transposed rotation: the gradient of the forward below
        return x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


@triton.jit
def _rope_kernel(q, k, oq, ok, cs, sn, N, T, H, Hk, sqn, sqh, skn, skh, scb, sct,
                 D2: tl.constexpr, BD2: tl.constexpr, BT: tl.constexpr, BWD: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    hid = tl.program_id(1)
    rd = tl.arange(0, BD2)
    m = (rows < N)[:, None] & (rd < D2)[None, :]
    if hid < H:
        y1, y2 = _rotate(q, rows, T, hid, sqn, sqh, cs, sn, scb, sct, m, rd, D2, BWD)
        ob = oq + rows[:, None] * (H * 2 * D2) + hid * (2 * D2) + rd[None, :]
    else:
        y1, y2 = _rotate(k, rows, T, hid - H, skn, skh, cs, sn, scb, sct, m, rd, D2, BWD)
        ob = ok + rows[:, None] * (Hk * 2 * D2) + (hid - H) * (2 * D2) + rd[None, :]
    tl.store(ob, y1.to(ob.dtype.element_ty), mask=m)
    tl.store(ob + D2, y2.to(ob.dtype.element_ty), mask=m)


def _rows(x):
    """(B, T, H, D) as (B*T, H, D) with a unit last stride, without copying when the rows allow it."""
    B, T, H, D = x.shape
    x2 = x.reshape(B * T, H, D)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rope_launch(q, k, cos, sin, backward: bool = False):
    B, T, H, D = q.shape
    Hk = k.shape[2]
    if D % 2 or k.shape[:2] != (B, T) or k.shape[-1] != D or cos.shape != sin.shape or cos.shape[-2:] != (T, D) \
            or cos.shape[0] not in (1, B):
        raise ValueError(f"rope: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)} "
                         "do not fit (B, T, heads, D) with cos/sin (B or 1, T, D), D even")
    q2, k2 = _rows(q), _rows(k)
    cs, sn = cos.expand(B, T, D), sin.expand(B, T, D)
    if cs.stride(-1) != 1 or sn.stride() != cs.stride():
        cs, sn = cs.contiguous(), sn.contiguous()
    oq = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype)
    ok = torch.empty(B, T, Hk, D, device=k.device, dtype=k.dtype)
    N, BT = B * T, 32
    if N:
        _rope_kernel[(cdiv(N, BT), H + Hk)](
            q2, k2, oq, ok, cs, sn, N, T, H, Hk, q2.stride(0), q2.stride(1), k2.stride(0), k2.stride(1),
            cs.stride(0), cs.stride(1), D2=D // 2, BD2=max(16, next_pow2(D // 2)), BT=BT, BWD=backward,
            num_warps=4,
        )
    return oq, ok


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.like = (q.shape, q.dtype), (k.shape, k.dtype)
        return rope_launch(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        # an output nobody used has no gradient: it contributes zeros
        dq, dk = (torch.zeros(s, dtype=t, device=cos.device) if g is None else g
                  for g, (s, t) in zip((dq, dk), ctx.like))
        gq, gk = rope_launch(dq, dk, cos, sin, backward=True)
        return gq, gk, None, None


def triton_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE on q (B, T, H, D) and k (B, T, Hk, D), in their dtype; gradients for q and k (cos/sin are
    the model's fixed tables: a caller that needs their gradient gets the PyTorch form, in dispatch)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _RopeFn.apply(q, k, cos, sin)
    return rope_launch(q, k, cos, sin)
