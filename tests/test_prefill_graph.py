"""The prefill in fixed-size pieces that CUDA graphs replay (modeling/prefill.py), checked on CPU in its
``static`` form (the same pieces and static state buffers, without capture) against the usual
one-pass prefill; and on CUDA with capture where a GPU is present."""

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from attnswap.errors import AttnSwapError
from attnswap.modeling.prefill import piece_sizes
from attnswap.modeling.runtime import RuntimeOptions
from tests.test_generation import _converted

pytestmark = pytest.mark.compat
PIECE = 16  # the tiny models' windows are 4 tokens (+ 2 sinks)


def _model(method="lolcats", sinks=2, piece=PIECE, **kw):
    m = _converted(method=method, sinks=sinks, **kw)
    m.attnswap_runtime = dataclasses.replace(m.attnswap_runtime, prefill_piece=piece)
    return m


def _ids(t, b=2, seed=4):
    return torch.randint(1, 300, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _prefill(m, ids, cache=None, **kw):
    out = m(ids, past_key_values=cache if cache is not None else DynamicCache(), use_cache=True, **kw)
    return out.logits, out.past_key_values


def _plans(m):
    return m.__dict__.get("_attnswap_prefill_plans", {})


def _same_cache(a, b, tol=2e-5):
    assert len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers):
        assert x.seen == y.seen and x.state.keys() == y.state.keys()
        for k in x.state:
            torch.testing.assert_close(y.state[k], x.state[k], rtol=tol, atol=tol)


@pytest.mark.parametrize("total,fresh", [(16, True), (17, True), (39, True), (64, True), (95, True), (5, False),
                                         (16, False), (47, False)])
def test_pieces_cover_the_prompt_with_few_sizes(total, fresh):
    plan = piece_sizes(total, PIECE, fresh)
    assert sum(n for _, n in plan) == total
    assert [k for k, _ in plan].count("first") == (1 if fresh else 0) and (not fresh or plan[0] == ("first", PIECE))
    rest = [n for k, n in plan if k == "next"]
    assert all(n == PIECE or (n < PIECE and n & (n - 1) == 0) for n in rest)
    tail = [n for n in rest if n < PIECE]
    assert tail == sorted(tail, reverse=True) and len(set(tail)) == len(tail)  # the binary expansion, once each


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
def test_pieces_split_the_state_sums_from_fewer_keys(monkeypatch, method):
    """Inside a piece the first state's linear sums split from SUM_SPLIT_FROM_GRAPHED keys on (the
    device time is what a graph leaves); a one-pass prefill keeps SUM_SPLIT_FROM. Both build the state
    one pass builds."""
    from attnswap.kernels.hybrid_attn import step_torch
    from attnswap.modeling import prefill

    m = _model(method, 2)
    ids = _ids(PIECE + 3)
    monkeypatch.setattr(prefill, "SUM_SPLIT_FROM_GRAPHED", 4)
    monkeypatch.setattr(step_torch, "SUM_PIECE", 3)
    widths = []
    sums = step_torch._linear_sums
    monkeypatch.setattr(step_torch, "_linear_sums", lambda fk, v, *a: widths.append(
        (fk.shape[1], step_torch._split_from)) or sums(fk, v, *a))
    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "off")
    ref, ref_cache = _prefill(m, ids)
    assert widths and all(at is None for _, at in widths)
    widths.clear()
    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "static")
    got, cache = _prefill(m, ids)
    assert widths and all(n >= 4 and at == 4 for n, at in widths)  # every layer's first piece: split
    assert step_torch._split_from is None
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-5)
    _same_cache(ref_cache, cache)


@pytest.mark.parametrize("method,sinks", [("lolcats", 0), ("lolcats", 2), ("lizard", 0)])
def test_static_pieces_prefill_what_one_pass_prefills(monkeypatch, method, sinks):
    """PyTorch kernels (the CPU default): later pieces step through ``decode``. The Triton continuation
    is checked in tests/kernels/test_hybrid_continue.py (under the interpreter)."""
    m = _model(method, sinks)
    ids = _ids(2 * PIECE + 7)  # first piece, one more whole piece, then 4 + 2 + 1
    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "off")
    ref, ref_cache = _prefill(m, ids)
    assert not _plans(m)
    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "static")
    got, cache = _prefill(m, ids)
    (plan,) = _plans(m).values()
    assert sorted(plan.pieces) == [("first", 16, 0), ("next", 1, 0), ("next", 2, 0), ("next", 4, 0), ("next", 16, 0)]
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-5)
    _same_cache(ref_cache, cache)
    # the cache got its own copy of the state: another prefill through the same plan leaves it alone
    before = {k: t.clone() for k, t in cache.layers[0].state.items()}
    _prefill(m, _ids(2 * PIECE + 7, seed=9))
    assert all(torch.equal(cache.layers[0].state[k], t) for k, t in before.items())
    # the last position only (what generate() asks for)
    last, _ = _prefill(m, ids, logits_to_keep=1)
    assert last.shape[1] == 1
    torch.testing.assert_close(last, ref[:, -1:], rtol=2e-5, atol=2e-5)


def test_continuing_a_cache_in_pieces(monkeypatch):
    m = _model()
    ids = _ids(PIECE + 5 + 2 * PIECE + 3)
    head, tail = ids[:, : PIECE + 5], ids[:, PIECE + 5 :]
    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "off")
    _, ref_cache = _prefill(m, head)
    ref, ref_cache = _prefill(m, tail, ref_cache)
    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "static")
    _, cache = _prefill(m, head)  # a fresh prefill lays out the static state
    got, cache = _prefill(m, tail, cache)
    (plan,) = _plans(m).values()
    assert ("next", 2, 0) in plan.pieces and ("next", 1, 0) in plan.pieces
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-5)
    _same_cache(ref_cache, cache)


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
def test_generate_with_static_pieces_generates_what_it_did(monkeypatch, method):
    m = _model(method)
    ids = _ids(3 * PIECE + 5)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
              attention_mask=torch.ones_like(ids))
    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "off")
    ref = m.generate(ids, **kw)
    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "static")
    out = m.generate(ids, **kw)
    assert _plans(m) and all(p.pieces for p in _plans(m).values())
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores, 1), torch.stack(ref.scores, 1), rtol=1e-4, atol=1e-4)


def test_calls_it_does_not_take_run_as_usual(monkeypatch):
    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "static")
    m = _model()
    ids = _ids(2 * PIECE)
    padded = torch.ones_like(ids)
    padded[1, :3] = 0
    with torch.no_grad():
        m(ids, past_key_values=DynamicCache(), use_cache=True, attention_mask=padded)  # padding
        m(ids[:, : PIECE - 1], past_key_values=DynamicCache(), use_cache=True)  # shorter than a piece
        m(ids, use_cache=False)  # no cache
    m(ids, past_key_values=DynamicCache(), use_cache=True)  # gradients on
    assert not _plans(m)
    small = _model(piece=4)  # a piece shorter than window + sinks
    _prefill(small, ids)
    assert not _plans(small)


def test_a_mixed_model_runs_as_usual(monkeypatch):
    from tests.test_exact_heads import _converted as mixed

    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "static")
    m = mixed("lolcats", {1: [0]})
    m.attnswap_runtime = dataclasses.replace(m.attnswap_runtime, prefill_piece=PIECE)
    _prefill(m, _ids(2 * PIECE))
    assert not _plans(m)


def test_a_piece_that_fails_falls_back_to_one_pass(monkeypatch, caplog):
    import attnswap.modeling.prefill as prefill

    m = _model()
    ids = _ids(2 * PIECE + 1)
    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "off")
    ref, _ = _prefill(m, ids)
    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "static")

    def broken(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(prefill._Piece, "body", broken)
    with caplog.at_level("WARNING"):
        got, _ = _prefill(m, ids)
    torch.testing.assert_close(got, ref)
    assert "prefill without graphed pieces" in caplog.text
    assert list(_plans(m).values()) == [False]  # not tried again for this batch size


def test_bad_settings_are_refused(monkeypatch):
    with pytest.raises(AttnSwapError, match="prefill_graph"):
        RuntimeOptions(prefill_graph="auto")
    with pytest.raises(AttnSwapError, match="prefill_piece"):
        RuntimeOptions(prefill_piece=0)
    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "fast")
    with pytest.raises(ValueError, match="ATTNSWAP_PREFILL_GRAPH"):
        _prefill(_model(), _ids(2 * PIECE))
    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "static")
    monkeypatch.setenv("ATTNSWAP_PREFILL_PIECE", "-3")
    with pytest.raises(ValueError, match="ATTNSWAP_PREFILL_PIECE"):
        _prefill(_model(), _ids(2 * PIECE))


def test_the_piece_can_be_set_from_the_environment(monkeypatch):
    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "static")
    monkeypatch.setenv("ATTNSWAP_PREFILL_PIECE", "8")
    m = _model()
    _prefill(m, _ids(2 * PIECE))
    (plan,) = _plans(m).values()
    assert plan.piece == 8 and sorted(plan.pieces) == [("first", 8, 0), ("next", 8, 0)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", ["lolcats", "lizard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_pieces_prefill_what_one_pass_prefills(monkeypatch, method, dtype):
    m = _model(method).to("cuda", dtype)
    ids = _ids(3 * PIECE + 11).cuda()
    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "off")
    ref, ref_cache = _prefill(m, ids)
    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "cuda")
    for _ in range(2):  # the first call runs eagerly and captures; the second replays
        got, cache = _prefill(m, ids)
    (plan,) = _plans(m).values()
    assert all(p.graph is not None for p in plan.pieces.values())
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
    _same_cache(ref_cache, cache, tol)


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
def test_a_piece_never_waits_for_the_device(monkeypatch, method):
    """A CUDA graph capture forbids host synchronisations: every piece's forward (the transformers mask
    code included) must make none. Counted on CPU as ATen calls (attnswap.profiling)."""
    from attnswap.profiling import count_host_ops

    monkeypatch.setenv("ATTNSWAP_PREFILL_GRAPH", "static")
    m = _model(method)
    ids = _ids(2 * PIECE + 3)
    _prefill(m, ids)
    (plan,) = _plans(m).values()
    at = {("first", PIECE): 0, ("next", PIECE): PIECE, ("next", 2): 2 * PIECE, ("next", 1): 2 * PIECE + 2}
    with torch.no_grad():
        for (kind, size, keep), piece in plan.pieces.items():
            start = at[kind, size]
            _, ops = count_host_ops(piece.run, ids[:, start : start + size], start, stacks=True)
            assert ops.syncs == 0, (kind, size, ops.where)
