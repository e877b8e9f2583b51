"""A chunked prefill's later pieces through the Triton forward (``triton_hybrid_continue``): the same
output and state as the PyTorch step (``hybrid_step``), and the same output as the whole sequence at
once (``naive_hybrid_attn``); then through a converted model's cache. Interpreter on CPU (fp32)."""

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


# (B, P prefilled, T new, H, Hk, D, F, W, sinks, segment_chunks)
CASES = [(1, 40, 70, 4, 2, 16, 32, 8, 0, None), (2, 33, 50, 6, 3, 16, 16, 16, 3, None),
         (1, 90, 200, 2, 1, 32, 32, 20, 4, 1), (2, 24, 17, 4, 4, 16, 16, 8, 2, 1)]


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_continue_matches_the_step_and_the_whole_sequence(case, device, dtype):
    skip_triton_on(device)
    from attnswap.kernels.hybrid_attn.chunk import triton_hybrid_continue

    B, P, T, H, Hk, D, F, W, S, seg = CASES[case]
    q, k, v, fq, fk, gamma = _seq(B, P + T, H, Hk, D, F, case, device, dtype)
    kw = dict(window=W, scale=D**-0.5, sinks=S)
    state = hybrid_prefill_state(k[:, :P], v[:, :P], fk[:, :P], None, window=W, sinks=S)
    new = (slice(None), slice(P, None))
    ref_out, ref_state = hybrid_step(q[new], k[new], v[new], fq[new], fk[new], gamma, state, **kw)
    out, st = triton_hybrid_continue(q[new], k[new], v[new], fq[new], fk[new], gamma, state, segment_chunks=seg, **kw)
    check(f"continue/{case}/out", out, ref_out, dtype)
    whole = naive_hybrid_attn(q, k, v, fq, fk, gamma, use_linear=True, **kw)
    check(f"continue/{case}/whole", out, whole[:, P:], dtype)
    assert st.keys() == ref_state.keys()
    for name, t in ref_state.items():
        assert st[name].shape == t.shape and st[name].dtype == t.dtype, name
        if t.dtype.is_floating_point:
            check(f"continue/{case}/{name}", st[name], t, dtype)
        else:
            assert torch.equal(st[name], t), name


@pytest.mark.parametrize("mixed", [False, True], ids=["plain", "mixed"])
def test_converted_model_prefills_in_pieces_through_the_kernel(monkeypatch, mixed):
    """A tiny lolcats model fed in pieces: later pieces take the Triton continuation once the window
    is full (counted), and the logits equal the PyTorch-step pieces and one pass. ``mixed``: layers
    that keep some KV heads exact (their linear heads continue through the kernel)."""
    skip_triton_on("cpu")
    from attnswap.convert.lolcats import LolcatsAttention
    from attnswap.hf_compat import cache_kwargs, new_cache
    from tests.test_exact_heads import _converted as _mixed
    from tests.test_generation import _converted

    m = (_mixed("lolcats", {0: [0], 2: [1]}) if mixed else _converted(sinks=2, window=4)).eval()
    ids = torch.randint(1, 300, (2, 30), generator=torch.Generator().manual_seed(3))
    calls = []
    fast = LolcatsAttention.continue_fast

    def spy(self, x, state, seen, mask):
        r = fast(self, x, state, seen, mask)
        calls.append((seen, r is not None, bool(self.exact_heads)))
        return r

    def pieces():
        cache, outs = new_cache(m.config), []
        for a in range(0, 30, 8):
            p = ids[:, a : a + 8]
            outs.append(m(input_ids=p, position_ids=torch.arange(a, a + p.shape[1])[None], use_cache=True,
                          **cache_kwargs(cache)).logits)
        return torch.cat(outs, 1)

    monkeypatch.setenv("ATTNSWAP_KERNELS", "triton")  # the model's own option would pick PyTorch on CPU
    with torch.no_grad():
        whole = m(input_ids=ids).logits
        monkeypatch.setattr(LolcatsAttention, "continue_fast", spy)
        got = pieces()
        monkeypatch.setattr(LolcatsAttention, "continue_fast", lambda self, x, state, seen, mask: None)
        stepped = pieces()
    assert calls and all(ran for seen, ran, _ in calls if seen >= 6) and any(ran for _, ran, _ in calls)
    assert any(ran and ex for _, ran, ex in calls) == mixed  # the mixed layers' linear heads took it too
    torch.testing.assert_close(got, stepped, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, whole, rtol=1e-4, atol=1e-4)
