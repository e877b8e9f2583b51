"""Non-finite numbers during distillation: the step is skipped and logged with the layer that produced
the first NaN/inf, the learning rate is halved, and a persistent fault stops the run with one line
that names the stage and the layer."""

import math

import pytest
import torch
from typer.testing import CliRunner

import attnswap  # noqa: F401  (registration)
from attnswap.cli import app
from attnswap.convert import swapped_modules
from attnswap.modeling import convert_model
from attnswap.convert.lolcats import HedgehogFeatureMap, LolcatsAttention
from attnswap.convert.swap import make_swap
from attnswap.distill.faults import NonFiniteError
from attnswap.distill.train import DistillConfig, distill
from tests.conftest import tiny_model


def _converted():
    m = tiny_model("llama")
    convert_model(m, [make_swap("lolcats", [0, 1, 2], {"window": 4}, m.config)], source="tiny")
    return m


def _seqs():
    return torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(0))


def _nan_on_calls(module, calls):
    """Make ``module`` output NaN on the given (0-based) forward calls."""
    count = {"n": 0}
    orig = module.forward

    def forward(*a, **kw):
        out = orig(*a, **kw)
        hit = count["n"] in calls
        count["n"] += 1
        return out * float("nan") if hit else out

    module.forward = forward
    return count


def test_transient_nan_loss_is_skipped_and_logged(capsys):
    m = _converted()
    fm = m.model.layers[1].self_attn.feature_map_q
    _nan_on_calls(fm, {2, 3})  # step 3 of attention transfer, and the re-run that looks for the source
    m, stats = distill(m, _seqs(), DistillConfig(transfer_steps=5, lora_steps=0, batch_size=2, warmup=1))
    err = capsys.readouterr().err
    assert "attention transfer step 3: non-finite loss" in err
    assert "model.layers.1.self_attn.feature_map_q (layer 1)" in err
    assert "step skipped, learning rate halved (retry 1/3)" in err
    assert err.count("warning") == 1
    assert math.isfinite(stats.losses["attention transfer"])
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_persistent_nan_loss_stops_naming_stage_and_layer():
    m = _converted()
    _nan_on_calls(m.model.layers[2].self_attn.feature_map_k, set(range(3, 100)))
    with pytest.raises(NonFiniteError) as e:
        distill(m, _seqs(), DistillConfig(transfer_steps=10, lora_steps=0, batch_size=2))
    msg = str(e.value)
    assert msg.startswith("attention transfer stopped at step 7: non-finite loss")  # steps 4, 5, 6 retried
    assert "model.layers.2.self_attn.feature_map_k (layer 2)" in msg and "after 3 retries" in msg
    assert "\n" not in msg


def test_nan_gradient_names_the_parameter():
    m = _converted()
    m.model.layers[2].self_attn.window_factor.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(NonFiniteError) as e:
        distill(m, _seqs(), DistillConfig(transfer_steps=6, lora_steps=0, batch_size=2), )
    msg = str(e.value)
    assert "attention transfer stopped at step 4" in msg
    assert "non-finite gradient in model.layers.2.self_attn.window_factor (layer 2)" in msg


def test_nan_in_lora_stage_names_the_layer(monkeypatch):
    m = _converted()
    target = m.model.layers[2].self_attn
    orig = LolcatsAttention.student

    def student(self, x):
        out = orig(self, x)
        return out * float("nan") if self is target else out  # student only: teacher mode never calls it

    monkeypatch.setattr(LolcatsAttention, "student", student)
    with pytest.raises(NonFiniteError) as e:
        distill(m, _seqs(), DistillConfig(transfer_steps=0, lora_steps=6, batch_size=2, lora_rank=2))
    msg = str(e.value)
    assert msg.startswith("LoRA distillation stopped at step 4: non-finite loss")
    assert "(layer 2)" in msg


def test_cli_stops_with_one_line_and_writes_nothing(tiny_dir, tiny_text, tmp_path, monkeypatch):
    monkeypatch.setattr(HedgehogFeatureMap, "forward", lambda self, x, *a, **k: torch.full((*x.shape[:3], 2 * self.bias.shape[1]), float("nan")))
    out = tmp_path / "o"
    res = CliRunner().invoke(app, [str(a) for a in ["linearize", "--model", tiny_dir, "--data", tiny_text, "--out", out,
                                                    "--seq-len", 32, "--batch-size", 2, "--eval-tokens", 0,
                                                    "--window", 8, "--steps", 8, "--nan-retries", 1]])
    assert res.exit_code == 3, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: attention transfer stopped at step 2: non-finite loss"), res.output
    assert "model.layers.0.self_attn.feature_map_q (layer 0)" in last and "after 1 retries" in last
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*"))


def _params(grads):
    out = []
    for i, g in enumerate(grads):
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g
        out.append((f"p{i}", p))
    return out


def test_nonfinite_grads_finds_nan_and_inf_and_passes_huge_finite_ones():
    """The one-sync norm check finds a NaN or an inf anywhere; a finite gradient whose norm overflows
    (1e30 squared) is not reported; tensors of several dtypes are checked together."""
    from attnswap.distill.faults import nonfinite_grads

    def fresh():
        g = torch.Generator().manual_seed(3)
        return [torch.randn(5, 7, generator=g), torch.randn(3, generator=g).to(torch.bfloat16), torch.randn(2, 4, generator=g)]

    assert nonfinite_grads(_params(fresh())) == []
    for i, bad in ((0, float("nan")), (1, float("inf")), (2, -float("inf"))):
        gs = fresh()
        gs[i].view(-1)[-1] = bad
        assert nonfinite_grads(_params(gs)) == [f"p{i}"]
    gs = fresh()
    gs[0].fill_(1e30)
    assert not torch.isfinite(torch.linalg.vector_norm(gs[0]))  # the norm overflows ...
    assert nonfinite_grads(_params(gs)) == []  # ... but every element is finite


def test_nonfinite_grads_costs_a_few_calls_not_a_few_per_gradient():
    """A LoRA step checks ~330 gradients: the check's ATen calls must not grow four per gradient."""
    from attnswap.distill.faults import nonfinite_grads
    from attnswap.profiling import count_host_ops

    params = _params([torch.randn(8, 8) for _ in range(300)])
    _, r = count_host_ops(lambda: nonfinite_grads(params))
    assert r.syncs == 1
    assert r.ops < 20, r.ops  # was ~1,200: isfinite (abs, eq, ne, and) and all, for each gradient
