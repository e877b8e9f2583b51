"""Mixed layers (some KV heads exact, the rest linear) through the Triton kernels against the PyTorch
path: the linear heads reach the kernels narrowed by ``index_select``, the exact heads bypass them."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import CASES, check, skip_triton_on, tol
from tests.test_exact_heads import MIXED, _converted  # MIXED: layer -> KV heads kept exact


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
@pytest.mark.parametrize("device,dtype", CASES)
def test_mixed_model_triton_matches_torch(method, device, dtype, monkeypatch):
    skip_triton_on(device)
    m = _converted(method, MIXED, seed=7).to(device=device, dtype=dtype)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(11)).to(device)
    with torch.no_grad():
        monkeypatch.setenv("ATTNSWAP_KERNELS", "torch")
        ref = m(ids, use_cache=False).logits
        monkeypatch.setenv("ATTNSWAP_KERNELS", "triton")
        got = m(ids, use_cache=False).logits
    assert torch.isfinite(got).all()
    check(f"mixed {method}", got, ref, dtype, bound=tol(dtype, grad=True))
