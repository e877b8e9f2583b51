from __future__ import annotations

import pytest
import torch
from conftest import CASES, check, dgamma_err_in_fp16, skip_triton_on

from attnswap.kernels.hybrid_attn.naive import hybrid_cache_from_prefill, naive_hybrid_attn, naive_hybrid_step
from attnswap.kernels.hybrid_attn.torch_chunk import chunk_hybrid_attn

# (B, T, H, Hk, D, F, Dv, W, chunk)
CPU_SHAPES = [(1, 37, 2, 1, 16, 16, 16, 8, 16), (2, 45, 6, 2, 16, 24, 16, 20, 16), (1, 40, 2, 2, 32, 16, 20, 1, 16),
              (1, 130, 9, 3, 64, 128, 64, 64, 64)]  # the last one: SmolLM2's heads, head dim and features
GPU_SHAPES = [(2, 300, 6, 2, 64, 128, 64, 64, 64), (1, 700, 8, 2, 128, 128, 128, 128, 64), (1, 200, 4, 4, 64, 64, 64, 30, 64),
              (2, 1024, 9, 3, 64, 128, 64, 64, 64)]


def _inputs(B, T, H, Hk, D, F, Dv, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, pos=False: ((torch.rand(*s, generator=g) if pos else torch.randn(*s, generator=g))  # noqa: E731
                                .to(device, dtype).requires_grad_())
    return (mk(B, T, H, D), mk(B, T, Hk, D), mk(B, T, Hk, Dv), mk(B, T, H, F, pos=True), mk(B, T, Hk, F, pos=True),
            torch.rand(H, generator=g).to(device, dtype).requires_grad_())


def _impl(name):
    if name == "triton":
        from attnswap.kernels.hybrid_attn.chunk import triton_hybrid_attn
        return triton_hybrid_attn
    return chunk_hybrid_attn


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("use_linear", [True, False])
@pytest.mark.parametrize("shape_i", [0, 1, 2, 3])
def test_hybrid_attn_matches_naive(device, dtype, impl, use_linear, shape_i):
    if impl == "triton":
        skip_triton_on(device)
    B, T, H, Hk, D, F, Dv, W, C = (CPU_SHAPES if device == "cpu" else GPU_SHAPES)[shape_i]
    q, k, v, fq, fk, gamma = _inputs(B, T, H, Hk, D, F, Dv, device, dtype, seed=shape_i)
    kw = dict(window=W, scale=D**-0.5, use_linear=use_linear)
    out = _impl(impl)(q, k, v, fq, fk, gamma, chunk_size=C, **kw)
    ref = naive_hybrid_attn(q, k, v, fq, fk, gamma, **kw)
    do = torch.randn_like(ref)
    # without the linear branch gamma cancels (its gradient is ~0); with W=1 the window is one key
    # and q, k get no gradient: only compare what is defined
    names = ["q", "k", "v"] + (["fq", "fk", "gamma"] if use_linear else [])
    if W == 1:
        names = [n for n in names if n not in ("q", "k")]
    ins = [dict(q=q, k=k, v=v, fq=fq, fk=fk, gamma=gamma)[n] for n in names]
    grads = torch.autograd.grad(out, ins, do)
    grads_r = torch.autograd.grad(ref, ins, do)
    tag = f"hybrid/{impl}/{'lin' if use_linear else 'nolin'}/T{T}W{W}"
    check(tag + "/out", out, ref, dtype)
    for n, a, b in zip(names, grads, grads_r):
        check(f"{tag}/d{n}", a, b, dtype, grad=True)


def test_hybrid_full_window_is_softmax():
    """use_linear=False with window >= T is causal softmax attention (checks the spec itself)."""
    q, k, v, fq, fk, gamma = _inputs(1, 20, 2, 1, 16, 16, 16, "cpu", torch.float32)
    out = naive_hybrid_attn(q, k, v, None, None, gamma, window=64, scale=0.25, use_linear=False)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
        is_causal=True, scale=0.25).transpose(1, 2)
    check("hybrid/spec-softmax", out, ref, torch.float32)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("impl", ["triton", "naive"])
@pytest.mark.parametrize("use_linear", [True, False])
def test_hybrid_decode_parity(device, dtype, impl, use_linear):
    """prefill n tokens -> cache, then k decode steps == hybrid over n + k tokens (crosses the window)."""
    if impl == "triton":
        skip_triton_on(device)
    B, H, Hk, D, F, Dv, W = 2, 6, 2, 16, 24, 16, 5
    n, k_steps = 3, 9
    q, k, v, fq, fk, gamma = (x.detach() for x in _inputs(B, n + k_steps, H, Hk, D, F, Dv, device, dtype, seed=3))
    kw = dict(scale=D**-0.5, use_linear=use_linear)
    ref = naive_hybrid_attn(q, k, v, fq, fk, gamma, window=W, **kw)
    cache = hybrid_cache_from_prefill(k[:, :n], v[:, :n], fk[:, :n] if use_linear else None, W)
    if impl == "triton":
        from attnswap.kernels.hybrid_attn.fused_recurrent import fused_recurrent_hybrid_step as step
    else:
        step = naive_hybrid_step
    for t in range(n, n + k_steps):
        o, cache = step(q[:, t], k[:, t], v[:, t], fq[:, t], fk[:, t], gamma, cache, **kw)
        check(f"hybrid-step/{impl}/t{t}", o, ref[:, t], dtype)


@pytest.mark.parametrize("shape", [(1, 200, 4, 4, 64, 64, 64, 30, 64), (1, 256, 9, 3, 64, 128, 64, 64, 64)])
def test_hybrid_dgamma_in_16_bit_against_fp32(shape):
    """d gamma sums e_ij (dnum_i . v_j + dden_i) over every query and nearly cancels, so the forward
    must not round the window weights, linear scores or state to 16 bits on their own (the denominators
    stay fp32). Under the interpreter fp16 shows it (bf16 on a GPU showed 6-17%): fp32 reference on
    the same fp16 inputs."""
    skip_triton_on("cpu")
    from attnswap.kernels.hybrid_attn.chunk import triton_hybrid_attn

    B, T, H, Hk, D, F, Dv, W, C = shape
    ins = _inputs(B, T, H, Hk, D, F, Dv, "cpu", torch.float16, seed=2)
    fast = lambda *a, **kw: triton_hybrid_attn(*a, chunk_size=C, **kw)  # noqa: E731
    assert dgamma_err_in_fp16(fast, naive_hybrid_attn, ins, 5, window=W, scale=D**-0.5) < 2e-3


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("use_linear", [True, False])
@pytest.mark.parametrize("shape_i,sinks", [(0, 4), (1, 3), (3, 4), (0, 20)])
def test_triton_hybrid_with_sinks_matches_naive(device, dtype, use_linear, shape_i, sinks):
    """Sink tokens (the first ``sinks`` keys, exact for every query, never in the linear branch),
    including more sinks than a chunk holds (20 > 16)."""
    skip_triton_on(device)
    from attnswap.kernels.hybrid_attn.chunk import triton_hybrid_attn

    B, T, H, Hk, D, F, Dv, W, C = (CPU_SHAPES if device == "cpu" else GPU_SHAPES)[shape_i]
    if device == "cpu" and sinks == 20:
        T = max(T, 100)
    q, k, v, fq, fk, gamma = _inputs(B, T, H, Hk, D, F, Dv, device, dtype, seed=3)
    kw = dict(window=W, scale=D**-0.5, use_linear=use_linear, sinks=sinks)
    out = triton_hybrid_attn(q, k, v, fq, fk, gamma, chunk_size=C, **kw)
    ref = naive_hybrid_attn(q, k, v, fq, fk, gamma, **kw)
    do = torch.randn_like(ref)
    names = ["q", "k", "v"] + (["fq", "fk", "gamma"] if use_linear else [])
    ins = [dict(q=q, k=k, v=v, fq=fq, fk=fk, gamma=gamma)[n] for n in names]
    tag = f"hybrid-sinks{sinks}/triton/{'lin' if use_linear else 'nolin'}/T{T}W{W}"
    check(tag + "/out", out, ref, dtype)
    for n, a, b in zip(names, torch.autograd.grad(out, ins, do), torch.autograd.grad(ref, ins, do)):
        check(f"{tag}/d{n}", a, b, dtype, grad=True)


def _hybrid_grads_against_naive(tag, shape, device, dtype, use_linear, sinks, seed=7):
    from attnswap.kernels.hybrid_attn.chunk import triton_hybrid_attn

    B, T, H, Hk, D, F, Dv, W, C = shape
    q, k, v, fq, fk, gamma = _inputs(B, T, H, Hk, D, F, Dv, device, dtype, seed=seed)
    kw = dict(window=W, scale=D**-0.5, use_linear=use_linear, sinks=sinks)
    out = triton_hybrid_attn(q, k, v, fq, fk, gamma, chunk_size=C, **kw)
    ref = naive_hybrid_attn(q, k, v, fq, fk, gamma, **kw)
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    names = ["q", "k", "v"] + (["fq", "fk", "gamma"] if use_linear else [])
    ins = [dict(q=q, k=k, v=v, fq=fq, fk=fk, gamma=gamma)[n] for n in names]
    check(tag + "/out", out, ref, dtype)
    got = torch.autograd.grad(out, ins, do)
    for n, a, b in zip(names, got, torch.autograd.grad(ref, ins, do)):
        check(f"{tag}/d{n}", a, b, dtype, grad=True)
    return got


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("use_linear", [True, False])
@pytest.mark.parametrize("sinks", [4, 20])
def test_hybrid_sink_keys_far_queries_split(device, dtype, use_linear, sinks):
    """The sink keys' gradient from queries past their tile's window walk comes from a kernel of its own,
    several programs over the rows (_hy_bwd_dsink_kernel), added to what the key tiles wrote: against
    the naive spec, and equal to the one-program walk it replaces (TUNING['bwd_sink_split'] off)."""
    skip_triton_on(device)
    from attnswap.kernels.hybrid_attn.chunk import _sink_far
    from attnswap.kernels.linear_attn.chunk import TUNING

    shape = (1, 180, 2, 1, 16, 16, 16, 16, 16) if device == "cpu" else (2, 2048, 9, 3, 64, 128, 64, 256, 64)
    T, W, C = shape[1], shape[7], shape[8]
    q0, per = _sink_far(T, W, C, sinks)
    assert q0 < T and (T - q0) > per * C, "the split must run several programs here"
    tag = f"hybrid-sink-split{sinks}/{'lin' if use_linear else 'nolin'}"
    split = _hybrid_grads_against_naive(tag, shape, device, dtype, use_linear, sinks)
    old = TUNING["bwd_sink_split"]
    TUNING["bwd_sink_split"] = False
    try:
        assert _sink_far(T, W, C, sinks)[0] == T
        walk = _hybrid_grads_against_naive(tag + "/one-walk", shape, device, dtype, use_linear, sinks)
    finally:
        TUNING["bwd_sink_split"] = old
    for a, b in zip(split, walk):
        check(tag + "/split-vs-walk", a, b, dtype, grad=True, bound=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("sinks", [0, 4])
def test_hybrid_dkv_half_key_tile(device, dtype, sinks, monkeypatch):
    """Where the dk / dv kernel does not fit shared memory at the chunk's key tile (head dim 128 with a
    window of 128 on the H100 / H200), it takes tiles of C / 2 while dq keeps C: forced here."""
    skip_triton_on(device)
    from attnswap.kernels.hybrid_attn import chunk
    from attnswap.kernels.linear_attn import chunk as lin

    monkeypatch.setattr(chunk, "_dkv_configs", lambda C: [(1, C // 2)])
    monkeypatch.setattr(lin, "_FITS", {})
    shape = (1, 100, 2, 1, 16, 16, 16, 24, 32) if device == "cpu" else (1, 700, 8, 2, 128, 128, 128, 128, 64)
    _hybrid_grads_against_naive(f"hybrid-dkv-half/s{sinks}", shape, device, dtype, True, sinks)
