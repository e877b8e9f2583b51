"""Triton gated linear attention and gated hybrid (forward + backward).

The kernels are the ones of ``linear_attn.chunk`` and ``hybrid_attn.chunk`` with ``GATED`` on: the
gate enters as G = cumsum(g) (fp32, per KV head, computed once with torch), scores get
exp(G_i - G_j) and the running state is decayed chunk by chunk. Gradient of the gate: with
a_ij = q_i.k_j exp(G_i - G_j), dG_i = sum_{h in group} q_i.dq_i - k_i.dk_i (dq, dk the full
gradients of the linear branch), and dg is the reverse cumulative sum of dG.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..hybrid_attn.chunk import hy_backward, hy_forward, needs_grad, triton_hybrid_attn
from ..linear_attn.chunk import la_backward, la_forward, norm_grads
from .torch_chunk import time_cumsum


def _dg(q, dq, k, dk):
    B, T, H, _ = q.shape
    Hk = k.shape[2]
    dG = (q.float() * dq.float()).sum(-1).view(B, T, Hk, H // Hk).sum(-1) - (k.float() * dk.float()).sum(-1)
    return time_cumsum(dG, reverse=True)


class _GatedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, S0, z0, normalize, eps, output_final_state, chunk_size, segment_chunks):
        Gc = time_cumsum(g.float())
        init = (S0, z0) if S0 is not None else None
        o, den, final = la_forward(q, k, v, normalize=normalize, eps=eps, Gc=Gc, initial_state=init,
                                   output_final_state=output_final_state, chunk_size=chunk_size, want_den=True,
                                   segment_chunks=segment_chunks)
        ctx.save_for_backward(q, k, v, Gc, o, den, S0, z0)
        ctx.cfg = (normalize, eps, chunk_size, g.dtype)
        if final is None:
            return o
        ctx.mark_non_differentiable(*final)
        return o, final[0], final[1]

    @staticmethod
    def backward(ctx, do, *_):
        q, k, v, Gc, o, den, S0, z0 = ctx.saved_tensors
        normalize, eps, C, gdt = ctx.cfg
        do = do.contiguous()
        rden = dden = None
        if normalize:
            rden, dden = norm_grads(o, do, den, eps)
        init = (S0, z0) if S0 is not None else None
        dq, dk, dv = la_backward(q, k, v, do, rden, dden, Gc=Gc, initial_state=init, chunk_size=C,
                                 qk_grad_dtype=torch.float32)
        dg = _dg(q, dq, k, dk).to(gdt)
        return dq.to(q.dtype), dk.to(k.dtype), dv, dg, None, None, None, None, None, None, None


def triton_gated_linear_attn(q, k, v, g, *, normalize: bool = True, eps: float = 1e-6,
                             initial_state=None, output_final_state: bool = False, chunk_size: int = 64,
                             segment_chunks: int | None = None):
    """Triton gated linear attention; returns (out, (S, z) or None). Gradients for q, k, v, g."""
    q, k, v, g = q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous()
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = (x.detach().float().contiguous() for x in initial_state)
    res = _GatedLinearFn.apply(q, k, v, g, S0, z0, normalize, eps, output_final_state, chunk_size, segment_chunks)
    if output_final_state:
        return res[0], (res[1], res[2])
    return res, None


class _GatedHybridFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, fq, fk, g, gamma, window, scale, eps, chunk_size, sinks, grads, segment_chunks):
        Gc = time_cumsum(g.float())
        o, den, m, arg = hy_forward(q, k, v, fq, fk, gamma, Gc, window=window, scale=scale,
                                    use_linear=True, eps=eps, chunk_size=chunk_size,
                                    out_fp32=grads and q.dtype != torch.float32, sinks=sinks, split=grads,
                                    segment_chunks=segment_chunks, save=grads)
        ctx.save_for_backward(q, k, v, fq, fk, Gc, gamma, o, den, m, arg)
        ctx.cfg = (window, scale, eps, chunk_size, g.dtype, sinks)
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, fq, fk, Gc, gamma, o, den, m, arg = ctx.saved_tensors
        window, scale, eps, C, gdt, sinks = ctx.cfg
        dq, dk, dv, dfq, dfk, dgamma = hy_backward(
            q, k, v, fq, fk, gamma, Gc, o, den, m, arg, do.contiguous(), window=window, scale=scale,
            use_linear=True, eps=eps, chunk_size=C, qk_grad_dtype=torch.float32, sinks=sinks)
        dg = _dg(fq, dfq, fk, dfk).to(gdt)
        return dq, dk, dv, dfq.to(fq.dtype), dfk.to(fk.dtype), dg, dgamma, None, None, None, None, None, None, None


def triton_gated_hybrid_attn(q, k, v, fq, fk, g, gamma, *, window: int, scale: float,
                             use_linear: bool = True, eps: float = 1e-6, chunk_size: int = 64,
                             meta_k=None, meta_v=None, segment_chunks: int | None = None):
    """Triton gated hybrid; gradients for q, k, v, fq, fk, g, gamma (and meta_k, meta_v).

    ``meta_k`` (M, Hk, D) / ``meta_v`` (M, Hk, Dv), Lizard's learned sink tokens, are placed in front
    of the sequence and served by the kernel's exact sink tile (scored by every query, never in the
    linear branch); the M extra query rows are computed and dropped."""
    M = 0 if meta_k is None else meta_k.shape[0]
    if M:
        B = q.shape[0]

        def front(x, pre):  # (B, T, ...) -> (B, M + T, ...)
            return torch.cat([pre.to(x.dtype).unsqueeze(0).expand(B, *pre.shape), x], 1)

        def zeros_first(x):  # M zero rows in front, in one operator (was zeros, expand and cat)
            return F.pad(x, (0, 0) * (x.dim() - 2) + (M, 0))

        q = zeros_first(q)  # the meta rows' queries: computed, then dropped
        k, v = front(k, meta_k), front(v, meta_v)
        if use_linear:  # the meta tokens are never in the linear branch
            fq, fk, g = zeros_first(fq), zeros_first(fk), zeros_first(g)
    if not use_linear:
        out = triton_hybrid_attn(q, k, v, None, None, gamma, window=window, scale=scale, use_linear=False,
                                 eps=eps, chunk_size=chunk_size, sinks=M, segment_chunks=segment_chunks)
    else:
        q, k, v, fq, fk, g = (x.contiguous() for x in (q, k, v, fq, fk, g))
        out = _GatedHybridFn.apply(q, k, v, fq, fk, g, gamma.contiguous(), int(window), float(scale),
                                   float(eps), int(chunk_size), M, needs_grad(q, k, v, fq, fk, g, gamma),
                                   segment_chunks)
    return out[:, M:] if M else out
