"""convert gqa: the rotations and permutations are exact (logits unchanged), merges give stock GQA
checkpoints, aligned merging is closer to the original than mean pooling, bad inputs are refused."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from tests.conftest import tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from attnswap.cli import app
from attnswap.convert import gqa

runner = CliRunner()
MHA = dict(num_attention_heads=8, num_key_value_heads=8)


def _ids(n=2, t=48, seed=1):
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed))


def _random_rotations(u, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    rk = gqa.rope_rotation(torch.rand(u, d // 2, generator=g, dtype=torch.float64) * 2 * math.pi)
    rv, _ = torch.linalg.qr(torch.randn(u, d, d, generator=g, dtype=torch.float64))
    return rk, rv


@pytest.mark.parametrize("model_type,over", [("llama", MHA), ("llama", {}), ("qwen2", {}), ("mistral", {})])
def test_random_rotations_and_permutation_leave_logits_unchanged(model_type, over):
    m = tiny_model(model_type, **over).double()
    ids = _ids()
    ref = m(ids).logits
    g = gqa.Geometry.of(m.config)
    for i, layer in enumerate(m.model.layers):
        rk, rv = _random_rotations(g.kv_heads, g.head_dim, seed=i)
        assert not torch.allclose(rk, torch.eye(g.head_dim, dtype=rk.dtype).expand_as(rk))
        gqa.rotate_heads(layer.self_attn, g.head_dim, rk, rv)
        gqa.permute_heads(layer.self_attn, g.head_dim, list(reversed(range(g.kv_heads))))
    out = m(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)


def test_rotation_that_ignores_rope_pairs_does_change_logits():
    """The invariance test can fail: a key rotation mixing dims across RoPE pairs breaks q.k."""
    m = tiny_model("llama", **MHA).double()
    ids = _ids()
    ref = m(ids).logits
    g = gqa.Geometry.of(m.config)
    rk, _ = torch.linalg.qr(torch.randn(g.kv_heads, g.head_dim, g.head_dim, dtype=torch.float64))
    gqa.rotate_heads(m.model.layers[0].self_attn, g.head_dim, rk, None)
    assert (m(ids).logits - ref).abs().max() > 1e-4


@pytest.mark.parametrize("model_type,over,kv", [("llama", MHA, 2), ("llama", MHA, 1), ("qwen2", {}, 1), ("llama", {}, 1),
                                                ("llama", dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48), 2)])
def test_fitted_alignment_and_grouping_before_pooling_are_exact(model_type, over, kv):
    m = tiny_model(model_type, **over).double()
    ids = _ids()
    ref = m(ids).logits
    stats = gqa.calibrate(m, [ids])
    info = gqa.merge_to_gqa(m, kv, merge="aligned", stats=stats, pool=False)
    torch.testing.assert_close(m(ids).logits, ref, atol=1e-9, rtol=1e-9)
    assert info["expanded"] == (over.get("num_key_value_heads", 2) % kv != 0)


def test_alignment_finds_a_planted_rotation():
    """Two heads whose keys/values are exact rotations of each other align to zero residual."""
    d, n = 8, 500
    x = torch.randn(n, d, dtype=torch.float64)
    rk = gqa.rope_rotation(torch.rand(d // 2, dtype=torch.float64) * 6)
    both = torch.stack([x, x @ rk.T], 1)  # head 1 = R head 0
    c = torch.einsum("nad,nbe->abde", both, both)
    rots = gqa.align_group(c, [0, 1], "rope")
    aligned = torch.stack([both[:, a] @ rots[a].T for a in (0, 1)], 1)
    torch.testing.assert_close(aligned[:, 0], aligned[:, 1], atol=1e-8, rtol=1e-8)
    cost = gqa.pair_costs({"k": c, "v": c}, aligned=True)
    assert cost[0, 1] < 1e-8 < gqa.pair_costs({"k": c, "v": c}, aligned=False)[0, 1]


def test_balanced_groups_pair_up_close_heads():
    cost = torch.full((6, 6), 5.0)
    for a, b in ((0, 3), (1, 5), (2, 4)):
        cost[a, b] = cost[b, a] = 0.1
    cost.fill_diagonal_(0)
    assert gqa.balanced_groups(cost, 3) == [[0, 3], [1, 5], [2, 4]]
    groups = gqa.balanced_groups(torch.rand(8, 8), 2)
    assert sorted(a for g in groups for a in g) == list(range(8)) and all(len(g) == 4 for g in groups)


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_merge_mha_gives_loadable_stock_model(kv, tmp_path):
    from transformers import AutoModelForCausalLM

    m = tiny_model("llama", **MHA)
    ids = _ids()
    gqa.merge_to_gqa(m, kv, stats=gqa.calibrate(m, [ids]))
    assert m.config.num_key_value_heads == kv
    assert m.model.layers[0].self_attn.k_proj.weight.shape == (kv * 8, 64)
    expect = m(ids).logits
    m.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["num_key_value_heads"] == kv and "auto_map" not in cfg and "attnswap" not in cfg
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert back.config.num_key_value_heads == kv
    torch.testing.assert_close(back(ids).logits, expect)
    ids2 = ids[:1, :10]
    gen = back.generate(ids2, max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 15)


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_aligned_merge_is_closer_than_mean(kv):
    """On a tiny MHA Llama whose heads come in pairs of rotated near-copies, aligned merging recovers
    the function far better than mean pooling when each pair is merged (kv=4); at kv 2 and 1, and on
    a plain random model, it is still closer."""
    base = tiny_model("llama", **MHA).double()
    g = gqa.Geometry.of(base.config)
    for i, layer in enumerate(base.model.layers):  # make heads 2j+1 rotated copies of heads 2j
        a = layer.self_attn
        for name in ("k_proj", "v_proj"):
            w = getattr(a, name).weight.data.view(g.kv_heads, g.head_dim, -1)
            w[1::2] = w[0::2] + 0.1 * w.std() * torch.randn_like(w[0::2])
        rk, rv = _random_rotations(g.kv_heads, g.head_dim, seed=10 + i)
        gqa.rotate_heads(a, g.head_dim, rk, rv)
    ids = _ids(4, 64)
    for model in (base, tiny_model("llama", seed=3, **MHA).double()):
        ref = model(ids).logits.log_softmax(-1)
        stats = gqa.calibrate(model, [ids])
        errs = {}
        for merge in ("aligned", "mean"):
            mm = copy.deepcopy(model)
            gqa.merge_to_gqa(mm, kv, merge=merge, grouping="adjacent", stats=stats)
            errs[merge] = torch.nn.functional.kl_div(mm(ids).logits.log_softmax(-1), ref, log_target=True,
                                                     reduction="batchmean").item()
        factor = 10 if model is base and kv == 4 else 1
        assert errs["aligned"] * factor < errs["mean"], errs


@pytest.mark.parametrize("merge", ["aligned", "mean"])
def test_value_refit_brings_the_merge_closer(merge):
    m = tiny_model("llama", seed=4, **MHA).double()
    ids = _ids(4, 64)
    ref = m(ids).logits.log_softmax(-1)
    stats = gqa.calibrate(m, [ids])
    errs = []
    for refit in (False, True):
        mm = copy.deepcopy(m)
        gqa.merge_to_gqa(mm, 2, merge=merge, stats=stats, refit=refit)
        errs.append(torch.nn.functional.kl_div(mm(ids).logits.log_softmax(-1), ref, log_target=True, reduction="batchmean").item())
    assert errs[1] < 0.9 * errs[0], errs


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_subspace_values_keep_identical_heads_exact(kv):
    """Heads of a group that are copies (in keys and values) merge without loss: the subspace merge
    reproduces the logits, as pooling copies must."""
    m = tiny_model("llama", seed=6, **MHA).double()
    g = gqa.Geometry.of(m.config)
    size = g.kv_heads // kv
    for layer in m.model.layers:
        for name in ("k_proj", "v_proj"):
            w = getattr(layer.self_attn, name).weight.data.view(kv, size, g.head_dim, -1)
            w[:] = w[:, :1]
    ids = _ids(4, 64)
    ref = m(ids).logits
    mm = copy.deepcopy(m)
    gqa.merge_to_gqa(mm, kv, merge="subspace", grouping="adjacent", stats=gqa.calibrate(m, [ids]))
    torch.testing.assert_close(mm(ids).logits, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_principal_keys_merge_complex_multiples_exactly(model_type):
    """Keys of a group that are complex multiples of one another in every RoPE pair (a rotation and a
    scale per pair: what RoPE commutes with), with values that are copies, merge without loss under
    ``subspace``; the aligned merge, which rotates but does not rescale, does not."""
    m = tiny_model(model_type, seed=7, **MHA).double()
    g = gqa.Geometry.of(m.config)
    half = g.head_dim // 2
    gen = torch.Generator().manual_seed(8)
    for layer in m.model.layers:
        a = layer.self_attn
        vw = a.v_proj.weight.data.view(g.kv_heads, g.head_dim, -1)
        vw[:] = vw[:1]
        kw = a.k_proj.weight.data.view(g.kv_heads, g.head_dim, -1)
        kb = None if a.k_proj.bias is None else a.k_proj.bias.data.view(g.kv_heads, g.head_dim)
        for b_ in ([a.v_proj.bias.data.view(g.kv_heads, g.head_dim)] if a.v_proj.bias is not None else []):
            b_[:] = b_[:1]
        c = torch.polar(0.5 + torch.rand(g.kv_heads, half, generator=gen, dtype=torch.float64),
                        torch.rand(g.kv_heads, half, generator=gen, dtype=torch.float64) * 2 * math.pi)
        z = torch.complex(kw[0, :half], kw[0, half:])[None] * c[..., None]
        kw[:] = torch.cat([z.real, z.imag], 1)
        if kb is not None:
            zb = torch.complex(kb[0, :half], kb[0, half:])[None] * c
            kb[:] = torch.cat([zb.real, zb.imag], 1)
    ids = _ids(4, 64)
    ref = m(ids).logits
    stats = gqa.calibrate(m, [ids])
    errs = {}
    for merge in ("subspace", "aligned"):
        mm = copy.deepcopy(m)
        gqa.merge_to_gqa(mm, 1, merge=merge, grouping="adjacent", stats=stats, refit=merge == "aligned")
        errs[merge] = (mm(ids).logits - ref).abs().max().item()
    assert errs["subspace"] < 1e-6 and errs["aligned"] > 1e-3, errs


def _value_output_error(model, merged, ids) -> float:
    """sum over query heads h and tokens of |W_o,h v_a(h) - W'_o,h v'_h|^2 in the first layer, whose
    inputs the merge does not change: the loss ``subspace_values`` minimises (for one layer)."""
    a, b = model.model.layers[0].self_attn, merged.model.layers[0].self_attn
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    d = a.head_dim
    h = a.q_proj.weight.shape[0] // d
    v, vn = a.v_proj(x).unflatten(-1, (-1, d)), b.v_proj(x).unflatten(-1, (-1, d))
    wo, wn = a.o_proj.weight.unflatten(-1, (h, d)), b.o_proj.weight.unflatten(-1, (h, d))
    err = 0.0
    for q in range(h):
        y = v[:, :, q // (h // v.shape[2])] @ wo[:, q].T
        yn = vn[:, :, q // (h // vn.shape[2])] @ wn[:, q].T
        err += (y - yn).pow(2).sum().item()
    return err


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_subspace_values_minimise_the_value_output_error(kv):
    """On random tiny MHA Llamas, what the query heads write from their values (first layer, on the
    calibration tokens) is closer to the original after the subspace merge than after the aligned
    average with its least-squares read-out, which is one of the merges it chooses among."""
    ids = _ids(4, 64)
    for seed in (3, 4):
        m = tiny_model("llama", seed=seed, **MHA).double()
        stats = gqa.calibrate(m, [ids])
        errs = {}
        for merge, kw in (("subspace", {}), ("aligned", {"refit": True})):
            mm = copy.deepcopy(m)
            gqa.merge_to_gqa(mm, kv, merge=merge, grouping="adjacent", stats=stats, **kw)
            errs[merge] = _value_output_error(m, mm, ids)
        assert errs["subspace"] < errs["aligned"], (seed, errs)


def test_qwen3_mean_only():
    from attnswap.errors import AttnSwapError

    m = tiny_model("qwen3")
    with pytest.raises(AttnSwapError, match="qwen3"):
        gqa.merge_to_gqa(m, 1, stats=gqa.calibrate(m, [_ids()]))
    ids = _ids()
    gqa.merge_to_gqa(m, 1, merge="mean", grouping="adjacent")
    assert m.config.num_key_value_heads == 1 and torch.isfinite(m(ids).logits).all()


# --- attention-block transfer (stage 1 of convert gqa) ------------------------------------------------

def _block_pair(model_type="llama", kv=2, **over):
    teacher = tiny_model(model_type, **over)
    model = copy.deepcopy(teacher)
    stats = gqa.calibrate(model, [_ids(2, 32, seed=s) for s in range(2)])
    gqa.merge_to_gqa(model, kv, stats=stats)
    return teacher, model


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_block_transfer_replays_each_layer_exactly(model_type):
    """The student's blocks run on the inputs the teacher's blocks saw, with the same keywords
    (position embeddings, mask): an unchanged copy scores zero, one changed weight does not."""
    from attnswap.distill.train import block_transfer_loss

    teacher = tiny_model(model_type)
    same = copy.deepcopy(teacher)
    assert block_transfer_loss(same, teacher)(_ids()).item() < 1e-12
    with torch.no_grad():
        w = same.model.layers[-1].self_attn.v_proj.weight
        w.add_(0.1 * w.std() * torch.randn_like(w))
    assert block_transfer_loss(same, teacher)(_ids()).item() > 1e-3


def test_block_transfer_trains_only_the_attention():
    from accelerate import Accelerator
    from attnswap.distill.train import Batches, DistillConfig, DistillStats, block_transfer, block_transfer_loss

    teacher, model = _block_pair(**MHA)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = block_transfer_loss(model, teacher)
    held = _ids(4, 32, seed=9)
    start = loss(held).item()
    cfg = DistillConfig(transfer_steps=30, lora_steps=0, batch_size=4, transfer_lr=3e-3, warmup=2,
                        transfer_blocks=("q_proj", "k_proj", "v_proj", "o_proj"))
    acc = Accelerator(cpu=True)
    stats = DistillStats()
    block_transfer(model, teacher, Batches(_ids(16, 32, seed=3), 4, 0, acc), cfg, acc, stats)
    assert loss(held).item() < 0.7 * start
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(".self_attn." in k for k in changed)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert stats.transfer_params == sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in [*model.modules(), *teacher.modules()])


# --- the command ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mha_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-mha")
    tok = tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tok), **MHA).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _args(model, data, out, *extra):
    return ["gqa", "--model", model, "--data", data, "--out", out, "--seq-len", 32, "--batch-size", 2,
            "--eval-tokens", 128, "--calib-batches", 2, *extra]


def _refused(res, out, needle):
    text = res.output.strip()
    assert res.exit_code == 2, text
    assert needle in text, text
    assert len(text.splitlines()) == 1, text
    assert not out.exists()


@pytest.mark.parametrize("extra,needle", [
    ([], "--kv-heads is required"),
    (["--kv-heads", 3], "--kv-heads 3 must divide the number of query heads (8)"),
    (["--kv-heads", 8], "must be smaller than the model's current 8 key/value heads"),
    (["--kv-heads", 0], "--kv-heads must be at least 1"),
    (["--kv-heads", 2, "--steps", 0], "--steps must be at least 1"),
    (["--kv-heads", 2, "--grouping", "random"], "unknown --grouping 'random'"),
    (["--kv-heads", 2, "--merge", "max"], "unknown --merge 'max'"),
    (["--kv-heads", 2, "--train", "everything"], "unknown --train 'everything'"),
    (["--kv-heads", 2, "--merge", "subspace", "--value-refit"], "--value-refit does not apply to --merge subspace"),
    (["--kv-heads", 2, "--seq-len", 4096], "beyond the model's maximum of 512"),
    (["--kv-heads", 2, "--steps", 4, "--transfer-steps", 5], "--transfer-steps 5 is more than --steps 4"),
    (["--kv-heads", 2, "--transfer-steps", -1], "--transfer-steps must be at least 0"),
    (["--kv-heads", 2, "--transfer-lr", 0], "--transfer-lr must be positive"),
    (["--kv-heads", 2, "--train", "none", "--transfer-steps", 2], "--transfer-steps does not apply to --train none"),
])
def test_bad_inputs(mha_dir, tiny_text, tmp_path, extra, needle):
    out = tmp_path / "o"
    _refused(_run(*_args(mha_dir, tiny_text, out), *extra), out, needle)


def test_bad_models(tmp_path, tiny_text):
    from transformers import GPT2Config

    out = tmp_path / "o"
    _refused(_run(*_args(tmp_path / "nope", tiny_text, out, "--kv-heads", 1)), out, "model path not found")
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    _refused(_run(*_args(tmp_path / "gpt2", tiny_text, out, "--kv-heads", 1)), out, "unsupported architecture 'gpt2'")
    q3 = tmp_path / "q3"
    tiny_model("qwen3").save_pretrained(q3)
    _refused(_run(*_args(q3, tiny_text, out, "--kv-heads", 1)), out, "use --merge mean")


def test_transfer_steps_default_to_a_fifth_of_steps_with_train_all_only():
    from attnswap.pipelines.gqa import GqaConfig, transfer_default

    assert transfer_default(GqaConfig(model="m", kv_heads=1, train="all", steps=1000)) == 200
    assert transfer_default(GqaConfig(model="m", kv_heads=1, train="all", steps=4)) == 0
    assert transfer_default(GqaConfig(model="m", kv_heads=1, train="all", steps=1000, transfer_steps=0)) == 0
    assert transfer_default(GqaConfig(model="m", kv_heads=1, train="lora", steps=1000)) == 0
    assert transfer_default(GqaConfig(model="m", kv_heads=1, train="lora", steps=10, transfer_steps=3)) == 3


def test_existing_out_needs_overwrite(mha_dir, tiny_text, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = _run(*_args(mha_dir, tiny_text, out, "--kv-heads", 2, "--steps", 2))
    assert res.exit_code == 2 and "already exists; pass --overwrite" in res.output
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("train,merge", [("lora", "aligned"), ("kv", "aligned"), ("attn", "aligned"), ("all", "aligned"),
                                         ("lora", "subspace")])
def test_gqa_command_end_to_end(mha_dir, tiny_text, tmp_path, train, merge):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "mqa"
    transfer = 1 if merge == "subspace" else 0  # one case runs the attention-block transfer first
    res = _run(*_args(mha_dir, tiny_text, out, "--kv-heads", 2, "--steps", 3, "--train", train, "--merge", merge,
                      "--transfer-steps", transfer, "--json", tmp_path / "r.json"))
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["merge"] == merge and rep["value_refit"] is (merge == "aligned")
    assert rep["kv_heads"] == {"before": 8, "after": 2}
    assert rep["kv_bytes_per_token"]["after"] * 4 == rep["kv_bytes_per_token"]["before"]
    assert rep["tokens_seen"] == 3 * 2 * 32 and rep["trained_params"] > 0
    assert (rep["transfer_steps"], rep["train_steps"]) == (transfer, 3 - transfer)
    assert ("attention-block transfer" in res.output) is bool(transfer)
    assert all(rep[k]["ppl"] > 1 for k in ("teacher", "merged", "distilled"))
    assert len(rep["groups"]) == 3 and all(len(g) == 2 for g in rep["groups"])
    assert "merged ppl, before training" in res.output and "KV cache bytes / token" in res.output
    assert {"loading", "evaluation", "merging", "training", "saving", "other"} == set(rep["seconds"])
    assert sum(rep["seconds"].values()) == pytest.approx(rep["wall_seconds"], abs=0.05)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == 2
    assert "auto_map" not in cfg and "attnswap" not in cfg and (out / "model.safetensors").is_file()
    assert not list(out.glob("*.py")) and not list(tmp_path.glob(".mqa.tmp-*"))
    m = AutoModelForCausalLM.from_pretrained(out)
    assert rep["transfer_params"] == transfer * sum(v.numel() for k, v in m.state_dict().items() if ".self_attn." in k)
    assert not any("lora" in k for k in m.state_dict())
    assert m.model.layers[0].self_attn.k_proj.weight.dtype == torch.float32


def test_saved_model_loads_without_attnswap(mha_dir, tiny_text, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "m"
    res = _run(*_args(mha_dir, tiny_text, out, "--kv-heads", 1, "--train", "none", "--grouping", "adjacent", "--merge", "mean"))
    assert res.exit_code == 0, res.output
    code = (f"import sys\nfrom transformers import AutoModelForCausalLM\nm = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
            "assert 'attnswap' not in sys.modules\nprint(m.config.num_key_value_heads)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr[-2000:]
