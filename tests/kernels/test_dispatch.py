"""A converted model gives the same logits and gradients through the Triton kernels as through the
PyTorch path (``force_backend``), with the default 4 sink tokens; under the interpreter on CPU."""

import pytest
import torch
from conftest import skip_triton_on

from attnswap.convert import convert_model
from attnswap.convert.swap import make_swap
from attnswap.kernels import force_backend
from tests.conftest import tiny_model


@pytest.mark.parametrize("sinks", [0, 4])
def test_converted_model_same_on_both_backends(sinks):
    skip_triton_on("cpu")
    m = tiny_model("llama", seed=1)
    convert_model(m, [make_swap("lolcats", [0, 1, 2], {"window": 8, "sinks": sinks}, m.config)], "tiny")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "feature_map" in name or "window_factor" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(3))
    out = {}
    for backend in ("torch", "triton"):
        m.zero_grad()
        with force_backend(backend):
            logits = m(ids).logits
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if "feature_map" in n or "window_factor" in n}
        out[backend] = (logits.detach(), grads)
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-4, atol=1e-4)
    for n, gr in out["torch"][1].items():
        torch.testing.assert_close(out["triton"][1][n], gr, rtol=1e-3, atol=1e-5, msg=n)
