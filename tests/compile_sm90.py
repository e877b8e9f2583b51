"""Compile the segment kernels and the hybrid forward for a Hopper GPU (sm_90) without one; run as a
script by tests/test_compile_sm90.py, in a process of its own without TRITON_INTERPRET (under it every
kernel is an interpreted function, which cannot be compiled). Prints one line per kernel compiled:
``NAME CASE shared=BYTES regs=N stack=BYTES`` (the stack holds spilled registers); any failure raises.
Run it on the GPU image too (``python tests/compile_sm90.py``) to see its own Triton's figures."""

from __future__ import annotations

import inspect
import os
import sys

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HOPPER_SMEM = 227 * 1024


def compile_sm90(fn, case: str, args: dict, consts: dict, **options) -> None:
    """``args`` maps runtime parameters to Triton types ('*bf16', 'i32', ...), ``consts`` the constexpr ones
    to values; every parameter must be in one of them."""
    names = list(inspect.signature(fn.fn).parameters)
    missing = set(names) - set(args) - set(consts)
    assert not missing, f"{fn.fn.__name__}: parameters without a type or value: {sorted(missing)}"
    sig = {n: args.get(n, "constexpr") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    assert "cubin" in kernel.asm, fn.fn.__name__
    shared = kernel.metadata.shared
    assert shared <= HOPPER_SMEM, f"{fn.fn.__name__} {case}: {shared} bytes of shared memory"
    print(f"{fn.fn.__name__} {case} shared={shared} {_registers(kernel.asm['cubin'])}", flush=True)


def _registers(cubin: bytes) -> str:
    """``regs=N stack=BYTES`` from cuobjdump (beside ptxas in Triton's wheel): registers a thread and the
    per-thread stack, where spilled registers go; '' when cuobjdump is missing or says something else."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton.backends.nvidia as nvidia

    tool = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    if not tool.exists():
        return ""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"regs={m.group(1)} stack={m.group(2)}" if m else ""


def main() -> None:
    from attnswap.kernels.hybrid_attn import chunk as hybrid
    from attnswap.kernels.linear_attn import chunk as linear

    ptrs = {n: "*bf16" for n in ("q", "do")} | {n: "*fp32" for n in ("rden", "dden", "per", "perz")}
    for norm in (True, False):
        compile_sm90(linear._rev_seg_kernel, f"norm={norm}", ptrs | {n: "i32" for n in ("T", "H", "Hk", "G", "NCH")},
                     dict(F=128, DV=64, BK=64, BV=64, C=64, NORM=norm, PREC="tf32"), num_warps=8, num_stages=2)

    ints = {n: "i32" for n in ("T", "Hk", "LAG", "SINKS", "NCH", "NSEG")}
    for gated in (False, True):
        compile_sm90(linear._seg_state_kernel, f"gated={gated}",
                     {"k": "*bf16", "v": "*bf16", "Gc": "*fp32", "Sl": "*fp32", "zl": "*fp32"} | ints,
                     dict(F=128, DV=64, BK=64, BV=64, C=64, GATED=gated, PREC="tf32", SPLIT=False),
                     num_warps=4, num_stages=2)
        compile_sm90(linear._seg_scan_kernel, f"gated={gated}",
                     {n: "*fp32" for n in ("Sl", "zl", "Gc", "S0", "z0", "ST", "zT")} | ints,
                     dict(F=128, DV=64, BK=64, BV=64, C=64, GATED=gated, HAS_INIT=True, STORE_FINAL=True), num_warps=4)

    # lolcats on SmolLM2 (head dim 64, 128 features, window 256 = 5 key tiles, 4 sinks in a 32-key tile) from
    # precomputed segment states: as a prefill runs it, and as a bf16 training step does
    ptrs = {n: "*bf16" for n in ("q", "k", "v", "fq", "fk", "gamma", "o")}
    ptrs |= {"Gc": "*fp32", "den_out": "*fp32", "m_out": "*fp32", "arg_out": "*i32", "Sl": "*fp32", "zl": "*fp32"}
    ints = {n: "i32" for n in ("T", "H", "Hk", "GROUP", "W", "SINKS", "NCH")} | {"scale": "fp32", "eps": "fp32"}
    for case, save, split in (("prefill", False, False), ("training", True, True)):
        compile_sm90(hybrid._hy_fwd_kernel, case, ptrs | ints,
                     dict(D=64, F=128, DV=64, BD=64, BF=128, BV=64, C=64, NKB=5, BS=32, USE_LIN=True, GATED=False,
                          SAVE=save, PREC="tf32", SPLIT=split, SEGINIT=True),
                     num_warps=hybrid.hybrid_forward_warps(True, False, save), num_stages=2)


if __name__ == "__main__":
    sys.exit(main())
