"""The chunked PyTorch paths against their naive specifications: outputs and gradients."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from attnswap.kernels.hybrid_attn.naive import naive_hybrid_attn
from attnswap.kernels.hybrid_attn.torch_chunk import chunk_hybrid_attn
from attnswap.kernels.linear_attn.naive import naive_linear_attn
from attnswap.kernels.linear_attn.torch_chunk import chunk_linear_attn


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _inputs(B, T, H, Hk, D, Fd, seed, grad=True):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, pos=False: (torch.rand(*s, generator=g) if pos else torch.randn(*s, generator=g)).requires_grad_(grad)
    return dict(
        q=mk(B, T, H, D), k=mk(B, T, Hk, D), v=mk(B, T, Hk, D),
        fq=mk(B, T, H, Fd, pos=True), fk=mk(B, T, Hk, Fd, pos=True),
    )


def _grads(out, tensors):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))  # same weights for any layout
    return torch.autograd.grad((out * w).sum(), tensors)


@pytest.mark.parametrize("B,T,H,Hk,chunk", [(1, 64, 2, 2, 16), (2, 77, 6, 2, 32), (1, 5, 3, 1, 64)])
@pytest.mark.parametrize("normalize", [True, False])
def test_chunk_linear_matches_naive(B, T, H, Hk, chunk, normalize):
    x = _inputs(B, T, H, Hk, 8, 12, seed=T + H)
    q, k, v = x["fq"], x["fk"], x["v"]
    S0 = torch.rand(B, Hk, 12, 8)
    z0 = torch.rand(B, Hk, 12)
    for init in (None, (S0, z0)):
        ref, sref = naive_linear_attn(q, k, v, normalize=normalize, initial_state=init, output_final_state=True)
        out, sout = chunk_linear_attn(q, k, v, normalize=normalize, initial_state=init, output_final_state=True, chunk_size=chunk)
        assert rel_err(out, ref) < 1e-5
        assert rel_err(sout[0], sref[0]) < 1e-5 and rel_err(sout[1], sref[1]) < 1e-5
        for ga, gb in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
            assert rel_err(ga, gb) < 1e-4


@pytest.mark.parametrize("B,T,H,Hk,W,chunk", [(1, 64, 2, 2, 16, 16), (2, 100, 6, 2, 7, 32), (1, 130, 4, 1, 64, 64), (1, 9, 2, 1, 3, 64)])
@pytest.mark.parametrize("sinks", [0, 1, 4])
def test_chunk_hybrid_matches_naive(B, T, H, Hk, W, chunk, sinks):
    x = _inputs(B, T, H, Hk, 8, 10, seed=T * W + sinks)
    gamma = torch.rand(H).requires_grad_(True)
    args = (x["q"], x["k"], x["v"], x["fq"], x["fk"], gamma)
    ref = naive_hybrid_attn(*args, window=W, scale=0.35, sinks=sinks)
    out = chunk_hybrid_attn(*args, window=W, scale=0.35, chunk_size=chunk, sinks=sinks)
    assert rel_err(out, ref) < 1e-5
    for ga, gb in zip(_grads(out, args), _grads(ref, args)):
        assert rel_err(ga, gb) < 1e-4


@pytest.mark.parametrize("impl", [naive_hybrid_attn, chunk_hybrid_attn])
def test_full_window_without_linear_is_softmax(impl):
    x = _inputs(2, 50, 6, 2, 16, 8, seed=3, grad=False)
    out = impl(x["q"], x["k"], x["v"], None, None, torch.ones(6), window=50, scale=0.25, use_linear=False)
    ref = F.scaled_dot_product_attention(
        x["q"].transpose(1, 2), x["k"].transpose(1, 2), x["v"].transpose(1, 2), is_causal=True, scale=0.25, enable_gqa=True
    ).transpose(1, 2)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("W", [1, 7, 32])
@pytest.mark.parametrize("meta", [0, 3])
def test_chunk_gated_hybrid_with_meta_tokens_matches_naive(W, meta):
    from attnswap.kernels.gated_attn.naive import naive_gated_hybrid_attn
    from attnswap.kernels.gated_attn.torch_chunk import chunk_gated_hybrid_attn

    x = _inputs(2, 90, 6, 2, 8, 10, seed=W + meta)
    g = torch.Generator().manual_seed(W)
    gate = (-0.2 * torch.rand(2, 90, 2, generator=g)).requires_grad_(True)
    gamma = torch.rand(6, generator=g).requires_grad_(True)
    mk = torch.randn(meta, 2, 8, generator=g).requires_grad_(True) if meta else None
    mv = torch.randn(meta, 2, 8, generator=g).requires_grad_(True) if meta else None
    args = (x["q"], x["k"], x["v"], x["fq"], x["fk"], gate, gamma)
    ref = naive_gated_hybrid_attn(*args, window=W, scale=0.35, meta_k=mk, meta_v=mv)
    out = chunk_gated_hybrid_attn(*args, window=W, scale=0.35, chunk_size=32, meta_k=mk, meta_v=mv)
    assert rel_err(out, ref) < 1e-5
    wrt = args + ((mk, mv) if meta else ())
    for ga, gb in zip(_grads(out, wrt), _grads(ref, wrt)):
        assert rel_err(ga, gb) < 1e-4


@pytest.mark.parametrize("W,S,gated", [(1, 0, False), (4, 2, False), (9, 0, True), (4, 0, True)])
def test_decode_state_continues_the_full_sequence(W, S, gated):
    """Prefill n tokens into the state, then decode the rest (one by one and as one chunk)."""
    from attnswap.kernels.gated_attn.naive import naive_gated_hybrid_attn
    from attnswap.kernels.hybrid_attn.step_torch import hybrid_prefill_state, hybrid_step

    x = _inputs(2, 26, 4, 2, 8, 6, seed=W * 10 + S, grad=False)
    g = torch.Generator().manual_seed(5)
    gamma = torch.rand(4, generator=g)
    gate = -0.3 * torch.rand(2, 26, 2, generator=g) if gated else None
    meta = dict(meta_k=torch.randn(3, 2, 8, generator=g), meta_v=torch.randn(3, 2, 8, generator=g)) if gated else {}
    q, k, v, fq, fk = x["q"], x["k"], x["v"], x["fq"], x["fk"]
    if gated:
        full = naive_gated_hybrid_attn(q, k, v, fq, fk, gate, gamma, window=W, scale=0.3, **meta)
    else:
        full = naive_hybrid_attn(q, k, v, fq, fk, gamma, window=W, scale=0.3, sinks=S)
    sl = lambda t, a, b: None if t is None else t[:, a:b]  # noqa: E731
    for n in (1, 5, 11):
        ones = torch.ones(2, n, dtype=torch.bool)
        st = hybrid_prefill_state(k[:, :n], v[:, :n], fk[:, :n], ones, window=W, sinks=S, g=sl(gate, 0, n))
        outs = []
        for t in range(n, 26):
            o, st = hybrid_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], fq[:, t:t + 1], fk[:, t:t + 1], gamma, st,
                                window=W, scale=0.3, sinks=S, g=sl(gate, t, t + 1), **meta)
            outs.append(o)
        assert rel_err(torch.cat(outs, 1), full[:, n:]) < 1e-5
        st = hybrid_prefill_state(k[:, :n], v[:, :n], fk[:, :n], ones, window=W, sinks=S, g=sl(gate, 0, n))
        o, _ = hybrid_step(q[:, n:], k[:, n:], v[:, n:], fq[:, n:], fk[:, n:], gamma, st, window=W, scale=0.3, sinks=S,
                           g=sl(gate, n, 26), **meta)
        assert rel_err(o, full[:, n:]) < 1e-5


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_state_without_padding_equals_the_masked_one(gated, dtype, split, monkeypatch):
    """valid=None (every token real: slices and sums) builds the state the masked path builds from an
    all-True mask, for lengths around the window and the sinks; ``split``: the linear sums taken in
    pieces of 3 keys from 4 keys on (long prompts' path), with and without a padded last piece."""
    from attnswap.kernels.hybrid_attn import step_torch
    from attnswap.kernels.hybrid_attn.step_torch import hybrid_prefill_state

    if split:
        monkeypatch.setattr(step_torch, "SUM_SPLIT_FROM", 4)
        monkeypatch.setattr(step_torch, "SUM_PIECE", 3)

    g = torch.Generator().manual_seed(5)
    B, Hk, D, Fd = 2, 3, 5, 6
    for T, W, S in itertools.product((1, 3, 4, 5, 9, 17, 40), (4, 8), (0, 1, 4)):
        k = torch.randn(B, T, Hk, D, generator=g).to(dtype)
        v = torch.randn(B, T, Hk, D, generator=g).to(dtype)
        fk = torch.rand(B, T, Hk, Fd, generator=g).to(dtype if T % 2 else torch.float32)  # fp32 features, or the model's
        gate = F.logsigmoid(torch.randn(B, T, Hk, generator=g)) if gated else None
        want = hybrid_prefill_state(k, v, fk, torch.ones(B, T, dtype=torch.bool), window=W, sinks=S, g=gate)
        got = hybrid_prefill_state(k, v, fk, None, window=W, sinks=S, g=gate)
        assert got.keys() == want.keys()
        for name, w in want.items():
            t = got[name]
            assert t.shape == w.shape and t.dtype == w.dtype, (name, T, W, S)
            if w.is_floating_point():
                err = (t.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-12)
                assert err < 1e-5, (name, T, W, S, float(err))
            else:
                assert torch.equal(t, w), (name, T, W, S)


def test_prefill_states_share_their_shape_only_parts_and_own_the_rest():
    """Two unpadded prefills of one shape (two layers) share the tensors that depend only on the shape
    (made once: fewer launches a layer), made outside inference mode; the window and the sums are each
    state's own, and compact (not views into the prompt's buffers)."""
    from attnswap.kernels.hybrid_attn.step_torch import hybrid_prefill_state

    g = torch.Generator().manual_seed(9)
    B, T, Hk, D, W = 2, 40, 3, 5, 8
    states = []
    with torch.inference_mode():
        for _ in range(2):
            k, v = torch.randn(B, T, Hk, D, generator=g), torch.randn(B, T, Hk, D, generator=g)
            fk = torch.rand(B, T, Hk, 6, generator=g).to(torch.bfloat16)
            states.append(hybrid_prefill_state(k, v, fk, None, window=W, sinks=0))
    a, b = states
    for name in ("win_rank", "sink_on", "n_real", "sink_k", "sink_v", "win_g"):
        assert a[name] is b[name], name
        assert not a[name].is_inference(), name
    for name in ("S", "z", "win_k", "win_v", "win_fk"):
        assert a[name].data_ptr() != b[name].data_ptr(), name
        assert a[name].untyped_storage().nbytes() == a[name].numel() * a[name].element_size(), name
    assert a["win_fk"].dtype == torch.float32


@pytest.mark.parametrize("gated", [False, True])
def test_the_pytorch_path_recomputes_in_training_with_the_same_gradients(gated):
    """dispatch runs the chunked PyTorch paths under torch.utils.checkpoint when differentiated (their
    scores are not kept for the backward): the same outputs and gradients as calling them directly,
    meta tokens included; the forward keeps fewer tensors for the backward."""
    from attnswap.kernels import dispatch
    from attnswap.kernels.gated_attn.torch_chunk import chunk_gated_hybrid_attn

    x = _inputs(2, 70, 6, 2, 8, 10, seed=11 + gated)
    g = torch.Generator().manual_seed(4)
    gamma = torch.rand(6, generator=g).requires_grad_(True)
    if gated:
        gate = (-0.2 * torch.rand(2, 70, 2, generator=g)).requires_grad_(True)
        mk = torch.randn(3, 2, 8, generator=g).requires_grad_(True)
        mv = torch.randn(3, 2, 8, generator=g).requires_grad_(True)
        args = (x["q"], x["k"], x["v"], x["fq"], x["fk"], gate, gamma)
        kw = dict(window=9, scale=0.35, chunk_size=16, meta_k=mk, meta_v=mv)
        direct, via, wrt = chunk_gated_hybrid_attn, dispatch.gated_hybrid_attn, args + (mk, mv)
    else:
        args = (x["q"], x["k"], x["v"], x["fq"], x["fk"], gamma)
        kw = dict(window=9, scale=0.35, chunk_size=16, sinks=2)
        direct, via, wrt = chunk_hybrid_attn, dispatch.hybrid_attn, args

    def saved(fn):
        n = [0]

        def pack(t):
            n[0] += t.numel()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(*args, **kw)
        return out, n[0]

    ref, kept_ref = saved(direct)
    out, kept = saved(via)
    assert torch.equal(out, ref)
    assert kept < kept_ref / 2
    for ga, gb in zip(_grads(out, wrt), _grads(ref, wrt)):
        assert rel_err(ga, gb) < 1e-6
