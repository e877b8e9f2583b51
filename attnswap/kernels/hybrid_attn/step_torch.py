"""Continuing the hybrid window + linear attention from a constant-size state, in PyTorch.

State after t tokens (all fp32 except the window, which keeps the input dtype):
    S (B, Hk, F, Dv)  sum of fk_j^T v_j over keys that have left the window
    z (B, Hk, F)      sum of fk_j over the same keys
    win_k (B, W, Hk, D), win_v (B, W, Hk, Dv), win_fk (B, W, Hk, F): the last W keys, oldest first
    win_valid (B, W)  False for slots not yet filled (or left padding)
Its size is independent of t. ``hybrid_step`` attends Tq new queries (usually 1) and returns the
updated state; it matches ``naive_hybrid_attn`` on the full sequence (tests/test_generation.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_


def hybrid_prefill_state(k, v, fk, valid, *, window: int) -> dict:
    """The state after keys k (B, T, Hk, D), values v, key features fk; ``valid`` (B, T) bool."""
    B, T, Hk, _ = k.shape
    W = window
    m = valid.to(torch.float32)[..., None, None]
    fkm, vm = fk.float() * m, v.float() * m
    old = max(0, T - W)
    S = torch.einsum("btxf,btxd->bxfd", fkm[:, :old], vm[:, :old])
    z = fkm[:, :old].sum(1)
    pad = max(0, W - T)

    def last(x, fill=0):
        x = x[:, old:]
        return F_.pad(x, (0, 0) * (x.dim() - 2) + (pad, 0), value=fill) if pad else x

    return {"S": S, "z": z, "win_k": last(k), "win_v": last(v), "win_fk": last(fk.float()),
            "win_valid": F_.pad(valid[:, old:], (pad, 0), value=False) if pad else valid[:, old:].clone()}


def hybrid_step(q, k, v, fq, fk, gamma, state: dict, *, window: int, scale: float, eps: float = 1e-6):
    """Attend queries q (B, Tq, H, D) whose keys k/v/fk (B, Tq, Hk, .) directly follow the state."""
    B, Tq, H, D = q.shape
    Hk = k.shape[2]
    G, W = H // Hk, window
    kl = torch.cat([state["win_k"], k.to(state["win_k"].dtype)], 1).float()  # (B, W+Tq, Hk, D)
    vl = torch.cat([state["win_v"], v.to(state["win_v"].dtype)], 1).float()
    fkl = torch.cat([state["win_fk"], fk.float()], 1)
    ok = torch.cat([state["win_valid"], torch.ones(B, Tq, dtype=torch.bool, device=q.device)], 1)
    t = torch.arange(Tq, device=q.device)[:, None]
    j = torch.arange(W + Tq, device=q.device)[None, :]
    in_win = (j <= W + t) & (j > t) & ok[:, None, :]  # (B, Tq, W+Tq): query t sits at local W+t
    older = (j <= t) & ok[:, None, :]
    qg = q.float().view(B, Tq, Hk, G, D)
    fqg = fq.float().view(B, Tq, Hk, G, -1)
    s = torch.einsum("btxgd,bjxd->bxgtj", qg, kl) * scale
    s = s.masked_fill(~in_win[:, None, None], float("-inf"))
    a = gamma.float().view(1, Hk, G, 1, 1) * torch.exp(s - s.amax(-1, keepdim=True))
    a = a + torch.einsum("btxgf,bjxf->bxgtj", fqg, fkl).masked_fill(~older[:, None, None], 0.0)
    num = torch.einsum("bxgtj,bjxd->btxgd", a, vl) + torch.einsum("btxgf,bxfd->btxgd", fqg, state["S"])
    den = a.sum(-1).permute(0, 3, 1, 2) + torch.einsum("btxgf,bxf->btxg", fqg, state["z"])
    out = (num / (den.unsqueeze(-1) + eps)).reshape(B, Tq, H, -1)
    # the first Tq slots of the local keys leave the window: fold them into the linear state
    leave = ok[:, :Tq].float()[..., None, None]
    new = {
        "S": state["S"] + torch.einsum("btxf,btxd->bxfd", fkl[:, :Tq] * leave, vl[:, :Tq]),
        "z": state["z"] + (fkl[:, :Tq] * leave).sum(1),
        "win_k": torch.cat([state["win_k"], k.to(state["win_k"].dtype)], 1)[:, Tq:],
        "win_v": torch.cat([state["win_v"], v.to(state["win_v"].dtype)], 1)[:, Tq:],
        "win_fk": fkl[:, Tq:],
        "win_valid": ok[:, Tq:],
    }
    return out.to(q.dtype), new
