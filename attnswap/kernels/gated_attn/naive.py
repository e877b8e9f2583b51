"""Specification of gated (decaying) linear attention and of its sliding-window hybrid.

g is a log-space gate, one scalar per KV head and token, g <= 0, shape (B, T, Hk). With
G_i = sum_{t<=i} g_t (per KV head):

    S_i = exp(g_i) S_{i-1} + k_i^T v_i,   z_i = exp(g_i) z_{i-1} + k_i
    out_i = q_i S_i / (q_i . z_i + eps)   if normalize else q_i S_i

i.e. score a_ij = (q_i . k_j) exp(G_i - G_j) for j <= i, plus exp(G_i) q_i S0 from an initial state.
The final state is S_{T-1}, z_{T-1}. Layout and GQA as in ``linear_attn.naive``.

Gated hybrid: as ``hybrid_attn.naive`` (window softmax with per-head gamma and shared normaliser),
but the linear branch scores older keys (j <= i - window) by (fq_i . fk_j) exp(G_i - G_j).

Decoding: ``naive_linear_step(..., g=...)`` and ``naive_hybrid_step(..., g=...)`` (the hybrid cache
then keeps a ring buffer of the window's log-gates, see ``hybrid_attn.naive``).
"""

from __future__ import annotations

import torch

from ..hybrid_attn.naive import hybrid_cache_from_prefill, naive_hybrid_step  # noqa: F401
from ..linear_attn.naive import expand_kv, naive_linear_step  # noqa: F401


def _decay(g: torch.Tensor, H: int) -> torch.Tensor:
    """exp(G_i - G_j) as (B, H, T, T), zero above the diagonal."""
    G = expand_kv(g.float().cumsum(1), H).transpose(1, 2)  # (B, H, T)
    diff = G[..., :, None] - G[..., None, :]
    T = G.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=g.device).tril()
    return diff.masked_fill(~causal, float("-inf")).exp()


def naive_gated_linear_attn(
    q, k, v, g, *, normalize: bool = True, eps: float = 1e-6,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None, output_final_state: bool = False,
):
    B, T, H, F = q.shape
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    scores = torch.einsum("bihf,bjhf->bhij", q, expand_kv(k, H)) * _decay(g, H)
    num = torch.einsum("bhij,bjhd->bihd", scores, expand_kv(v, H))
    den = scores.sum(-1).transpose(1, 2)
    G = g.float().cumsum(1)  # (B, T, Hk)
    if initial_state is not None:
        S0, z0 = initial_state
        qd = q * expand_kv(G, H).exp()[..., None]
        num = num + torch.einsum("bihf,bhfd->bihd", qd, expand_kv(S0.float(), H, dim=1))
        den = den + torch.einsum("bihf,bhf->bih", qd, expand_kv(z0.float(), H, dim=1))
    out = num / (den.unsqueeze(-1) + eps) if normalize else num
    out = out.to(dtype)
    if not output_final_state:
        return out, None
    kd = k * (G[:, -1:] - G).exp()[..., None]
    S = torch.einsum("bjhf,bjhd->bhfd", kd, v)
    z = kd.sum(1)
    if initial_state is not None:
        w = G[:, -1].exp()  # (B, Hk)
        S = S + w[..., None, None] * initial_state[0].float()
        z = z + w[..., None] * initial_state[1].float()
    return out, (S, z)


def naive_gated_hybrid_attn(
    q, k, v, fq, fk, g, gamma, *, window: int, scale: float, use_linear: bool = True, eps: float = 1e-6,
    meta_k: torch.Tensor | None = None, meta_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """``meta_k`` (M, Hk, D) / ``meta_v`` (M, Hk, Dv): learned sink tokens (Lizard's meta-memory) that
    every query scores exactly, like window keys, sharing the window's max and the normaliser."""
    B, T, H, D = q.shape
    dtype = q.dtype
    s = torch.einsum("bihd,bjhd->bhij", q.float(), expand_kv(k.float(), H)) * scale
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    in_window = (j <= i) & (j > i - window)
    older = j <= i - window
    s = s.masked_fill(~in_window, float("-inf"))
    vq = expand_kv(v.float(), H)
    if meta_k is not None:  # meta tokens become extra key columns before the sequence
        sm = torch.einsum("bihd,mhd->bhim", q.float(), expand_kv(meta_k.float(), H, dim=1)) * scale
        s = torch.cat([sm, s], -1)
        vq = torch.cat([expand_kv(meta_v.float(), H, dim=1).unsqueeze(0).expand(B, -1, -1, -1), vq], 1)
    a = gamma.float().view(1, H, 1, 1) * torch.exp(s - s.amax(-1, keepdim=True))
    if use_linear:
        lin = torch.einsum("bihf,bjhf->bhij", fq.float(), expand_kv(fk.float(), H)) * _decay(g, H)
        lin = lin.masked_fill(~older, 0.0)
        if meta_k is not None:
            lin = torch.cat([lin.new_zeros(*lin.shape[:-1], meta_k.shape[0]), lin], -1)
        a = a + lin
    out = torch.einsum("bhij,bjhd->bihd", a, vq) / (a.sum(-1).transpose(1, 2).unsqueeze(-1) + eps)
    return out.to(dtype)
