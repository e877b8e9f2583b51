"""Specification of streaming attention (LoZA's cheap layers), as plainly as possible.

Layout is (batch, time, heads, dim); q has H heads, k/v have Hk heads, H % Hk == 0. Positions are
counted in blocks of ``block`` tokens. Query i at position p_i attends key j at position p_j when

    0 <= p_j <= p_i   and   ( p_j // block < sink                              (the sink blocks)
                             or p_j // block > p_i // block - local )          (the local blocks)

that is, the first ``sink`` blocks of the sequence plus the ``local`` most recent blocks, the query's
own (diagonal) block included and causal inside it. A query therefore sees between
``(local - 1) * block + 1`` and ``local * block`` recent tokens, plus ``sink * block`` first ones: a
decoding cache needs only ``(sink + local) * block`` tokens however long the sequence (see
``hf_compat.StreamingLayer``).

By default queries are the last T of the Tk keys (query i at position Tk - T + i, key j at j).
``q_pos`` (B, T) and ``k_pos`` (B, Tk) give other positions: a cache whose middle was evicted keeps
the original positions of its keys, and a left-padded row counts positions from its first real token
(a padding key has a negative position and is never attended; a query that sees no key gives 0).
"""

from __future__ import annotations

import torch

from ..linear_attn.naive import expand_kv


def default_positions(T: int, Tk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_pos (1, T), k_pos (1, Tk)): queries are the last T of Tk keys."""
    return torch.arange(Tk - T, Tk, device=device)[None], torch.arange(Tk, device=device)[None]


def streaming_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, *, sink: int, local: int, block: int) -> torch.Tensor:
    """(B, T, Tk) bool: which keys each query attends (positions as in the module docstring)."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    qb, kb = torch.div(qp, block, rounding_mode="floor"), torch.div(kp, block, rounding_mode="floor")
    return (kp >= 0) & (kp <= qp) & ((kb < sink) | (kb > qb - local))


def naive_streaming_attn(q, k, v, *, sink: int, local: int, block: int, scale: float | None = None,
                         q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None):
    B, T, H, D = q.shape
    Tk = k.shape[1]
    dq, dk = default_positions(T, Tk, q.device)
    q_pos = dq if q_pos is None else q_pos
    k_pos = dk if k_pos is None else k_pos
    scale = D**-0.5 if scale is None else scale
    ok = streaming_mask(q_pos, k_pos, sink=sink, local=local, block=block)[:, None]  # (B|1, 1, T, Tk)
    s = torch.einsum("bihd,bjhd->bhij", q.float(), expand_kv(k.float(), H)) * scale
    p = s.masked_fill(~ok, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("bhij,bjhd->bihd", p, expand_kv(v.float(), H)).to(q.dtype)
