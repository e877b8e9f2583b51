"""Attention operators: one folder each (naive.py = specification, torch_chunk.py = PyTorch path,
chunk.py = Triton), chosen in ``dispatch``."""

from .dispatch import force_backend, hybrid_attn, linear_attn

__all__ = ["force_backend", "hybrid_attn", "linear_attn"]
