"""Block-sparse operators in plain PyTorch, with bounded memory (same contracts as ``naive.py``).

Prefill and the block map walk the query blocks in groups sized so that one group's scores stay under
``max_scores`` elements (never a T x Tk matrix for long T); each group only sees the keys up to its
last query (causal). Query heads are viewed as (Hk, G) so KV heads are never repeated. Decode gathers
just the selected key blocks of the cache (S * block tokens per selection head), so its shapes are
static given S. Autograd works through all of them (prefill is the one that needs it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_

from .masks import block_layout, check_block_mask

MAX_SCORES = 1 << 25  # fp32 score elements per query group (128 MiB)


def _groups(T: int, Tk: int, block: int, heads: int, batch: int, max_scores: int):
    """Yield (r0, r1, t0, t1, kend): query blocks [r0, r1), query rows [t0, t1), keys [0, kend)."""
    q0, nQ, nK = block_layout(T, Tk, block)
    off = Tk - T
    per = max(1, max_scores // max(1, batch * heads * block * Tk))
    for r0 in range(0, nQ, per):
        r1 = min(nQ, r0 + per)
        t0 = max(0, (q0 + r0) * block - off)
        t1 = min(T, (q0 + r1) * block - off)
        yield r0, r1, t0, t1, min(Tk, (q0 + r1) * block)


def _scores(q, k, t0, t1, kend, scale):
    """(B, Hk, G, rows, kend) fp32 scores of query rows [t0, t1) against keys [0, kend)."""
    B, _, H, D = q.shape
    Hk = k.shape[2]
    qg = q[:, t0:t1].float().view(B, t1 - t0, Hk, H // Hk, D)
    return torch.einsum("bikgd,bjkd->bkgij", qg, k[:, :kend].float()) * scale


def _causal(T, Tk, t0, t1, kend, device):
    pos_q = torch.arange(Tk - T + t0, Tk - T + t1, device=device)
    return torch.arange(kend, device=device)[None, :] <= pos_q[:, None]


def _out(p, v, kend, dtype):
    B, Hk, G, rows, _ = p.shape
    o = torch.einsum("bkgij,bjkd->bikgd", p, v[:, :kend].float())
    return o.reshape(B, rows, Hk * G, -1).to(dtype)


def torch_block_sparse_attn(q, k, v, block_mask, *, block: int = 64, scale: float | None = None,
                            max_scores: int = MAX_SCORES):
    B, T, H, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    q0, nQ, nK = block_layout(T, Tk, block)
    Hg = check_block_mask(block_mask, B, H, nQ, nK)
    scale = D**-0.5 if scale is None else scale
    head_rows = block_mask.bool()[:, torch.arange(H, device=q.device) // (H // Hg)]  # (B, H, nQ, nK), small
    outs = []
    for r0, r1, t0, t1, kend in _groups(T, Tk, block, H, B, max_scores):
        s = _scores(q, k, t0, t1, kend, scale)
        pos_q = torch.arange(Tk - T + t0, Tk - T + t1, device=q.device)
        pos_k = torch.arange(kend, device=q.device)
        tok = head_rows[:, :, pos_q // block - q0][:, :, :, pos_k // block]  # (B, H, rows, kend)
        ok = tok & _causal(T, Tk, t0, t1, kend, q.device)
        s = s.masked_fill(~ok.view(B, Hk, H // Hk, t1 - t0, kend), float("-inf"))
        outs.append(_out(s.softmax(-1), v, kend, q.dtype))
    return torch.cat(outs, 1)


@torch.no_grad()
def torch_attn_with_block_map(q, k, v, *, block: int = 64, scale: float | None = None,
                              max_scores: int = MAX_SCORES):
    B, T, H, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    q0, nQ, nK = block_layout(T, Tk, block)
    scale = D**-0.5 if scale is None else scale
    outs, maps = [], []
    for r0, r1, t0, t1, kend in _groups(T, Tk, block, H, B, max_scores):
        s = _scores(q, k, t0, t1, kend, scale)
        p = s.masked_fill(~_causal(T, Tk, t0, t1, kend, q.device), float("-inf")).softmax(-1)
        outs.append(_out(p, v, kend, q.dtype))
        nb, kb = r1 - r0, -(-kend // block)
        lead = Tk - T + t0 - (q0 + r0) * block  # rows of the group's first block before its first query
        grid = F_.pad(p.reshape(B, H, t1 - t0, kend), (0, kb * block - kend, lead, nb * block - lead - (t1 - t0)))
        m = grid.view(B, H, nb, block, kb, block).amax(dim=(3, 5))
        maps.append(F_.pad(m, (0, nK - kb)))
    m = torch.cat(maps, 2)
    return torch.cat(outs, 1), m / m.sum(-1, keepdim=True)


def torch_block_sparse_decode(q, k_cache, v_cache, block_idx, block_cnt, *, block: int = 64,
                              scale: float | None = None, cache_seqlens: torch.Tensor | None = None):
    B, H, D = q.shape
    L, Hk, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    Hg, S = block_idx.shape[1:]
    R = Hg // Hk if Hg >= Hk else None
    if R is None or Hg % Hk or H % Hg:
        raise ValueError(f"selection heads ({Hg}) must be a multiple of the KV heads ({Hk}) and divide H ({H})")
    scale = D**-0.5 if scale is None else scale
    nK = -(-L // block)
    lens = torch.full((B,), L, device=q.device) if cache_seqlens is None else cache_seqlens.to(q.device).long()
    valid = torch.arange(S, device=q.device) < block_cnt[..., None].long()  # (B, Hg, S)
    bi = torch.where(valid, block_idx.long(), torch.zeros_like(block_idx, dtype=torch.long)).clamp(0, nK - 1)
    pos = bi[..., None] * block + torch.arange(block, device=q.device)  # (B, Hg, S, block)
    ok = valid[..., None] & (pos < lens[:, None, None, None])
    pos = pos.clamp_max(L - 1).reshape(B, Hg, S * block)
    kv_head = (torch.arange(Hg, device=q.device) // R)[None, :, None]
    bidx = torch.arange(B, device=q.device)[:, None, None]

    def gather(c):  # (B, L, Hk, Dc), any strides -> (B, Hg, S * block, Dc): only the selected blocks
        return c[bidx, pos, kv_head]

    kk, vv = gather(k_cache).float(), gather(v_cache).float()
    qg = q.float().view(B, Hg, H // Hg, D)
    s = torch.einsum("bgqd,bgjd->bgqj", qg, kk) * scale
    s = s.masked_fill(~ok.reshape(B, Hg, 1, S * block), float("-inf"))
    p = torch.nan_to_num(s.softmax(-1))  # a head with nothing selected gives 0
    return torch.einsum("bgqj,bgjd->bgqd", p, vv).reshape(B, H, Dv).to(q.dtype)
