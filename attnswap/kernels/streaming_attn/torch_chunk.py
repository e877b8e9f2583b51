"""Streaming attention in plain PyTorch in O(T * (sink + local) * block), differentiable.

Each query block gathers just the keys it may see (its sink blocks and its local blocks, a fixed
``W = (sink + local) * block`` of them) and runs SDPA over them, many query blocks per call (they
become SDPA's batch). No T x T score matrix is formed. Queries are the last T of the Tk keys (the
default positions of ``naive.py``); other layouts (evicted caches, padding) take the reference path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_GATHERED = 1 << 22  # gathered key rows (query blocks x W x batch) per SDPA call


def gather_index(T: int, Tk: int, *, sink: int, local: int, block: int, device):
    """For the query blocks holding the last T of Tk positions: (first block q0, key positions
    (nQ, W) long clamped into range, valid (nQ, W) bool: a real, distinct key of that block's window)."""
    q0 = (Tk - T) // block
    nQ = -(-Tk // block) - q0
    r = torch.arange(q0, q0 + nQ, device=device)[:, None]  # absolute query blocks
    s = torch.arange(sink * block, device=device)[None].expand(nQ, -1)
    loc = (r - local + 1) * block + torch.arange(local * block, device=device)[None]
    pos = torch.cat([s, loc], 1)
    is_sink = torch.arange(pos.shape[1], device=device)[None] < sink * block
    # a local position inside the sink region would be counted twice, a sink one past the query is unseen
    valid = (pos >= 0) & (pos < Tk) & (is_sink | (pos >= sink * block))
    return q0, nQ, pos.clamp(0, Tk - 1), valid


def torch_streaming_attn(q, k, v, *, sink: int, local: int, block: int, scale: float | None = None,
                         max_gathered: int = MAX_GATHERED):
    B, T, H, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    q0, nQ, pos, valid = gather_index(T, Tk, sink=sink, local=local, block=block, device=q.device)
    W = pos.shape[1]
    lead = Tk - T - q0 * block  # query rows of the first block that precede the first query
    qp = F.pad(q, (0, 0, 0, 0, lead, nQ * block - lead - T)).view(B, nQ, block, H, D)
    qpos = (q0 * block + torch.arange(nQ * block, device=q.device)).view(nQ, block)
    per = max(1, max_gathered // max(1, B * W))
    outs = []
    for a in range(0, nQ, per):
        b = min(nQ, a + per)
        n = b - a
        kg = k[:, pos[a:b]].reshape(B * n, W, Hk, -1).transpose(1, 2)  # (B*n, Hk, W, D)
        vg = v[:, pos[a:b]].reshape(B * n, W, Hk, -1).transpose(1, 2)
        ok = valid[a:b, None, :] & (pos[a:b, None, :] <= qpos[a:b, :, None])  # (n, block, W)
        ok[..., 0] |= ~ok.any(-1)  # padding query rows: let them see one key (discarded below), never NaN
        mask = ok[None].expand(B, -1, -1, -1).reshape(B * n, 1, block, W)
        qg = qp[:, a:b].reshape(B * n, block, H, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(o.transpose(1, 2).reshape(B, n * block, H, -1))
    out = torch.cat(outs, 1)
    return out[:, lead:lead + T]
