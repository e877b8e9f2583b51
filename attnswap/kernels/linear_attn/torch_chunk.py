"""Chunked causal linear attention in plain PyTorch: O(T) memory, autograd for the backward pass.

Same contract as ``naive.naive_linear_attn``. Query heads are viewed as (Hk, G) so KV heads are never
copied. Within a chunk the quadratic form is used; across chunks, running sums of k^T v and k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_


def _pad_time(x: torch.Tensor, T_pad: int) -> torch.Tensor:
    return x if x.shape[1] == T_pad else F_.pad(x, (0, 0, 0, 0, 0, T_pad - x.shape[1]))


def chunk_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
):
    B, T, H, F = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    G, C = H // Hk, chunk_size
    dtype = q.dtype
    N = -(-T // C)
    Tp = N * C
    qf = _pad_time(q.float(), Tp).view(B, N, C, Hk, G, F)
    kf = _pad_time(k.float(), Tp).view(B, N, C, Hk, F)
    vf = _pad_time(v.float(), Tp).view(B, N, C, Hk, Dv)

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = torch.einsum("bncxgf,bnsxf->bnxgcs", qf, kf).masked_fill(~causal, 0.0)
    num = torch.einsum("bnxgcs,bnsxd->bncxgd", scores, vf)
    den = scores.sum(-1).permute(0, 1, 4, 2, 3)  # (B, N, C, Hk, G)

    kv = torch.einsum("bnsxf,bnsxd->bnxfd", kf, vf)  # per-chunk sums
    ksum = kf.sum(2)  # (B, N, Hk, F)
    S_incl = kv.cumsum(1)
    z_incl = ksum.cumsum(1)
    S_before = S_incl - kv  # state entering each chunk
    z_before = z_incl - ksum
    if initial_state is not None:
        S0, z0 = initial_state[0].float(), initial_state[1].float()
        S_before = S_before + S0.unsqueeze(1)
        z_before = z_before + z0.unsqueeze(1)
    num = num + torch.einsum("bncxgf,bnxfd->bncxgd", qf, S_before)
    den = den + torch.einsum("bncxgf,bnxf->bncxg", qf, z_before)
    out = num / (den.unsqueeze(-1) + eps) if normalize else num
    out = out.reshape(B, Tp, H, Dv)[:, :T].to(dtype)
    if not output_final_state:
        return out, None
    S, z = S_incl[:, -1], z_incl[:, -1]
    if initial_state is not None:
        S, z = S + S0, z + z0
    return out, (S, z)
