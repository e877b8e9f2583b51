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


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
@pytest.mark.parametrize("device,dtype,length", [
    pytest.param("cpu", torch.float32, 96, id="cpu-fp32"),
    pytest.param("cuda", torch.bfloat16, 4133, id="cuda-bf16-4k",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_mixed_generation_of_a_long_prompt_matches_recomputation(method, device, dtype, length, monkeypatch):
    """Issue 16: on the H200 lizard's exact heads found passkeys at 1k / 2k and none at 4k / 8k, while
    lolcats' found them at 4k. Here a prompt past 4k (on CUDA) goes through the fast path, the Triton
    prefill into a cache and the decode step, and each generated token's logits must be those of a
    PyTorch-path forward over the whole sequence without a cache."""
    skip_triton_on(device)
    m = _converted(method, MIXED, seed=5).to(device=device, dtype=dtype)
    ids = torch.randint(0, 300, (1, length), generator=torch.Generator().manual_seed(8)).to(device)
    monkeypatch.setenv("ATTNSWAP_KERNELS", "triton")
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    got = torch.stack(out.logits, 1).float()  # (1, 6, V): the prompt's last position, then 5 decode steps
    monkeypatch.setenv("ATTNSWAP_KERNELS", "torch")
    with torch.no_grad():
        ref = m(out.sequences[:, :-1], use_cache=False).logits[:, length - 1:].float()
    assert got.shape == ref.shape and torch.isfinite(got).all()
    check(f"mixed {method} generation at {length}", got, ref, dtype, bound=tol(dtype, grad=True))
