"""Block-sparse operators (attnswap/kernels/block_sparse): every fast path against naive.py on fresh random
inputs. Triton runs under the interpreter on CPU (fp32 and fp16), natively on CUDA (bf16)."""

from __future__ import annotations

import pytest
import torch
from conftest import check, rel_err, skip_triton_on

from attnswap.kernels.block_sparse.masks import (block_layout, block_mask_to_index, causal_block_mask, decode_index,
                                                 density, diagonal_and_sink, flex_block_mask, index_to_mask,
                                                 random_block_mask)
from attnswap.kernels.block_sparse.naive import (naive_attn_block_map, naive_block_sparse_attn,
                                                 naive_block_sparse_decode)
from attnswap.kernels.block_sparse.torch_chunk import (torch_attn_with_block_map, torch_block_sparse_attn,
                                                       torch_block_sparse_decode)

CASES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.float16, id="cpu-fp16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]

# (B, T, Tk, H, Hk, selection heads: "kv" = Hk, "q" = H, "one" = 1, D, Dv, block, BM, BN)
PREFILL = [
    (1, 96, 96, 2, 2, "kv", 16, 16, 16, 16, 16),       # aligned, one head per KV head
    (2, 70, 100, 4, 2, "kv", 32, 24, 32, 32, 16),      # history of 30 (unaligned), GQA, Dv != D, BN < block
    (1, 150, 150, 4, 1, "q", 16, 16, 64, 32, 32),      # per-query-head selection, MQA, partial last block, BM < block
    (1, 40, 120, 3, 3, "one", 16, 16, 32, 32, 16),     # one selection for all heads, history of 80
]
GPU_PREFILL = [
    (1, 1000, 1000, 8, 2, "kv", 128, 128, 64, None, None),
    (2, 700, 1300, 8, 8, "q", 64, 64, 128, None, None),
    (1, 2048, 2048, 32, 32, "kv", 128, 128, 128, None, None),
    (1, 512, 4096, 9, 3, "kv", 64, 64, 64, None, None),  # SmolLM2's heads, a chunk after history
]  # as many cases as PREFILL: the tests are parametrized by index


def _sel_heads(kind, H, Hk):
    return {"kv": Hk, "q": H, "one": 1}[kind]


def _qkv(B, T, Tk, H, Hk, D, Dv, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    # k as a transposed view of a (B, Hk, Tk, D) tensor, as a transformers KV cache holds it
    k = r(B, Hk, Tk, D).transpose(1, 2)
    return r(B, T, H, D), k, r(B, Tk, Hk, Dv), g


def _random_mask(B, Hg, T, Tk, block, g, keep=0.5):
    """Sink and diagonal plus each other causal block with probability ``keep`` (at these short lengths
    random_block_mask's sparsity target would leave little besides the sink and the diagonal), and a
    few blocks above the diagonal, which the operators must ignore."""
    _, nQ, nK = block_layout(T, Tk, block)
    m = (torch.rand(B, Hg, nQ, nK, generator=g) < keep) | diagonal_and_sink(nQ, nK)
    return m & (causal_block_mask(nQ, nK) | (torch.rand(m.shape, generator=g) < 0.2))


def _prefill_case(i, device, dtype):
    shapes = PREFILL if device == "cpu" else GPU_PREFILL
    B, T, Tk, H, Hk, kind, D, Dv, block, bm, bn = shapes[i]
    q, k, v, g = _qkv(B, T, Tk, H, Hk, D, Dv, device, dtype, seed=10 + i)
    mask = _random_mask(B, _sel_heads(kind, H, Hk), T, Tk, block, g).to(device)
    return q, k, v, mask, block, bm, bn


def _bound(dtype):
    return None if dtype != torch.float16 else 5e-3


# ---- masks -------------------------------------------------------------------------------------

def test_layout_and_index_conversion():
    assert block_layout(100, 100, 32) == (0, 4, 4)
    assert block_layout(70, 100, 32) == (0, 4, 4)  # queries 30..99: blocks 0..3
    assert block_layout(40, 120, 32) == (2, 2, 4)  # queries 80..119: blocks 2..3
    m = random_block_mask(2, 3, 70, 200, 16, 0.6, generator=torch.Generator().manual_seed(0))
    nQ, nK = m.shape[-2:]
    assert m[..., diagonal_and_sink(nQ, nK)].all() and not m[..., ~causal_block_mask(nQ, nK)].any()
    noisy = m | (torch.rand(m.shape, generator=torch.Generator().manual_seed(1)) < 0.3)  # some above the diagonal
    idx, cnt = block_mask_to_index(noisy)
    assert torch.equal(index_to_mask(idx, cnt, nK), noisy & causal_block_mask(nQ, nK))
    assert idx.shape[-1] == int(cnt.max())
    for row, c in zip(idx.view(-1, idx.shape[-1]), cnt.view(-1)):
        sel = row[:c]
        assert torch.all(sel[1:] > sel[:-1]) and torch.all(row[c:] == -1)
    diag = torch.arange(nQ) + (nK - nQ)
    assert torch.equal(idx.gather(-1, (cnt.long() - 1)[..., None])[..., 0], diag.expand_as(cnt).int())
    idx_w, cnt_w = block_mask_to_index(noisy, width=nK + 2)
    assert idx_w.shape[-1] == nK + 2 and torch.equal(index_to_mask(idx_w, cnt_w, nK), index_to_mask(idx, cnt, nK))
    with pytest.raises(ValueError):
        block_mask_to_index(noisy, width=1)
    dm = torch.rand(2, 2, 9, generator=torch.Generator().manual_seed(2)) < 0.5
    di, dc = decode_index(dm, width=9)
    assert torch.equal(index_to_mask(di, dc, 9), dm)


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.95])
def test_random_mask_density(sparsity):
    m = random_block_mask(1, 8, 8192, 8192, 64, sparsity, generator=torch.Generator().manual_seed(3))
    assert abs(density(m) - (1 - sparsity)) < 0.01
    assert m[..., diagonal_and_sink(128, 128)].all()


def test_flex_block_mask_is_the_same_pattern():
    """The BlockMask the benchmark gives FlexAttention selects the same full and partial blocks as
    FlexAttention's own create_block_mask over the token-level rule (its compiled kernels skip the
    rest and apply the causal mask_mod to the partial, diagonal, blocks); with the exact mask_mod it
    gives the same attention on FlexAttention's eager path, which ignores block sparsity."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    B, H, Hk, T, Tk, D, block = 1, 4, 2, 128, 256, 16, 32
    q, k, v, g = _qkv(B, T, Tk, H, Hk, D, D, "cpu", torch.float32, seed=4)
    mask = random_block_mask(B, Hk, T, Tk, block, 0.6, generator=g)
    bm = flex_block_mask(mask, H, T, Tk, block)
    q0 = (Tk - T) // block
    rows = mask[:, torch.arange(H) // (H // Hk)]

    def mask_mod(b, h, qi, kj):
        return rows[b, h, qi // block, kj // block] & (qi + (Tk - T) >= kj)

    ref = flex.create_block_mask(mask_mod, B, H, T, Tk, device="cpu", BLOCK_SIZE=block)
    for a, b_ in ((bm.kv_num_blocks, ref.kv_num_blocks), (bm.full_kv_num_blocks, ref.full_kv_num_blocks)):
        assert torch.equal(a, b_)
    for idx, n, idx_r in ((bm.kv_indices, bm.kv_num_blocks, ref.kv_indices),
                          (bm.full_kv_indices, bm.full_kv_num_blocks, ref.full_kv_indices)):
        for x, c, y in zip(idx.reshape(-1, idx.shape[-1]), n.reshape(-1), idx_r.reshape(-1, idx_r.shape[-1])):
            assert sorted(x[:c].tolist()) == sorted(y[:c].tolist())
    assert q0 == 4
    exact = flex_block_mask(mask, H, T, Tk, block, exact=True)
    assert torch.equal(exact.kv_indices, bm.kv_indices) and torch.equal(exact.full_kv_indices, bm.full_kv_indices)
    out = flex.flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=exact, enable_gqa=True)
    check("flex/out", out.transpose(1, 2), naive_block_sparse_attn(q, k, v, mask, block=block), torch.float32)


# ---- prefill -----------------------------------------------------------------------------------

def test_the_mask_matters():
    """The reference with the random mask differs from dense attention by far more than the test bounds
    (so a kernel that ignored the mask would fail), and from the same mask without its diagonal rows."""
    q, k, v, mask, block, _, _ = _prefill_case(1, "cpu", torch.float32)
    sparse = naive_block_sparse_attn(q, k, v, mask, block=block)
    dense = naive_block_sparse_attn(q, k, v, torch.ones_like(mask), block=block)
    assert rel_err(sparse, dense) > 0.1
    # and each query block's list holds blocks other than the first ones (a kernel reading blocks
    # 0..cnt-2 in place of the listed ones would fail)
    idx, cnt = block_mask_to_index(mask)
    first = torch.arange(idx.shape[-1], dtype=idx.dtype)
    listed = torch.arange(idx.shape[-1]) < (cnt - 1)[..., None]
    assert bool((listed & (idx != first)).any())
    with pytest.raises(AssertionError):
        naive_block_sparse_attn(q, k, v, mask & ~diagonal_and_sink(*mask.shape[-2:]), block=block)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("i", range(len(PREFILL)))
def test_block_sparse_attn_triton(device, dtype, i):
    skip_triton_on(device)
    from attnswap.kernels.block_sparse.chunk import triton_block_sparse_attn

    q, k, v, mask, block, bm, bn = _prefill_case(i, device, dtype)
    ref = naive_block_sparse_attn(q, k, v, mask, block=block)
    out = triton_block_sparse_attn(q, k, v, mask, block=block, bm=bm, bn=bn)
    check(f"block_sparse/triton/{i}", out, ref, dtype, bound=_bound(dtype))


@pytest.mark.parametrize("i", range(len(PREFILL)))
def test_block_sparse_attn_torch_forward_and_grads(i):
    q, k, v, mask, block, _, _ = _prefill_case(i, "cpu", torch.float32)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    ref = naive_block_sparse_attn(q, k, v, mask, block=block)
    out = torch_block_sparse_attn(q, k, v, mask, block=block, max_scores=3000)  # several query groups
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(i))
    check(f"block_sparse/torch/{i}", out, ref, torch.float32)
    for n, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        check(f"block_sparse/torch/{i}/d{n}", a, b, torch.float32, grad=True)


def test_dispatch_block_sparse(monkeypatch):
    """auto = PyTorch on CPU; forced triton matches; the index form gives the same; a gradient request
    falls back to the differentiable PyTorch path."""
    from attnswap.kernels import block_sparse_attn, force_backend

    monkeypatch.delenv("ATTNSWAP_KERNELS", raising=False)
    q, k, v, mask, block, _, _ = _prefill_case(3, "cpu", torch.float32)
    ref = naive_block_sparse_attn(q, k, v, mask, block=block)
    check("dispatch/auto", block_sparse_attn(q, k, v, mask, block=block), ref, torch.float32)
    index = block_mask_to_index(mask)
    check("dispatch/auto/index", block_sparse_attn(q, k, v, block=block, index=index), ref, torch.float32)
    skip_triton_on("cpu")
    with force_backend("triton"):
        check("dispatch/triton/index", block_sparse_attn(q, k, v, block=block, index=index), ref, torch.float32)
        qg = q.detach().requires_grad_()
        out = block_sparse_attn(qg, k, v, mask, block=block)
        assert out.requires_grad
        out.sum().backward()
        assert qg.grad is not None


# ---- attention + block map ---------------------------------------------------------------------

def _map_checks(name, out, bmap, ref, ref_map, dtype):
    check(name + "/out", out, ref, dtype, bound=_bound(dtype))
    # the map is normalised probabilities: its error bound is on the map's scale too
    check(name + "/map", bmap, ref_map, dtype, bound=_bound(dtype))
    nQ, nK = bmap.shape[-2:]
    assert not bmap[..., ~causal_block_mask(nQ, nK, bmap.device)].any()
    torch.testing.assert_close(bmap.sum(-1), torch.ones_like(bmap.sum(-1)))


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("i", range(len(PREFILL)))
def test_attn_block_map_triton(device, dtype, i):
    skip_triton_on(device)
    from attnswap.kernels.block_sparse.chunk import triton_attn_with_block_map

    q, k, v, _, block, bm, bn = _prefill_case(i, device, dtype)
    ref, ref_map = naive_attn_block_map(q, k, v, block=block)
    out, bmap = triton_attn_with_block_map(q, k, v, block=block, bm=bm, bn=bn)
    _map_checks(f"attn_map/triton/{i}", out, bmap, ref, ref_map, dtype)


@pytest.mark.parametrize("i", range(len(PREFILL)))
def test_attn_block_map_torch(i):
    q, k, v, _, block, _, _ = _prefill_case(i, "cpu", torch.float32)
    ref, ref_map = naive_attn_block_map(q, k, v, block=block)
    out, bmap = torch_attn_with_block_map(q, k, v, block=block, max_scores=3000)
    _map_checks(f"attn_map/torch/{i}", out, bmap, ref, ref_map, torch.float32)


def test_block_map_is_not_a_plain_sum():
    """The reference map is the max-pool (not the mean or sum) of the probabilities, normalised: checked
    against a direct loop on a tiny case."""
    B, T, H, D, block = 1, 12, 1, 8, 4
    q, k, v, _ = _qkv(B, T, T, H, H, D, D, "cpu", torch.float32, seed=5)
    _, m = naive_attn_block_map(q, k, v, block=block)
    p = (torch.einsum("bihd,bjhd->bhij", q, k) * D**-0.5).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(),
                                                                     float("-inf")).softmax(-1)
    want = torch.zeros(3, 3)
    for r in range(3):
        for c in range(r + 1):
            want[r, c] = p[0, 0, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4].max()
    torch.testing.assert_close(m[0, 0], want / want.sum(-1, keepdim=True))


# ---- decode ------------------------------------------------------------------------------------

# (B, L, H, Hk, selection heads, D, Dv, block, lens or None, density)
DECODE = [
    (2, 100, 4, 2, "kv", 32, 32, 32, (100, 77), 0.5),
    (1, 200, 6, 2, "q", 16, 24, 16, None, 0.3),
    (3, 64, 2, 2, "kv", 16, 16, 64, (64, 1, 40), 1.0),  # one (partial) block; a sequence of one token
]
GPU_DECODE = [
    (2, 5000, 32, 8, "kv", 128, 128, 64, (5000, 3001), 0.2),
    (1, 32768, 32, 32, "kv", 128, 128, 64, None, 0.1),
    (1, 8192, 9, 3, "kv", 64, 64, 64, None, 0.1),  # SmolLM2's heads
]  # as many cases as DECODE


def _decode_case(i, device, dtype):
    B, L, H, Hk, kind, D, Dv, block, lens, dens = (DECODE if device == "cpu" else GPU_DECODE)[i]
    q, k, v, g = _qkv(B, L, L, H, Hk, D, Dv, device, dtype, seed=20 + i)
    q = q[:, 0]
    Hg = _sel_heads(kind, H, Hk)
    nK = -(-L // block)
    lens_t = torch.tensor(lens if lens else [L] * B, dtype=torch.int32)
    last = (lens_t - 1) // block  # the block holding the new token
    sel = torch.rand(B, Hg, nK, generator=g) < dens
    sel[..., 0] = True
    sel |= torch.arange(nK)[None, None, :] == last[:, None, None]
    sel &= torch.arange(nK)[None, None, :] <= last[:, None, None]  # nothing past the sequence
    idx, cnt = decode_index(sel)
    # shuffle each row's valid entries (the kernel takes them in any order)
    perm = torch.argsort(torch.rand(idx.shape, generator=g) + (idx < 0) * 2.0, dim=-1)
    idx = idx.gather(-1, perm)
    lens_d = lens_t.to(device) if lens else None
    return q, k, v, idx.to(device), cnt.to(device), block, lens_d


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("i", range(len(DECODE)))
def test_block_sparse_decode(device, dtype, i):
    q, k, v, idx, cnt, block, lens = _decode_case(i, device, dtype)
    ref = naive_block_sparse_decode(q, k, v, idx, cnt, block=block, cache_seqlens=lens)
    check(f"decode/torch/{i}", torch_block_sparse_decode(q, k, v, idx, cnt, block=block, cache_seqlens=lens), ref,
          dtype, bound=_bound(dtype))
    skip_triton_on(device)
    from attnswap.kernels.block_sparse.decode import triton_block_sparse_decode

    for nsplit in ((1, 3) if device == "cpu" else (None, 1)):
        out = triton_block_sparse_decode(q, k, v, idx, cnt, block=block, cache_seqlens=lens, nsplit=nsplit)
        check(f"decode/triton/{i}/split{nsplit}", out, ref, dtype, bound=_bound(dtype))


def test_decode_matches_last_prefill_row():
    """A decoding step equals the last query of the prefill operator with the same blocks selected."""
    B, L, H, Hk, D, block = 2, 90, 4, 2, 16, 16
    q, k, v, g = _qkv(B, 1, L, H, Hk, D, D, "cpu", torch.float32, seed=6)
    mask = random_block_mask(B, Hk, 1, L, block, 0.5, generator=g)  # (B, Hk, 1, nK)
    idx, cnt = decode_index(mask[:, :, 0])
    check("decode=prefill", torch_block_sparse_decode(q[:, 0], k, v, idx, cnt, block=block),
          naive_block_sparse_attn(q, k, v, mask, block=block)[:, 0], torch.float32)


def test_dispatch_decode_and_map(monkeypatch):
    from attnswap.kernels import attn_with_block_map, block_sparse_decode

    monkeypatch.delenv("ATTNSWAP_KERNELS", raising=False)
    q, k, v, idx, cnt, block, lens = _decode_case(0, "cpu", torch.float32)
    check("dispatch/decode", block_sparse_decode(q, k, v, idx, cnt, block=block, cache_seqlens=lens),
          naive_block_sparse_decode(q, k, v, idx, cnt, block=block, cache_seqlens=lens), torch.float32)
    q, k, v, _, block, _, _ = _prefill_case(0, "cpu", torch.float32)
    out, m = attn_with_block_map(q, k, v, block=block)
    ref, ref_m = naive_attn_block_map(q, k, v, block=block)
    check("dispatch/map", m, ref_m, torch.float32)


def test_gpu_case_lists_cover_every_parametrized_index():
    assert len(GPU_PREFILL) == len(PREFILL) and len(GPU_DECODE) == len(DECODE)
