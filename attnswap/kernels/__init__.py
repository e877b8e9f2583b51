"""Attention operators: one folder each (naive.py = specification, torch_chunk.py = PyTorch path,
chunk.py = Triton), chosen in ``dispatch``."""

from .block_sparse.masks import block_mask_to_index, decode_index
from .dispatch import (
    attn_with_block_map,
    block_sparse_attn,
    block_sparse_decode,
    force_backend,
    gated_hybrid_attn,
    gated_linear_attn,
    hedgehog,
    hedgehog_pair,
    hybrid_attn,
    hybrid_attn_step,
    linear_attn,
    linear_attn_step,
    rope,
    streaming_attn,
)
from .hybrid_attn.naive import hybrid_cache_from_prefill

__all__ = [
    "attn_with_block_map",
    "block_mask_to_index",
    "block_sparse_attn",
    "block_sparse_decode",
    "decode_index",
    "force_backend",
    "gated_hybrid_attn",
    "gated_linear_attn",
    "hedgehog",
    "hedgehog_pair",
    "hybrid_attn",
    "hybrid_attn_step",
    "hybrid_cache_from_prefill",
    "linear_attn",
    "linear_attn_step",
    "rope",
    "streaming_attn",
]
