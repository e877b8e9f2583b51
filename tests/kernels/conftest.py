"""Kernel tests: Triton runs under its interpreter on CPU-only machines (fp32), natively on CUDA (bf16)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

CASES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


def skip_triton_on(device: str):
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (only set on CPU-only machines)")


def tol(dtype, grad: bool = False) -> float:
    if dtype == torch.float32:
        return 1e-4
    return 4e-2 if grad else 2e-2


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (floored so an all-zero reference cannot divide by zero)."""
    x, ref = x.float(), ref.float()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def check(name: str, x, ref, dtype, grad: bool = False, bound: float | None = None):
    e = rel_err(x, ref)
    log = os.environ.get("ATTNSWAP_ERRLOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{name}\t{str(dtype).replace('torch.', '')}\t{e:.3e}\n")
    b = bound if bound is not None else tol(dtype, grad)
    assert e < b, f"{name}: relative error {e:.3e} >= {b:.0e}"


def dgamma_err_in_fp16(fast, naive, ins, gamma_index: int, **kw) -> float:
    """Relative error of the fast kernel's d gamma on fp16 inputs against the naive one in fp32 on the
    same values (d gamma nearly cancels, so 16-bit rounding inside the forward shows here first)."""
    ins32 = [t.detach().float().requires_grad_() for t in ins]
    ref = naive(*ins32, **kw)
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    dgamma_ref = torch.autograd.grad(ref, ins32[gamma_index], do)[0]
    out = fast(*ins, **kw)
    return rel_err(torch.autograd.grad(out, ins[gamma_index], do.half())[0], dgamma_ref)
