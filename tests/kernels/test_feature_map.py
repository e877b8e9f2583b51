"""The fused Hedgehog feature map (Triton) against its specification, outputs and gradients, on fresh
random inputs: fp32 and fp16 under the interpreter on CPU, bf16 on CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, check, skip_triton_on

from attnswap.kernels.feature_map.naive import naive_hedgehog

# (lead shape, H, D, F): SmolLM2's query and key heads, odd sizes that exercise the masks, a decode-like row
SHAPES = [((2, 70), 9, 64, 64), ((1, 33), 3, 64, 64), ((3, 5), 2, 24, 20), ((2,), 4, 16, 16)]


def _inputs(lead, H, D, F, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, H, D, generator=g)
    w = torch.eye(D, F).repeat(H, 1, 1) + 0.3 * torch.randn(H, D, F, generator=g)
    b = 0.5 * torch.randn(H, F, generator=g)
    return [t.to(device, dtype).requires_grad_() for t in (x, w, b)]


def _fused():
    from attnswap.kernels.feature_map.fused import triton_hedgehog
    return triton_hedgehog


@pytest.mark.parametrize("device,dtype", CASES + [pytest.param("cpu", torch.float16, id="cpu-fp16")])
@pytest.mark.parametrize("shape_i", range(len(SHAPES)))
def test_hedgehog_matches_naive(device, dtype, shape_i):
    skip_triton_on(device)
    lead, H, D, F = SHAPES[shape_i]
    x, w, b = _inputs(lead, H, D, F, device, dtype, seed=shape_i)
    ref = naive_hedgehog(*(t.detach().float().requires_grad_() for t in (x, w, b)))  # fp32 from the same values
    ins32 = ref.grad_fn is not None
    out = _fused()(x, w, b)
    assert out.dtype == torch.float32 and out.shape == (*lead, H, 2 * F) and ins32
    check(f"hedgehog/{dtype}/{shape_i}/out", out, ref, dtype)
    # rows are distributions
    torch.testing.assert_close(out.sum(-1), torch.ones_like(out.sum(-1)), rtol=1e-5, atol=1e-5)
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7)).to(device)
    xs32 = [t.detach().float().requires_grad_() for t in (x, w, b)]
    grads_r = torch.autograd.grad(naive_hedgehog(*xs32), xs32, dy)
    grads = torch.autograd.grad(out, (x, w, b), dy.to(out.dtype))
    for n, a, r in zip("xwb", grads, grads_r):
        assert a.dtype == dtype
        check(f"hedgehog/{dtype}/{shape_i}/d{n}", a, r, dtype, grad=True,
              bound=3e-2 if dtype == torch.float16 else None)


@pytest.mark.parametrize("device,dtype", CASES + [pytest.param("cpu", torch.float16, id="cpu-fp16")])
@pytest.mark.parametrize("out_dtype", [torch.float32, "input"])
def test_hedgehog_without_gradients_writes_the_asked_dtype(device, dtype, out_dtype):
    skip_triton_on(device)
    out_dtype = dtype if out_dtype == "input" else out_dtype
    lead, H, D, F = SHAPES[0]
    x, w, b = (t.detach() for t in _inputs(lead, H, D, F, device, dtype, seed=11))
    with torch.no_grad():
        out = _fused()(x, w, b, out_dtype)
    assert out.dtype == out_dtype and out.grad_fn is None
    check(f"hedgehog/{dtype}/nograd", out, naive_hedgehog(x, w, b), dtype)


def test_hedgehog_reads_strided_inputs():
    """A head-sliced view (what a narrowed or transposed caller passes) gives the rows of the copy."""
    skip_triton_on("cpu")
    g = torch.Generator().manual_seed(3)
    big = torch.randn(2, 4, 10, 6, 32, generator=g)[:, :, :, 1:4]  # (2, 4, 10, 3, 32), not contiguous
    x = big.permute(0, 2, 1, 3, 4)  # (2, 10, 4, 3, 32): rows not viewable as one stride
    w, b = torch.randn(3, 32, 16, generator=g), torch.randn(3, 16, generator=g)
    with torch.no_grad():
        out = _fused()(x, w, b)
    check("hedgehog/strided", out, naive_hedgehog(x.contiguous(), w, b), torch.float32)


def test_hedgehog_rejects_mismatched_weights():
    skip_triton_on("cpu")
    with pytest.raises(ValueError, match="do not match"):
        _fused()(torch.randn(2, 3, 8), torch.randn(3, 4, 8), torch.randn(3, 8))


@pytest.mark.parametrize("device,dtype", CASES + [pytest.param("cpu", torch.float16, id="cpu-fp16")])
@pytest.mark.parametrize("lead", [(2, 70), (1, 1)], ids=["rows", "one-row"])
def test_hedgehog_pair_matches_two_maps(device, dtype, lead):
    """A layer's query (9 heads) and key (3 heads) maps in one launch, each in its own output dtype,
    against the specification; a key input read through a head-sliced view."""
    skip_triton_on(device)
    from attnswap.kernels.feature_map.fused import triton_hedgehog_pair

    xq, wq, bq = (t.detach() for t in _inputs(lead, 9, 64, 64, device, dtype, seed=21))
    xk_big, wk, bk = (t.detach() for t in _inputs(lead, 5, 64, 64, device, dtype, seed=22))
    xk, wk, bk = xk_big[..., 1:4, :], wk[1:4], bk[1:4]  # 3 heads, not contiguous
    with torch.no_grad():
        fq, fk = triton_hedgehog_pair(xq, wq, bq, xk, wk, bk, dtype, torch.float32)
    assert fq.dtype == dtype and fk.dtype == torch.float32
    assert fq.shape == (*lead, 9, 128) and fk.shape == (*lead, 3, 128)
    check(f"hedgehog-pair/{dtype}/q", fq, naive_hedgehog(xq, wq, bq), dtype)
    check(f"hedgehog-pair/{dtype}/k", fk, naive_hedgehog(xk.contiguous(), wk, bk), dtype)


def test_hedgehog_pair_falls_back_to_two_maps():
    """With gradients, or maps that cannot share a launch (other feature sizes), the pair is two maps:
    the same values and gradients as calling each."""
    skip_triton_on("cpu")
    from attnswap.kernels.feature_map.fused import _pairable, hedgehog_pair_forward, triton_hedgehog, triton_hedgehog_pair

    xq, wq, bq = _inputs((2, 9), 4, 16, 16, "cpu", torch.float32, seed=31)
    xk, wk, bk = _inputs((2, 9), 2, 16, 8, "cpu", torch.float32, seed=32)  # 8 features: not pairable
    assert not _pairable(xq, wq, xk, wk)
    with pytest.raises(ValueError, match="cannot share a launch"):
        hedgehog_pair_forward(xq, wq, bq, torch.float32, xk, wk, bk, torch.float32)
    with torch.no_grad():
        a, b = triton_hedgehog_pair(xq, wq, bq, xk, wk, bk)
    check("hedgehog-pair/fallback/k", b, naive_hedgehog(xk, wk, bk), torch.float32)
    fq, fk = triton_hedgehog_pair(xq, wq, bq, xq, wq, bq)  # pairable, but gradients are wanted
    assert fq.grad_fn is not None and fk.grad_fn is not None
    g_pair = torch.autograd.grad((fq.square().sum() + fk.sum()), (wq,))[0]
    ref = triton_hedgehog(xq, wq, bq)
    g_two = torch.autograd.grad(ref.square().sum() + ref.sum(), (wq,))[0]
    check("hedgehog-pair/fallback/dw", g_pair, g_two, torch.float32)
