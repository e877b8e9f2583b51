"""Specification of the block-sparse attention operators (SeerAttention-style), as plainly as possible.

Layout is (batch, time, heads, dim). q has H heads, k/v have Hk heads, H % Hk == 0 (query head h reads
KV head h // (H // Hk)). Block geometry and mask conventions: ``masks.py``. ``scale`` defaults to
D ** -0.5. All three compute in fp32 and return q's dtype (the block map is fp32).

block_sparse_attn: queries are the last T of Tk keys (query i at absolute position Tk - T + i);
    out_i = softmax_j( s_ij  where j <= pos_i and block(j) is selected for (head, block(pos_i)) ) v_j

attn_with_block_map: exact causal attention (out as above with every block selected) and
    P_ij = the causal softmax probabilities (0 above the diagonal),
    M[b, h, r, c] = max over query positions i in query block r and key positions j in key block c of P_ij,
    block_map = M / sum_c M        (each row sums to 1; causally invisible blocks are 0).
Queries absent from a partial block (before the first query or past the end) do not count.

block_sparse_decode: one query per sequence at position L - 1 of its cache (``cache_seqlens`` gives
per-sequence lengths for a static cache, else L = k_cache.shape[1]); it attends to the tokens j < L of
the key blocks listed in block_idx[b, g, :block_cnt[b, g]] for its selection head g = h // (H // Hg).
"""

from __future__ import annotations

import torch

from ..linear_attn.naive import expand_kv
from .masks import block_layout, causal_block_mask, check_block_mask, diagonal_and_sink, index_to_mask


def _token_mask(block_mask: torch.Tensor, T: int, Tk: int, H: int, block: int) -> torch.Tensor:
    """(B, Hg, nQ, nK) block mask -> (B, H, T, Tk) token mask, causal."""
    q0, _, _ = block_layout(T, Tk, block)
    pos_q = torch.arange(Tk - T, Tk, device=block_mask.device)
    pos_k = torch.arange(Tk, device=block_mask.device)
    bm = block_mask.bool().repeat_interleave(H // block_mask.shape[1], dim=1)
    tok = bm[:, :, pos_q // block - q0][:, :, :, pos_k // block]
    return tok & (pos_k[None, :] <= pos_q[:, None])


def naive_block_sparse_attn(q, k, v, block_mask, *, block: int = 64, scale: float | None = None):
    B, T, H, D = q.shape
    Tk = k.shape[1]
    _, nQ, nK = block_layout(T, Tk, block)
    check_block_mask(block_mask, B, H, nQ, nK)
    must = diagonal_and_sink(nQ, nK, block_mask.device)
    assert bool(block_mask.bool()[..., must].all()), "the sink and the diagonal block must be selected"
    scale = D**-0.5 if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q.float(), expand_kv(k.float(), H)) * scale
    s = s.masked_fill(~_token_mask(block_mask, T, Tk, H, block), float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), expand_kv(v.float(), H))
    return out.to(q.dtype)


def naive_attn_block_map(q, k, v, *, block: int = 64, scale: float | None = None):
    """Returns (out (B, T, H, Dv) in q's dtype, block_map (B, H, nQ, nK) fp32)."""
    B, T, H, D = q.shape
    Tk = k.shape[1]
    q0, nQ, nK = block_layout(T, Tk, block)
    scale = D**-0.5 if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q.float(), expand_kv(k.float(), H)) * scale
    pos_q = torch.arange(Tk - T, Tk, device=q.device)
    causal = torch.arange(Tk, device=q.device)[None, :] <= pos_q[:, None]
    p = s.masked_fill(~causal, float("-inf")).softmax(-1)
    out = torch.einsum("bhij,bjhd->bihd", p, expand_kv(v.float(), H)).to(q.dtype)
    grid = p.new_zeros(B, H, nQ * block, nK * block)
    r0 = Tk - T - q0 * block  # row of the first query inside the block grid
    grid[:, :, r0:r0 + T, :Tk] = p
    m = grid.view(B, H, nQ, block, nK, block).amax(dim=(3, 5))
    assert not m.masked_select(~causal_block_mask(nQ, nK, q.device)).any()
    return out, m / m.sum(-1, keepdim=True)


def naive_block_sparse_decode(q, k_cache, v_cache, block_idx, block_cnt, *, block: int = 64,
                              scale: float | None = None, cache_seqlens: torch.Tensor | None = None):
    """q (B, H, D), caches (B, L, Hk, D), block_idx (B, Hg, S), block_cnt (B, Hg) -> (B, H, Dv)."""
    B, H, D = q.shape
    L = k_cache.shape[1]
    nK = -(-L // block)
    Hg = block_idx.shape[1]
    assert H % Hg == 0 and bool((block_cnt >= 1).all())
    scale = D**-0.5 if scale is None else scale
    lens = torch.full((B,), L, device=q.device) if cache_seqlens is None else cache_seqlens.long()
    sel = index_to_mask(block_idx, block_cnt, nK).repeat_interleave(H // Hg, dim=1)  # (B, H, nK)
    pos = torch.arange(L, device=q.device)
    ok = sel[:, :, pos // block] & (pos[None, None, :] < lens[:, None, None])  # (B, H, L)
    s = torch.einsum("bhd,bjhd->bhj", q.float(), expand_kv(k_cache.float(), H)) * scale
    p = s.masked_fill(~ok, float("-inf")).softmax(-1)
    return torch.einsum("bhj,bjhd->bhd", p, expand_kv(v_cache.float(), H)).to(q.dtype)
