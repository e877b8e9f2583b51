"""Streaming attention (attnswap/kernels/streaming_attn): the gathered PyTorch path and the block-sparse
kernels under a sink + local block mask against naive.py, forward and gradients, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import check, skip_triton_on

from attnswap.kernels.block_sparse.masks import streaming_block_mask
from attnswap.kernels.block_sparse.naive import naive_block_sparse_attn
from attnswap.kernels.block_sparse.torch_chunk import torch_block_sparse_attn
from attnswap.kernels.streaming_attn.naive import naive_streaming_attn, streaming_mask
from attnswap.kernels.streaming_attn.torch_chunk import torch_streaming_attn

# (B, T, Tk, H, Hk, D, block, sink, local)
CASES = [
    (1, 96, 96, 2, 2, 16, 16, 1, 2),     # aligned
    (2, 70, 100, 4, 2, 16, 8, 1, 3),     # history of 30 (unaligned), GQA
    (1, 150, 150, 3, 1, 32, 16, 2, 4),   # two sink blocks, partial last block, MQA
    (1, 40, 40, 2, 2, 16, 16, 1, 7),     # shorter than the window: exact causal attention
    (1, 77, 77, 2, 2, 16, 8, 0, 2),      # no sink: a sliding window of blocks
]


def _inputs(B, T, Tk, H, Hk, D, seed, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(dtype)
    k = torch.randn(B, Tk, Hk, D, generator=g).to(dtype)
    v = torch.randn(B, Tk, Hk, D, generator=g).to(dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gathered_path_matches_naive_forward_and_backward(case, dtype):
    B, T, Tk, H, Hk, D, block, sink, local = CASES[case]
    kw = dict(sink=sink, local=local, block=block)
    q, k, v = _inputs(B, T, Tk, H, Hk, D, case, dtype, grad=True)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = naive_streaming_attn(*ref_in, **kw)
    out = torch_streaming_attn(q, k, v, **kw, max_gathered=B * 3 * (sink + local) * block)  # several groups
    check("streaming fwd", out, ref, dtype)
    if dtype == torch.float32:
        do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9))
        want = torch.autograd.grad(ref, ref_in, do)
        got = torch.autograd.grad(out, (q, k, v), do)
        for name, a, b in zip("qkv", got, want):
            check(f"streaming d{name}", a, b, dtype, grad=True)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_the_block_mask_form_is_the_same_attention(case):
    B, T, Tk, H, Hk, D, block, sink, local = CASES[case]
    q, k, v = _inputs(B, T, Tk, H, Hk, D, case)
    mask = streaming_block_mask(T, Tk, block, sink, local).expand(B, -1, -1, -1)
    ref = naive_streaming_attn(q, k, v, sink=sink, local=local, block=block)
    if sink >= 1:  # the block-sparse reference insists on the sink block
        check("block mask (naive)", naive_block_sparse_attn(q, k, v, mask, block=block), ref, torch.float32)
    check("block mask (torch)", torch_block_sparse_attn(q, k, v, mask, block=block), ref, torch.float32)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_the_triton_block_sparse_kernel_serves_streaming(device):
    skip_triton_on(device)
    from attnswap.kernels.dispatch import _triton_ops, force_backend, streaming_attn

    if _triton_ops() is None:
        pytest.skip("Triton is not importable")
    B, T, Tk, H, Hk, D, block, sink, local = 1, 64, 80, 2, 1, 16, 16, 1, 2
    q, k, v = (t.to(device) for t in _inputs(B, T, Tk, H, Hk, D, 4))
    ref = naive_streaming_attn(q, k, v, sink=sink, local=local, block=block)
    with torch.no_grad(), force_backend("triton"):
        out = streaming_attn(q, k, v, sink=sink, local=local, block=block)
    check("streaming triton", out, ref, torch.float32)


def test_an_evicted_cache_with_its_positions_gives_the_same_last_rows():
    """What decoding relies on: dropping keys no later query can see changes nothing, given positions."""
    B, Tk, H, Hk, D, block, sink, local = 2, 90, 2, 2, 16, 8, 1, 2
    q, k, v = _inputs(B, Tk, Tk, H, Hk, D, 11)
    full = naive_streaming_attn(q, k, v, sink=sink, local=local, block=block)
    T = 5  # the last 5 queries (positions 85..89, blocks 10 and 11): keep sink block 0 and blocks 9..11
    kp = torch.cat([torch.arange(8), torch.arange(72, 90)])
    got = naive_streaming_attn(q[:, -T:], k[:, kp], v[:, kp], sink=sink, local=local, block=block,
                               q_pos=torch.arange(85, 90)[None], k_pos=kp[None])
    torch.testing.assert_close(got, full[:, -T:])
    assert streaming_mask(torch.arange(85, 90)[None], torch.arange(90)[None], sink=sink, local=local,
                          block=block)[0].any(0).nonzero().flatten().tolist() == kp.tolist()
