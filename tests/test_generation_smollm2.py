"""The decoding parity of test_generation.py on the real SmolLM2 (30 layers, 9/3 heads, head dim 64):
prefill, then token-by-token decoding from the constant-size state (eagerly and through the static
decode step that CUDA graphs replay) gives the logits of one full forward pass."""

import pytest
import torch
from transformers import DynamicCache

from attnswap import loading
from attnswap.modeling import convert_model
from attnswap.convert.swap import make_swap

# not in the contract run on the oldest transformers (`-m compat`): the same paths run there on tiny
# models (test_generation.py, test_hf_compat.py, test_decode_graph.py); these ~90 s on the real model
# run once, on the newest
pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2():
    model, _ = loading.load_model(loading.resolve("llama"), dtype=torch.float32, device="cpu")
    return model


WINDOW = {"lolcats": {"window": 64}, "lizard": {"window": 128}}  # short enough that these lengths cross it


@pytest.mark.parametrize("method,prefix,total", [("lolcats", 90, 130), ("lizard", 150, 175)])
def test_decoding_from_the_state_equals_a_full_forward(smollm2, monkeypatch, method, prefix, total):
    import copy

    m = copy.deepcopy(smollm2)
    convert_model(m, [make_swap(method, list(range(m.config.num_hidden_layers)), WINDOW[method], m.config)], "smollm2")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the learned parts off their initial values
        for name, p in m.named_parameters():
            if any(s in name for s in ("feature_map", "window_factor", "gate_proj", "meta_")):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    ids = torch.randint(100, 40000, (1, total), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(ids).logits
        for path in ("off", "static"):
            monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", path)
            out = m(ids[:, :prefix], past_key_values=DynamicCache(), use_cache=True)
            logits = [out.logits]
            for t in range(prefix, total):
                out = m(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
                logits.append(out.logits)
            got = torch.cat(logits, 1)
            rel = ((got - full).abs().max() / full.abs().max()).item()  # fp32 through 30 layers: ~5e-5
            assert rel < 2e-4, f"{method}, {path}: max |diff| is {rel:.2e} of the largest logit"
            assert torch.equal(got.argmax(-1), full.argmax(-1))


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
def test_generate_equals_recomputation_on_smollm2(smollm2, method):
    """generate() (greedy, chunked prefill, left-padded batch, beam search) against recomputing every
    step from scratch without a cache, on the real model, across the softmax window."""
    import copy

    from tests.test_hf_compat import _recompute_greedy

    m = copy.deepcopy(smollm2)
    convert_model(m, [make_swap(method, list(range(m.config.num_hidden_layers)), WINDOW[method], m.config)], "smollm2")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if any(s in name for s in ("feature_map", "window_factor", "gate_proj", "meta_")):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    a = torch.randint(100, 40000, (1, 150), generator=g)
    b = torch.randint(100, 40000, (1, 140), generator=g)
    n = 6
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    want_a = _recompute_greedy(m, a, n)
    assert torch.equal(m.generate(a, **kw), want_a)
    assert torch.equal(m.generate(a, prefill_chunk_size=64, **kw), want_a)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 10, dtype=torch.long), b], 1)])
    mask = (ids != 0).long()
    mask[0] = 1
    got = m.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got[0, 150:], want_a[0, 150:])
    assert torch.equal(got[1, 150:], _recompute_greedy(m, b, n)[0, 140:])
    beam = dict(kw, num_beams=2, max_new_tokens=4, min_new_tokens=4)
    assert torch.equal(m.generate(a, **beam), m.generate(a, use_cache=False, **beam))
