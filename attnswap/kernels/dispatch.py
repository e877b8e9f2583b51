"""The one place that picks an implementation for each attention operator.

``ATTNSWAP_KERNELS`` = ``auto`` (default: Triton on CUDA tensors when it is importable, PyTorch
otherwise), ``torch`` (always the chunked PyTorch path) or ``triton`` (always Triton; on CPU this
needs ``TRITON_INTERPRET=1``). ``force_backend`` does the same from code.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from .hybrid_attn.torch_chunk import chunk_hybrid_attn
from .linear_attn.torch_chunk import chunk_linear_attn

BACKENDS = ("auto", "torch", "triton")
_forced: str | None = None


@contextlib.contextmanager
def force_backend(name: str):
    """Temporarily force a backend (``auto``, ``torch`` or ``triton``)."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose from {', '.join(BACKENDS)}")
    old, _forced = _forced, name
    try:
        yield
    finally:
        _forced = old


@functools.lru_cache(maxsize=None)
def _triton_ops() -> dict | None:
    try:
        from .hybrid_attn.chunk import triton_hybrid_attn
        from .linear_attn.chunk import triton_linear_attn
    except Exception:  # triton missing or too old: the PyTorch path serves
        return None
    return {"linear": triton_linear_attn, "hybrid": triton_hybrid_attn}


def backend_for(x: torch.Tensor) -> str:
    choice = _forced or os.environ.get("ATTNSWAP_KERNELS", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"ATTNSWAP_KERNELS={choice!r}; choose from {', '.join(BACKENDS)}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if _triton_ops() is None:
            raise RuntimeError("ATTNSWAP_KERNELS=triton but the Triton kernels cannot be imported")
        return "triton"
    return "triton" if x.is_cuda and _triton_ops() is not None else "torch"


def linear_attn(q, k, v, **kw):
    """Causal linear attention; see ``linear_attn/naive.py`` for the contract."""
    if backend_for(q) == "triton":
        return _triton_ops()["linear"](q, k, v, **kw)
    return chunk_linear_attn(q, k, v, **kw)


def hybrid_attn(q, k, v, fq, fk, gamma, **kw):
    """Sliding-window softmax + linear attention; see ``hybrid_attn/naive.py`` for the contract."""
    if backend_for(q) == "triton":
        return _triton_ops()["hybrid"](q, k, v, fq, fk, gamma, **kw)
    return chunk_hybrid_attn(q, k, v, fq, fk, gamma, **kw)
