"""LoZA (convert/loza.py) and the calibration mechanism (distill/calibrate.py): streaming layers compute
the specified attention, keep only their sink and window in the cache and still generate what
recomputation gives; calibration moves the alphas and selection keeps to its budget; a converted model
saves and loads; `convert sparsify --method loza` runs end to end and refuses bad input in one line."""

import json

import pytest
import torch
from typer.testing import CliRunner

from attnswap import hf_compat
from attnswap.cli import app
from attnswap.convert import swapped_modules
from attnswap.convert.swap import make_swap
from attnswap.distill.calibrate import CalibrationConfig, calibrate, select
from attnswap.kernels.streaming_attn.naive import naive_streaming_attn
from attnswap.modeling import convert_model
from attnswap.pipelines.sparsify import kv_cache_bytes, loza_swaps, split_steps
from tests.conftest import tiny_model

OPTS = {"block": 4, "sink_blocks": 1, "local_blocks": 2}


def _loza(streaming=(0, 2), seed=0, fam="llama", **opts):
    m = tiny_model(fam, seed=seed)
    cand = make_swap("loza", [0, 1, 2], {**OPTS, **opts}, m.config)
    convert_model(m, loza_swaps(cand, list(streaming)), "tiny")
    return m


def test_a_streaming_layer_computes_the_specified_attention_and_a_dense_one_is_exact():
    m = _loza(streaming=(0,))
    teacher = tiny_model("llama")
    stream, dense = swapped_modules(m)[0], swapped_modules(m)[1]
    assert stream.streaming and not dense.streaming
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 37, 4, 16, generator=g), torch.randn(2, 37, 2, 16, generator=g), torch.randn(2, 37, 2, 16, generator=g)
    want = naive_streaming_attn(q, k, v, sink=1, local=2, block=4, scale=stream.scaling)
    torch.testing.assert_close(stream.attend(q, k, v), want, rtol=1e-5, atol=1e-5)
    kp = torch.cat([torch.arange(4), torch.arange(28, 37)])  # an evicted cache: the reference path, by position
    torch.testing.assert_close(stream.attend(q[:, -3:], k[:, kp], v[:, kp], positions=kp), want[:, -3:], rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, 300, (1, 30))
    all_dense = _loza(streaming=())
    with torch.no_grad():
        torch.testing.assert_close(all_dense(ids).logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(m(ids).logits, teacher(ids).logits, atol=1e-3)  # the window is 8 of 30 tokens


@pytest.mark.parametrize("fam", ["llama", "qwen3"])
def test_streaming_cache_keeps_sink_and_window_and_generation_equals_recomputation(fam):
    m = _loza(fam=fam)
    ids = torch.randint(0, 300, (1, 29), generator=torch.Generator().manual_seed(1))
    seq = ids
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, m(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    for chunk in (None, 5, 8):
        got = m.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, prefill_chunk_size=chunk)
        assert torch.equal(got, seq), chunk
    out = m(seq, use_cache=True)
    cache = hf_compat.output_cache(out)
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds == ["StreamingLayer", "DynamicLayer", "StreamingLayer"]
    assert cache.get_seq_length() == seq.shape[1] == cache.layers[1].keys.shape[-2]
    for i in (0, 2):
        layer = cache.layers[i]
        assert layer.seen == seq.shape[1] and layer.keys.shape[-2] == layer.stored() <= (1 + 2) * 4
        assert layer.positions[:4].tolist() == [0, 1, 2, 3]  # the sink block stays


def test_calibration_moves_alpha_towards_what_the_loss_asks_and_selection_keeps_its_budget():
    seqs = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(2))

    def run(penalty):
        m = _loza(streaming=(0, 1, 2))
        cal = calibrate(m, seqs, CalibrationConfig(steps=3, batch_size=2, lr=0.2, penalty=penalty))
        assert all(mod.calib_logit is None and mod.mode == "student" for mod in swapped_modules(m))
        assert not any("calib" in n for n, _ in m.named_parameters())
        return cal

    free = run(0.0)  # only the KL: exact attention is the teacher, every alpha rises
    assert set(free.alphas) == {0, 1, 2} and all(a[0] > 0.5 for a in free.alphas.values()), free.alphas
    cheap = run(100.0)  # the penalty dominates: every alpha falls
    assert all(a[0] < 0.5 for a in cheap.alphas.values()), cheap.alphas
    units = free.units()
    for budget in (0, 1, 2, 3, 5):
        chosen = select(units, budget)
        assert len(chosen) == min(budget, 3) and chosen == sorted(chosen)
        assert all(units[c] <= units[o] for c in chosen for o in units if o not in chosen)
    assert select({0: 0.2, 1: 0.9, 2: 0.1}, 2, max_alpha=0.15) == [2]


def test_per_head_calibration_is_the_same_code_path():
    m = _loza(streaming=(0, 1, 2))
    seqs = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(3))
    cal = calibrate(m, seqs, CalibrationConfig(steps=2, per_head=True, lr=0.2))
    assert all(len(a) == m.config.num_key_value_heads for a in cal.alphas.values())
    assert set(cal.units()) == {(layer, h) for layer in range(3) for h in range(2)}


def test_save_and_load_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    from attnswap.saving import save_converted
    from tests.conftest import tiny_tokenizer

    m = _loza(streaming=(1,))
    save_converted(m, tiny_tokenizer(), tmp_path / "out", overwrite=False)
    for kw in ({}, {"trust_remote_code": True}):
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", **kw)
        assert [s["layers"] for s in back.config.attnswap["swaps"]] == [[1], [0, 2]]
        assert [mod.streaming for mod in swapped_modules(back)] == [False, True, False]
        ids = torch.randint(0, 300, (1, 25))
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, m(ids).logits)


def test_split_steps_and_kv_bytes():
    assert split_steps(4, None, None) == (1, 3) and split_steps(10, None, None) == (3, 7)
    assert split_steps(10, 5, None) == (5, 5) and split_steps(10, None, 2) == (8, 2) and split_steps(10, 2, 3) == (2, 3)
    cfg = tiny_model().config  # 3 layers, 2 KV heads of 16
    cand = {"method": "loza", "layers": [0, 1, 2], "options": {"block": 128, "sink_blocks": 1, "local_blocks": 7}}
    kv = kv_cache_bytes(cfg, loza_swaps(cand, [0, 2]), 8192, torch.bfloat16)
    per = 2 * 2 * 16 * 2
    assert kv["before"] == 3 * 8192 * per and kv["after"] == (8192 + 2 * 1024) * per


# --- the command line ---------------------------------------------------------------------------
runner = CliRunner()


def _args(tiny_dir, tiny_text, out, *extra):
    return [str(a) for a in ["sparsify", "--method", "loza", "--model", tiny_dir, "--data", tiny_text, "--out", out,
                             "--seq-len", 256, "--block", 16, "--local-blocks", 2, "--eval-tokens", 512, *extra]]


@pytest.mark.parametrize("flag,value,needle", [
    ("--fraction", 1.5, "--fraction must be in [0, 1]"), ("--fraction", -0.1, "--fraction must be in [0, 1]"),
    ("--local-blocks", 0, "--local-blocks must be at least 1"), ("--sink-blocks", -1, "must not be negative"),
    ("--calib-steps", 0, "--calib-steps must be at least 1"), ("--retrieval-mix", 1, "--retrieval-mix must be at least 0 and below 1"),
    ("--calib-lr", 0, "must be positive")])
def test_bad_input_is_refused_in_one_line(tiny_dir, tiny_text, tmp_path, flag, value, needle):
    out = tmp_path / "o"
    res = runner.invoke(app, _args(tiny_dir, tiny_text, out, flag, value))
    text = res.output.strip()
    assert res.exit_code == 2 and needle in text and len(text.splitlines()) == 1, text
    assert not out.exists() and not (tmp_path / "o.ckpt").exists()


def test_sparsify_loza_end_to_end(tiny_dir, tiny_text, tmp_path):
    pytest.importorskip("attnswap.synthetic")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "loza"
    res = runner.invoke(app, _args(tiny_dir, tiny_text, out, "--steps", 4, "--fraction", 0.34, "--json", tmp_path / "r.json"))
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert (rep["calib_steps"], rep["lora_steps"]) == (1, 3) and set(rep["alpha"]) == {"0", "1", "2"}
    assert len(rep["streaming_layers"]) == 1 and rep["kv_cache"]["ratio"] < 1
    assert "converted" in rep and rep["calibration_seconds"] > 0
    probe = rep["retrieval_probe"]
    assert set(probe["layer"]) == {"0", "1", "2"} and all(0 <= v <= 1 for v in probe["layer"].values())
    assert probe["facts"] > 0 and all(len(h) == 2 for h in probe["head"].values())
    pytest.importorskip("matplotlib")
    assert (out / "calibration.png").stat().st_size > 0
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.attnswap["calibration"]["alpha"] == rep["alpha"]
    assert [s["options"]["streaming"] for s in m.config.attnswap["swaps"]] == [True, False]
    ids = torch.randint(0, 200, (1, 40))
    assert m.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 44)
    assert not (tmp_path / "loza.ckpt").exists()


def test_interrupted_loza_run_resumes_to_the_same_model(tiny_dir, tiny_text, tmp_path, monkeypatch):
    pytest.importorskip("attnswap.synthetic")
    from safetensors.torch import load_file

    import attnswap.distill.checkpoint as ck

    full = tmp_path / "full"
    assert runner.invoke(app, _args(tiny_dir, tiny_text, full, "--steps", 4, "--eval-tokens", 0)).exit_code == 0
    part = tmp_path / "part"
    calls = {"n": 0}
    orig = ck.StageRun.step_done

    def stop_in_lora(self, done):
        orig(self, done)
        calls["n"] += 1
        if calls["n"] == 2:  # calibration's one step, then LoRA's first
            raise KeyboardInterrupt

    monkeypatch.setattr(ck.StageRun, "step_done", stop_in_lora)
    res = runner.invoke(app, _args(tiny_dir, tiny_text, part, "--steps", 4, "--eval-tokens", 0, "--save-every", 1))
    assert res.exit_code != 0 and not part.exists()
    monkeypatch.setattr(ck.StageRun, "step_done", orig)
    res = runner.invoke(app, _args(tiny_dir, tiny_text, part, "--steps", 4, "--eval-tokens", 0, "--save-every", 1, "--resume"))
    assert res.exit_code == 0, res.output
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((d / "config.json").read_text())["attnswap"] for d in (full, part))
    assert ca["swaps"] == cb["swaps"] and ca["calibration"] == cb["calibration"]
