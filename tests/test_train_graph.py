"""The training step replayed as a CUDA graph (on by default on one CUDA device; ``ATTNSWAP_TRAIN_GRAPH=0``
turns it off; distill/train.py: StepGraph) against the eager step, its reference: the same losses and
weights after both stages. On a machine without CUDA the variable changes nothing."""

import pytest
import torch

import attnswap  # noqa: F401  (registration)
from attnswap.convert.swap import make_swap
from attnswap.distill.train import GRAPH_ENV, DistillConfig, distill
from attnswap.modeling import convert_model
from tests.conftest import tiny_model


def _run(device: str, graph: bool, monkeypatch):
    monkeypatch.setenv(GRAPH_ENV, "1" if graph else "0")
    torch.manual_seed(0)
    m = tiny_model("llama")
    convert_model(m, [make_swap("lolcats", [0, 1, 2], {"window": 4}, m.config)], source="tiny")
    m.to(device)
    seqs = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))
    m, stats = distill(m, seqs, DistillConfig(transfer_steps=5, lora_steps=5, batch_size=2, lora_rank=2, warmup=1))
    return m, stats


def test_the_graph_variable_changes_nothing_without_cuda(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    eager, s0 = _run("cpu", False, monkeypatch)
    asked, s1 = _run("cpu", True, monkeypatch)
    assert s1.graph_steps == {} and s0.graph_steps == {}
    assert s0.losses == s1.losses
    for (n, a), (_, b) in zip(eager.state_dict().items(), asked.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_steps_match_eager_cuda(monkeypatch):
    eager, s0 = _run("cuda", False, monkeypatch)
    graphed, s1 = _run("cuda", True, monkeypatch)
    assert s0.graph_steps == {}
    assert s1.graph_steps == {"attention transfer": 5, "LoRA distillation": 5}, s1.graph_steps
    _same_training(eager, s0, graphed, s1)


def _same_training(eager, s0, graphed, s1):
    """The same losses and weights, to 1e-3, from the eager and the graphed steps."""
    for k in s0.losses:
        assert abs(s0.losses[k] - s1.losses[k]) <= 1e-3 * abs(s0.losses[k]) + 1e-6, (k, s0.losses, s1.losses)
    for (n, a), (_, b) in zip(eager.state_dict().items(), graphed.state_dict().items()):
        rel = ((a.float() - b.float()).norm() / a.float().norm().clamp_min(1e-12)).item()
        assert rel < 1e-3, (n, rel)


def test_a_step_that_cannot_be_captured_runs_eagerly_with_one_warning_a_stage(monkeypatch, capsys):
    """The fallback, on any machine: a capture that raises (a host sync inside the step, say) leaves the
    stage to the eager steps, which then train exactly as with the graph turned off."""
    from attnswap.distill.train import StepGraph

    eager, s0 = _run("cpu", False, monkeypatch)
    tries = []

    def refuse(self, ids):
        tries.append(ids.shape)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StepGraph, "wanted", staticmethod(lambda acc, params: True))
    monkeypatch.setattr(StepGraph, "_capture", refuse)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a, **k: None)
    capsys.readouterr()
    fell_back, s1 = _run("cpu", True, monkeypatch)
    out = capsys.readouterr()
    assert len(tries) == 2 and s1.graph_steps == {}  # one try a stage, then eager for good
    assert (out.out + out.err).count("could not be captured as a CUDA graph") == 2
    assert s0.losses == s1.losses
    for (n, a), (_, b) in zip(eager.state_dict().items(), fell_back.state_dict().items()):
        assert torch.equal(a, b), n


def test_the_graph_is_the_default_on_one_cuda_device_and_a_bad_value_is_refused(monkeypatch):
    from types import SimpleNamespace

    from attnswap.distill.train import StepGraph
    from attnswap.errors import AttnSwapError

    cuda = SimpleNamespace(device=torch.device("cuda"), num_processes=1, scaler=None)
    params = [torch.nn.Parameter(torch.zeros(2))]
    monkeypatch.delenv(GRAPH_ENV, raising=False)
    assert StepGraph.wanted(cuda, params)
    assert not StepGraph.wanted(SimpleNamespace(device=torch.device("cpu"), num_processes=1, scaler=None), params)
    assert not StepGraph.wanted(SimpleNamespace(device=torch.device("cuda"), num_processes=2, scaler=None), params)
    assert not StepGraph.wanted(SimpleNamespace(device=torch.device("cuda"), num_processes=1, scaler=object()), params)
    monkeypatch.setenv(GRAPH_ENV, "0")
    assert not StepGraph.wanted(cuda, params)
    monkeypatch.setenv(GRAPH_ENV, "1")
    assert StepGraph.wanted(cuda, params)
    monkeypatch.setenv(GRAPH_ENV, "yes")
    with pytest.raises(AttnSwapError, match="must be 0"):
        StepGraph.wanted(cuda, params)


def test_unpadded_rows_skips_reading_the_mask():
    """Inside ``unpadded_rows`` a 4D mask is taken as padding-free without a host read (a CUDA graph
    capture forbids one); outside, a padded mask is still found."""
    from attnswap.hf_compat import padding_plan, unpadded_rows
    from attnswap.profiling import count_host_ops

    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool).tril()
    mask[1, ..., 0] = False  # row 1: one leading pad
    assert padding_plan(mask.clone(), 4) == [0, 1]
    with unpadded_rows():
        answer, r = count_host_ops(padding_plan, mask.clone(), 4)
    assert answer is None and r.syncs == 0
    assert padding_plan(mask.clone(), 4) == [0, 1]


def _gqa_run(device: str, graph: bool, monkeypatch):
    """convert gqa's stages: attention-block transfer, then --train all, from a 2 -> 1 KV-head merge."""
    import copy

    from attnswap.convert.gqa import calibrate, merge_to_gqa

    monkeypatch.setenv(GRAPH_ENV, "1" if graph else "0")
    torch.manual_seed(0)
    teacher = tiny_model("llama").to(device)
    m = copy.deepcopy(teacher)
    seqs = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))
    merge_to_gqa(m, 1, stats=calibrate(m, [seqs[:4].to(device)]))
    full = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    cfg = DistillConfig(transfer_steps=5, lora_steps=5, batch_size=2, lr=1e-4, transfer_lr=3e-4, warmup=1,
                        full_train=full, transfer_blocks=full[:4])
    return distill(m, seqs, cfg, teacher=teacher)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_gqa_steps_match_eager_cuda(monkeypatch):
    eager, s0 = _gqa_run("cuda", False, monkeypatch)
    graphed, s1 = _gqa_run("cuda", True, monkeypatch)
    assert s1.graph_steps == {"attention-block transfer": 5, "full-weight distillation": 5}, s1.graph_steps
    _same_training(eager, s0, graphed, s1)


def test_gqa_stages_run_on_cpu(monkeypatch):
    """The same stages on the CPU, where the graph variable changes nothing: both stages run, eagerly."""
    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    m, stats = _gqa_run("cpu", True, monkeypatch)
    assert stats.graph_steps == {} and set(stats.losses) == {"attention-block transfer", "full-weight distillation"}
    assert stats.transfer_params > 0 and stats.lora_params > stats.transfer_params


def test_update_time_recorded_per_step_and_fused_adamw_only_on_cuda(monkeypatch):
    """``DistillStats.update_seconds`` holds one host time a step of each stage (profile_train.py reads it);
    the fused AdamW (the CUDA default, ``ATTNSWAP_FUSED_ADAMW=1``) leaves CPU parameters to torch's default
    optimiser, and a bad value is refused."""
    from attnswap.distill.train import FUSED_ENV, adamw
    from attnswap.errors import AttnSwapError

    _, stats = _run("cpu", False, monkeypatch)
    assert {k: len(v) for k, v in stats.update_seconds.items()} == {"attention transfer": 5, "LoRA distillation": 5}
    assert all(t >= 0 for v in stats.update_seconds.values() for t in v)
    p = [torch.nn.Parameter(torch.ones(3))]
    monkeypatch.delenv(FUSED_ENV, raising=False)
    assert not adamw(p, 1e-3).defaults["fused"]
    monkeypatch.setenv(FUSED_ENV, "1")
    assert not adamw(p, 1e-3).defaults["fused"]
    monkeypatch.setenv(FUSED_ENV, "yes")
    with pytest.raises(AttnSwapError, match=FUSED_ENV):
        adamw(p, 1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_adamw_trains_as_the_default_cuda(monkeypatch):
    """The fused optimiser (the CUDA default) against torch's default (``ATTNSWAP_FUSED_ADAMW=0``) on the same
    graphed steps: the same losses and weights to 1e-3."""
    from attnswap.distill.train import FUSED_ENV, adamw

    monkeypatch.delenv(FUSED_ENV, raising=False)
    assert adamw([torch.nn.Parameter(torch.ones(3, device="cuda"))], 1e-3).defaults["fused"]
    monkeypatch.setenv(FUSED_ENV, "0")
    assert not adamw([torch.nn.Parameter(torch.ones(3, device="cuda"))], 1e-3).defaults["fused"]
    monkeypatch.setenv(FUSED_ENV, "1")
    fused, s1 = _run("cuda", True, monkeypatch)
    monkeypatch.setenv(FUSED_ENV, "0")
    default, s0 = _run("cuda", True, monkeypatch)
    _same_training(default, s0, fused, s1)
