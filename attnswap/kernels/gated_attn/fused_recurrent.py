"""Decoding steps for the gated operators: the Triton steps of linear_attn / hybrid_attn with a gate.

``fused_recurrent_gated_linear_step(q, k, v, g, state, normalize=, eps=)``: S <- exp(g) S + k^T v.
``fused_recurrent_gated_hybrid_step(q, k, v, fq, fk, g, gamma, cache, scale=, eps=)``: the cache must
carry the "g" ring buffer (``hybrid_cache_from_prefill(..., g=g)``); the key leaving the window enters
S with weight exp(sum of the W gates now in the ring) = exp(G_t - G_{t-W}).
"""

from __future__ import annotations

from ..hybrid_attn.fused_recurrent import fused_recurrent_hybrid_step
from ..linear_attn.fused_recurrent import fused_recurrent_linear_step


def fused_recurrent_gated_linear_step(q, k, v, g, state, *, normalize: bool = True, eps: float = 1e-6):
    return fused_recurrent_linear_step(q, k, v, state, normalize=normalize, eps=eps, g=g)


def fused_recurrent_gated_hybrid_step(q, k, v, fq, fk, g, gamma, cache, *, scale: float, eps: float = 1e-6):
    return fused_recurrent_hybrid_step(q, k, v, fq, fk, gamma, cache, scale=scale, use_linear=True, eps=eps, g=g)
