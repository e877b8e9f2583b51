from __future__ import annotations

import pytest
import torch
from conftest import CASES, check, skip_triton_on

from attnswap.kernels.linear_attn.naive import naive_linear_attn, naive_linear_step
from attnswap.kernels.linear_attn.torch_chunk import chunk_linear_attn

# (B, T, H, Hk, F, Dv, chunk)
CPU_SHAPES = [(1, 37, 2, 1, 16, 16, 16), (2, 50, 6, 2, 24, 20, 16), (1, 64, 3, 3, 32, 16, 16)]
GPU_SHAPES = [(2, 300, 6, 2, 64, 64, 64), (1, 1000, 8, 2, 128, 128, 64), (1, 129, 4, 4, 256, 128, 64)]


def _inputs(B, T, H, Hk, F, Dv, device, dtype, init, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, pos=True: ((torch.rand(*s, generator=g) if pos else torch.randn(*s, generator=g))  # noqa: E731
                               .to(device, dtype).requires_grad_())
    q, k, v = mk(B, T, H, F), mk(B, T, Hk, F), mk(B, T, Hk, Dv, pos=False)
    st = None
    if init:
        st = (torch.rand(B, Hk, F, Dv, generator=g).to(device), torch.rand(B, Hk, F, generator=g).to(device))
    return q, k, v, st


def _impl(name):
    if name == "triton":
        from attnswap.kernels.linear_attn.chunk import triton_linear_attn
        return triton_linear_attn
    return chunk_linear_attn


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("shape_i", [0, 1, 2])
def test_linear_attn_matches_naive(device, dtype, impl, normalize, init, shape_i):
    if impl == "triton":
        skip_triton_on(device)
    B, T, H, Hk, F, Dv, C = (CPU_SHAPES if device == "cpu" else GPU_SHAPES)[shape_i]
    q, k, v, st = _inputs(B, T, H, Hk, F, Dv, device, dtype, init, seed=shape_i)
    out, (S, z) = _impl(impl)(q, k, v, normalize=normalize, initial_state=st, output_final_state=True, chunk_size=C)
    ref, (S_r, z_r) = naive_linear_attn(q, k, v, normalize=normalize, initial_state=st, output_final_state=True)
    do = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), do)
    grads_r = torch.autograd.grad(ref, (q, k, v), do)
    tag = f"linear/{impl}/{'norm' if normalize else 'raw'}/init{int(init)}/T{T}"
    check(tag + "/out", out, ref, dtype)
    check(tag + "/S", S, S_r, dtype)
    check(tag + "/z", z, z_r, dtype)
    for n, a, b in zip("qkv", grads, grads_r):
        check(f"{tag}/d{n}", a, b, dtype, grad=True)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("impl", ["triton", "naive"])
def test_linear_decode_parity(device, dtype, impl):
    """prefill n tokens (final state) + k decode steps == prefill of n + k tokens."""
    if impl == "triton":
        skip_triton_on(device)
    B, H, Hk, F, Dv = 2, 6, 2, 32, 16
    n, k_steps = 21, 5
    q, k, v, _ = _inputs(B, n + k_steps, H, Hk, F, Dv, device, dtype, False, seed=7)
    q, k, v = q.detach(), k.detach(), v.detach()
    ref, _ = naive_linear_attn(q, k, v)
    _, state = chunk_linear_attn(q[:, :n], k[:, :n], v[:, :n], output_final_state=True, chunk_size=16)
    if impl == "triton":
        from attnswap.kernels.linear_attn.fused_recurrent import fused_recurrent_linear_step as step
        state = (state[0].contiguous(), state[1].contiguous())
    else:
        step = naive_linear_step
    for t in range(n, n + k_steps):
        o, state = step(q[:, t], k[:, t], v[:, t], state)
        check(f"linear-step/{impl}/t{t}", o, ref[:, t], dtype)
