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

from ..linear_attn.chunk import p2


@triton.jit
def _hedgehog_fwd_kernel(x, w, b, out, N, H, sxn, sxh, D: tl.constexpr, F: tl.constexpr, BT: tl.constexpr,
                         BD: tl.constexpr, BF: tl.constexpr, NATIVE: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
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


def hedgehog_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    *lead, H, D = x.shape
    F = weight.shape[-1]
    if weight.shape != (H, D, F) or bias.shape != (H, F):
        raise ValueError(f"hedgehog: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)} do not match")
    x2 = x.reshape(-1, H, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    N = x2.shape[0]
    out = torch.empty(N, H, 2 * F, device=x.device, dtype=out_dtype)
    w, b = weight.contiguous(), bias.contiguous()
    native = x.dtype in (torch.float16, torch.bfloat16) and w.dtype == x.dtype
    BT = 64
    if N:
        _hedgehog_fwd_kernel[(triton.cdiv(N, BT), H)](
            x2, w, b, out, N, H, x2.stride(0), x2.stride(1), D=D, F=F, BT=BT, BD=p2(D), BF=p2(F), NATIVE=native,
            num_warps=4,
        )
    return out.view(*lead, H, 2 * F)


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
