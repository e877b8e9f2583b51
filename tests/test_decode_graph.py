"""The whole-model decode step that CUDA graphs replay (generation.py), checked on CPU in its
``static`` form: the same static buffers and in-place state updates, without graph capture."""

import pytest
import torch
from transformers import DynamicCache

from attnswap.modeling import reset_decode_graphs
from tests.test_generation import _converted

pytestmark = pytest.mark.compat


def _greedy(m, ids, mask=None, n=10):
    out = m.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                     output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores, 1)


@pytest.mark.parametrize("method,sinks", [("lolcats", 0), ("lolcats", 2), ("lizard", 0)])
def test_static_step_generates_what_the_eager_step_generates(monkeypatch, method, sinks):
    m = _converted(method=method, sinks=sinks)
    a = torch.randint(1, 300, (1, 12), generator=torch.Generator().manual_seed(4))
    b = torch.randint(1, 300, (1, 7), generator=torch.Generator().manual_seed(5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = (torch.arange(12)[None] >= torch.tensor([[0], [5]])).long()
    monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", "off")
    ref_seq, ref_scores = _greedy(m, batch, mask)
    assert not m.__dict__.get("_attnswap_decode_graphs")
    monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", "static")
    seq, scores = _greedy(m, batch, mask)
    assert len(m._attnswap_decode_graphs) == 1  # the static step did run
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    seq2, _ = _greedy(m, batch, mask)  # the graph is reused from a fresh prefill
    assert torch.equal(seq2, ref_seq) and len(m._attnswap_decode_graphs) == 1


def test_compiled_whole_step_generates_what_the_eager_step_generates(monkeypatch):
    """torch.compile of the whole one-token step (ATTNSWAP_COMPILE_DECODE=model), on CPU (about 30 s)."""
    m = _converted(sinks=2)
    ids = torch.randint(1, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", "off")
    ref_seq, ref_scores = _greedy(m, ids, n=6)
    monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", "static")
    monkeypatch.setenv("ATTNSWAP_COMPILE_DECODE", "model")
    seq, scores = _greedy(m, ids, n=6)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_two_interleaved_generations_keep_their_own_state(monkeypatch):
    monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", "static")
    m = _converted(sinks=2)
    x = torch.randint(1, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    y = torch.randint(1, 300, (1, 9), generator=torch.Generator().manual_seed(2))

    def start(ids):
        o = m(ids, past_key_values=DynamicCache(), use_cache=True)
        return o.past_key_values, o.logits[:, -1:].argmax(-1)

    def alone(ids, n=6):
        cache, tok = start(ids)
        toks = []
        for _ in range(n):
            o = m(tok, past_key_values=cache, use_cache=True)
            tok = o.logits[:, -1:].argmax(-1)
            toks.append(o.logits)
        return torch.cat(toks, 1)

    want_x, want_y = alone(x), alone(y)
    (cx, tx), (cy, ty) = start(x), start(y)
    got_x, got_y = [], []
    for _ in range(6):
        ox = m(tx, past_key_values=cx, use_cache=True)
        oy = m(ty, past_key_values=cy, use_cache=True)
        tx, ty = ox.logits[:, -1:].argmax(-1), oy.logits[:, -1:].argmax(-1)
        got_x.append(ox.logits)
        got_y.append(oy.logits)
    torch.testing.assert_close(torch.cat(got_x, 1), want_x)
    torch.testing.assert_close(torch.cat(got_y, 1), want_y)


def test_partly_converted_models_and_prompt_steps_stay_eager(monkeypatch):
    monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", "static")
    m = _converted(layers=(0, 2))  # layer 1 keeps softmax attention and its growing KV cache
    ids = torch.randint(1, 300, (1, 8))
    m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert not m.__dict__.get("_attnswap_decode_graphs")


def test_replaced_weights_get_a_new_step(monkeypatch):
    monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", "static")
    m = _converted()
    ids = torch.randint(1, 300, (1, 8))
    m.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())
    m.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(m._attnswap_decode_graphs) == 2
    reset_decode_graphs(m)
    assert not m.__dict__.get("_attnswap_decode_graphs")


@pytest.mark.parametrize("var", ["ATTNSWAP_DECODE_GRAPH", "ATTNSWAP_COMPILE_DECODE"])
def test_unknown_setting_is_refused(monkeypatch, var):
    monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", "static")
    monkeypatch.setenv(var, "fast")
    m = _converted()
    with pytest.raises(ValueError, match=var):
        m.generate(torch.randint(1, 300, (1, 5)), max_new_tokens=2, do_sample=False, pad_token_id=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", ["lolcats", "lizard"])
@pytest.mark.parametrize("compiled", ["0", "attn", "model"])
def test_cuda_graph_generates_what_the_eager_step_generates(monkeypatch, method, compiled):
    monkeypatch.setenv("ATTNSWAP_COMPILE_DECODE", compiled)
    m = _converted(method=method, sinks=2).cuda()
    ids = torch.randint(1, 300, (2, 37), generator=torch.Generator().manual_seed(9)).cuda()
    monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", "off")
    ref_seq, ref_scores = _greedy(m, ids, n=20)
    monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", "auto")
    seq, scores = _greedy(m, ids, n=20)
    assert m._attnswap_decode_graphs and all(g.graph is not None for g in m._attnswap_decode_graphs.values())
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-4)


def test_a_step_that_cannot_be_captured_falls_back_to_eager(monkeypatch, caplog):
    import attnswap.modeling.decode as gen

    def broken(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    m = _converted(sinks=2)
    ids = torch.randint(1, 300, (2, 9), generator=torch.Generator().manual_seed(6))
    monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", "off")
    ref, _ = _greedy(m, ids, n=5)
    monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", "static")
    monkeypatch.setattr(gen, "DecodeGraph", broken)
    with caplog.at_level("WARNING", logger="attnswap.modeling.decode"):
        seq, _ = _greedy(m, ids, n=5)
        seq2, _ = _greedy(m, ids, n=5)
    assert torch.equal(seq, ref) and torch.equal(seq2, ref)
    assert sum("decoding without a CUDA graph" in r.message for r in caplog.records) == 1  # tried once, then eager


@pytest.mark.parametrize("failing", [1, 2])
def test_a_whole_step_that_fails_to_compile_is_tried_again_then_taken_uncompiled(monkeypatch, caplog, failing):
    """compile_decode="model": a compiled variant that raises (as Inductor did for Lizard on the H100)
    hands over to the next, and past the last compiled one to the plain step, still a captured step
    rather than eager decoding."""
    import attnswap.modeling.decode as gen

    def raises(*args, **kwargs):
        raise RuntimeError("SubprocException: An exception occurred in a subprocess:\n...\nPassManager::run failed")

    variants = list(gen.COMPILE_VARIANTS)
    monkeypatch.setattr(gen, "compiled_step", lambda v: raises if variants.index(v) < failing else gen._pure_step_plain_reductions)
    m = _converted(method="lizard")
    ids = torch.randint(1, 300, (2, 9), generator=torch.Generator().manual_seed(7))
    monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", "off")
    ref, ref_scores = _greedy(m, ids, n=5)
    monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", "static")
    monkeypatch.setenv("ATTNSWAP_COMPILE_DECODE", "model")
    with caplog.at_level("WARNING", logger="attnswap.modeling.decode"):
        seq, scores = _greedy(m, ids, n=5)
    assert torch.equal(seq, ref)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    (g,) = m._attnswap_decode_graphs.values()
    assert g is not False and g.step_fn is (gen._pure_step if failing == 2 else gen._pure_step_plain_reductions)
    msgs = [r.message for r in caplog.records]
    assert sum("decode step failed" in x for x in msgs) == failing and "PassManager::run failed" in msgs[0]
    assert not any("without a CUDA graph" in x for x in msgs)


def test_captured_steps_are_bounded(monkeypatch):
    import attnswap.modeling.decode as gen

    monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", "static")
    m = _converted()
    for b in range(1, gen.MAX_GRAPHS + 3):
        m.generate(torch.randint(1, 300, (b, 6)), max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert len(m._attnswap_decode_graphs) == min(b, gen.MAX_GRAPHS)
