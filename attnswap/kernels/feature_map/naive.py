"""Specification of the Hedgehog feature map (LoLCATs, Lizard): a per-head linear map, then a softmax
over the concatenation [z, -z], so every feature is positive and the features of a row sum to one.

    z = x W_h + b_h            x (..., H, D), W (H, D, F), b (H, F)
    phi(x) = softmax([z, -z])  (..., H, 2F), computed in fp32
"""

from __future__ import annotations

import torch


def naive_hedgehog(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    z = torch.einsum("...hd,hdf->...hf", x.float(), weight.float()) + bias.float()
    return torch.softmax(torch.cat([z, -z], dim=-1), dim=-1).to(out_dtype)
