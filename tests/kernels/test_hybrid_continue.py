"""A chunked prefill's later pieces through the Triton forward (``triton_hybrid_continue``): the same
output and state as the PyTorch step (``hybrid_step``), and the same output as the whole sequence at
once (``naive_hybrid_attn``), ungated (lolcats) and gated with meta tokens (lizard); then through a
converted model's cache. Interpreter on CPU (fp32), and bf16 on CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES as DEVICES
from conftest import check, skip_triton_on

from attnswap.kernels.hybrid_attn.naive import naive_hybrid_attn
from attnswap.kernels.hybrid_attn.step_torch import hybrid_prefill_state, hybrid_step


def _seq(B, T, H, Hk, D, F, seed, device, dtype):
    g = torch.Generator().manual_seed(seed)
    xs = (torch.randn(B, T, H, D, generator=g), torch.randn(B, T, Hk, D, generator=g), torch.randn(B, T, Hk, D, generator=g),
          torch.rand(B, T, H, F, generator=g), torch.rand(B, T, Hk, F, generator=g), torch.rand(H, generator=g))
    return [x.to(device, dtype) for x in xs]


def _same_state(tag, st, ref, dtype):
    """The continuation's new state against the PyTorch step's: same tensors, shapes and dtypes; the
    sums and window close to the bound, the integer bookkeeping equal."""
    assert st.keys() == ref.keys()
    for name, t in ref.items():
        assert st[name].shape == t.shape and st[name].dtype == t.dtype, name
        if t.dtype.is_floating_point:
            check(f"{tag}/{name}", st[name], t, dtype)
        else:
            assert torch.equal(st[name], t), name


# (B, P prefilled, T new, H, Hk, D, F, W, sinks, segment_chunks)
CASES = [(1, 40, 70, 4, 2, 16, 32, 8, 0, None), (2, 33, 50, 6, 3, 16, 16, 16, 3, None),
         (1, 90, 200, 2, 1, 32, 32, 20, 4, 1), (2, 24, 17, 4, 4, 16, 16, 8, 2, 1)]


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_continue_matches_the_step_and_the_whole_sequence(case, device, dtype):
    skip_triton_on(device)
    _ungated_continue(CASES[case], case, device, dtype)


def _ungated_continue(params, case, device, dtype):
    from attnswap.kernels.hybrid_attn.chunk import triton_hybrid_continue

    B, P, T, H, Hk, D, F, W, S, seg = params
    q, k, v, fq, fk, gamma = _seq(B, P + T, H, Hk, D, F, case, device, dtype)
    kw = dict(window=W, scale=D**-0.5, sinks=S)
    state = hybrid_prefill_state(k[:, :P], v[:, :P], fk[:, :P], None, window=W, sinks=S)
    new = (slice(None), slice(P, None))
    ref_out, ref_state = hybrid_step(q[new], k[new], v[new], fq[new], fk[new], gamma, state, **kw)
    out, st = triton_hybrid_continue(q[new], k[new], v[new], fq[new], fk[new], gamma, state, segment_chunks=seg, **kw)
    check(f"continue/{case}/out", out, ref_out, dtype)
    whole = naive_hybrid_attn(q, k, v, fq, fk, gamma, use_linear=True, **kw)
    check(f"continue/{case}/whole", out, whole[:, P:], dtype)
    _same_state(f"continue/{case}", st, ref_state, dtype)


# (B, P prefilled, T new, H, Hk, D, F, W, meta tokens, gate scale, segment_chunks); gate scale 8: a window
# whose total decay is far beyond what exp() holds in fp32 (the state's share must not be scaled up by it)
GATED = [(1, 40, 70, 4, 2, 16, 32, 8, 0, 1.0, None), (2, 33, 50, 6, 3, 16, 16, 16, 3, 1.0, None),
         (1, 90, 200, 2, 1, 32, 32, 20, 4, 1.0, 1), (2, 70, 17, 4, 4, 16, 16, 40, 2, 8.0, 1)]


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("case", range(len(GATED)))
def test_gated_continue_matches_the_step_and_the_whole_sequence(case, device, dtype):
    """Lizard's form: log-gates on the linear branch and learned meta tokens in place of sinks."""
    skip_triton_on(device)
    _gated_continue(GATED[case], case, device, dtype)


def _gated_continue(params, case, device, dtype):
    from attnswap.kernels.gated_attn.naive import naive_gated_hybrid_attn
    from attnswap.kernels.hybrid_attn.chunk import triton_hybrid_continue

    B, P, T, H, Hk, D, F, W, M, gs, seg = params
    q, k, v, fq, fk, gamma = _seq(B, P + T, H, Hk, D, F, 100 + case, device, dtype)
    gen = torch.Generator().manual_seed(200 + case)
    g = (torch.nn.functional.logsigmoid(torch.randn(B, P + T, Hk, generator=gen) + 1.0) * gs).to(device)
    meta = {}
    if M:
        meta = {"meta_k": torch.randn(M, Hk, D, generator=gen).to(device, dtype),
                "meta_v": torch.randn(M, Hk, D, generator=gen).to(device, dtype)}
    kw = dict(window=W, scale=D**-0.5)
    state = hybrid_prefill_state(k[:, :P], v[:, :P], fk[:, :P], None, window=W, g=g[:, :P])
    new = (slice(None), slice(P, None))
    ref_out, ref_state = hybrid_step(q[new], k[new], v[new], fq[new], fk[new], gamma, state, g=g[new], **kw, **meta)
    out, st = triton_hybrid_continue(q[new], k[new], v[new], fq[new], fk[new], gamma, state, g=g[new],
                                     segment_chunks=seg, **kw, **meta)
    assert torch.isfinite(out).all()
    check(f"gated-continue/{case}/out", out, ref_out, dtype)
    whole = naive_gated_hybrid_attn(q, k, v, fq, fk, g, gamma, use_linear=True, **kw, **meta)
    check(f"gated-continue/{case}/whole", out, whole[:, P:], dtype)
    _same_state(f"gated-continue/{case}", st, ref_state, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (minutes under the interpreter)")
@pytest.mark.parametrize("gated", [False, True], ids=["lolcats", "lizard"])
def test_continue_at_smollm2_shape_and_wide_windows_cuda(gated):
    """SmolLM2's shape (9 query / 3 KV heads, head dim 64, 128 features) at wide windows (lolcats
    128 + 4 sinks, lizard 256 + 4 meta tokens, its default) and 2,048-token pieces, in bf16: the sizes the
    small cases above do not reach (several key tiles of window, a piece of many segments)."""
    if gated:
        _gated_continue((1, 2048, 2048, 9, 3, 64, 128, 256, 4, 1.0, None), 300, "cuda", torch.bfloat16)
    else:
        _ungated_continue((1, 2048, 2048, 9, 3, 64, 128, 128, 4, None), 301, "cuda", torch.bfloat16)


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
def test_converted_model_prefills_in_pieces_through_the_kernel(monkeypatch, method):
    """A tiny converted model fed in pieces: later pieces take the Triton continuation once the window
    is full (counted), and the logits equal the PyTorch-step pieces and one pass. Layers 0 and 2 keep a
    KV head exact (their linear heads continue through the kernel), layer 1 is all linear."""
    skip_triton_on("cpu")
    from attnswap.convert.base import SwappedAttention
    from attnswap.hf_compat import cache_kwargs, new_cache
    from tests.test_exact_heads import _converted
    from tests.test_generation import held_views

    m = _converted(method, {0: [0], 2: [1]}).eval()
    cls = type(next(mod for mod in m.modules() if isinstance(mod, SwappedAttention)))
    full = m.config.attnswap["swaps"][0]["options"]
    ready = full["window"] + full.get("sinks", 0)
    ids = torch.randint(1, 300, (2, 30), generator=torch.Generator().manual_seed(3))
    calls = []
    fast = cls.continue_fast

    def spy(self, x, state, seen, mask):
        r = fast(self, x, state, seen, mask)
        calls.append((seen, r is not None, bool(self.exact_heads)))
        return r

    caches = []

    def pieces():
        cache, outs = new_cache(m.config), []
        for a in range(0, 30, 8):
            p = ids[:, a : a + 8]
            outs.append(m(input_ids=p, position_ids=torch.arange(a, a + p.shape[1])[None], use_cache=True,
                          **cache_kwargs(cache)).logits)
        caches.append(cache)
        return torch.cat(outs, 1)

    monkeypatch.setenv("ATTNSWAP_KERNELS", "triton")  # the model's own option would pick PyTorch on CPU
    with torch.no_grad():
        whole = m(input_ids=ids).logits
        monkeypatch.setattr(cls, "continue_fast", spy)
        got = pieces()
        monkeypatch.setattr(cls, "continue_fast", lambda self, x, state, seen, mask: None)
        stepped = pieces()
    assert calls and all(ran for seen, ran, _ in calls if seen >= ready)
    assert held_views(caches[0]) == []  # the kernel's window and features are copied out of its piece buffers
    assert {ex for _, ran, ex in calls if ran} == {False, True}  # plain and mixed layers both took it
    torch.testing.assert_close(got, stepped, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
def test_pieces_of_fixed_size_take_the_kernel_and_prefill_what_one_pass_does(monkeypatch, method):
    """modeling/prefill.py in its ``static`` form (CUDA graphs without capture) with the Triton
    continuation: every later piece takes the kernel, and the logits and state equal one pass."""
    skip_triton_on("cpu")
    from attnswap.convert.base import SwappedAttention
    from tests.test_prefill_graph import PIECE, _ids, _model, _plans, _prefill, _same_cache

    m = _model(method)
    cls = type(next(mod for mod in m.modules() if isinstance(mod, SwappedAttention)))
    fast, ran = cls.continue_fast, []

    def spy(self, x, state, seen, mask):
        r = fast(self, x, state, seen, mask)
        ran.append(r is not None)
        return r

    ids = _ids(2 * PIECE + 3)
    monkeypatch.setenv("ATTNSWAP_KERNELS", "triton")
    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "off")
    ref, ref_cache = _prefill(m, ids)
    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "static")
    monkeypatch.setattr(cls, "continue_fast", spy)
    got, cache = _prefill(m, ids)
    assert _plans(m) and ran == [True] * 2 * 3  # pieces of 16 and 2, three layers each (1 token is a decode step)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    _same_cache(ref_cache, cache, 1e-4)
