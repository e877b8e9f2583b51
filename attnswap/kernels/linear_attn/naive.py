"""Specification of causal linear attention, written as plainly as possible.

Layout is (batch, time, heads, dim) everywhere. ``q`` has H heads, ``k``/``v`` have Hk heads with
H % Hk == 0 (grouped-query attention: query head h reads key/value head h // (H // Hk)).
``q`` and ``k`` are already feature-mapped (non-negative features for the normalised form).

    num_i = sum_{j<=i} (q_i . k_j) v_j  (+ q_i S0)
    den_i = sum_{j<=i} (q_i . k_j)      (+ q_i . z0)
    out_i = num_i / (den_i + eps)   if normalize else num_i

The recurrent state after the last token is S = sum_j k_j^T v_j (+S0), shape (B, Hk, F, Dv), and
z = sum_j k_j (+z0), shape (B, Hk, F). It is what prefill hands to decoding.
"""

from __future__ import annotations

import torch


def expand_kv(x: torch.Tensor, n_heads: int, dim: int = 2) -> torch.Tensor:
    """Repeat KV heads along ``dim`` so they line up with query heads (reference code only)."""
    groups = n_heads // x.shape[dim]
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def naive_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
):
    B, T, H, F = q.shape
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    kq, vq = expand_kv(k, H), expand_kv(v, H)
    scores = torch.einsum("bihf,bjhf->bhij", q, kq)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, 0.0)
    num = torch.einsum("bhij,bjhd->bihd", scores, vq)
    den = scores.sum(-1).transpose(1, 2)  # (B, T, H)
    if initial_state is not None:
        S0, z0 = initial_state
        num = num + torch.einsum("bihf,bhfd->bihd", q, expand_kv(S0.float(), H, dim=1))
        den = den + torch.einsum("bihf,bhf->bih", q, expand_kv(z0.float(), H, dim=1))
    out = num / (den.unsqueeze(-1) + eps) if normalize else num
    out = out.to(dtype)
    if not output_final_state:
        return out, None
    S = torch.einsum("bjhf,bjhd->bhfd", k, v)
    z = k.sum(1)  # (B, Hk, F)
    if initial_state is not None:
        S, z = S + initial_state[0].float(), z + initial_state[1].float()
    return out, (S, z)


def naive_linear_step(
    q: torch.Tensor,  # (B, H, F): the new token's query
    k: torch.Tensor,  # (B, Hk, F)
    v: torch.Tensor,  # (B, Hk, Dv)
    state: tuple[torch.Tensor, torch.Tensor],  # S (B, Hk, F, Dv) fp32, z (B, Hk, F) fp32
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    g: torch.Tensor | None = None,  # (B, Hk) log-space gate (gated_attn); None = no decay
):
    """One decoding step: S <- exp(g) S + k^T v, z <- exp(g) z + k, out = q S / (q . z + eps).
    Functional (returns a new state). Output (B, H, Dv) in q's dtype."""
    H = q.shape[1]
    S, z = state[0].float(), state[1].float()
    if g is not None:
        dec = g.float().exp()
        S, z = S * dec[..., None, None], z * dec[..., None]
    S = S + torch.einsum("bhf,bhd->bhfd", k.float(), v.float())
    z = z + k.float()
    num = torch.einsum("bhf,bhfd->bhd", q.float(), expand_kv(S, H, dim=1))
    out = num
    if normalize:
        den = torch.einsum("bhf,bhf->bh", q.float(), expand_kv(z, H, dim=1))
        out = num / (den[..., None] + eps)
    return out.to(q.dtype), (S, z)
