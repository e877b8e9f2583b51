"""The distillation loss a block of rows at a time (distill/logit_loss.py) against its reference, the
whole logits through ``log_softmax`` and ``F.kl_div``: the loss and the gradients of the hidden states
and of the head, on fresh random inputs; and the trunk-and-head split on real model classes."""

import pytest
import torch

import attnswap  # noqa: F401  (registration)
from attnswap.convert.swap import make_swap
from attnswap.distill import logit_loss as ll
from attnswap.distill.train import DistillConfig, distill
from attnswap.modeling import convert_model
from tests.conftest import tiny_model


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(seed, n=37, d=24, v=301, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, d, generator=g, dtype=dtype)
    ws = torch.randn(v, d, generator=g, dtype=dtype) / d ** 0.5
    ht = hs + 0.5 * torch.randn(n, d, generator=g, dtype=dtype)
    wt = ws + 0.3 * torch.randn(v, d, generator=g, dtype=dtype) / d ** 0.5
    return hs, ws, ht, wt, g


@pytest.mark.parametrize("rows", [1, 5, 16, 37, 100])
@pytest.mark.parametrize("case", ["kl", "ce", "weighted"])
def test_chunked_loss_matches_the_reference(rows, case):
    hs, ws, ht, wt, g = _inputs(rows * 7 + len(case))
    n, v = hs.shape[0], ws.shape[0]
    kw = {}
    if case == "ce":
        targets = torch.randint(0, v, (n,), generator=g)
        targets[::6] = -100
        kw = dict(targets=targets, ce_weight=0.3)
    if case == "weighted":
        weight = (torch.rand(n, generator=g) < 0.4).to(hs.dtype)
        kw = dict(weight=weight, norm=weight.sum().clamp_min(1.0))
    a = [t.clone().requires_grad_(True) for t in (hs, ws)]
    b = [t.clone().requires_grad_(True) for t in (hs, ws)]
    want = ll.logit_loss(b[0] @ b[1].t(), ht @ wt.t(), **kw)
    got = ll.chunked_logit_loss(a[0], a[1], ht, wt, rows=rows, **kw)
    (2.5 * want).backward()  # an incoming gradient other than one
    (2.5 * got).backward()
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    assert _rel(a[0].grad, b[0].grad) < 1e-5
    assert _rel(a[1].grad, b[1].grad) < 1e-5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_chunked_loss_bf16_matches_the_reference_within_bf16(device):
    n, d, v, rows = (64, 32, 500, 10) if device == "cpu" else (2048, 64, 4096, 300)
    hs, ws, ht, wt, _ = _inputs(3, n=n, d=d, v=v, dtype=torch.float32)
    hs, ws, ht, wt = (t.to(device).bfloat16() for t in (hs, ws, ht, wt))
    a, b = hs.clone().requires_grad_(True), hs.clone().requires_grad_(True)
    want = ll.logit_loss(b @ ws.t(), ht @ wt.t())
    got = ll.chunked_logit_loss(a, ws, ht, wt, rows=rows)
    want.backward()
    got.backward()
    assert abs(got.item() - want.item()) <= 1e-3 * abs(want.item())
    assert a.grad.dtype == torch.bfloat16 and _rel(a.grad.float(), b.grad.float()) < 2e-2


def test_the_teacher_side_gets_no_gradient():
    hs, ws, ht, wt, _ = _inputs(4)
    ht.requires_grad_(True)
    loss = ll.chunked_logit_loss(hs.requires_grad_(True), ws, ht, wt, rows=8)
    loss.backward()
    assert ht.grad is None and hs.grad is not None


def test_the_split_reproduces_a_llama_and_its_peft_wrapping():
    from peft import LoraConfig, get_peft_model

    m = tiny_model("llama")
    src = ll.Logits(m)
    assert src.chunked, src.why
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.allclose((src.hidden(ids) @ src.weight.t()).view(2, 9, -1), m(input_ids=ids).logits, atol=1e-5)
    pm = get_peft_model(m, LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0))
    assert ll.Logits(pm).chunked


def test_a_head_the_split_would_not_reproduce_falls_back():
    m = tiny_model("llama")
    m.lm_head.register_forward_hook(lambda _m, _a, out: out * 2.0)  # the model's logits are no longer the product
    src = ll.Logits(m)
    assert not src.chunked and "changed" in src.why
    m2 = tiny_model("llama")
    m2.model.norm.register_forward_hook(lambda _m, _a, out: out)  # harmless: still split
    assert ll.Logits(m2).chunked


def test_the_check_catches_what_the_attributes_do_not(monkeypatch):
    m = tiny_model("llama")
    real = type(m).forward

    def scaled(self, *a, **k):  # a forward that scales its logits after the head (as a soft cap would)
        out = real(self, *a, **k)
        out.logits = out.logits * 0.5
        return out

    monkeypatch.setattr(type(m), "forward", scaled)
    src = ll.Logits(m)
    assert not src.chunked and "reproduce" in src.why


def test_the_variable_turns_it_off_and_is_checked(monkeypatch):
    monkeypatch.setenv(ll.ENV, "0")
    assert not ll.Logits(tiny_model("llama")).chunked
    monkeypatch.delenv(ll.ENV)
    assert ll.wanted()
    monkeypatch.setenv(ll.ENV, "yes")
    with pytest.raises(Exception, match="must be 0"):
        ll.wanted()


def _distill(monkeypatch, chunked: str, ce_weight: float, device: str = "cpu"):
    monkeypatch.setenv(ll.ENV, chunked)
    torch.manual_seed(0)
    m = tiny_model("llama")
    convert_model(m, [make_swap("lolcats", [0, 1, 2], {"window": 4}, m.config)], source="tiny")
    m.to(device)
    seqs = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))
    return distill(m, seqs, DistillConfig(transfer_steps=2, lora_steps=4, batch_size=2, lora_rank=2, warmup=1,
                                          ce_weight=ce_weight))


@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_distillation_trains_the_same_model_either_way(monkeypatch, ce_weight):
    a, sa = _distill(monkeypatch, "0", ce_weight)
    b, sb = _distill(monkeypatch, "1", ce_weight)
    assert sa.losses.keys() == sb.losses.keys()
    for k in sa.losses:
        assert abs(sa.losses[k] - sb.losses[k]) <= 1e-4 * abs(sa.losses[k]), k
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert _rel(y.float(), x.float()) < 1e-4, n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_distillation_on_cuda_the_same_either_way_graphed(monkeypatch):
    """On one CUDA device the LoRA steps are replayed as a CUDA graph: the blocked loss is captured too."""
    a, sa = _distill(monkeypatch, "0", 0.0, "cuda")
    b, sb = _distill(monkeypatch, "1", 0.0, "cuda")
    assert sb.graph_steps.get("LoRA distillation", 0) > 0
    for k in sa.losses:
        assert abs(sa.losses[k] - sb.losses[k]) <= 1e-3 * abs(sa.losses[k]), k
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert _rel(y.float(), x.float()) < 1e-3, n
