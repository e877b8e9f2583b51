"""Constant-memory generation: decoding from the recurrent state equals a full forward pass."""

import pytest
import torch
from transformers import DynamicCache

from attnswap.modeling import convert_model
from attnswap.hf_compat import StateLayer
from attnswap.convert.swap import make_swap
from tests.conftest import tiny_model

pytestmark = pytest.mark.compat


def _converted(fam="llama", layers=(0, 1, 2), window=4, seed=0, sinks=0, method="lolcats"):
    m = tiny_model(fam, seed=seed)
    opts = {"window": window, "sinks": sinks} if method == "lolcats" else {"window": window}
    convert_model(m, [make_swap(method, list(layers), opts, m.config)], "tiny")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move feature maps, gates, sinks and mixing factors off their initial values
        for name, p in m.named_parameters():
            if any(s in name for s in ("feature_map", "window_factor", "gate_proj", "meta_")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


def _state_numel(cache):
    return sum(t.numel() for l in cache.layers if isinstance(l, StateLayer) for t in l.state.values())


@pytest.mark.parametrize("fam,layers", [("llama", (0, 1, 2)), ("llama", (0, 2)), ("qwen3", (1,)), ("mistral", (0, 1, 2))])
@pytest.mark.parametrize("prefix", [1, 3, 9])
@pytest.mark.parametrize("sinks", [0, 2])
def test_token_by_token_equals_full_forward(fam, layers, prefix, sinks):
    m = _converted(fam, layers, sinks=sinks)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(prefix))
    full = m(ids).logits
    out = m(ids[:, :prefix], past_key_values=DynamicCache(), use_cache=True)
    logits = [out.logits]
    sizes = []
    for t in range(prefix, ids.shape[1]):
        out = m(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits)
        sizes.append(_state_numel(out.past_key_values))
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-5)
    assert len(set(sizes)) == 1  # the state does not grow with the tokens seen
    for i in layers:
        assert isinstance(out.past_key_values.layers[i], StateLayer)


def test_chunked_continuation_equals_full_forward():
    m = _converted()
    ids = torch.randint(0, 300, (1, 30))
    full = m(ids).logits
    o1 = m(ids[:, :11], past_key_values=DynamicCache(), use_cache=True)
    o2 = m(ids[:, 11:], past_key_values=o1.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([o1.logits, o2.logits], 1), full, rtol=1e-4, atol=1e-5)


def test_generate_greedy_matches_recomputation():
    m = _converted(layers=(0, 2))
    ids = torch.randint(0, 300, (1, 10))
    out = m.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    seq = ids
    for _ in range(12):
        seq = torch.cat([seq, m(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("sinks", [0, 3])
def test_batched_generation_with_left_padding_matches_single(sinks):
    m = _converted(sinks=sinks)
    a = torch.randint(1, 300, (1, 12))
    b = torch.randint(1, 300, (1, 7))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 12), torch.cat([torch.zeros(1, 5), torch.ones(1, 7)], 1)]).long()
    out = m.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ga = m.generate(a, max_new_tokens=8, do_sample=False, pad_token_id=0)
    gb = m.generate(b, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0], ga[0])
    assert torch.equal(out[1, 5:], gb[0])


def test_sampling_runs_and_is_seeded():
    m = _converted()
    ids = torch.randint(0, 300, (2, 6))
    torch.manual_seed(3)
    x = m.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(3)
    y = m.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    assert x.shape == (2, 12) and torch.equal(x, y)


@pytest.mark.parametrize("fam", ["llama", "qwen2"])
@pytest.mark.parametrize("prefix", [1, 6])
def test_lizard_token_by_token_equals_full_forward(fam, prefix):
    m = _converted(fam, (0, 2), method="lizard")
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(prefix))
    full = m(ids).logits
    out = m(ids[:, :prefix], past_key_values=DynamicCache(), use_cache=True)
    logits = [out.logits]
    for t in range(prefix, ids.shape[1]):
        out = m(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-5)


def test_lizard_batched_generation_with_left_padding_matches_single():
    m = _converted(method="lizard")
    a = torch.randint(1, 300, (1, 10))
    b = torch.randint(1, 300, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = (batch != 0).long()
    mask[0] = 1
    out = m.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0], m.generate(a, max_new_tokens=6, do_sample=False, pad_token_id=0)[0])
    assert torch.equal(out[1, 4:], m.generate(b, max_new_tokens=6, do_sample=False, pad_token_id=0)[0])


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
def test_beam_search_with_the_state_matches_beam_search_without_cache(method):
    m = _converted(sinks=2) if method == "lolcats" else _converted(method="lizard")
    ids = torch.randint(1, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(m.generate(ids, **kw), m.generate(ids, use_cache=False, **kw))


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
def test_chunked_prefill_through_the_state_matches_one_prefill(method):
    """transformers' prefill_chunk_size feeds the prompt through the cache in pieces: with a
    recurrent state this bounds generation memory, and must not change the result."""
    m = _converted(sinks=2) if method == "lolcats" else _converted(method="lizard")
    ids = torch.randint(1, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(m.generate(ids, **kw), m.generate(ids, prefill_chunk_size=8, **kw))


def test_long_continuation_goes_through_the_state_in_pieces(monkeypatch):
    from attnswap.convert.base import SwappedAttention

    m = _converted(sinks=2)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(7))
    full = m(ids).logits
    monkeypatch.setattr(SwappedAttention, "decode_piece", 3)
    o1 = m(ids[:, :9], past_key_values=DynamicCache(), use_cache=True)
    o2 = m(ids[:, 9:], past_key_values=o1.past_key_values, use_cache=True)  # 31 tokens in pieces of 3
    torch.testing.assert_close(torch.cat([o1.logits, o2.logits], 1), full, rtol=1e-4, atol=1e-5)


def held_views(cache) -> list[str]:
    """State tensors that are views into a buffer much larger than themselves (the prompt's keys,
    values or features), which the cache would keep alive: their names."""
    return [f"{i}:{n}" for i, l in enumerate(cache.layers) if isinstance(l, StateLayer) for n, t in l.state.items()
            if t.untyped_storage().nbytes() > 2 * t.numel() * t.element_size()]


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
@pytest.mark.parametrize("padded", [False, True], ids=["one-row", "left-padded"])
def test_the_state_holds_no_prompt_sized_buffer(method, padded):
    """After a prefill of many more tokens than the window, every state tensor owns its memory: its
    window, sinks and features are copies, not slices of the prompt's keys (at 32k, 2.2 GB for
    SmolLM2 before this was checked). Both state builders: unpadded in one pass, and masked."""
    m = _converted(sinks=2) if method == "lolcats" else _converted(method="lizard")
    ids = torch.randint(1, 300, (2, 600), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :5] = 0
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(), use_cache=True)
    cache = out.past_key_values
    assert _state_numel(cache) > 0
    assert held_views(cache) == []


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
def test_watched_feature_maps_run_as_modules_in_a_prefill(method):
    """A prefill into a cache computes a layer's query and key features together (one launch on the
    Triton path), except where something watches the feature-map modules: a hook then sees its module
    run, with the same logits."""
    m = _converted(sinks=2) if method == "lolcats" else _converted(method="lizard")
    ids = torch.randint(1, 300, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = m(input_ids=ids, past_key_values=DynamicCache(), use_cache=True).logits
        seen = []
        attn = m.model.layers[1].self_attn
        handle = attn.feature_map_k.register_forward_hook(lambda mod, a, out: seen.append(out.shape))
        try:
            watched = m(input_ids=ids, past_key_values=DynamicCache(), use_cache=True).logits
        finally:
            handle.remove()
    assert seen and seen[0][:2] == (1, 20)
    torch.testing.assert_close(watched, plain, rtol=1e-5, atol=1e-6)
