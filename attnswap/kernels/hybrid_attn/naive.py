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

``sinks`` = S > 0 keeps the first S keys in the exact (softmax) part for every later query, as
StreamingLLM's attention sinks do: they never enter the linear branch, and m_i also covers them.
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
    sinks: int = 0,
) -> torch.Tensor:
    B, T, H, D = q.shape
    dtype = q.dtype
    kq, vq = expand_kv(k.float(), H), expand_kv(v.float(), H)
    s = torch.einsum("bihd,bjhd->bhij", q.float(), kq) * scale
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    in_window = (j <= i) & ((j > i - window) | (j < sinks))
    older = (j <= i - window) & (j >= sinks)
    s = s.masked_fill(~in_window, float("-inf"))
    m = s.amax(-1, keepdim=True)
    a = gamma.float().view(1, H, 1, 1) * torch.exp(s - m)
    if use_linear:
        lin = torch.einsum("bihf,bjhf->bhij", fq.float(), expand_kv(fk.float(), H))
        a = a + lin.masked_fill(~older, 0.0)
    out = torch.einsum("bhij,bjhd->bihd", a, vq) / (a.sum(-1).transpose(1, 2).unsqueeze(-1) + eps)
    return out.to(dtype)


# ---------------------------------------------------------------------------------------------
# Decoding. Cache layout (a plain dict so it can live anywhere):
#   "k":  (B, Hk, W, D),  "v": (B, Hk, W, Dv),  "fk": (B, Hk, W, F)   ring buffers of the last W
#         tokens; the token at absolute position p sits in slot p % W (slots not yet written: zeros)
#   "g":  (B, Hk, W) fp32 ring buffer of log-gates (gated hybrid only, else absent/None)
#   "S":  (B, Hk, F, Dv) fp32, "z": (B, Hk, F) fp32   linear state of every key that has left the
#         window (positions <= pos - 1 - W), decayed to position pos - 1 in the gated case
#   "pos": int, number of tokens seen so far (the next token's position). Same for the whole batch.
# A step at position t evicts slot t % W (the key at t - W, if t >= W) into S, z, writes the new
# token there, then attends to the ring (window softmax) and to S, z (linear branch).


def hybrid_cache_from_prefill(k, v, fk, window: int, g: torch.Tensor | None = None) -> dict:
    """Build the decoding cache after a prefill of the T tokens in k (B,T,Hk,D), v, fk (B,T,Hk,F)."""
    B, T, Hk, D = k.shape
    W = window
    dev = k.device

    def ring(x):
        buf = torch.zeros(B, Hk, W, *x.shape[3:], device=dev, dtype=x.dtype)
        p = torch.arange(max(0, T - W), T, device=dev)
        buf[:, :, p % W] = x[:, p].transpose(1, 2)
        return buf

    cache = {"k": ring(k), "v": ring(v), "pos": T, "g": None}
    F = fk.shape[-1] if fk is not None else 1
    S = torch.zeros(B, Hk, F, v.shape[-1], device=dev, dtype=torch.float32)
    z = torch.zeros(B, Hk, F, device=dev, dtype=torch.float32)
    if fk is not None:
        cache["fk"] = ring(fk)
        n_old = max(0, T - W)
        fo, vo = fk[:, :n_old].float(), v[:, :n_old].float()
        if g is not None:
            G = g.float().cumsum(1)
            fo = fo * (G[:, T - 1 : T] - G[:, :n_old]).exp()[..., None]
        S = S + torch.einsum("bjhf,bjhd->bhfd", fo, vo)
        z = z + fo.sum(1)
    else:
        cache["fk"] = None
    if g is not None:
        cache["g"] = ring(g.float()[..., None])[..., 0]
    cache["S"], cache["z"] = S, z
    return cache


def naive_hybrid_step(q, k, v, fq, fk, gamma, cache: dict, *, scale: float, use_linear: bool = True,
                      eps: float = 1e-6, g: torch.Tensor | None = None):
    """One decoding step. q (B,H,D), k (B,Hk,D), v (B,Hk,Dv), fq (B,H,F), fk (B,Hk,F), g (B,Hk) or None.
    Functional: returns (out (B,H,Dv), new cache)."""
    B, H, D = q.shape
    W = cache["k"].shape[2]
    t = cache["pos"]
    slot = t % W
    Kc, Vc = cache["k"].clone(), cache["v"].clone()
    S, z = cache["S"].clone(), cache["z"].clone()
    new = dict(cache)
    if use_linear:
        FKc = cache["fk"].clone()
        if g is not None:
            gc = cache["g"].clone()
            gc[:, :, slot] = g.float()
            n_valid = min(t + 1, W)
            dec = g.float().exp()
            S, z = S * dec[..., None, None], z * dec[..., None]
            new["g"] = gc
        if t >= W:
            w = torch.ones(B, Kc.shape[1], device=q.device)
            if g is not None:
                w = gc[:, :, :n_valid].sum(-1).exp()
            fo, vo = FKc[:, :, slot].float() * w[..., None], Vc[:, :, slot].float()
            S = S + fo[..., :, None] * vo[..., None, :]
            z = z + fo
        FKc[:, :, slot] = fk
        new["fk"] = FKc
    Kc[:, :, slot], Vc[:, :, slot] = k, v
    valid = torch.arange(W, device=q.device) < min(t + 1, W)
    s = torch.einsum("bhd,bhwd->bhw", q.float(), expand_kv(Kc.float(), H, dim=1)) * scale
    s = s.masked_fill(~valid, float("-inf"))
    a = gamma.float().view(1, H, 1) * torch.exp(s - s.amax(-1, keepdim=True))
    num = torch.einsum("bhw,bhwd->bhd", a, expand_kv(Vc.float(), H, dim=1))
    den = a.sum(-1)
    if use_linear:
        num = num + torch.einsum("bhf,bhfd->bhd", fq.float(), expand_kv(S, H, dim=1))
        den = den + torch.einsum("bhf,bhf->bh", fq.float(), expand_kv(z, H, dim=1))
    out = num / (den[..., None] + eps)
    new.update(k=Kc, v=Vc, S=S, z=z, pos=t + 1)
    return out.to(q.dtype), new
