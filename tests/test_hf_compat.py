"""The transformers seam and the contract of converted models: generate() equals recomputation from
scratch on every supported family, and a converted layer never decodes without its state.

Runs on the newest transformers and, in scripts/test.sh's second environment, on 5.17.0."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from attnswap import hf_compat
from attnswap.convert.base import KVCacheAttention, register_method
from attnswap.hf_compat import CacheContractError, StateLayer
from attnswap.convert.swap import make_swap
from attnswap.modeling import RuntimeOptions, convert_model
from tests.conftest import tiny_model

pytestmark = pytest.mark.compat

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@register_method("test_exact")
class ExactKV(KVCacheAttention):
    """Exact softmax attention through the ordinary KV cache: the simplest KV-cache method."""

    def attend(self, q, k, v, attention_mask=None):
        return self.softmax_attention(q, k, v, attention_mask)

    def transfer_parameters(self):
        return []


def _converted(fam, method, seed=0):
    m = tiny_model(fam, seed=seed)
    opts = {"lolcats": {"window": 4, "sinks": 2}, "lizard": {"window": 4, "meta_tokens": 2},
            "loza": {"block": 3, "sink_blocks": 1, "local_blocks": 2}}.get(method, {})
    convert_model(m, [make_swap(method, [0, 1, 2], opts, m.config)], "tiny")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move the learned parts off their initial values
        for name, p in m.named_parameters():
            if any(s in name for s in ("feature_map", "window_factor", "gate_proj", "meta_")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


@torch.no_grad()
def _recompute_greedy(m, ids, n):
    """Greedy continuation by a full forward over the whole sequence at every step: no cache at all."""
    seq = ids
    for _ in range(n):
        nxt = m(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq


@pytest.mark.parametrize("method", ["lolcats", "lizard", "test_exact", "loza"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_generate_equals_recomputation(fam, method):
    m = _converted(fam, method)
    ids = torch.randint(0, 300, (1, 13), generator=torch.Generator().manual_seed(3))
    want = _recompute_greedy(m, ids, 8)
    got = m.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert torch.equal(got, want)
    chunked = m.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8, prefill_chunk_size=5)
    assert torch.equal(chunked, want)
    one_pass = m.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8, prefill_chunk_size=None)
    assert torch.equal(one_pass, want)


@pytest.mark.parametrize("method", ["lolcats", "lizard", "test_exact", "loza"])
@pytest.mark.parametrize("fam", ["llama", "qwen3"])
def test_beam_search_equals_beam_search_without_cache(fam, method):
    m = _converted(fam, method)
    ids = torch.randint(0, 300, (1, 11), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False, early_stopping=True)
    assert torch.equal(m.generate(ids, **kw), m.generate(ids, use_cache=False, **kw))


@pytest.mark.parametrize("method", ["lolcats", "lizard", "test_exact", "loza"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_left_padded_batch_equals_each_prompt_alone(fam, method):
    m = _converted(fam, method)
    m.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(7)
    a, b = torch.randint(1, 300, (1, 12), generator=g), torch.randint(1, 300, (1, 7), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 12), torch.cat([torch.zeros(1, 5), torch.ones(1, 7)], 1)]).long()
    got = m.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(got[0, 12:], _recompute_greedy(m, a, 6)[0, 12:])
    assert torch.equal(got[1, 12:], _recompute_greedy(m, b, 6)[0, 7:])


def test_a_recurrent_layer_keeps_a_state_and_a_kv_method_keeps_keys():
    m = _converted("llama", "lolcats")
    out = m(torch.randint(0, 300, (1, 9)), use_cache=True)
    assert all(isinstance(layer, StateLayer) for layer in hf_compat.output_cache(out).layers)
    k = _converted("llama", "test_exact")
    out = k(torch.randint(0, 300, (1, 9)), use_cache=True)
    assert hf_compat.output_cache(out).get_seq_length() == 9
    assert not any(isinstance(layer, StateLayer) for layer in hf_compat.output_cache(out).layers)


# --- the contract: never decode without the state ------------------------------------------------
def _layer_inputs(m, T=5):
    h = torch.randn(1, T, m.config.hidden_size)
    pe = m.model.rotary_emb(h, position_ids=torch.arange(T)[None])
    return h, pe


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
def test_a_layer_asked_to_cache_without_a_cache_raises(method):
    m = _converted("llama", method)
    attn = m.model.layers[0].self_attn
    h, pe = _layer_inputs(m)
    with pytest.raises(CacheContractError, match="no cache"):
        attn(h, position_embeddings=pe, attention_mask=None, use_cache=True)
    with pytest.raises(CacheContractError, match="no cache"):
        attn(h, position_embeddings=pe, attention_mask=torch.zeros(1, 1, 5, 12))  # 7 keys of history it cannot see
    attn(h, position_embeddings=pe, attention_mask=None, use_cache=False)  # a plain forward is fine


def test_a_cache_under_an_unknown_name_raises():
    m = _converted("llama", "lolcats")
    attn = m.model.layers[0].self_attn
    h, pe = _layer_inputs(m)
    with pytest.raises(CacheContractError, match="'kv_cache'"):
        attn(h, position_embeddings=pe, kv_cache=hf_compat.new_cache())


def test_the_model_under_a_renamed_cache_argument_raises_not_decodes(monkeypatch):
    """What a future rename looks like: the decoder layer hands the cache on under a name we do not
    read. generate() must fail loudly rather than return other tokens."""
    m = _converted("llama", "lolcats")
    layer_cls = type(m.model.layers[0])
    orig = layer_cls.forward

    def renamed(self, hidden_states, *a, **kw):
        for name in hf_compat.CACHE_NAMES:
            if name in kw:
                kw["kv_cache"] = kw.pop(name)
        return orig(self, hidden_states, *a, **kw) if "kv_cache" not in kw else _call(self, hidden_states, kw)

    def _call(self, hidden_states, kw):
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        h, _ = self.self_attn(hidden_states=h, **kw)
        return residual + h

    monkeypatch.setattr(layer_cls, "forward", renamed)
    with pytest.raises(CacheContractError):
        m.generate(torch.randint(0, 300, (1, 6)), max_new_tokens=3, do_sample=False)


def test_methods_must_say_how_they_generate():
    from attnswap.convert.base import SwappedAttention

    with pytest.raises(TypeError, match="prefill_state and decode"):
        @register_method("test_nothing")
        class Nothing(SwappedAttention):  # noqa: F841
            pass


# --- the seam itself ---------------------------------------------------------------------------------
def test_the_seam_reads_the_installed_release():
    import inspect

    params = inspect.signature(type(tiny_model().model.layers[0]).forward).parameters
    assert hf_compat.CACHE_KWARG in params
    out = tiny_model()(torch.randint(0, 300, (1, 4)), use_cache=True)
    assert hf_compat.output_cache(out) is not None
    made = hf_compat.causal_lm_output(torch.zeros(1, 1, 3), hf_compat.new_cache())
    assert hf_compat.output_cache(made) is not None


def test_a_version_outside_the_tested_range_warns(monkeypatch):
    from packaging.version import Version

    monkeypatch.setattr(hf_compat, "VERSION", Version("99.0.0"))
    seen = []
    assert hf_compat.check_version(warn=lambda msg, **kw: seen.append(msg)) is False
    assert "tested with transformers" in seen[0]
    monkeypatch.setattr(hf_compat, "VERSION", Version(transformers.__version__))
    lo, hi = (Version(v) for v in hf_compat.TESTED)
    assert hf_compat.check_version(warn=lambda msg, **kw: seen.append(msg)) is (lo <= Version(hf_compat.VERSION.base_version) <= hi)


# --- runtime options -----------------------------------------------------------------------------------
def test_runtime_options_save_and_load_and_from_pretrained_kwargs_win(tmp_path):
    m = _converted("llama", "lolcats")
    m.config.attnswap["runtime"] = RuntimeOptions(kernels="torch", decode_graph="off").to_dict()
    m.save_pretrained(tmp_path)
    r = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert r.attnswap_runtime == RuntimeOptions(kernels="torch", decode_graph="off")
    r = AutoModelForCausalLM.from_pretrained(tmp_path, decode_graph="static", compile_decode="attn", prefill_chunk=64)
    assert r.attnswap_runtime == RuntimeOptions(kernels="torch", decode_graph="static", compile_decode="attn", prefill_chunk=64)
    with pytest.raises(Exception, match="decode_graph='sometimes'"):
        AutoModelForCausalLM.from_pretrained(tmp_path, decode_graph="sometimes")


def test_runtime_options_reach_the_kernels_and_the_decode_step(monkeypatch):
    from attnswap.kernels import dispatch
    from attnswap.modeling import decode

    monkeypatch.delenv("ATTNSWAP_KERNELS", raising=False)
    monkeypatch.delenv("ATTNSWAP_DECODE_GRAPH", raising=False)
    seen = {}
    m = _converted("llama", "lolcats")
    m.attnswap_runtime = RuntimeOptions(kernels="torch", decode_graph="static")
    orig = decode.try_decode_step

    def spy(model, input_ids, *a):
        seen["backend"] = dispatch.backend_for(torch.zeros(1))
        seen["graph"] = decode.graph_mode(torch.device("cpu"))
        return orig(model, input_ids, *a)

    monkeypatch.setattr("attnswap.modeling.classes.try_decode_step", spy)
    m(torch.randint(0, 300, (1, 4)))
    assert seen == {"backend": "torch", "graph": "static"}
    monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", "off")  # the environment overrides the saved option
    m(torch.randint(0, 300, (1, 4)))
    assert seen["graph"] == "off"


def test_generate_prefills_long_prompts_in_chunks_by_default(monkeypatch):
    """Peak memory of a plain generate() stays flat with the prompt's length: the prompt goes through
    the model in runtime.prefill_chunk pieces unless the caller says otherwise."""
    from transformers import LlamaForCausalLM

    m = _converted("llama", "lolcats")
    m.attnswap_runtime = RuntimeOptions(prefill_chunk=8)
    sizes = []
    orig = LlamaForCausalLM.forward

    def recording(self, input_ids=None, **kw):
        sizes.append(input_ids.shape[1])
        return orig(self, input_ids=input_ids, **kw)

    monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", "off")
    monkeypatch.setattr(LlamaForCausalLM, "forward", recording)
    ids = torch.randint(0, 300, (1, 30))
    want = _recompute_greedy(m, ids, 2)
    sizes.clear()
    assert torch.equal(m.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False), want)
    assert sizes == [8, 8, 8, 6, 1]
    sizes.clear()
    m.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, prefill_chunk_size=None)
    assert sizes == [30, 1]
    # no runtime option: the device's default piece (PREFILL_CHUNK off CUDA, PREFILL_CHUNK_CUDA on it)
    from attnswap.modeling import classes

    m.attnswap_runtime = RuntimeOptions()
    monkeypatch.setattr(classes, "PREFILL_CHUNK", 12)
    sizes.clear()
    assert torch.equal(m.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False), want)
    assert sizes == [12, 12, 6, 1]
    assert classes.default_prefill_chunk("cuda:0") == classes.PREFILL_CHUNK_CUDA > classes.default_prefill_chunk("cpu")


def test_on_cuda_a_model_recurrent_in_every_layer_takes_prompts_up_to_32k_in_one_pass():
    """The CUDA default: one pass up to ONE_PASS_CUDA tokens when every layer is recurrent without exact
    heads (measured faster and lower in peak than pieces at 32k), else PREFILL_CHUNK_CUDA pieces."""
    from attnswap.convert.base import swapped_modules
    from attnswap.modeling import classes

    one, piece = classes.ONE_PASS_CUDA, classes.PREFILL_CHUNK_CUDA
    assert classes.default_prefill_chunk("cuda", 20000, recurrent=True) == 20000
    assert classes.default_prefill_chunk("cuda", 1000, recurrent=True) == piece  # one piece either way
    assert classes.default_prefill_chunk("cuda", one, recurrent=True) == one
    assert classes.default_prefill_chunk("cuda", one + 1, recurrent=True) == piece
    assert classes.default_prefill_chunk("cuda", 20000, recurrent=False) == piece
    assert classes.default_prefill_chunk("cpu", 20000, recurrent=True) == classes.PREFILL_CHUNK
    assert classes._all_recurrent(_converted("llama", "lolcats"))
    assert classes._all_recurrent(_converted("llama", "lizard"))
    assert not classes._all_recurrent(_converted("llama", "seer"))  # a KV cache, prefilled in pieces as before
    mixed = _converted("llama", "lolcats")
    next(iter(swapped_modules(mixed))).set_exact_heads([0])
    assert not classes._all_recurrent(mixed)
    partial = tiny_model("llama")
    convert_model(partial, [make_swap("lolcats", [0, 1], {"window": 4}, partial.config)], "tiny")
    assert not classes._all_recurrent(partial)  # layer 2 keeps softmax attention and its KV cache
    ids = torch.zeros(2, 17, dtype=torch.long)
    assert classes._prompt_len((ids,), {}) == 17 == classes._prompt_len((), {"input_ids": ids})
    assert classes._prompt_len((), {"inputs_embeds": torch.zeros(1, 9, 4)}) == 9
    assert classes._prompt_len((), {}) is None


# --- the KV layer with per-block summaries (seer's gate keys) --------------------------------------------
def _summary_layer(B=3, L=21, block=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = hf_compat.new_cache()
    cache.update(torch.randn(B, 2, L, 8, generator=g), torch.randn(B, 2, L, 8, generator=g), 0)
    layer = hf_compat.summary_slot(cache, 0)
    rows = torch.randn(B, L // block, 2, 5, generator=g)  # one row per completed block
    layer.append_summaries(rows, "tag", block, first=0)
    return cache, layer, rows


def test_a_summary_layer_adopts_a_dynamic_layer_and_keeps_its_keys():
    g = torch.Generator().manual_seed(0)
    cache = hf_compat.new_cache()
    k, v = torch.randn(1, 2, 9, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g)
    cache.update(k, v, 0)
    layer = hf_compat.summary_slot(cache, 0)
    assert isinstance(layer, hf_compat.BlockSummaryLayer) and cache.layers[0] is layer
    assert torch.equal(layer.keys, k) and layer.get_seq_length() == 9 and cache.get_seq_length() == 9
    assert layer.summaries("tag", 4, 1) is None  # none yet: the caller computes them
    assert hf_compat.summary_slot(cache, 0) is layer
    assert hf_compat.summary_slot(cache, 1) is None  # no such layer yet


def test_summaries_follow_beam_reordering_batch_selection_repetition_and_cropping():
    cache, layer, rows = _summary_layer()
    torch.testing.assert_close(layer.summaries("tag", 4, 3), rows)
    beam = torch.tensor([2, 0, 0])
    cache.reorder_cache(beam)
    torch.testing.assert_close(layer.summaries("tag", 4, 3), rows[beam])
    cache.batch_select_indices(torch.tensor([0, 1]))
    torch.testing.assert_close(layer.summaries("tag", 4, 2), rows[beam][:2])
    cache.batch_repeat_interleave(2)
    torch.testing.assert_close(layer.summaries("tag", 4, 4), rows[beam][:2].repeat_interleave(2, 0))
    cache.crop(-3)  # 21 -> 18 keys: blocks 0..3 stay complete
    assert layer.summaries("tag", 4, 4).shape[1] == 4
    cache.crop(-3)  # 15 keys: block 3 is no longer complete
    assert layer.summaries("tag", 4, 4).shape[1] == 3
    with pytest.raises(CacheContractError):
        layer.append_summaries(torch.randn(4, 1, 2, 5), "tag", 4, first=3)  # 4 summaries for 15 keys: too many
    with pytest.raises(CacheContractError):
        layer.append_summaries(torch.randn(4, 1, 2, 5), "tag", 4, first=2)  # not after the stored ones
    cache.update(torch.randn(4, 2, 2, 8), torch.randn(4, 2, 2, 8), 0)
    layer.append_summaries(torch.ones(4, 1, 2, 5), "tag", 4, first=3)
    assert layer.summaries("tag", 4, 4).shape[1] == 4
    cache.reset()
    assert layer.summaries("tag", 4, 4) is None


def test_summaries_are_dropped_rather_than_read_when_they_may_be_stale():
    _, layer, rows = _summary_layer()
    assert layer.summaries("other tag", 4, 3) is None  # made by other weights: dropped
    assert layer.summaries("tag", 4, 3) is None
    _, layer, rows = _summary_layer()
    assert layer.summaries("tag", 8, 3) is None  # another block size
    _, layer, rows = _summary_layer()
    assert layer.summaries("tag", 4, 2) is None  # another batch
    cache, layer, rows = _summary_layer()
    layer.keys = layer.keys[:, :, :5]  # keys changed behind the layer's back
    assert layer.summaries("tag", 4, 3) is None
    cache, layer, rows = _summary_layer()
    layer.keys = layer.keys.clone()  # same length, another object: cannot be vouched for
    cache.update(torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8), 0)
    assert layer.summaries("tag", 4, 3) is None
    cache, layer, rows = _summary_layer()
    layer.keys = torch.cat([layer.keys, layer.keys[:, :, :4]], 2)  # grown behind its back: 6 blocks
    with pytest.raises(CacheContractError, match="do not continue"):
        layer.append_summaries(torch.randn(3, 1, 2, 5), "tag", 4, first=5)


def test_summaries_grow_without_copying_all_rows_at_every_block():
    cache = hf_compat.new_cache()
    cache.update(torch.zeros(1, 1, 0, 2), torch.zeros(1, 1, 0, 2), 0)
    layer = hf_compat.summary_slot(cache, 0)
    stores = set()
    for i in range(40):
        cache.update(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2), 0)
        layer.append_summaries(torch.full((1, 1, 3), float(i)), "t", 2, first=i)
        stores.add(layer._rows.data_ptr())
    assert layer.summaries("t", 2, 1)[0, :, 0].tolist() == [float(i) for i in range(40)]
    assert len(stores) <= 3  # capacity doubles: 16, 32, 64


def test_layer_checkpointing_switches_every_layer_without_a_deprecation_warning():
    """Under the name this release gives the switch (``activation_checkpointing_enable`` from 5.25,
    ``gradient_checkpointing_enable`` before) and its keyword argument, with no FutureWarning."""
    import warnings

    m = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_compat.layer_checkpointing(m, True, {"use_reentrant": False})
        assert all(layer.gradient_checkpointing for layer in m.model.layers)
        hf_compat.layer_checkpointing(m, False)
    assert not any(layer.gradient_checkpointing for layer in m.model.layers)
