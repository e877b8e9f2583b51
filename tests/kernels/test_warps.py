"""The warps knobs of linear_attn.chunk.TUNING (``*_warps``; 0 keeps each launch's own rule), which
``benchmarks/kernel_speed.py --warps-sweep`` turns one at a time: with every knob set, the linear, gated,
hybrid and gated-hybrid operators still match naive.py, forward and backward, segments forced on (so
the segment-state and reverse-sum launches run too). The interpreter ignores warps, so on CPU this checks
that each knob reaches its launch without breaking it; on CUDA each setting builds real kernels."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import CASES, check, skip_triton_on

from attnswap.kernels.gated_attn.chunk import triton_gated_hybrid_attn, triton_gated_linear_attn
from attnswap.kernels.gated_attn.naive import naive_gated_hybrid_attn, naive_gated_linear_attn
from attnswap.kernels.hybrid_attn.chunk import triton_hybrid_attn
from attnswap.kernels.hybrid_attn.naive import naive_hybrid_attn
from attnswap.kernels.linear_attn import chunk as lc
from attnswap.kernels.linear_attn.chunk import triton_linear_attn
from attnswap.kernels.linear_attn.naive import naive_linear_attn

ROOT = Path(__file__).resolve().parents[2]
KNOBS = [k for k in lc.TUNING if k.endswith("_warps")]


def test_every_launch_has_a_warps_knob_left_at_its_rule():
    assert set(KNOBS) == {"hybrid_warps", "bwd_dq_warps", "hybrid_bwd_dkv_warps", "la_fwd_warps", "la_bwd_warps",
                          "la_bwd_dv_warps", "seg_state_warps", "rev_seg_warps"}
    assert all(lc.TUNING[k] == 0 for k in KNOBS)
    assert lc.warps("la_fwd_warps", 8) == 8


def _inputs(device, dtype, B=1, T=100, H=4, Hk=2, D=16, F=16, seed=0):
    g = torch.Generator().manual_seed(seed)

    def mk(*s, pos=False, dt=dtype):
        x = torch.rand(*s, generator=g) if pos else torch.randn(*s, generator=g)
        return x.to(device, dt).requires_grad_()

    if device == "cuda":
        T, H, Hk, D, F = 1000, 6, 2, 64, 128
    return dict(q=mk(B, T, H, D), k=mk(B, T, Hk, D), v=mk(B, T, Hk, D), fq=mk(B, T, H, F, pos=True),
                fk=mk(B, T, Hk, F, pos=True), g=(-0.1 * torch.rand(B, T, Hk, generator=g)).to(device).requires_grad_(),
                gamma=mk(H, pos=True), meta_k=mk(3, Hk, D), meta_v=mk(3, Hk, D))


def _ops(x):
    """(name, fast, naive, the inputs that get gradients) for each operator."""
    q, k, v, fq, fk, g, gamma = (x[n] for n in ("q", "k", "v", "fq", "fk", "g", "gamma"))
    s = q.shape[-1] ** -0.5
    meta = {"meta_k": x["meta_k"], "meta_v": x["meta_v"]}
    return [
        ("linear", lambda **kw: triton_linear_attn(fq, fk, v, **kw)[0], lambda: naive_linear_attn(fq, fk, v)[0],
         ["fq", "fk", "v"]),
        ("gated", lambda **kw: triton_gated_linear_attn(fq, fk, v, g, **kw)[0],
         lambda: naive_gated_linear_attn(fq, fk, v, g)[0], ["fq", "fk", "v", "g"]),
        ("hybrid", lambda **kw: triton_hybrid_attn(q, k, v, fq, fk, gamma, window=20, scale=s, sinks=3, **kw),
         lambda: naive_hybrid_attn(q, k, v, fq, fk, gamma, window=20, scale=s, sinks=3), ["q", "k", "v", "fq", "fk"]),
        ("gated-hybrid", lambda **kw: triton_gated_hybrid_attn(q, k, v, fq, fk, g, gamma, window=20, scale=s, **meta, **kw),
         lambda: naive_gated_hybrid_attn(q, k, v, fq, fk, g, gamma, window=20, scale=s, **meta),
         ["q", "k", "v", "fq", "fk", "g"]),
    ]


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("w", [4, 8])
def test_operators_match_naive_with_every_warps_knob_set(device, dtype, w, monkeypatch):
    skip_triton_on(device)
    if device == "cpu" and w == 8:
        pytest.skip("the interpreter ignores warps: one setting covers the knobs' wiring")
    for knob in KNOBS:
        monkeypatch.setitem(lc.TUNING, knob, w)
    x = _inputs(device, dtype)
    C = 16 if device == "cpu" else 64
    for name, fast, naive, names in _ops(x):
        ref = naive()
        out = fast(chunk_size=C, segment_chunks=2)
        with torch.no_grad():
            inf = fast(chunk_size=C, segment_chunks=2)
        check(f"{name}/w{w}/out", out, ref, dtype)
        check(f"{name}/w{w}/out-no-grad", inf, ref, dtype)
        do = torch.randn_like(ref)
        got = torch.autograd.grad(out, [x[n] for n in names], do)
        want = torch.autograd.grad(ref, [x[n] for n in names], do)
        for n, a, b in zip(names, got, want):
            check(f"{name}/w{w}/d{n}", a, b, dtype, grad=True)


def test_the_warps_sweep_prints_a_row_a_setting(monkeypatch, capsys):
    """``kernel_speed.py --warps-sweep`` on the CPU (the interpreter, each operator called once instead of
    timed, a small shape): one row for the defaults and one for each setting tried, all filled in, and
    the knobs back at their defaults after it."""
    skip_triton_on("cpu")
    if torch.cuda.is_available():
        pytest.skip("the CPU stand-in for the GPU sweep")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import kernel_speed as ks

    def once(fn):
        fn()
        return 1.0

    monkeypatch.setattr(ks, "ms", once)
    monkeypatch.setattr(ks, "dev", "cpu")
    monkeypatch.setattr(ks, "DT", torch.float32)
    monkeypatch.setitem(ks.SHAPES, "tiny", dict(H=4, Hk=2, D=16, F=16))
    monkeypatch.setattr(ks, "WARPS_KNOBS", {"la_fwd_warps": (2,), "hybrid_bwd_dkv_warps": (4,)})
    before = dict(lc.TUNING)
    ks.warps_sweep(["tiny"], [96])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert [r.split(" | ")[2] for r in rows] == ["defaults", "la_fwd_warps=2", "hybrid_bwd_dkv_warps=4"]
    assert all(r.count("1.000") == 10 and "err" not in r for r in rows)
    assert lc.TUNING == before
    ks.warps_sweep(["tiny"], [96], ["hybrid_bwd_dkv_warps"])  # --warps-knobs: only the knobs named
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert [r.split(" | ")[2] for r in rows] == ["defaults", "hybrid_bwd_dkv_warps=4"]
    with pytest.raises(SystemExit, match="unknown hybrid_wraps"):
        ks.warps_sweep(["tiny"], [96], ["hybrid_wraps"])
    sys.modules.pop("kernel_speed", None)


def test_the_hybrid_forward_asks_the_rule_for_its_warps(monkeypatch):
    """The launch takes its warps from ``hybrid_forward_warps`` with what it runs: the linear branch, the
    gate, and whether it saves for a backward (no_grad: nothing saved)."""
    skip_triton_on("cpu")
    if torch.cuda.is_available():
        pytest.skip("the CPU check of the launch's wiring")
    from attnswap.kernels.hybrid_attn import chunk as hc

    asked = []
    rule = hc.hybrid_forward_warps
    monkeypatch.setattr(hc, "hybrid_forward_warps", lambda *a: asked.append(a) or rule(*a))
    x = _inputs("cpu", torch.float32)
    q, k, v, fq, fk, g, gamma = (x[n] for n in ("q", "k", "v", "fq", "fk", "g", "gamma"))
    with torch.no_grad():
        triton_hybrid_attn(q, k, v, fq, fk, gamma, window=20, scale=0.25, chunk_size=16)
        triton_gated_hybrid_attn(q, k, v, fq, fk, g, gamma, window=20, scale=0.25, chunk_size=16)
    triton_gated_hybrid_attn(q, k, v, fq, fk, g, gamma, window=20, scale=0.25, chunk_size=16)
    assert asked == [(True, False, False), (True, True, False), (True, True, True)]


def test_the_linear_backward_asks_its_rule_for_its_warps(monkeypatch):
    """la_backward takes its warps from ``la_backward_warps`` with its block sizes and whether it is gated;
    the rule gives 8 only to gated blocks of at least 64 x 128 (4 was faster ungated on the H100)."""
    skip_triton_on("cpu")
    if torch.cuda.is_available():
        pytest.skip("the CPU check of the launch's wiring")
    assert [lc.la_backward_warps(64, 128, gated) for gated in (False, True)] == [4, 8]
    assert lc.la_backward_warps(64, 64, True) == 4
    asked = []
    rule = lc.la_backward_warps
    monkeypatch.setattr(lc, "la_backward_warps", lambda *a: asked.append(a) or rule(*a))
    x = _inputs("cpu", torch.float32)
    fq, fk, v, g = (x[n] for n in ("fq", "fk", "v", "g"))
    triton_linear_attn(fq, fk, v, chunk_size=16)[0].sum().backward()
    triton_gated_linear_attn(fq, fk, v, g, chunk_size=16)[0].sum().backward()
    assert [a[2] for a in asked] == [False, True]
    assert all(a[:2] == (16, 16) for a in asked)
