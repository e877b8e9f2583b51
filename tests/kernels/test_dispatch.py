"""A converted model gives the same logits and gradients through the Triton kernels as through the
PyTorch path (``ATTNSWAP_KERNELS``; checked to have taken each): lolcats with and without sink tokens, lizard with its learned meta
tokens; under the interpreter on CPU. And what ``auto`` picks."""

import pytest
import torch
from conftest import skip_triton_on

from attnswap.modeling import convert_model
from attnswap.convert.swap import make_swap
from tests.conftest import tiny_model


TRAINED = ("feature_map", "window_factor", "meta_", "gate_proj")


@pytest.mark.parametrize("method,options", [("lolcats", {"window": 8, "sinks": 0}), ("lolcats", {"window": 8, "sinks": 4}),
                                            ("lizard", {"window": 8, "meta_tokens": 2})])
def test_converted_model_same_on_both_backends(method, options, monkeypatch):
    skip_triton_on("cpu")
    import attnswap.kernels.dispatch as dispatch

    ops, used = dispatch._triton_ops(), []

    class Counting(dict):
        def __getitem__(self, name):
            used.append(name)
            return ops[name]

    monkeypatch.setattr(dispatch, "_triton_ops", lambda: Counting(ops))
    m = tiny_model("llama", seed=1)
    convert_model(m, [make_swap(method, [0, 1, 2], options, m.config)], "tiny")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if any(t in name for t in TRAINED):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(3))
    out = {}
    for backend in ("torch", "triton"):
        m.zero_grad()
        # the environment, not force_backend: a converted model applies its own runtime option
        # (kernels="auto", PyTorch on CPU) inside forward, which a surrounding force_backend cannot override
        monkeypatch.setenv("ATTNSWAP_KERNELS", backend)
        used.clear()
        logits = m(ids).logits
        assert bool(used) == (backend == "triton"), used
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if any(t in n for t in TRAINED)}
        out[backend] = (logits.detach(), grads)
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-4, atol=1e-4)
    for n, gr in out["torch"][1].items():
        torch.testing.assert_close(out["triton"][1][n], gr, rtol=1e-3, atol=1e-5, msg=n)


def test_auto_is_pytorch_on_cpu_and_for_steps(monkeypatch):
    from attnswap.kernels.dispatch import backend_for

    monkeypatch.delenv("ATTNSWAP_KERNELS", raising=False)
    x = torch.zeros(1)
    assert backend_for(x) == "torch"
    assert backend_for(x, step=True) == "torch"
    monkeypatch.setenv("ATTNSWAP_KERNELS", "bogus")
    with pytest.raises(ValueError, match="ATTNSWAP_KERNELS"):
        backend_for(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_is_triton_on_cuda_for_sequences(monkeypatch):
    from attnswap.kernels.dispatch import backend_for

    monkeypatch.delenv("ATTNSWAP_KERNELS", raising=False)
    x = torch.zeros(1, device="cuda")
    assert backend_for(x) == "triton"
    assert backend_for(x, step=True) == "torch"
