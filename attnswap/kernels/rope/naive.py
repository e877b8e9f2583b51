"""Specification of rotary position embeddings as the supported families apply them (half-split
"rotate_half" form, cos/sin computed by the model, (B or 1, T, D)):

    rot(x) = [-x[D/2:], x[:D/2]]
    rope(x) = x * cos + rot(x) * sin          per head, x (B, T, H, D)

``hf_compat.apply_rope`` (transformers' own function) is the authority; tests check this against it.
"""

from __future__ import annotations

import torch


def _rot(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def naive_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * c + _rot(q) * s, k * c + _rot(k) * s
