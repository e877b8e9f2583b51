"""Lower the block-sparse kernels for sm_90 (Hopper) down to PTX on a machine WITHOUT a GPU or ptxas,
with the divisibility hints a real launch gets (16-byte aligned pointers, strides divisible by 16):
catches compile errors on the non-interpreted path and prints each config's shared memory, wgmma and
cp.async (software-pipelined loads) counts in the PTX. Uses Triton internals (ASTSource, the stages
inspection hook), checked with Triton 3.9 only: a diagnostic, not a test.

    python benchmarks/sparse_compile_check.py [bf16|fp16]
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_MOCK_PTX_VERSION", "12.8")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attnswap.kernels.block_sparse import chunk, decode  # noqa: E402

DIV16 = {"sqb", "sqt", "sqh", "skb", "skt", "skh", "svb", "svt", "svh", "T", "Tk", "H", "L", "S"}


def _no_cubin(*a):  # called with no arguments for a cache key, then with (backend, stages, ...)
    if not a:
        return "no-cubin", "no-cubin"
    a[1].pop("cubin", None)


def lower(fn, types, consts, warps, stages, label):
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    div = [i for i, n in enumerate(fn.arg_names) if sig[n].startswith("*") or n in DIV16]
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in div})
    d = tempfile.mkdtemp()
    knobs.cache.dir = d
    try:
        try:
            triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": stages, "ptx_version": 86})
        except KeyError as e:  # building the kernel object wants the cubin we skipped
            if "cubin" not in str(e):
                raise
        ptx = open(glob.glob(d + "/*/*.ptx")[0]).read()
        meta = json.load(open([f for f in glob.glob(d + "/*/*.json") if "__grp__" not in f][0]))
        print(f"OK   {label}: shared={meta['shared']} wgmma={len(re.findall('wgmma.mma_async', ptx))} "
              f"cp.async={len(re.findall('cp.async', ptx))}")
    except Exception as e:  # noqa: BLE001
        print(f"FAIL {label}: {type(e).__name__}: {' | '.join(str(e).strip().splitlines()[-6:])[:1500]}")


def main():
    knobs.runtime.add_stages_inspection_hook = _no_cubin
    dt = sys.argv[1] if len(sys.argv) > 1 else "bf16"
    if dt in ("-h", "--help"):
        print(f"usage: python benchmarks/sparse_compile_check.py [bf16|fp16]\n{__doc__}")
        return
    if dt not in ("bf16", "fp16"):
        sys.exit(f"sparse_compile_check.py: the dtype is bf16 or fp16, not {dt!r}")
    P = {n: f"*{dt}" for n in ("q", "k", "v", "o")}
    P.update(idx="*i32", cnt="*i32", bmap="*fp32", qk_scale="fp32")
    for bm, bn, w, st in chunk.AUTOTUNE_CONFIGS:
        for block in (64, 128):
            if block % bm or block % bn:
                continue
            c = dict(D=128, DV=128, BD=128, BDV=128, BLOCK=block, BM=bm, BN=bn, SPARSE=True, MAP=False, PREC="tf32")
            lower(chunk._bs_fwd_kernel, P, c, w, st, f"sparse D=128 block={block} BM={bm} BN={bn} warps={w} stages={st}")
    for D in (64, 128):
        c = dict(D=D, DV=D, BD=D, BDV=D, BLOCK=64, BM=64, BN=64, SPARSE=False, MAP=True, PREC="tf32")
        lower(chunk._bs_fwd_kernel, P, c, 4, 3, f"attention + block map D={D} block=64")
    c = dict(D=96, DV=96, BD=128, BDV=128, BLOCK=64, BM=64, BN=64, SPARSE=True, MAP=False, PREC="tf32")
    lower(chunk._bs_fwd_kernel, P, c, 4, 3, "sparse D=96 (padded to 128)")
    Dd = {n: f"*{dt}" for n in ("q", "k", "v", "o")}
    Dd.update(idx="*i32", cnt="*i32", lens="*i32", pacc="*fp32", pml="*fp32", qk_scale="fp32")
    for direct in (False, True):
        c = dict(D=128, DV=128, BD=128, BDV=128, BG=16, BLOCK=64, BN=64, HAS_LENS=True, DIRECT=direct, PREC="tf32")
        lower(decode._bs_decode_kernel, Dd, c, decode.TUNING["warps"], decode.TUNING["stages"], f"decode direct={direct}")
    lower(decode._bs_decode_merge_kernel, {"pacc": "*fp32", "pml": "*fp32", "o": f"*{dt}"},
          dict(DV=128, BDV=128, BG=16), 4, 1, "decode merge")


if __name__ == "__main__":
    main()
