"""Attention operators: one folder each (naive.py = specification, torch_chunk.py = PyTorch path,
chunk.py = Triton), chosen in ``dispatch``."""

from .dispatch import (
    force_backend,
    gated_hybrid_attn,
    gated_linear_attn,
    hybrid_attn,
    hybrid_attn_step,
    linear_attn,
    linear_attn_step,
)
from .hybrid_attn.naive import hybrid_cache_from_prefill

__all__ = [
    "force_backend",
    "gated_hybrid_attn",
    "gated_linear_attn",
    "hybrid_attn",
    "hybrid_attn_step",
    "hybrid_cache_from_prefill",
    "linear_attn",
    "linear_attn_step",
]
