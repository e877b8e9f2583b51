"""benchmarks/streaming_probe.py: its mask and attention against per-head loops written out by hand,
and on a tiny Llama, through transformers' AttentionInterface, the stock attention's logits when every
head is exact (or the window covers the prompt)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from attnswap.evals.common import HFModel, encode
from attnswap.evals.passkey import key_forced, leading_blanks
from tests.conftest import tiny_model, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import streaming_probe as sp  # noqa: E402


def _naive(q, k, v, exact_kv: set[int], sinks: int, window: int, scale: float):
    """(H, T, D) by loops: query i (position S - T + i) of head h over the keys its rule lets it see."""
    H, T, D = q.shape
    Hk, S = k.shape[0], k.shape[1]
    G = H // Hk
    out = torch.zeros_like(q)
    for h in range(H):
        for i in range(T):
            p = S - T + i
            keys = [j for j in range(p + 1) if h // G in exact_kv or j < sinks or p - j < window]
            s = torch.stack([q[h, i] @ k[h // G, j] for j in keys]) * scale
            w = torch.softmax(s, 0)
            out[h, i] = sum(w[n] * v[h // G, j] for n, j in enumerate(keys))
    return out


@pytest.mark.parametrize("T,S,sinks,window", [(9, 9, 2, 3), (4, 11, 1, 2), (7, 7, 0, 7)])
def test_attention_matches_loops(T, S, sinks, window):
    g = torch.Generator().manual_seed(T * 100 + S)
    H, Hk, D = 6, 3, 8
    q, k, v = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((H, T, D), (Hk, S, D), (Hk, S, D)))
    layer = type("Layer", (), {"layer_idx": 5})()
    sp.SETTINGS.update(exact={5: {1}}, sinks=sinks, window=window)
    got, weights = sp.probe_attention(layer, q[None], k[None], v[None], None, scaling=D ** -0.5)
    want = _naive(q, k, v, {1}, sinks, window, D ** -0.5)
    assert weights is None and got.shape == (1, T, H, D)
    torch.testing.assert_close(got[0].transpose(0, 1), want, rtol=1e-10, atol=1e-10)


def test_mask_rule():
    m = sp.streaming_mask(torch.arange(3, 6), 6, torch.tensor([True, False]), sinks=1, window=2)
    assert m[0].tolist() == [[j <= p for j in range(6)] for p in range(3, 6)]
    assert m[1].tolist() == [[j <= p and (j < 1 or p - j < 2) for j in range(6)] for p in range(3, 6)]


@pytest.mark.compat  # transformers' AttentionInterface and set_attn_implementation, on both versions
@torch.no_grad()
def test_model_through_attention_interface():
    m = tiny_model()  # 4 heads, 2 KV heads
    ids = torch.randint(0, 200, (1, 21), generator=torch.Generator().manual_seed(1))
    stock = m(ids).logits
    n_layers, n_kv = m.config.num_hidden_layers, m.config.num_key_value_heads
    every = {i: set(range(n_kv)) for i in range(n_layers)}
    with sp.streaming(m, every, sinks=0, window=1):
        torch.testing.assert_close(m(ids).logits, stock, rtol=1e-5, atol=1e-5)
    with sp.streaming(m, {}, sinks=0, window=21):  # the window covers the prompt
        torch.testing.assert_close(m(ids).logits, stock, rtol=1e-5, atol=1e-5)
    with sp.streaming(m, {0: {1}}, sinks=1, window=3):
        cut = m(ids).logits
    assert not torch.allclose(cut[0, 4:], stock[0, 4:], atol=1e-3)  # the rule acts beyond the window
    torch.testing.assert_close(cut[0, :3], stock[0, :3], rtol=1e-5, atol=1e-5)  # and not within it
    torch.testing.assert_close(m(ids).logits, stock)  # restored


def test_parse_exact(tmp_path):
    assert sp.parse_exact("3.1,20.1,20.2") == {3: {1}, 20: {1, 2}}
    assert sp.parse_exact(None) == {}
    swaps = [{"layers": [0, 2], "method": "lizard", "options": {"window": 256}},
             {"layers": [1, 3], "method": "lizard", "options": {"exact_heads": [0, 2], "window": 256}}]
    (tmp_path / "config.json").write_text(json.dumps({"attnswap": {"swaps": swaps}}))
    assert sp.parse_exact(str(tmp_path)) == {1: {0, 2}, 3: {0, 2}}
    with pytest.raises(SystemExit, match="LAYER.HEAD"):
        sp.parse_exact("3,4")


def test_plan_runs():
    base = {1: {0}}
    runs = sp.plan_runs(["teacher", "streaming"], base, "0-1;3", n_layers=4, n_kv=2)
    assert [r[0] for r in runs] == ["teacher", "streaming, layers 0-1 exact", "streaming, layers 3 exact"]
    assert runs[0][1] == {i: {0, 1} for i in range(4)}
    assert runs[1][1] == {0: {0, 1}, 1: {0, 1}} and runs[2][1] == {1: {0}, 3: {0, 1}}
    assert sp.plan_runs(["streaming"], base, None, 4, 2) == [("streaming", base)]
    with pytest.raises(sp.AttnSwapError):
        sp.plan_runs(["streaming"], base, "7", 4, 2)


def test_far_mean_keeps_the_far_mass_and_averages_its_values():
    """``--far mean``: a streaming head's output is its full softmax's weights on the keys it sees, plus
    the total weight of those it hides times their values' mean; exact heads are unchanged."""
    g = torch.Generator().manual_seed(7)
    H, Hk, T, D, sinks, window = 4, 2, 12, 8, 1, 3
    q, k, v = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((H, T, D), (Hk, T, D), (Hk, T, D)))
    layer = type("Layer", (), {"layer_idx": 0})()
    sp.SETTINGS.update(exact={0: {0}}, sinks=sinks, window=window, far="mean")
    try:
        got = sp.probe_attention(layer, q[None], k[None], v[None], None, scaling=D ** -0.5)[0][0].transpose(0, 1)
    finally:
        sp.SETTINGS["far"] = "none"
    full = _naive(q, k, v, {0, 1}, 0, T, D ** -0.5)
    torch.testing.assert_close(got[:2], full[:2], rtol=1e-10, atol=1e-10)  # KV head 0 exact
    for h in (2, 3):
        for p in range(T):
            w = torch.softmax(torch.stack([q[h, p] @ k[1, j] for j in range(p + 1)]) * D ** -0.5, 0)
            far = [j for j in range(p + 1) if not (j < sinks or p - j < window)]
            want = sum(w[j] * v[1, j] for j in range(p + 1) if j not in far)
            if far:
                want = want + w[far].sum() * v[1, far].mean(0)
            torch.testing.assert_close(got[h, p], want, rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_score_in_one_forward_matches_key_forced_and_the_next_token():
    """``score``'s forced scores are ``passkey.key_forced``'s, and its top token the prompt's own next one."""
    m, tok = tiny_model(), tiny_tokenizer()
    ids = encode(tok, "The quick brown fox jumps over the lazy dog. The key is")
    for key in ("12345", "54321"):
        got = sp.score(m, tok, ids, key)
        key_ids = encode(tok, " " + key)
        whole, digits = key_forced(HFModel(m), ids, key_ids, leading_blanks(tok, key_ids))
        p = m(torch.tensor([ids])).logits[0, -1].softmax(-1)
        assert (got["forced"], got["digits"]) == (float(whole), float(digits))
        assert got["top"] == tok.decode([int(p.argmax())])
        assert got["top_p"] == pytest.approx(float(p.max()), rel=1e-5)
        assert got["key_p"] == pytest.approx(float(p[key_ids[0]]), rel=1e-5)


@pytest.mark.compat  # the cached decoding path: queries that are the last T of S positions
@torch.no_grad()
def test_greedy_answer_through_the_cache_matches_whole_forwards():
    """``score``'s answer decodes through the KV cache, one query against all earlier keys; under the
    streaming rule it must pick what a whole forward over the grown sequence picks at every step."""
    m, tok = tiny_model(), tiny_tokenizer()
    ids = encode(tok, "The quick brown fox jumps over the lazy dog. The key is 12345. The key is")
    with sp.streaming(m, {0: {1}}, sinks=2, window=5):
        got = sp.score(m, tok, ids, "12345", answer_tokens=6)
        seq = list(ids)
        for _ in range(6):
            seq.append(int(m(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got["answer"] == tok.decode(seq[len(ids):], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert got["loose"] == float(sp.first_number(got["answer"]) == "12345")
    assert "answer" not in sp.score(m, tok, ids, "12345")


@pytest.mark.compat  # gradient checkpointing of transformers' layers, on both versions
def test_attribution_is_the_gradient_toward_each_heads_exact_attention():
    """``attribute``'s gradient agrees with central differences of the same objective (log p of the key's
    first token) in each head's mixing weight; a head already exact gets 0; the model comes back in eval
    mode with its parameters' flags; at weight 1 everywhere the model is the original."""
    m, tok = tiny_model(), tiny_tokenizer()
    m.model.embed_tokens.weight.requires_grad_(False)  # a flag to come back as it was
    ids = encode(tok, "The quick brown fox jumps. The key is 12345. The lazy dog sleeps all day. The key is")
    exact, first = {0: {1}}, encode(tok, " 12345")[0]
    g = sp.attribute(m, tok, ids, "12345", exact, sinks=1, window=4)
    n_layers, n_kv = m.config.num_hidden_layers, m.config.num_key_value_heads
    assert g.shape == (n_layers, n_kv) and g[0, 1] == 0 and g.abs().sum() > 0
    assert not m.training and not m.model.embed_tokens.weight.requires_grad and m.lm_head.weight.requires_grad

    @torch.no_grad()
    def objective(mix):
        sp.SETTINGS["mix"] = mix
        try:
            with sp.streaming(m, exact, 1, 4):
                logits = m(torch.tensor([ids])).logits[0, -1]
        finally:
            sp.SETTINGS.pop("mix")
        return float(logits.double().log_softmax(-1)[first])

    eps = 1e-3
    for i in range(n_layers):
        for h in range(n_kv):
            e = torch.zeros(n_layers, n_kv)
            e[i, h] = eps
            fd = (objective(e) - objective(-e)) / (2 * eps)
            assert fd == pytest.approx(float(g[i, h]), rel=2e-2, abs=1e-4), (i, h)
    stock = m(torch.tensor([ids])).logits[0, -1].log_softmax(-1)[first]
    assert objective(torch.ones(n_layers, n_kv)) == pytest.approx(float(stock), rel=1e-5)


def test_attribute_rounds_pick_heads_greedily(tmp_path, monkeypatch):
    """--rounds N: round r takes the best head of the gradient computed with the r - 1 heads before it
    exact (the first from the single ranking); the picks are distinct and written to the JSON."""
    m, tok = tiny_model(), tiny_tokenizer()
    monkeypatch.setattr(sp.loading, "load_model", lambda *args, **kwargs: (m, tok))
    monkeypatch.setattr(sp.loading, "resolve", lambda x: x)
    seen = []
    real = sp.attribute

    def spy(model, tok_, ids, key, exact, sinks, window):
        seen.append({i: set(h) for i, h in exact.items()})
        return real(model, tok_, ids, key, exact, sinks, window)

    monkeypatch.setattr(sp, "attribute", spy)
    monkeypatch.setattr(sp, "build_prompt", lambda tok_, n, d, key: (encode(tok_, f"The key is {key}. The dog sleeps. The key is"), 0))
    out = tmp_path / "a.json"
    monkeypatch.setattr(sys, "argv", ["streaming_probe.py", "--attribute", "--rounds", "3", "--lengths", "64", "--depths", "1",
                                      "--samples", "2", "--window", "3", "--sinks", "1", "--device", "cpu", "--json", str(out)])
    sp.main()
    picks = [tuple(map(int, x["head"].split("."))) for x in json.loads(out.read_text())["greedy"]]
    assert len(picks) == len(set(picks)) == 3
    assert len(seen) == 2 * 3  # the single ranking, then rounds 2 and 3, each over both prompts
    assert seen[0] == {} and seen[2] == {picks[0][0]: {picks[0][1]}}
    merged = {}
    for layer, head in picks[:2]:
        merged.setdefault(layer, set()).add(head)
    assert seen[4] == merged
