"""Mixed layers (issue 16): some KV heads of a lolcats/lizard layer stay exact softmax attention over
the whole context, the others run the linear method, in one module; generation keeps a KV cache for
the exact heads only."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import attnswap  # noqa: F401  (registration)
from attnswap.convert import attention_mode, swapped_modules
from attnswap.convert.spec import validate_attnswap_config
from attnswap.convert.swap import make_swap
from attnswap.errors import AttnSwapError
from attnswap.hf_compat import StateLayer
from attnswap.modeling import convert_model
from attnswap.saving import save_converted
from tests.conftest import tiny_model, tiny_tokenizer

OPTS = {"lolcats": {"window": 4, "sinks": 2}, "lizard": {"window": 4, "meta_tokens": 2}}


def _converted(method, exact: dict[int, list[int]], fam="llama", seed=0):
    """A tiny model whose three layers are ``method``, layer i keeping ``exact[i]`` KV heads exact."""
    m = tiny_model(fam, seed=seed)
    swaps = []
    for i in range(m.config.num_hidden_layers):
        opts = dict(OPTS[method])
        if exact.get(i):
            opts["exact_heads"] = exact[i]
        swaps.append(make_swap(method, [i], opts, m.config))
    convert_model(m, swaps, "tiny")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move the learned parts off their initial values
        for name, p in m.named_parameters():
            if any(s in name for s in ("feature_map", "window_factor", "gate_proj", "meta_")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


@torch.no_grad()
def _recompute_greedy(m, ids, n):
    seq = ids
    for _ in range(n):
        nxt = m(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
def test_all_heads_exact_is_the_teachers_attention(method):
    m = _converted(method, {0: [0, 1], 1: [1, 0], 2: [0, 1]})
    ids = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = m(ids, use_cache=False).logits
        with attention_mode(m, "teacher"):
            want = m(ids, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
@pytest.mark.parametrize("fam", ["llama", "qwen3"])
def test_each_head_is_either_the_method_or_exact_softmax(method, fam):
    """Per query head, a mixed layer's output is the plain method's (linear heads) or softmax (exact)."""
    plain = swapped_modules(_converted(method, {}, fam=fam))[0]
    mixed = swapped_modules(_converted(method, {0: [1]}, fam=fam))[0]
    torch.manual_seed(0)
    h = torch.randn(1, 21, plain.q_proj.in_features)
    pos = torch.arange(21)[None]
    rope = tiny_model(fam).model.rotary_emb
    with torch.no_grad():
        x = plain.project(h, rope(h, pos))
        want_lin = plain.student(x)
        want_ex = plain.softmax_attention(x.q, x.k, x.v)
        got = mixed._mixed_student(x)
    G = plain.num_heads // plain.num_kv_heads
    lin, ex = list(range(G)), list(range(G, 2 * G))  # KV head 1 exact: query heads G..2G-1
    assert torch.allclose(got[:, :, lin], want_lin[:, :, lin], atol=1e-5)
    assert torch.allclose(got[:, :, ex], want_ex[:, :, ex], atol=1e-5)


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
def test_no_exact_heads_is_the_plain_method(method):
    a = _converted(method, {})
    b = _converted(method, {0: [], 1: []})
    assert all(not mod.mixed for mod in swapped_modules(b))
    assert "exact_heads" not in json.dumps(b.config.attnswap)  # today's configs, unchanged
    ids = torch.randint(0, 300, (1, 17))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


MIXED = {0: [0], 1: [1], 2: []}


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
@pytest.mark.parametrize("exact", [MIXED, {0: [0, 1], 1: [0], 2: [1]}])
def test_generate_equals_recomputation(method, exact):
    m = _converted(method, exact)
    ids = torch.randint(0, 300, (1, 13), generator=torch.Generator().manual_seed(3))
    want = _recompute_greedy(m, ids, 8)
    for chunk in ({}, {"prefill_chunk_size": 5}, {"prefill_chunk_size": None}):
        got = m.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8, **chunk)
        assert torch.equal(got, want), chunk


def test_the_exact_heads_keep_keys_and_values_for_themselves_only():
    m = _converted("lolcats", MIXED)
    ids = torch.randint(0, 300, (1, 9))
    out = m(ids, use_cache=True)
    cache = out.past_key_values if hasattr(out, "past_key_values") and out.past_key_values is not None else out.cache
    layers = cache.layers
    assert all(isinstance(layer, StateLayer) for layer in layers)
    st = layers[0].state
    assert st["exact_k"].shape == (1, 256, 1, 16) and st["win_k"].shape[2] == 1  # one exact head, room for 256
    assert st["exact_ok"][0].tolist() == [True] * 9 + [False] * 247 and st["exact_n"].tolist() == [9]
    assert "exact_k" not in layers[2].state and layers[2].state["win_k"].shape[2] == 2
    nxt = out.logits[:, -1:].argmax(-1)
    m(nxt, past_key_values=cache, use_cache=True)
    assert layers[0].state["exact_n"].tolist() == [10] and int(layers[0].state["exact_ok"].sum()) == 10


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
def test_left_padded_batch_and_beam_search(method):
    m = _converted(method, MIXED)
    m.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(7)
    a, b = torch.randint(1, 300, (1, 12), generator=g), torch.randint(1, 300, (1, 7), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 12), torch.cat([torch.zeros(1, 5), torch.ones(1, 7)], 1)]).long()
    got = m.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(got[0, 12:], _recompute_greedy(m, a, 6)[0, 12:])
    assert torch.equal(got[1, 12:], _recompute_greedy(m, b, 6)[0, 7:])
    kw = dict(max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False, early_stopping=True)
    assert torch.equal(m.generate(a, **kw), m.generate(a, use_cache=False, **kw))


def test_exact_capacity_grows_by_a_quarter_in_whole_units():
    from attnswap.convert.base import SwappedAttention

    cap = SwappedAttention.exact_capacity
    m = SwappedAttention.__new__(SwappedAttention)
    assert [cap(m, n) for n in (1, 256, 257, 8192)] == [256, 256, 512, 8192]
    assert cap(m, 8193, 8192) == 10240 and cap(m, 257, 256) == 512 and cap(m, 20000, 8192) == 20224
    c, seen = 256, []
    for need in range(257, 65536, 64):  # a long decode: few regrowths, never more than 25% + a unit spare
        if need > c:
            c = cap(m, need, c)
            seen.append(c)
        assert need <= c <= need * 1.25 + 256 + 64
    assert len(seen) <= 25  # 256 -> 64k: log base 1.25 of 256


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
def test_the_static_decode_step_covers_mixed_models_and_their_growing_cache(monkeypatch, method):
    """The decode graph's static-buffer step (what CUDA captures) on a mixed model: the exact heads'
    buffers grow in 4-slot units here while decoding, each capacity its own step."""
    from attnswap.convert.base import SwappedAttention

    monkeypatch.setattr(SwappedAttention, "exact_capacity_min", 4)
    m = _converted(method, MIXED)
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(4))
    want = _recompute_greedy(m, ids, 12)
    monkeypatch.setenv("ATTNSWAP_DECODE_GRAPH", "static")
    got = m.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)
    caps = sorted(k[-1] for k in m.__dict__["_attnswap_decode_graphs"])
    assert caps == [(8, 8), (12, 12), (16, 16)]  # 5 prompt + 11 fed tokens: 8 slots, then 12, 16, each its own step
    m.generation_config.pad_token_id = 0  # a left-padded batch through the static step
    g = torch.Generator().manual_seed(7)
    a, b = torch.randint(1, 300, (1, 9), generator=g), torch.randint(1, 300, (1, 6), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], 1)]).long()
    got = m.generate(batch, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(got[0, 9:], _recompute_greedy(m, a, 6)[0, 9:])
    assert torch.equal(got[1, 9:], _recompute_greedy(m, b, 6)[0, 6:])


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
def test_save_and_load_both_ways(method, tmp_path):
    m = _converted(method, MIXED)
    ids = torch.randint(0, 300, (1, 15))
    with torch.no_grad():
        ref = m(ids).logits
    save_converted(m, tiny_tokenizer(), tmp_path / "out", overwrite=False)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert [s["options"].get("exact_heads", []) for s in cfg["attnswap"]["swaps"]] == [[0], [1], []]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert [mod.exact_heads for mod in swapped_modules(again)] == [[0], [1], []]
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(ref, tmp_path / "ref.pt")
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
assert 'attnswap' not in sys.modules
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, trust_remote_code=True).eval()
ids = torch.load({str(tmp_path / 'ids.pt')!r}); ref = torch.load({str(tmp_path / 'ref.pt')!r})
with torch.no_grad():
    assert torch.equal(m(ids).logits, ref), (m(ids).logits - ref).abs().max()
out = m.generate(ids, max_new_tokens=4, do_sample=False)
assert out.shape == (1, 19)
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_bad_exact_heads_are_refused():
    m = tiny_model("llama")
    with pytest.raises(AttnSwapError, match="exact_heads"):
        make_swap("lolcats", [0], {"exact_heads": [0, 0]}, m.config)
    with pytest.raises(AttnSwapError, match="exact_heads"):
        make_swap("lolcats", [0], {"exact_heads": "0"}, m.config)
    with pytest.raises(AttnSwapError, match="exact_heads"):
        convert_model(m, [make_swap("lolcats", [0], {"exact_heads": [2]}, m.config)], "tiny")  # 2 KV heads
    with pytest.raises(AttnSwapError, match="unknown option 'exact_heads'"):
        make_swap("loza", [0], {"exact_heads": [0]}, m.config)
    bad = {"version": "0.1.0", "swaps": [{"method": "lizard", "layers": [0], "options": {"exact_heads": [-1]}}]}
    with pytest.raises(AttnSwapError, match="exact_heads"):
        validate_attnswap_config(bad, 3)


# --- the pipeline: linearize --exact-heads N -------------------------------------------------------
def _cli(*args):
    from typer.testing import CliRunner

    from attnswap.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _tiny_args(tiny_dir, tiny_text, out):
    return ["linearize", "--model", tiny_dir, "--data", tiny_text, "--out", out, "--seq-len", 32,
            "--batch-size", 2, "--eval-tokens", 128, "--window", 8]


@pytest.mark.parametrize("value,needle", [("-1", "--exact-heads must not be negative (got -1)"),
                                          ("two", "--exact-heads takes a non-negative integer"),
                                          ("7", "--exact-heads 7 is more than the 6 KV heads"),
                                          ("0.x", "--exact-heads: '0.x' is not LAYER.HEAD"),
                                          ("0.1,2.0,0.1", "--exact-heads names 0.1 twice"),
                                          ("3.0", "--exact-heads 3.0: not a KV head of the converted layers"),
                                          ("1.2", "--exact-heads 1.2: not a KV head of the converted layers")])
def test_bad_exact_heads_flag_exits_2_in_one_line(tiny_dir, tiny_text, tmp_path, value, needle):
    out = tmp_path / "o"
    res = _cli(*_tiny_args(tiny_dir, tiny_text, out), "--exact-heads", value)
    text = res.output.strip()
    assert res.exit_code == 2 and needle in text and len(text.splitlines()) == 1, text
    assert not out.exists()


@pytest.mark.parametrize("extra,needle", [(["--calib-steps", 2], "--calib-steps applies only with --exact-heads"),
                                          (["--exact-heads", 1, "--recall-floor", 0.5], "--recall-floor applies only with --exact-heads auto"),
                                          (["--exact-heads", "auto", "--recall-floor", 0], "--recall-floor must be in (0, 1]"),
                                          (["--exact-heads", "auto", "--steps", 2], "--exact-heads auto needs retrieval rows")])
def test_flags_that_do_not_apply_are_refused(tiny_dir, tiny_text, tmp_path, extra, needle):
    out = tmp_path / "o"
    res = _cli(*_tiny_args(tiny_dir, tiny_text, out), *extra)
    last = res.output.strip().splitlines()[-1]  # (the last refusal comes after the model and data loaded)
    assert res.exit_code == 2 and needle in last and "Traceback" not in res.output, res.output
    assert not out.exists()


def test_linearize_keeps_the_exact_heads_it_is_given(tiny_dir, tiny_text, tmp_path):
    """--exact-heads LAYER.HEAD,...: those heads exact whatever calibration says (it still runs and is
    reported); the saved model has them, and ranking flags are refused beside them."""
    from attnswap.pipelines.linearize import parse_exact_heads

    assert parse_exact_heads(" 2.1, 0.0") == ((2, 1), (0, 0)) and parse_exact_heads("3") == 3
    out = tmp_path / "given"
    res = _cli(*_tiny_args(tiny_dir, tiny_text, out), "--exact-heads", "2.1,0.0", "--steps", 6, "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["exact_heads"] == {"0": [0], "2": [1]} and rep["exact_heads_by"] == "given"
    assert rep["exact_head_count"] == 2 and sorted(rep["alpha"]) == ["0", "1", "2"]  # calibration ran
    m = AutoModelForCausalLM.from_pretrained(out).eval()
    assert sorted((mod.layer_idx, h) for mod in swapped_modules(m) for h in mod.exact_heads) == [(0, 0), (2, 1)]
    assert m.config.attnswap["calibration"]["ranked_by"] == "given"
    bad = _cli(*_tiny_args(tiny_dir, tiny_text, tmp_path / "o"), "--exact-heads", "0.1", "--exact-heads-by", "probe")
    assert bad.exit_code == 2 and "--exact-heads names them here" in bad.output and not (tmp_path / "o").exists()


def test_steps_split_with_exact_heads():
    from attnswap.pipelines.linearize import split_exact_steps

    assert split_exact_steps(1000, None, None, None) == (400, 100, 500)
    assert split_exact_steps(6, None, None, None) == (2, 1, 3)
    assert split_exact_steps(10, None, 4, None) == (4, 4, 2)
    assert split_exact_steps(10, 3, None, None) == (3, 1, 6)
    assert split_exact_steps(10, None, None, 2) == (7, 1, 2)


def test_linearize_exact_heads_end_to_end(tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "mixed"
    res = _cli(*_tiny_args(tiny_dir, tiny_text, out), "--exact-heads", 2, "--steps", 6, "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["steps"] == {"transfer": 2, "calibration": 1, "lora": 3} and rep["tokens_seen"] == 6 * 2 * 32
    assert rep["retrieval_mix"] == 0.25  # the default with --exact-heads (0 without)
    assert sorted(rep["alpha"]) == ["0", "1", "2"] and all(len(a) == 2 for a in rep["alpha"].values())
    chosen = [(int(layer), h) for layer, heads in rep["exact_heads"].items() for h in heads]
    assert len(chosen) == 2
    ranked = sorted(((a, (int(layer), h)) for layer, al in rep["alpha"].items() for h, a in enumerate(al)), reverse=True)
    assert min(rep["alpha"][str(layer)][h] for layer, h in chosen) >= ranked[1][0]  # the two highest alphas
    kv = rep["kv_cache"]
    assert kv["per_token_before"] == 3 * 2 * 2 * 16 * 4 and kv["per_token_after"] == 2 * 2 * 16 * 4
    assert "exact KV heads" in res.output
    if importlib.util.find_spec("matplotlib"):
        assert (out / "calibration.png").stat().st_size > 0  # alpha per head; no probe (no fact fits in 32 tokens)
    m = AutoModelForCausalLM.from_pretrained(out).eval()
    got = sorted((mod.layer_idx, h) for mod in swapped_modules(m) for h in mod.exact_heads)
    assert got == sorted(chosen)
    assert m.config.attnswap["calibration"]["unit"] == "kv_head"
    assert not any("lora" in k or "calib" in k for k in m.state_dict())
    ids = torch.randint(0, 200, (1, 12))
    assert torch.equal(m.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False), _recompute_greedy(m, ids, 5))


@pytest.mark.parametrize("stop_after", [2, 4])  # the last transfer step; LoRA's first (after calibration's one)
def test_interrupted_exact_heads_run_resumes_to_the_same_model(tiny_dir, tiny_text, tmp_path, monkeypatch, stop_after):
    from safetensors.torch import load_file

    import attnswap.distill.checkpoint as ck

    args = ["--exact-heads", 2, "--steps", 6, "--eval-tokens", 0, "--save-every", 1]
    full = tmp_path / "full"
    assert _cli(*_tiny_args(tiny_dir, tiny_text, full), *args).exit_code == 0
    part = tmp_path / "part"
    calls = {"n": 0}
    orig = ck.StageRun.step_done

    def stop(self, done):
        orig(self, done)
        calls["n"] += 1
        if calls["n"] == stop_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(ck.StageRun, "step_done", stop)
    res = _cli(*_tiny_args(tiny_dir, tiny_text, part), *args)
    assert res.exit_code != 0 and not part.exists()
    monkeypatch.setattr(ck.StageRun, "step_done", orig)
    res = _cli(*_tiny_args(tiny_dir, tiny_text, part), *args, "--resume")
    assert res.exit_code == 0, res.output
    assert "resuming" in res.output
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((d / "config.json").read_text())["attnswap"] for d in (full, part))
    assert ca["swaps"] == cb["swaps"] and ca["calibration"] == cb["calibration"]


def test_linearize_exact_heads_auto_takes_the_fewest_heads_meeting_the_recall_floor(tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "auto"
    args = ["linearize", "--model", tiny_dir, "--data", tiny_text, "--out", out, "--seq-len", 256, "--batch-size", 1,
            "--eval-tokens", 0, "--window", 8, "--steps", 3, "--exact-heads", "auto", "--recall-floor", 1.0,
            "--json", tmp_path / "r.json"]
    res = _cli(*args)
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    auto = rep["exact_heads_auto"]
    n = auto["chosen"]
    assert auto["probe_rows"] > 0 and auto["recall_floor"] == 1.0
    assert sorted(map(int, auto["recall"])) == list(range(n + 1))  # scanned up from 0, stopped at the first
    assert auto["recall"][str(n)] >= auto["teacher_recall"] and all(
        auto["recall"][str(k)] < auto["teacher_recall"] for k in range(n))
    assert rep["exact_head_count"] == n == sum(len(h) for h in rep["exact_heads"].values())
    m = AutoModelForCausalLM.from_pretrained(out)
    assert sum(len(mod.exact_heads) for mod in swapped_modules(m)) == n
    assert "exact heads (auto)" in res.output
    probe = rep["retrieval_probe"]  # the teacher's attention on the stated facts, per KV head
    assert probe["facts"] > 0 and sorted(probe["head"]) == ["0", "1", "2"]
    assert all(len(h) == 2 and all(0 <= v <= 1 for v in h) for h in probe["head"].values())


def test_auto_scans_up_the_alpha_ranking_and_stops_at_the_first_n_meeting_the_floor(monkeypatch):
    from attnswap.pipelines import linearize as lin

    m = _converted("lolcats", {})
    ranked = [(2, 1), (0, 0), (1, 1), (0, 1), (1, 0), (2, 0)]
    seen = []

    def fake_recall(net, ids, details, rows):
        mods = swapped_modules(net)
        if mods[0].mode == "teacher":
            return 0.8
        units = sorted((mod.layer_idx, h) for mod in mods for h in mod.exact_heads)
        seen.append(units)
        return 0.8 * len(units) / 4  # meets 0.9 of the teacher's at 4 heads (0.72 at 3.6)

    monkeypatch.setattr(lin, "answer_recall", fake_recall)
    got = lin.auto_exact_heads(m, None, {}, [], ranked, floor=0.9)
    assert got["chosen"] == 4 and got["teacher_recall"] == 0.8
    assert [len(u) for u in seen] == [0, 1, 2, 3, 4]
    assert seen[-1] == sorted(ranked[:4])  # the highest alphas first
    assert all(mod.mode == "student" for mod in swapped_modules(m))


def test_linearize_lizard_with_one_exact_head(tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "liz"
    res = _cli(*_tiny_args(tiny_dir, tiny_text, out), "--attention", "lizard", "--meta-tokens", 2, "--exact-heads", 1,
               "--steps", 3, "--layers", "0,2", "--eval-tokens", 0, "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["steps"] == {"transfer": 1, "calibration": 1, "lora": 1} and sorted(rep["alpha"]) == ["0", "2"]
    m = AutoModelForCausalLM.from_pretrained(out).eval()
    swaps = m.config.attnswap["swaps"]
    assert sorted(i for s in swaps for i in s["layers"]) == [0, 2] and all(s["method"] == "lizard" for s in swaps)
    assert sum(len(s["options"].get("exact_heads", [])) * len(s["layers"]) for s in swaps) == 1
    assert rep["kv_cache"]["per_token_after"] == (1 + 2) * 2 * 16 * 4  # layer 1 left softmax: both its heads
    ids = torch.randint(0, 200, (1, 12))
    assert torch.equal(m.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False), _recompute_greedy(m, ids, 5))


def test_rank_heads_by_alpha_or_by_the_probe():
    from attnswap.errors import AttnSwapError
    from attnswap.pipelines.linearize import rank_heads

    alphas = {(0, 0): 0.9, (0, 1): 0.1, (1, 0): 0.5, (1, 1): 0.5}
    probe = {"head": {"0": [0.0, 0.3], "1": [0.2, 0.01]}}
    assert rank_heads(alphas, probe, "alpha") == [(0, 0), (1, 0), (1, 1), (0, 1)]  # ties: the lower unit
    assert rank_heads(alphas, probe, "probe") == [(0, 1), (1, 0), (1, 1), (0, 0)]
    assert rank_heads(alphas, {"head": {0: [0.0, 0.3], 1: [0.2, 0.01]}}, "probe")[0] == (0, 1)  # int keys too
    with pytest.raises(AttnSwapError, match="found no facts"):
        rank_heads(alphas, {}, "probe")


def _two_exact_heads(tiny_dir, tiny_text, out, *flags):
    """A 3-step linearize with 2 exact heads on rows long enough for retrieval facts; its output and report."""
    res = _cli("linearize", "--model", tiny_dir, "--data", tiny_text, "--out", out, "--seq-len", 256, "--batch-size", 1,
               "--eval-tokens", 0, "--window", 8, "--steps", 3, "--exact-heads", 2, *flags, "--json", out.parent / "r.json")
    assert res.exit_code == 0, res.output
    return res, json.loads((out.parent / "r.json").read_text())


def test_linearize_exact_heads_by_probe_keeps_the_probes_top_heads(tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "probe"
    _, rep = _two_exact_heads(tiny_dir, tiny_text, out, "--exact-heads-by", "probe")
    scores = {(int(layer), h): v for layer, row in rep["retrieval_probe"]["head"].items() for h, v in enumerate(row)}
    top = sorted(scores, key=lambda u: (-scores[u], u))[:2]
    chosen = sorted((int(layer), h) for layer, heads in rep["exact_heads"].items() for h in heads)
    assert chosen == sorted(top) and rep["exact_heads_by"] == "probe"
    cfg = AutoModelForCausalLM.from_pretrained(out).config.attnswap
    assert cfg["calibration"]["ranked_by"] == "probe"


@pytest.mark.parametrize("extra,needle", [(["--exact-heads-by", "probe"], "--exact-heads-by applies only with --exact-heads"),
                                          (["--exact-heads", 1, "--exact-heads-by", "random"], "--exact-heads-by is one of alpha, probe"),
                                          (["--exact-heads", 1, "--exact-heads-by", "probe", "--steps", 2],
                                           "--exact-heads-by probe needs retrieval rows"),
                                          (["--calib-loss", "answers"], "--calib-loss applies only with --exact-heads"),
                                          (["--exact-heads", 1, "--calib-loss", "some"], "--calib-loss is one of all, answers"),
                                          (["--exact-heads", 1, "--calib-loss", "answers", "--steps", 2],
                                           "--calib-loss answers needs calibration rows carrying retrieval")])
def test_exact_heads_by_and_calib_loss_refusals(tiny_dir, tiny_text, tmp_path, extra, needle):
    out = tmp_path / "o"
    res = _cli(*_tiny_args(tiny_dir, tiny_text, out), *extra)
    last = res.output.strip().splitlines()[-1]
    assert res.exit_code == 2 and needle in last and "Traceback" not in res.output, res.output
    assert not out.exists()


def test_answer_marks_round_trip_and_sit_where_the_logits_predict_the_answer():
    from attnswap.distill.calibrate import mark_answers, split_marked

    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(4))
    marked = mark_answers(ids, [[(5, 7)], [(0, 1), (10, 12)]])
    back, w = split_marked(marked)
    assert torch.equal(back, ids)
    # the logits at position p predict token p + 1: answer tokens 5, 6 are predicted at 4, 5
    assert w[0].nonzero().flatten().tolist() == [4, 5]
    assert w[1].nonzero().flatten().tolist() == [9, 10]  # token 0 has no predicting position


def test_calibration_on_the_answers_only():
    """With every position marked, the answers-only loss is the plain one (same alphas); with a few
    marked, only their KL counts: unmarked positions' logits may change freely."""
    from attnswap.distill.calibrate import CalibrationConfig, calibrate, mark_answers

    seqs = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(3))
    everything = mark_answers(seqs, [[(1, 41)], [(1, 41)]])
    cfg = dict(steps=3, per_head=True, lr=0.2, batch_size=2)
    plain = calibrate(_converted("lolcats", {}), seqs, CalibrationConfig(**cfg))
    marked = calibrate(_converted("lolcats", {}), everything, CalibrationConfig(**cfg, answers_only=True))
    for layer, a in plain.alphas.items():
        assert a == pytest.approx(marked.alphas[layer], abs=1e-6), (layer, a, marked.alphas[layer])
    few = calibrate(_converted("lolcats", {}), mark_answers(seqs, [[(30, 33)], []]), CalibrationConfig(**cfg, answers_only=True))
    assert few.alphas != plain.alphas


def test_linearize_calibrated_on_the_answers(tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "ans"
    res, rep = _two_exact_heads(tiny_dir, tiny_text, out, "--calib-loss", "answers")
    assert rep["calib_loss"] == "answers" and rep["exact_head_count"] == 2 and "calibrated" in res.output
    assert AutoModelForCausalLM.from_pretrained(out).config.attnswap["calibration"]["loss"] == "answers"
