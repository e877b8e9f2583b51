"""Chunked sliding-window + linear hybrid attention in plain PyTorch (O(T * chunk) memory).

Same contract as ``naive.naive_hybrid_attn``. With chunk size C >= window, the keys a query chunk can
see in its window all lie in that chunk or the one before; keys two or more chunks back are all in the
linear region and enter through a running k^T v state. Per chunk the score tensor is C x 2C.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_


def _chunks(x: torch.Tensor, N: int, C: int) -> torch.Tensor:
    B, T = x.shape[:2]
    x = F_.pad(x, (0, 0, 0, 0, 0, N * C - T)) if N * C != T else x
    return x.view(B, N, C, *x.shape[2:])


def _with_previous(x: torch.Tensor) -> torch.Tensor:
    """(B, N, C, ...) -> (B, N, 2C, ...): each chunk preceded by the one before it (zeros for chunk 0)."""
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    return torch.cat([prev, x], dim=2)


def chunk_hybrid_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor | None,
    fk: torch.Tensor | None,
    gamma: torch.Tensor,
    *,
    window: int,
    scale: float,
    use_linear: bool = True,
    eps: float = 1e-6,
    chunk_size: int = 64,
    sinks: int = 0,
) -> torch.Tensor:
    B, T, H, D = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    G = H // Hk
    C = max(chunk_size, window)
    N = -(-T // C)
    dtype = q.dtype
    qc = _chunks(q.float(), N, C).view(B, N, C, Hk, G, D)
    kl = _with_previous(_chunks(k.float(), N, C))  # (B, N, 2C, Hk, D)
    vc = _chunks(v.float(), N, C)
    vl = _with_previous(vc)

    c = torch.arange(C, device=q.device)[:, None]
    s_ = torch.arange(2 * C, device=q.device)[None, :]
    rel = s_ - C - c  # key position minus query position
    n_idx = torch.arange(N, device=q.device).view(N, 1, 1)
    exists = (n_idx * C + s_ - C) >= 0  # (N, 1, 2C): keys before position 0 are padding
    in_window = (rel <= 0) & (rel > -window) & exists  # (N, C, 2C)
    older = (rel <= -window) & exists

    s = torch.einsum("bncxgd,bnsxd->bnxgcs", qc, kl) * scale
    s = s.masked_fill(~in_window.view(1, N, 1, 1, C, 2 * C), float("-inf"))
    m = s.amax(-1, keepdim=True)
    gam = gamma.float().view(1, 1, Hk, G, 1, 1)
    S = min(sinks, T)
    if S:  # sink keys outside a query's window still count exactly
        pos = (torch.arange(N, device=q.device).view(N, 1) * C + torch.arange(C, device=q.device)).view(N, C, 1)
        far = torch.arange(S, device=q.device).view(1, 1, S) <= pos - window  # (N, C, S)
        ss = torch.einsum("bncxgd,bsxd->bnxgcs", qc, k[:, :S].float()) * scale
        ss = ss.masked_fill(~far.view(1, N, 1, 1, C, S), float("-inf"))
        m = torch.maximum(m, ss.amax(-1, keepdim=True))
        a_s = gam * torch.exp(ss - m)
    a = gam * torch.exp(s - m)
    num = torch.einsum("bnxgcs,bnsxd->bncxgd", a, vl)
    den = a.sum(-1).permute(0, 1, 4, 2, 3)
    if S:
        num = num + torch.einsum("bnxgcs,bsxd->bncxgd", a_s, v[:, :S].float())
        den = den + a_s.sum(-1).permute(0, 1, 4, 2, 3)
    if use_linear:
        F = fq.shape[-1]
        fqc = _chunks(fq.float(), N, C).view(B, N, C, Hk, G, F)
        fk = fk.float()
        if S:  # sinks never enter the linear branch
            fk = torch.cat([torch.zeros_like(fk[:, :S]), fk[:, S:]], 1)
        fkc = _chunks(fk, N, C)
        lin = torch.einsum("bncxgf,bnsxf->bnxgcs", fqc, _with_previous(fkc))
        lin = lin.masked_fill(~older.view(1, N, 1, 1, C, 2 * C), 0.0)
        num = num + torch.einsum("bnxgcs,bnsxd->bncxgd", lin, vl)
        den = den + lin.sum(-1).permute(0, 1, 4, 2, 3)
        # keys two or more chunks back: exclusive prefix sums shifted by one extra chunk
        kv = torch.einsum("bnsxf,bnsxd->bnxfd", fkc, vc)
        ks = fkc.sum(2)
        S2 = F_.pad(kv.cumsum(1), (0, 0, 0, 0, 0, 0, 2, 0))[:, :N]
        z2 = F_.pad(ks.cumsum(1), (0, 0, 0, 0, 2, 0))[:, :N]
        num = num + torch.einsum("bncxgf,bnxfd->bncxgd", fqc, S2)
        den = den + torch.einsum("bncxgf,bnxf->bncxg", fqc, z2)
    out = num / (den.unsqueeze(-1) + eps)
    return out.reshape(B, N * C, H, Dv)[:, :T].to(dtype)
