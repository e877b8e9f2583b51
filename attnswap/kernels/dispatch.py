"""The one place that picks an implementation for each attention operator.

The backend is ``auto`` (default: the Triton kernels for whole sequences on CUDA, the chunked PyTorch
path on CPU and for the one-token decoding steps, which run inside a CUDA graph; see ``backend_for``),
``torch``, or ``triton`` (always Triton, steps included; on CPU this needs ``TRITON_INTERPRET=1``).
Code picks it with ``force_backend`` (a converted model does, from its runtime options); the
environment variable ``ATTNSWAP_KERNELS``, when set, overrides both.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from .block_sparse.masks import index_to_mask, streaming_block_mask
from .block_sparse.torch_chunk import torch_attn_with_block_map, torch_block_sparse_attn, torch_block_sparse_decode
from .feature_map.naive import naive_hedgehog
from .gated_attn.torch_chunk import chunk_gated_hybrid_attn, chunk_gated_linear_attn
from .hybrid_attn.naive import naive_hybrid_step
from .hybrid_attn.torch_chunk import chunk_hybrid_attn
from .linear_attn.naive import naive_linear_step
from .linear_attn.torch_chunk import chunk_linear_attn
from .rope.naive import naive_rope
from .streaming_attn.torch_chunk import torch_streaming_attn

BACKENDS = ("auto", "torch", "triton")
_forced: str | None = None
_compile_forced: str | None = None
COMPILE_SETTINGS = ("off", "attn", "model")


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
        from .block_sparse.chunk import triton_attn_with_block_map, triton_block_sparse_attn
        from .block_sparse.decode import triton_block_sparse_decode
        from .feature_map.fused import triton_hedgehog, triton_hedgehog_pair
        from .gated_attn.chunk import triton_gated_hybrid_attn, triton_gated_linear_attn
        from .hybrid_attn.chunk import triton_hybrid_attn, triton_hybrid_continue
        from .hybrid_attn.fused_recurrent import fused_recurrent_hybrid_step
        from .linear_attn.chunk import triton_linear_attn
        from .linear_attn.fused_recurrent import fused_recurrent_linear_step
        from .rope.fused import triton_rope
    except Exception:  # triton missing or too old: the PyTorch path serves
        return None
    return {
        "linear": triton_linear_attn,
        "hybrid": triton_hybrid_attn,
        "hybrid_continue": triton_hybrid_continue,
        "gated_linear": triton_gated_linear_attn,
        "gated_hybrid": triton_gated_hybrid_attn,
        "linear_step": fused_recurrent_linear_step,
        "hybrid_step": fused_recurrent_hybrid_step,
        "block_sparse": triton_block_sparse_attn,
        "attn_block_map": triton_attn_with_block_map,
        "block_sparse_decode": triton_block_sparse_decode,
        "hedgehog": triton_hedgehog,
        "hedgehog_pair": triton_hedgehog_pair,
        "rope": triton_rope,
    }


def backend_for(x: torch.Tensor, step: bool = False) -> str:
    """``torch`` or ``triton`` for an operator on ``x`` (``step``: a one-token decoding step)."""
    choice = os.environ.get("ATTNSWAP_KERNELS") or _forced or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"ATTNSWAP_KERNELS={choice!r}; choose from {', '.join(BACKENDS)}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if _triton_ops() is None:
            raise RuntimeError("ATTNSWAP_KERNELS=triton but the Triton kernels cannot be imported")
        return "triton"
    # auto: Triton for prefill and training on CUDA (checked against the PyTorch path on the H100 in
    # bf16, docs/BENCHMARKS.md); decoding steps stay on PyTorch, which the CUDA-graph and compiled
    # decode paths were measured with, and which alone serves Lizard's meta tokens in a step
    if step or not x.is_cuda or _triton_ops() is None:
        return "torch"
    return "triton"


def compile_setting() -> str:
    """Whether decoding steps are compiled with torch.compile: ``off`` (default), ``attn`` (each
    layer's attention step, here in the kernels) or ``model`` (the whole one-token step, in
    attnswap/modeling/decode.py). Set from code with ``force_compile``; the environment variable
    ``ATTNSWAP_COMPILE_DECODE`` (0/off, attn, 1/model), when set, overrides it."""
    v = os.environ.get("ATTNSWAP_COMPILE_DECODE")
    if v is None:
        return _compile_forced or "off"
    v = v.lower()
    if v in ("0", "", "false", "off"):
        return "off"
    if v in ("1", "true", "model"):
        return "model"
    if v == "attn":
        return "attn"
    raise ValueError(f"ATTNSWAP_COMPILE_DECODE={v!r}: use 0, attn or model")


@contextlib.contextmanager
def force_compile(setting: str):
    """Temporarily pick the decode-compile setting (``off``, ``attn`` or ``model``)."""
    global _compile_forced
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"unknown compile setting {setting!r}; choose from {', '.join(COMPILE_SETTINGS)}")
    old, _compile_forced = _compile_forced, setting
    try:
        yield
    finally:
        _compile_forced = old


def hedgehog(x, weight, bias, out_dtype=torch.float32, *, step: bool = False):
    """Hedgehog feature map softmax([xW + b, -(xW + b)]) per head, x (..., H, D) -> (..., H, 2F) in
    ``out_dtype``; see ``feature_map/naive.py``. ``step``: a one-token decoding step (PyTorch under
    ``auto``, as the other step operators)."""
    if backend_for(x, step=step) == "triton":
        return _triton_ops()["hedgehog"](x, weight, bias, out_dtype)
    return naive_hedgehog(x, weight, bias, out_dtype)


def hedgehog_pair(xq, wq, bq, xk, wk, bk, q_dtype=torch.float32, k_dtype=torch.float32, *, step: bool = False):
    """``hedgehog`` of a layer's queries and keys, (phi_q(xq) in ``q_dtype``, phi_k(xk) in ``k_dtype``):
    one Triton launch for both where it can (no gradients, maps of one shape), two otherwise."""
    if backend_for(xq, step=step) == "triton":
        return _triton_ops()["hedgehog_pair"](xq, wq, bq, xk, wk, bk, q_dtype, k_dtype)
    return naive_hedgehog(xq, wq, bq, q_dtype), naive_hedgehog(xk, wk, bk, k_dtype)


def rope(q, k, cos, sin, *, step: bool = False):
    """Rotary embeddings of q (B, T, H, D) and k (B, T, Hk, D) with the model's cos/sin (B or 1, T, D),
    transformers' half-split form; see ``rope/naive.py``. ``step``: a one-token decoding step (PyTorch
    under ``auto``). cos/sin that need a gradient always take the PyTorch form."""
    if backend_for(q, step=step) == "triton" and not (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)):
        return _triton_ops()["rope"](q, k, cos, sin)
    return naive_rope(q, k, cos, sin)


def linear_attn(q, k, v, **kw):
    """Causal linear attention; see ``linear_attn/naive.py`` for the contract."""
    if backend_for(q) == "triton":
        return _triton_ops()["linear"](q, k, v, **kw)
    return chunk_linear_attn(q, k, v, **kw)


def _recomputed(fn, *args, **kw):
    """``fn(*args, **kw)``; when it is differentiated, its intermediates are not kept but recomputed in
    the backward (torch.utils.checkpoint). The PyTorch paths keep a chunk's (C x 2C) scores several
    times over per layer: in training on the CPU that, not the weights, is what fills the memory."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(functools.partial(fn, **kw), *args, use_reentrant=False)
    return fn(*args, **kw)


def hybrid_attn(q, k, v, fq, fk, gamma, *, sinks: int = 0, **kw):
    """Sliding-window softmax + linear attention, with ``sinks`` first tokens always exact; see
    ``hybrid_attn/naive.py`` for the contract."""
    if backend_for(q) == "triton":
        return _triton_ops()["hybrid"](q, k, v, fq, fk, gamma, sinks=sinks, **kw)
    return _recomputed(chunk_hybrid_attn, q, k, v, fq, fk, gamma, sinks=sinks, **kw)


def gated_linear_attn(q, k, v, g, **kw):
    """Gated (decaying) causal linear attention; see ``gated_attn/naive.py`` for the contract."""
    if backend_for(q) == "triton":
        return _triton_ops()["gated_linear"](q, k, v, g, **kw)
    return chunk_gated_linear_attn(q, k, v, g, **kw)


def gated_hybrid_attn(q, k, v, fq, fk, g, gamma, *, meta_k=None, meta_v=None, **kw):
    """Sliding-window softmax + gated linear attention, with optional learned sink tokens
    (``meta_k``/``meta_v``, Lizard's meta-memory); see ``gated_attn/naive.py``."""
    if backend_for(q) == "triton":
        return _triton_ops()["gated_hybrid"](q, k, v, fq, fk, g, gamma, meta_k=meta_k, meta_v=meta_v, **kw)
    return _recomputed(chunk_gated_hybrid_attn, q, k, v, fq, fk, g, gamma, meta_k=meta_k, meta_v=meta_v, **kw)


def hybrid_continue(q, k, v, fq, fk, gamma, state, **kw):
    """Several new tokens after a hybrid state through the Triton forward (a chunked prefill), as
    (out, new state); None where the backend is not Triton (the caller then steps in PyTorch). The
    state must hold a full window with the sinks out of it (``triton_hybrid_continue``); ``g=`` gated,
    ``meta_k=``/``meta_v=`` Lizard's meta tokens."""
    if backend_for(q) != "triton":
        return None
    return _triton_ops()["hybrid_continue"](q, k, v, fq, fk, gamma, state, **kw)


def linear_attn_step(q, k, v, state, **kw):
    """One decoding step of (optionally gated, ``g=``) linear attention: q (B,H,F), k (B,Hk,F),
    v (B,Hk,Dv), state (S, z). The Triton step updates the state in place, the PyTorch one returns a
    new one; use the returned state either way. Returns (out (B,H,Dv), state)."""
    if backend_for(q, step=True) == "triton":
        return _triton_ops()["linear_step"](q, k, v, state, **kw)
    return naive_linear_step(q, k, v, state, **kw)


def hybrid_attn_step(q, k, v, fq, fk, gamma, cache, **kw):
    """One decoding step of the (optionally gated) hybrid; cache layout in ``hybrid_attn/naive.py``
    (``hybrid_cache_from_prefill`` builds it). Returns (out (B,H,Dv), cache); use the returned cache."""
    if backend_for(q, step=True) == "triton":
        if kw.get("meta_k") is not None:
            raise RuntimeError("the Triton decoding step has no meta tokens yet; use ATTNSWAP_KERNELS=auto or torch")
        return _triton_ops()["hybrid_step"](q, k, v, fq, fk, gamma, cache, **{n: x for n, x in kw.items()
                                                                            if n not in ("meta_k", "meta_v")})
    return naive_hybrid_step(q, k, v, fq, fk, gamma, cache, **kw)


def block_sparse_attn(q, k, v, block_mask=None, *, block: int = 64, scale: float | None = None, index=None):
    """Block-sparse causal attention (prefill; queries are the last T of the Tk keys): q (B, T, H, D),
    k/v (B, Tk, Hk, D), ``block_mask`` (B, Hg, nQ, nK) bool or ``index`` = (idx, cnt) from
    ``block_sparse.masks.block_mask_to_index``; conventions in ``block_sparse/masks.py``, contract in
    ``block_sparse/naive.py``. Returns (B, T, H, Dv). The Triton kernel is forward-only: when a
    gradient is needed the (chunked, differentiable) PyTorch path runs instead."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if backend_for(q) == "triton" and not needs_grad:
        return _triton_ops()["block_sparse"](q, k, v, block_mask, block=block, scale=scale, index=index)
    if block_mask is None:
        if index is None:
            raise ValueError("give block_mask or index")
        block_mask = index_to_mask(index[0], index[1], -(-k.shape[1] // block))
    return torch_block_sparse_attn(q, k, v, block_mask, block=block, scale=scale)


def attn_with_block_map(q, k, v, *, block: int = 64, scale: float | None = None):
    """Exact causal attention plus the attention map max-pooled over (block x block) tiles and
    normalised per query-block row (the gate's training target): returns (out (B, T, H, Dv),
    block_map (B, H, nQ, nK) fp32), per QUERY head; see ``block_sparse/naive.py``. No gradients
    (the teacher is frozen)."""
    if backend_for(q) == "triton":
        return _triton_ops()["attn_block_map"](q, k, v, block=block, scale=scale)
    return torch_attn_with_block_map(q, k, v, block=block, scale=scale)


def block_sparse_decode(q, k_cache, v_cache, block_idx, block_cnt, *, block: int = 64, scale: float | None = None,
                        cache_seqlens=None):
    """One decoding step reading only the selected key blocks of the cache: q (B, H, D), caches
    (B, L, Hk, D) holding the new token as their last entry, ``block_idx`` (B, Hg, S) / ``block_cnt``
    (B, Hg) int32 (``block_sparse.masks.decode_index``), Hk | Hg | H; ``cache_seqlens`` (B,) for a
    static cache. Returns (B, H, Dv). Unlike the linear steps, ``auto`` picks Triton on CUDA here: the
    kernel's grid depends only on shapes (CUDA-graph safe with a fixed-width ``block_idx``), and reading
    only the selected blocks is the point of the step."""
    if backend_for(q) == "triton":
        return _triton_ops()["block_sparse_decode"](q, k_cache, v_cache, block_idx, block_cnt, block=block,
                                                     scale=scale, cache_seqlens=cache_seqlens)
    return torch_block_sparse_decode(q, k_cache, v_cache, block_idx, block_cnt, block=block, scale=scale,
                                     cache_seqlens=cache_seqlens)


def streaming_attn(q, k, v, *, sink: int, local: int, block: int, scale: float | None = None):
    """Streaming attention (prefill; queries are the last T of the Tk keys): each query sees the first
    ``sink`` blocks and its ``local`` most recent blocks, causal (contract in ``streaming_attn/naive.py``).
    Without gradients on CUDA this is the block-sparse Triton kernel under a sink + local block mask;
    otherwise the gathered PyTorch path (``streaming_attn/torch_chunk.py``), which is differentiable."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if backend_for(q) == "triton" and not needs_grad:
        T, Tk = q.shape[1], k.shape[1]
        mask = streaming_block_mask(T, Tk, block, sink, local, device=q.device).expand(q.shape[0], -1, -1, -1)
        return _triton_ops()["block_sparse"](q, k, v, mask, block=block, scale=scale)
    return torch_streaming_attn(q, k, v, sink=sink, local=local, block=block, scale=scale)
