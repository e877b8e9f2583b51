"""Module swapping on tiny random configs of every supported family; save and reload both ways."""

import json
import subprocess
import sys

import pytest
import torch

import attnswap  # noqa: F401  (registration)
from attnswap.convert import FAMILIES, attention_mode, parse_layers, swapped_modules
from attnswap.modeling import convert_model
from attnswap.convert.swap import make_swap
from attnswap.errors import AttnSwapError
from attnswap.saving import save_converted
from tests.conftest import tiny_model, tiny_tokenizer

FAMS = sorted(FAMILIES)


def _convert(model, layers=None, method="lolcats", **opts):
    layers = list(range(model.config.num_hidden_layers)) if layers is None else layers
    return convert_model(model, [make_swap(method, layers, opts, model.config)], source="tiny")


@pytest.mark.parametrize("fam", FAMS)
def test_teacher_mode_reproduces_original(fam):
    m = tiny_model(fam)
    ids = torch.randint(0, 300, (2, 37))
    ref = m(ids).logits
    _convert(m, window=8)
    assert type(m).__name__.startswith("AttnSwap") and m.config.model_type == f"attnswap_{fam}"
    assert len(swapped_modules(m)) == m.config.num_hidden_layers
    with attention_mode(m, "teacher"):
        assert torch.allclose(m(ids).logits, ref, atol=1e-5)
    student = m(ids).logits
    assert torch.isfinite(student).all() and not torch.allclose(student, ref, atol=1e-3)


@pytest.mark.parametrize("fam", FAMS)
def test_full_window_student_equals_teacher(fam):
    """With the window covering the sequence and the linear branch off, the student is softmax attention."""
    m = tiny_model(fam)
    ids = torch.randint(0, 300, (1, 30))
    ref = m(ids).logits
    _convert(m, window=64, use_linear=False)
    assert torch.allclose(m(ids).logits, ref, atol=1e-5)


def test_keep_softmax_layers_untouched():
    m = tiny_model("llama")
    _convert(m, layers=[0, 2])
    kinds = [type(l.self_attn).__name__ for l in m.model.layers]
    assert kinds == ["LolcatsAttention", "LlamaAttention", "LolcatsAttention"]


def test_transfer_mode_passes_teacher_output_and_records_loss():
    m = tiny_model("llama")
    ids = torch.randint(0, 300, (1, 20))
    ref = m(ids).logits
    _convert(m, window=4)
    with attention_mode(m, "transfer") as mods:
        out = m(ids).logits
        assert all(mod.transfer_loss is not None and mod.transfer_loss.item() > 0 for mod in mods)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("fam,method", [(f, "lolcats") for f in FAMS] + [("llama", "lizard"), ("qwen3", "lizard")])
def test_save_reload_both_ways_identical_logits(fam, method, tmp_path):
    from transformers import AutoModelForCausalLM

    m = _convert(tiny_model(fam), method=method, window=8)
    with torch.no_grad():
        for p in swapped_modules(m)[0].transfer_parameters():
            p.add_(0.05 * torch.randn_like(p))  # make sure trained values, not inits, round-trip
    ids = torch.randint(0, 300, (1, 25))
    ref = m(ids).logits
    save_converted(m, tiny_tokenizer(), tmp_path / "out", overwrite=False)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["attnswap"]["swaps"][0]["method"] == method and "auto_map" in cfg
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "out").iterdir())
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(again(ids).logits, ref)
    # A fresh process that never imports attnswap itself: trust_remote_code through auto_map.
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(ref, tmp_path / "ref.pt")
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
assert 'attnswap' not in sys.modules
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, trust_remote_code=True).eval()
ids = torch.load({str(tmp_path / 'ids.pt')!r}); ref = torch.load({str(tmp_path / 'ref.pt')!r})
assert torch.equal(m(ids).logits, ref), (m(ids).logits - ref).abs().max()
out = m.generate(ids, max_new_tokens=5, do_sample=False)
assert out.shape == (1, 30)
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_generate_matches_full_forward_greedy():
    m = _convert(tiny_model("llama"), window=4)
    ids = torch.randint(0, 300, (1, 12))
    out = m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    seq = ids
    for _ in range(8):  # greedy decoding by hand, recomputing everything each time
        nxt = m(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(AttnSwapError, match="unsupported architecture 'gpt2'; supported: llama, mistral, qwen2, qwen3"):
        convert_model(m, [], source="x")


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("0-1,3", 4) == [0, 1, 3]
    assert parse_layers("-1", 4) == [3]
    with pytest.raises(AttnSwapError, match="out of range"):
        parse_layers("7", 4)
    with pytest.raises(AttnSwapError, match="cannot read"):
        parse_layers("a-b", 4)
