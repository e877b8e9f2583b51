"""The fused RoPE (Triton) against its specification, and the specification against transformers'
own function (the seam's ``apply_rope``): outputs and gradients on fresh random inputs; fp32 and fp16
under the interpreter on CPU, bf16 on CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, check, skip_triton_on

from attnswap.hf_compat import apply_rope
from attnswap.kernels.rope.naive import naive_rope

# (B, T, H, Hk, D, cos batch): SmolLM2's heads, a batch with its own positions per row, odd sizes
SHAPES = [(1, 50, 9, 3, 64, 1), (2, 37, 4, 2, 32, 2), (3, 5, 2, 2, 24, 1)]


def _tables(Bc, T, D, seed, dtype, device):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 5000, (Bc, T), generator=g).float()
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = pos[..., None] * inv  # (Bc, T, D/2)
    emb = torch.cat([ang, ang], -1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def _qk(B, T, H, Hk, D, seed, dtype, device):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, n, D, generator=g).to(device, dtype).requires_grad_() for n in (H, Hk)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_spec_is_transformers_rope_bit_for_bit(dtype):
    for i, (B, T, H, Hk, D, Bc) in enumerate(SHAPES):
        q, k = _qk(B, T, H, Hk, D, i, dtype, "cpu")
        cos, sin = _tables(Bc, T, D, i, dtype, "cpu")
        for a, b in zip(naive_rope(q, k, cos, sin), apply_rope(q, k, cos, sin)):
            assert torch.equal(a, b)


def _fused():
    from attnswap.kernels.rope.fused import triton_rope
    return triton_rope


@pytest.mark.parametrize("device,dtype", CASES + [pytest.param("cpu", torch.float16, id="cpu-fp16")])
@pytest.mark.parametrize("shape_i", range(len(SHAPES)))
def test_rope_matches_the_spec(device, dtype, shape_i):
    skip_triton_on(device)
    B, T, H, Hk, D, Bc = SHAPES[shape_i]
    q, k = _qk(B, T, H, Hk, D, shape_i, dtype, device)
    cos, sin = _tables(Bc, T, D, shape_i, dtype, device)
    # the reference in fp32 from the same values (the fused form rounds once, transformers' after each operator)
    q32, k32 = (t.detach().float().requires_grad_() for t in (q, k))
    ref = naive_rope(q32, k32, cos.float(), sin.float())
    out = _fused()(q, k, cos, sin)
    for name, a, r in zip("qk", out, ref):
        assert a.dtype == dtype and a.shape == r.shape
        check(f"rope/{dtype}/{shape_i}/{name}", a, r, dtype)
    gq, gk = (torch.randn(r.shape, generator=torch.Generator().manual_seed(9 + j)).to(device) for j, r in enumerate(ref))
    want = torch.autograd.grad(ref, (q32, k32), (gq, gk))
    got = torch.autograd.grad(out, (q, k), (gq.to(dtype), gk.to(dtype)))
    for name, a, r in zip("qk", got, want):
        check(f"rope/{dtype}/{shape_i}/d{name}", a, r, dtype, grad=True)


def test_rope_gradient_when_only_the_keys_are_used():
    skip_triton_on("cpu")
    B, T, H, Hk, D, Bc = SHAPES[1]
    q, k = _qk(B, T, H, Hk, D, 4, torch.float32, "cpu")
    cos, sin = _tables(Bc, T, D, 4, torch.float32, "cpu")
    _, kr = _fused()(q, k, cos, sin)
    gk = torch.randn(kr.shape, generator=torch.Generator().manual_seed(1))
    dq, dk = torch.autograd.grad(kr, (q, k), gk, allow_unused=True)
    _, kref = naive_rope(q, k, cos, sin)
    dq_ref, dk_ref = torch.autograd.grad(kref, (q, k), gk, allow_unused=True)
    check("rope/keys-only/dk", dk, dk_ref, torch.float32)
    assert dq is None or not dq.any()
    assert dq_ref is None or not dq_ref.any()


def test_rope_reads_strided_inputs():
    skip_triton_on("cpu")
    B, T, H, D = 2, 9, 3, 16
    g = torch.Generator().manual_seed(2)
    q = torch.randn(B, H, T, D, generator=g).transpose(1, 2)  # (B, T, H, D), not contiguous
    k = torch.randn(B, T, 2 * H, D, generator=g)[:, :, ::2]   # every other head
    cos, sin = torch.randn(1, T, D, generator=g), torch.randn(1, T, D, generator=g)  # halves differ: the general form
    with torch.no_grad():
        out = _fused()(q, k, cos, sin)
    for a, r in zip(out, naive_rope(q, k, cos, sin)):
        check("rope/strided", a, r, torch.float32)


def test_rope_refuses_tables_that_do_not_fit():
    skip_triton_on("cpu")
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="do not fit"):
        _fused()(q, k, torch.randn(1, 5, 8), torch.randn(1, 5, 8))
