"""The Hedgehog feature map in one Triton kernel (same contract as ``naive.naive_hedgehog``).

The PyTorch form is about ten operators per map (casts to fp32, an fp32 einsum, bias, negation,
concatenation, softmax, a cast back) and materialises several fp32 copies of a (T, H, 2F) tensor; on
the H200 they were the largest share of a converted layer's prefill (docs/BENCHMARKS.md, issue 17).
Here one program takes a block of rows of one head: it multiplies by W_h with fp32 accumulation, adds
b_h and writes the normalised exp(z - m) and exp(-z - m) halves (m = max |z| of the row) in the output
dtype. 16-bit inputs whose weight has the same dtype are multiplied as they are (their products are
exact in fp32); anything else in full fp32 (``ieee``), as the reference does.

Gradients (attention transfer trains W and b; LoRA stages send gradients to x) come from the saved
fp32 output in PyTorch: with y = softmax(c), c = [z, -z],

    dc = y * (dy - sum(dy * y)),   dz = dc[:F] - dc[F:],   dx = dz W^T,   dW = x^T dz,   db = sum dz.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..host import cdiv
from ..linear_attn.chunk import p2


@triton.jit
def _hedgehog_rows(x, w, b, out, pid, h, N, H, sxn, sxh, D: tl.constexpr, F: tl.constexpr, BT: tl.constexpr,
                   BD: tl.constexpr, BF: tl.constexpr, NATIVE: tl.constexpr):
    """Features of rows [pid * BT, pid * BT + BT) of head h: out (N, H, 2F)."""
    h = h.to(tl.int64)
    rows = pid.to(tl.int64) * BT + tl.arange(0, BT)
    rd = tl.arange(0, BD)
    rf = tl.arange(0, BF)
    mr, md, mf = rows < N, rd < D, rf < F
    xb = tl.load(x + rows[:, None] * sxn + h * sxh + rd[None, :], mask=mr[:, None] & md[None, :], other=0.0)
    wb = tl.load(w + h * D * F + rd[:, None] * F + rf[None, :], mask=md[:, None] & mf[None, :], other=0.0)
    if NATIVE:
        z = tl.dot(xb, wb)
    else:
        z = tl.dot(xb.to(tl.float32), wb.to(tl.float32), input_precision="ieee")
    z += tl.load(b + h * F + rf, mask=mf, other=0.0).to(tl.float32)[None, :]
    m = tl.max(tl.where(mf[None, :], tl.abs(z), 0.0), 1)
    e1 = tl.where(mf[None, :], tl.exp(z - m[:, None]), 0.0)
    e2 = tl.where(mf[None, :], tl.exp(-z - m[:, None]), 0.0)
    r = 1.0 / (tl.sum(e1, 1) + tl.sum(e2, 1))
    ob = out + rows[:, None] * (H * 2 * F) + h * (2 * F) + rf[None, :]
    om = mr[:, None] & mf[None, :]
    tl.store(ob, (e1 * r[:, None]).to(out.dtype.element_ty), mask=om)
    tl.store(ob + F, (e2 * r[:, None]).to(out.dtype.element_ty), mask=om)


@triton.jit
def _hedgehog_fwd_kernel(x, w, b, out, N, H, sxn, sxh, D: tl.constexpr, F: tl.constexpr, BT: tl.constexpr,
                         BD: tl.constexpr, BF: tl.constexpr, NATIVE: tl.constexpr):
    _hedgehog_rows(x, w, b, out, tl.program_id(0), tl.program_id(1), N, H, sxn, sxh, D, F, BT, BD, BF, NATIVE)


@triton.jit
def _hedgehog_pair_kernel(xa, wa, ba, oa, Ha, sxan, sxah, xb, wb, bb, ob, Hb, sxbn, sxbh, N, D: tl.constexpr,
                          F: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, NATIVE: tl.constexpr):
    """Two maps over the same rows in one launch (queries' and keys' heads): program column h < Ha
    takes head h of the first, the rest the second."""
    h = tl.program_id(1)
    if h < Ha:
        _hedgehog_rows(xa, wa, ba, oa, tl.program_id(0), h, N, Ha, sxan, sxah, D, F, BT, BD, BF, NATIVE)
    else:
        _hedgehog_rows(xb, wb, bb, ob, tl.program_id(0), h - Ha, N, Hb, sxbn, sxbh, D, F, BT, BD, BF, NATIVE)


def _native(x, weight) -> bool:
    """16-bit inputs with weights of their dtype are multiplied as they are, anything else in fp32."""
    return x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype


def _prepare(x, weight, bias, out_dtype):
    """(rows (N, H, D) with a unit last stride, weight, bias, output (N, H, 2F), native)"""
    *lead, H, D = x.shape
    F = weight.shape[-1]
    if weight.shape != (H, D, F) or bias.shape != (H, F):
        raise ValueError(f"hedgehog: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)} do not match")
    x2 = x.reshape(-1, H, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], H, 2 * F, device=x.device, dtype=out_dtype)
    return x2, weight.contiguous(), bias.contiguous(), out, _native(x, weight)


_ROWS = 64  # rows of one program


def hedgehog_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    x2, w, b, out, native = _prepare(x, weight, bias, out_dtype)
    (N, H, D), F = x2.shape, w.shape[-1]
    if N:
        _hedgehog_fwd_kernel[(cdiv(N, _ROWS), H)](
            x2, w, b, out, N, H, x2.stride(0), x2.stride(1), D=D, F=F, BT=_ROWS, BD=p2(D), BF=p2(F), NATIVE=native,
            num_warps=4,
        )
    return out.view(*x.shape[:-1], 2 * F)


def _pairable(xa, wa, xb, wb) -> bool:
    """Two maps can share a launch: the same rows, head dim and feature size, and the same kind of
    product (``_native``)."""
    return xa.shape[:-2] == xb.shape[:-2] and xa.shape[-1] == xb.shape[-1] and wa.shape[1:] == wb.shape[1:] \
        and _native(xa, wa) == _native(xb, wb)


def hedgehog_pair_forward(xa, wa, ba, da, xb, wb, bb, db):
    """``hedgehog_forward`` of two maps in one launch, without gradients: (phi_a(xa) in ``da``, phi_b(xb)
    in ``db``); the maps must be ``_pairable`` (a query and a key map of one layer are)."""
    if not _pairable(xa, wa, xb, wb):
        raise ValueError(f"hedgehog pair: x {tuple(xa.shape)} / {tuple(xb.shape)}, weights {tuple(wa.shape)} / "
                         f"{tuple(wb.shape)} ({xa.dtype}/{wa.dtype}, {xb.dtype}/{wb.dtype}) cannot share a launch")
    xa2, wa2, ba2, oa, native = _prepare(xa, wa, ba, da)
    xb2, wb2, bb2, ob, _ = _prepare(xb, wb, bb, db)
    (N, Ha, D), Hb, F = xa2.shape, xb2.shape[1], wa2.shape[-1]
    if N:
        _hedgehog_pair_kernel[(cdiv(N, _ROWS), Ha + Hb)](
            xa2, wa2, ba2, oa, Ha, xa2.stride(0), xa2.stride(1), xb2, wb2, bb2, ob, Hb, xb2.stride(0), xb2.stride(1),
            N, D=D, F=F, BT=_ROWS, BD=p2(D), BF=p2(F), NATIVE=native, num_warps=4,
        )
    return oa.view(*xa.shape[:-1], 2 * F), ob.view(*xb.shape[:-1], 2 * F)


class _HedgehogFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        y = hedgehog_forward(x, weight, bias, torch.float32)
        ctx.save_for_backward(x, weight, y)
        ctx.bias_dtype = bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, y = ctx.saved_tensors
        F = weight.shape[-1]
        dc = y * (dy.float() - (dy.float() * y).sum(-1, keepdim=True))
        dz = dc[..., :F] - dc[..., F:]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.einsum("...hf,hdf->...hd", dz, weight.float()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = torch.einsum("...hd,...hf->hdf", x.float(), dz).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            db = dz.reshape(-1, *dz.shape[-2:]).sum(0).to(ctx.bias_dtype)
        return dx, dw, db


def triton_hedgehog(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """phi(x) in ``out_dtype`` (see ``naive.py``). With gradients the output is computed in fp32 (the
    backward reads it) and cast afterwards."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return _HedgehogFn.apply(x, weight, bias).to(out_dtype)
    return hedgehog_forward(x, weight, bias, out_dtype)


def triton_hedgehog_pair(xa, wa, ba, xb, wb, bb, da=torch.float32, db=torch.float32):
    """(phi_a(xa) in ``da``, phi_b(xb) in ``db``): one launch for both maps (a layer's query and key
    features) when no gradient is needed and they are ``_pairable``, else ``triton_hedgehog`` twice."""
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (xa, wa, ba, xb, wb, bb))
    if grads or not _pairable(xa, wa, xb, wb):
        return triton_hedgehog(xa, wa, ba, da), triton_hedgehog(xb, wb, bb, db)
    return hedgehog_pair_forward(xa, wa, ba, da, xb, wb, bb, db)
