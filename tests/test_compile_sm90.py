"""The segment kernels and the hybrid forward compile for a Hopper GPU (sm_90) on a machine without one.

The interpreter runs a kernel's Python, not Triton's compiler, so a kernel can pass every CPU test and
still fail to compile on the GPU. Triton's wheel carries the CUDA back end and ptxas, so the whole
pipeline down to a cubin runs here (tests/compile_sm90.py, in a process without TRITON_INTERPRET). This
checks that they compile, in the dtypes and constexpr settings the GPU runs, and fit the H100's and
H200's 227 KB of shared memory. It checks neither results (the interpreter tests do) nor speed, and it
uses the Triton installed here, not the GPU image's. On a CUDA machine the real launches cover it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KERNELS = [("_rev_seg_kernel", "norm=True"), ("_rev_seg_kernel", "norm=False"),
           ("_seg_state_kernel", "gated=False"), ("_seg_state_kernel", "gated=True"),
           ("_seg_scan_kernel", "gated=False"), ("_seg_scan_kernel", "gated=True"),
           ("_hy_fwd_kernel", "prefill"), ("_hy_fwd_kernel", "training")]


def _has_cuda_backend() -> bool:
    try:
        import triton.backends.nvidia as nvidia
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        return False
    return (Path(nvidia.__file__).parent / "bin" / "ptxas").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine launches the kernels for real")
@pytest.mark.skipif(not _has_cuda_backend(), reason="this Triton has no CUDA back end with ptxas")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "tests/compile_sm90.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    done = {tuple(line.split()[:2]) for line in r.stdout.splitlines() if "shared=" in line}
    assert done == set(KERNELS), (sorted(done), r.stdout)
