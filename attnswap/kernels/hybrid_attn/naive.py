"""Specification of the sliding-window softmax + linear attention hybrid (LoLCATs-style).

For query i, keys split by distance: the last ``window`` keys (i - window < j <= i) are scored exactly,
older keys (j <= i - window) are scored by their feature maps. With s_ij = scale * q_i . k_j and
m_i = max over the window of s_ij:

    a_ij = gamma_h * exp(s_ij - m_i)      for j in the window
    a_ij = fq_i . fk_j                    for older j (when ``use_linear``)
    out_i = sum_j a_ij v_j / sum_j a_ij

``gamma`` is the per-query-head mixing factor in (0, 1) (a sigmoid of a learned logit in the model).
q, k feed the softmax branch; fq, fk are the feature-mapped q, k of the linear branch; both may be
differently shaped in their last dim. GQA as in ``linear_attn.naive``.
With ``use_linear=False`` and window >= T this is exactly causal softmax attention.
"""

from __future__ import annotations

import torch

from ..linear_attn.naive import expand_kv


def naive_hybrid_attn(
    q: torch.Tensor,  # (B, T, H, D)
    k: torch.Tensor,  # (B, T, Hk, D)
    v: torch.Tensor,  # (B, T, Hk, Dv)
    fq: torch.Tensor | None,  # (B, T, H, F)
    fk: torch.Tensor | None,  # (B, T, Hk, F)
    gamma: torch.Tensor,  # (H,)
    *,
    window: int,
    scale: float,
    use_linear: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    B, T, H, D = q.shape
    dtype = q.dtype
    kq, vq = expand_kv(k.float(), H), expand_kv(v.float(), H)
    s = torch.einsum("bihd,bjhd->bhij", q.float(), kq) * scale
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    in_window = (j <= i) & (j > i - window)
    older = j <= i - window
    s = s.masked_fill(~in_window, float("-inf"))
    m = s.amax(-1, keepdim=True)
    a = gamma.float().view(1, H, 1, 1) * torch.exp(s - m)
    if use_linear:
        lin = torch.einsum("bihf,bjhf->bhij", fq.float(), expand_kv(fk.float(), H))
        a = a + lin.masked_fill(~older, 0.0)
    out = torch.einsum("bhij,bjhd->bihd", a, vq) / (a.sum(-1).transpose(1, 2).unsqueeze(-1) + eps)
    return out.to(dtype)
