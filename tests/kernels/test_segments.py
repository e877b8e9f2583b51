"""The forward kernels' segment split (each segment of chunks starts from a precomputed state and runs
in parallel), the meta tokens of the gated hybrid, and the forward-only (no_grad) variant, against
naive.py. On CPU the split is off by default, so it is forced here with ``segment_chunks``."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, check, skip_triton_on

from attnswap.kernels.gated_attn.naive import naive_gated_hybrid_attn, naive_gated_linear_attn
from attnswap.kernels.hybrid_attn.naive import naive_hybrid_attn
from attnswap.kernels.linear_attn.naive import naive_linear_attn

# (B, T, H, Hk, D, F, Dv, W, chunk, segment_chunks); on CPU (the interpreter) each has a partial last
# chunk and a partial last segment: 105 = 6 x 16 + 9 in segments of 2, 2, 2, 1 chunks; 100 = 6 x 16 + 4
# in segments of 3, 3, 1
CPU = [(2, 105, 4, 2, 16, 32, 16, 20, 16, 2), (1, 100, 3, 1, 16, 16, 24, 16, 16, 3)]
GPU = [(2, 1000, 6, 2, 64, 128, 64, 64, 64, 3), (1, 2100, 8, 8, 128, 128, 128, 128, 64, 4)]


def _shape(device, i):
    return (CPU if device == "cpu" else GPU)[i]


def _inputs(B, T, H, Hk, D, F, Dv, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def mk(*s, pos=False, dt=dtype):
        x = torch.rand(*s, generator=g) if pos else torch.randn(*s, generator=g)
        return x.to(device, dt).requires_grad_()

    return dict(q=mk(B, T, H, D), k=mk(B, T, Hk, D), v=mk(B, T, Hk, Dv), fq=mk(B, T, H, F, pos=True),
                fk=mk(B, T, Hk, F, pos=True), g=(-0.1 * torch.rand(B, T, Hk, generator=g)).to(device).requires_grad_(),
                gamma=mk(H, pos=True), meta_k=mk(3, Hk, D), meta_v=mk(3, Hk, Dv),
                S0=torch.randn(B, Hk, F, Dv, generator=g).to(device), z0=torch.rand(B, Hk, F, generator=g).to(device))


def _grads(out, ref, xs, names, tag, dtype):
    do = torch.randn_like(ref)
    got = torch.autograd.grad(out, [xs[n] for n in names], do)
    want = torch.autograd.grad(ref, [xs[n] for n in names], do)
    for n, a, b in zip(names, got, want):
        # d gamma is one sum over every (query, window key) pair that nearly cancels: in fp32 the
        # reference itself is only good to ~2e-4 here (same with and without segments)
        bound = 1e-3 if n == "gamma" and dtype == torch.float32 else None
        check(f"{tag}/d{n}", a, b, dtype, grad=True, bound=bound)


def _check_hybrid(tag, fast, naive, args, kw, x, names, dtype, C, seg):
    """The fast hybrid with gradients enabled and under no_grad (no hi/lo products, nothing saved)
    against the naive one: outputs, then the gradients of ``names``."""
    ref = naive(*args, **kw)
    out = fast(*args, chunk_size=C, segment_chunks=seg, **kw)
    with torch.no_grad():
        inf = fast(*args, chunk_size=C, segment_chunks=seg, **kw)
    check(f"{tag}/out", out, ref, dtype)
    check(f"{tag}/out-no-grad", inf, ref, dtype)
    _grads(out, ref, x, names, tag, dtype)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape_i", [0, 1])
@pytest.mark.parametrize("gated", [False, True])
def test_linear_segments_match_naive(device, dtype, shape_i, gated):
    skip_triton_on(device)
    from attnswap.kernels.gated_attn.chunk import triton_gated_linear_attn
    from attnswap.kernels.linear_attn.chunk import triton_linear_attn

    B, T, H, Hk, D, F, Dv, W, C, seg = _shape(device, shape_i)
    x = _inputs(B, T, H, Hk, D, F, Dv, device, dtype)
    st = (x["S0"], x["z0"])
    if gated:
        out, (S, z) = triton_gated_linear_attn(x["fq"], x["fk"], x["v"], x["g"], initial_state=st, output_final_state=True,
                                               chunk_size=C, segment_chunks=seg)
        ref, (S2, z2) = naive_gated_linear_attn(x["fq"], x["fk"], x["v"], x["g"], initial_state=st, output_final_state=True)
    else:
        out, (S, z) = triton_linear_attn(x["fq"], x["fk"], x["v"], initial_state=st, output_final_state=True,
                                         chunk_size=C, segment_chunks=seg)
        ref, (S2, z2) = naive_linear_attn(x["fq"], x["fk"], x["v"], initial_state=st, output_final_state=True)
    tag = f"segments/{'gated' if gated else 'linear'}/T{T}s{seg}"
    check(f"{tag}/out", out, ref, dtype)
    check(f"{tag}/S", S, S2, dtype)
    check(f"{tag}/z", z, z2, dtype)
    _grads(out, ref, x, ["fq", "fk", "v"] + (["g"] if gated else []), tag, dtype)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape_i", [0, 1])
@pytest.mark.parametrize("sinks", [0, 4])
def test_hybrid_segments_match_naive(device, dtype, shape_i, sinks):
    skip_triton_on(device)
    from attnswap.kernels.hybrid_attn.chunk import triton_hybrid_attn

    B, T, H, Hk, D, F, Dv, W, C, seg = _shape(device, shape_i)
    x = _inputs(B, T, H, Hk, D, F, Dv, device, dtype)
    args = [x[n] for n in ("q", "k", "v", "fq", "fk", "gamma")]
    kw = dict(window=W, scale=D**-0.5, sinks=sinks)
    _check_hybrid(f"segments/hybrid/T{T}W{W}s{seg}sinks{sinks}", triton_hybrid_attn, naive_hybrid_attn, args, kw, x,
                  ["q", "k", "v", "fq", "fk", "gamma"], dtype, C, seg)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape_i", [0, 1])
@pytest.mark.parametrize("use_linear", [True, False])
def test_gated_hybrid_meta_tokens_match_naive(device, dtype, shape_i, use_linear):
    skip_triton_on(device)
    from attnswap.kernels.gated_attn.chunk import triton_gated_hybrid_attn

    B, T, H, Hk, D, F, Dv, W, C, seg = _shape(device, shape_i)
    x = _inputs(B, T, H, Hk, D, F, Dv, device, dtype)
    args = [x[n] for n in ("q", "k", "v", "fq", "fk", "g", "gamma")]
    kw = dict(window=W, scale=D**-0.5, use_linear=use_linear, meta_k=x["meta_k"], meta_v=x["meta_v"])
    # without the linear branch gamma cancels out of the output (its gradient is eps-sized noise)
    names = ["q", "k", "v", "meta_k", "meta_v"] + (["fq", "fk", "g", "gamma"] if use_linear else [])
    _check_hybrid(f"segments/gated-hybrid-meta/T{T}W{W}s{seg}{'' if use_linear else '-nolin'}", triton_gated_hybrid_attn,
                  naive_gated_hybrid_attn, args, kw, x, names, dtype, C, seg)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("lag", [0, 5, 20])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("init", [False, True])
def test_linear_backward_segments_match_one_walk(device, dtype, lag, norm, init):
    """``la_backward`` with its rows cut into segments (the later queries' sums and the earlier keys'
    state precomputed: reverse_segment_states, segment_states) gives the gradients of one walk over
    every chunk, with a partial last chunk and segment, query-head groups, a lag and an initial state."""
    skip_triton_on(device)
    from attnswap.kernels.linear_attn.chunk import la_backward

    for i, (B, T, H, Hk, _, F, Dv, _, C, seg) in enumerate(CPU if device == "cpu" else GPU):
        g = torch.Generator().manual_seed(10 * i + lag)
        q = torch.rand(B, T, H, F, generator=g).to(device, dtype)
        k = torch.rand(B, T, Hk, F, generator=g).to(device, dtype)
        v = torch.randn(B, T, Hk, Dv, generator=g).to(device, dtype)
        do = torch.randn(B, T, H, Dv, generator=g).to(device, dtype)
        rden = dden = None
        if norm:
            rden = (1.0 / (1.0 + torch.rand(B, T, H, generator=g))).to(device)
            dden = torch.randn(B, T, H, generator=g).to(device)
        s0 = None
        if init:
            s0 = (torch.randn(B, Hk, F, Dv, generator=g).to(device), torch.rand(B, Hk, F, generator=g).to(device))
        want = la_backward(q, k, v, do, rden, dden, lag=lag, initial_state=s0, chunk_size=C)
        got = la_backward(q, k, v, do, rden, dden, lag=lag, initial_state=s0, chunk_size=C, segment_chunks=seg)
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            check(f"seg{i}/lag{lag}/{name}", a, b, dtype, grad=True)


def test_backward_segments_only_with_few_programs_for_the_sms(monkeypatch):
    """The automatic plan of la_backward cuts rows into segments up to one program per SM: the training
    step's 12 (2 rows x 3 KV heads x 2 feature blocks) and 32 heads' 64 at 16k (both measured faster on
    the H100), not beyond (not measured), and never with the knob off."""
    from attnswap.kernels.linear_attn import chunk

    assert chunk.bwd_segments_wanted(12, 132)
    assert chunk.bwd_segments_wanted(64, 132)
    assert not chunk.bwd_segments_wanted(133, 132)
    monkeypatch.setitem(chunk.TUNING, "bwd_segments", False)
    assert not chunk.bwd_segments_wanted(12, 132)


def test_the_segment_plan_covers_every_chunk_and_rounds_up(monkeypatch):
    """plan_segments on a CUDA device of 132 SMs, SmolLM2's 9 prefill programs at 8k (128 chunks): every
    plan covers every chunk, and the wanted segments are rounded up (16 x 9 = 144 programs at one a SM,
    one wave and 12 more); a CPU device gets one segment."""
    from attnswap.kernels.linear_attn import chunk

    monkeypatch.setattr(chunk, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda")
    for pps in (1, 2, 4):
        monkeypatch.setitem(chunk.TUNING, "programs_per_sm", pps)
        nch, nseg = chunk.plan_segments(8192, 64, 9, None, cuda)
        assert nch * nseg >= 128 and nch * (nseg - 1) < 128
    monkeypatch.setitem(chunk.TUNING, "programs_per_sm", 1)
    assert chunk.plan_segments(8192, 64, 9, None, cuda)[1] * 9 > 132
    assert chunk.plan_segments(8192, 64, 9, None, torch.device("cpu")) == (128, 1)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("sinks", [0, 4])
def test_hybrid_one_chunk_segments_match_naive(device, dtype, sinks):
    """The finest plan (``kernel_speed.py --prefill-sweep`` times it): a segment per chunk, so every chunk
    starts from a precomputed state, with a window wider than a chunk (the lag crosses chunks)."""
    skip_triton_on(device)
    from attnswap.kernels.hybrid_attn.chunk import triton_hybrid_attn

    B, T, H, Hk, D, F, Dv, W, C, _ = _shape(device, 0)
    x = _inputs(B, T, H, Hk, D, F, Dv, device, dtype, seed=5)
    args = [x[n] for n in ("q", "k", "v", "fq", "fk", "gamma")]
    kw = dict(window=W, scale=D**-0.5, sinks=sinks)
    _check_hybrid(f"segments/hybrid/T{T}W{W}s1sinks{sinks}", triton_hybrid_attn, naive_hybrid_attn, args, kw, x,
                  ["q", "k", "v", "fq", "fk", "gamma"], dtype, C, 1)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("G,nch", [(1, 1), (3, 2), (2, 3)])
def test_reverse_segment_states_kernel_matches_reference(device, dtype, norm, G, nch):
    """The backward's reverse sums a segment at a time from one Triton kernel against the PyTorch
    reference, on fresh random inputs: a partial last chunk and segment, GQA groups, with and without
    the normaliser's rden / dden."""
    skip_triton_on(device)
    from attnswap.kernels.linear_attn.chunk import reverse_segment_states, reverse_segment_states_triton

    B, T, Hk, F, Dv, C = 2, 75, 2, 24, 20, 16
    H = Hk * G
    chunks = -(-T // C)
    nseg = -(-chunks // nch)
    g = torch.Generator().manual_seed(11 + G + nch)
    q = torch.rand(B, T, H, F, generator=g).to(device, dtype)
    do = torch.randn(B, T, H, Dv, generator=g).to(device, dtype)
    rden = (torch.rand(B, T, H, generator=g) + 0.5).to(device) if norm else None
    dden = torch.randn(B, T, H, generator=g).to(device) if norm else None
    want = reverse_segment_states(q, do, rden, dden, Hk, C, nch, nseg)
    got = reverse_segment_states_triton(q, do, rden, dden, Hk, C, nch, nseg)
    assert got[0].shape == (B, Hk, nseg, F, Dv)
    check(f"reverse/dS/G{G}n{nch}", got[0], want[0], torch.float32)
    if norm:
        check(f"reverse/dz/G{G}n{nch}", got[1], want[1], torch.float32)
    else:
        assert got[1] is None and want[1] is None


def test_hybrid_forward_warps_follow_the_timed_rule(monkeypatch):
    """8 warps only for the gated training forward (4 was slower there on the H100); 4 for every
    inference forward and the ungated training forward."""
    from attnswap.kernels.hybrid_attn.chunk import hybrid_forward_warps

    assert hybrid_forward_warps(use_linear=True, gated=True, save=True) == 8
    for gated in (False, True):
        assert hybrid_forward_warps(use_linear=True, gated=gated, save=False) == 4
    assert hybrid_forward_warps(use_linear=True, gated=False, save=True) == 4
    assert hybrid_forward_warps(use_linear=False, gated=False, save=True) == 4
