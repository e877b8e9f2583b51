"""benchmarks/attention_shares.py: the shares of each head's attention at a prompt's last position,
measured by running the layer on indicator values, against the attention weights written out by hand
(softmax for exact heads and teacher mode; the LoLCATs hybrid's weights, naive.py's specification, for
linear heads)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.test_exact_heads import _converted

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import attention_shares as ash  # noqa: E402

NEEDLE = (5, 9)
T = 19


def _indicators(T, window):
    j = torch.arange(T)
    return torch.stack([(j >= T - window).float(), ((j >= NEEDLE[0]) & (j < NEEDLE[1])).float(),
                        (j < 4).float(), torch.ones(T)], -1)  # (T, 4), the CHANNELS


@torch.no_grad()
def _layer_qkv(m, ids):
    """Each converted layer's projected heads, from the model's own hidden states (not the script's hook)."""
    out = m(ids, use_cache=False, output_hidden_states=True)
    pos = torch.arange(ids.shape[1])[None]
    res = []
    for i, layer in enumerate(m.model.layers):
        h = layer.input_layernorm(out.hidden_states[i])
        pe = m.model.rotary_emb(h, pos)
        res.append(layer.self_attn.project(h, pe))
    return res


def _softmax_last(x, mod):
    G = mod.num_heads // mod.num_kv_heads
    k = x.k[0].repeat_interleave(G, 1)  # (T, H, D)
    s = torch.einsum("hd,thd->ht", x.q[0, -1].float(), k.float()) * mod.scaling
    return torch.softmax(s, -1)  # (H, T): the last query sees every key


def _lolcats_last(x, mod, cap=0):
    """Weights of the last query per head: gamma exp(s - m) over the window and sinks, fq . fk before
    (fq times min(1, cap / n), n the keys older than the window, with a cap)."""
    G = mod.num_heads // mod.num_kv_heads
    T = x.q.shape[1]
    fq, fk = mod._features(x)
    if cap:
        fq = fq * min(1.0, cap / (T - mod.window))
    k = x.k[0].repeat_interleave(G, 1).float()
    s = torch.einsum("hd,thd->ht", x.q[0, -1].float(), k) * mod.scaling
    j = torch.arange(T)
    soft = (j > T - 1 - mod.window) | (j < mod.sinks)
    s = s.masked_fill(~soft, float("-inf"))
    a = mod.gamma().view(-1, 1) * torch.exp(s - s.amax(-1, keepdim=True))
    lin = torch.einsum("hf,thf->ht", fq[0, -1].float(), fk[0].repeat_interleave(G, 1).float())
    a = a + lin.masked_fill(soft, 0.0)
    return a / a.sum(-1, keepdim=True)


def test_shares_match_the_weights_written_out():
    m = _converted("lolcats", {1: [1]})
    ids = torch.randint(0, 300, (1, T), generator=torch.Generator().manual_seed(3))
    got = ash.shares(m, ids[0].tolist(), NEEDLE)
    for L, x, layer in zip(got, _layer_qkv(m, ids), m.model.layers):
        mod = layer.self_attn
        ind = _indicators(T, mod.window)
        soft = _softmax_last(x, mod) @ ind
        torch.testing.assert_close(torch.tensor(L["softmax"]), soft, rtol=1e-4, atol=1e-5)
        hyb = _lolcats_last(x, mod) @ ind
        torch.testing.assert_close(torch.tensor(L["linear"]), hyb[L["linear_heads"]], rtol=1e-4, atol=1e-5)
        if L["exact_heads"]:
            torch.testing.assert_close(torch.tensor(L["exact"]), soft[L["exact_heads"]], rtol=1e-4, atol=1e-5)
    assert [len(L["exact_heads"]) for L in got] == [0, 2, 0]
    ops = (ash.lolcats.hybrid_attn, ash.lizard.gated_hybrid_attn)
    with ash.linear_cap(3):  # 15 keys older than the window of 4 at the last position: fq x 0.2
        capped = ash.shares(m, ids[0].tolist(), NEEDLE)
        qkv = _layer_qkv(m, ids)  # the capped model's own layer inputs
    assert (ash.lolcats.hybrid_attn, ash.lizard.gated_hybrid_attn) == ops
    for L, x, layer in zip(capped, qkv, m.model.layers):
        mod = layer.self_attn
        hyb = _lolcats_last(x, mod, cap=3) @ _indicators(T, mod.window)
        torch.testing.assert_close(torch.tensor(L["linear"]), hyb[L["linear_heads"]], rtol=1e-4, atol=1e-5)
    assert ash.summary(capped)["linear window mean"] > ash.summary(got)["linear window mean"]
    assert all(abs(h[3] - 1) < 1e-5 for L in got for h in L["linear"])  # no meta tokens: all weight on the tokens
    s = ash.summary(got)
    assert 0 < s["linear window mean"] < 1 and s["exact needle max"] > 0


def test_forced_is_every_key_token_top1():
    m = _converted("lolcats", {})
    ids = torch.randint(0, 300, (T,), generator=torch.Generator().manual_seed(5)).tolist()
    prompt, key = ids[:12], []
    with torch.no_grad():  # the model's own next two tokens, greedily
        for _ in range(2):
            key.append(m(torch.tensor([prompt + key]), use_cache=False).logits[0, -1].argmax().item())
    assert ash.forced(m, prompt, key)
    assert not ash.forced(m, prompt, [(key[0] + 1) % 300, key[1]])
    other = (key[0] + 1) % 300  # a first token the model does not pick, and its own next token after it
    with torch.no_grad():
        after = m(torch.tensor([prompt + [other]]), use_cache=False).logits[0, -1].argmax().item()
    assert ash.forced(m, prompt, [other, after], skip=1) and not ash.forced(m, prompt, [other, after])
    assert ash.forced(m, prompt, [other, after], mode=None, skip=1)  # no attention modes to set


def test_lizard_meta_tokens_take_what_the_tokens_leave_and_keep_their_values():
    m = _converted("lizard", {0: [0]})
    before = {n: p.clone() for n, p in m.named_parameters()}
    ids = torch.randint(0, 300, (T,), generator=torch.Generator().manual_seed(4)).tolist()
    got = ash.shares(m, ids, NEEDLE)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    lin = torch.tensor([h for L in got for h in L["linear"]])
    assert (lin[:, 3] < 1 - 1e-4).all() and (lin[:, 3] > 0).all()  # the meta tokens hold some weight
    assert (lin[:, :3] <= lin[:, 3:4] + 1e-6).all()
    # the model still computes what it did: the probe ran on copies of the layers' inputs
    with torch.no_grad():
        a = m(torch.tensor([ids]), use_cache=False).logits
    m2 = _converted("lizard", {0: [0]})
    with torch.no_grad():
        b = m2(torch.tensor([ids]), use_cache=False).logits
    torch.testing.assert_close(a, b)


def test_a_model_without_converted_layers_is_refused(monkeypatch):
    from tests.conftest import tiny_model

    monkeypatch.setattr(ash.loading, "resolve", lambda spec: spec)
    monkeypatch.setattr(ash.loading, "load_model", lambda *a, **k: (tiny_model(), None))
    monkeypatch.setattr(sys, "argv", ["attention_shares.py", "--model", "plain", "--device", "cpu"])
    with pytest.raises(SystemExit, match="no converted attention layers"):
        ash.main()
