"""What one kernel launch costs the host, ours (Triton) against PyTorch's own operators.

A prefill of a few thousand tokens is bound by the host (docs/BENCHMARKS.md, issue 17): the device
waits while Python issues the next kernel. This prints, for each entry point, the host's time per call
when calls are issued back to back on tiny inputs (so the device is never what waits), the median of
``--repeats`` loops of ``--calls`` calls each, and the device's time per call for comparison:

- ``torch.add`` and ``F.linear`` on small bf16 tensors: an ATen operator's launch;
- ``rope`` (``kernels.rope``: q and k in one launch), ``hedgehog_pair`` (a layer's query and key
  feature maps in one launch), ``hybrid`` (``kernels.hybrid_attn`` inference forward, one segment:
  one launch) and ``hybrid-seg`` (several segments: the segment states first, three launches), at
  SmolLM2's head shape (9 query heads, 3 KV heads, head dim 64, window 256 + 4 sinks) with ``--tokens``
  tokens (``hybrid-seg`` one segment a 64-token chunk, so ``--tokens`` of 128 or more).

On CUDA it times real launches. ``--stub-launches`` (no GPU needed) replaces every Triton launch with a
no-op and runs on CPU tensors, so what is left is our wrappers' own Python (shape checks, grids, block
sizes, allocations): the part of a launch this project's code decides.

    python benchmarks/launch_cost.py --tokens 512 --calls 200 --repeats 7     # CUDA
    python benchmarks/launch_cost.py --stub-launches --calls 500              # the wrappers alone, CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F_

from _common import commit, stub_triton_launches


def _host_and_device(fn, calls: int, repeats: int, cuda: bool) -> tuple[float, float]:
    """(host us per call, device us per call; nan without CUDA), medians over ``repeats`` loops of
    ``calls`` calls."""
    for _ in range(3):
        fn()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    host, dev = [], []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sync()
            start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        host.append((t1 - t0) / calls * 1e6)
        if cuda:
            end.record()
            sync()
            dev.append(start.elapsed_time(end) / calls * 1e3)
    return statistics.median(host), statistics.median(dev) if dev else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--stub-launches", action="store_true", help="CPU tensors, every Triton launch a no-op")
    a = ap.parse_args()
    if a.stub_launches:
        os.environ["TRITON_INTERPRET"] = "1"  # kernels defined from here on are the interpreter's, then stubbed
        stub_triton_launches()
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        raise SystemExit("launch_cost.py: needs a CUDA device (on a CPU the Triton interpreter runs, not a launch); "
                         "--stub-launches times the wrappers alone")
    from attnswap.kernels.feature_map.fused import triton_hedgehog_pair
    from attnswap.kernels.hybrid_attn.chunk import triton_hybrid_attn
    from attnswap.kernels.rope.fused import triton_rope

    dev, dt = torch.device("cpu" if a.stub_launches else "cuda"), torch.bfloat16
    T, H, Hk, D, F = a.tokens, 9, 3, 64, 64
    g = torch.Generator(device=dev).manual_seed(0)
    cuda = dev.type == "cuda"

    def rnd(*shape):
        return torch.randn(*shape, device=dev, dtype=dt, generator=g)

    x, w = rnd(T, 576), rnd(192, 576)
    q, k, v = rnd(1, T, H, D), rnd(1, T, Hk, D), rnd(1, T, Hk, D)
    cos, sin = rnd(1, T, D), rnd(1, T, D)
    wq, bq, wk, bk = rnd(H, D, F), rnd(H, F), rnd(Hk, D, F), rnd(Hk, F)
    fq, fk = triton_hedgehog_pair(q, wq, bq, k, wk, bk, dt, dt)
    gamma = torch.zeros(H, device=dev, dtype=dt)
    cases = {
        "torch.add": lambda: torch.add(x, x),
        "F.linear": lambda: F_.linear(x, w),
        "rope": lambda: triton_rope(q, k, cos, sin),
        "hedgehog_pair": lambda: triton_hedgehog_pair(q, wq, bq, k, wk, bk, dt, dt),
        "hybrid": lambda: triton_hybrid_attn(q, k, v, fq, fk, gamma, window=256, scale=D ** -0.5, sinks=4,
                                             segment_chunks=T),
        "hybrid-seg": lambda: triton_hybrid_attn(q, k, v, fq, fk, gamma, window=256, scale=D ** -0.5, sinks=4,
                                                 segment_chunks=1),
    }
    where = torch.cuda.get_device_name(dev) if cuda else "cpu, launches stubbed"
    print(f"device {where}, torch {torch.__version__}, commit {commit()}, tokens {T}, {a.calls} calls x {a.repeats}")
    print(f"{'entry':16s} {'host us/call':>13s} {'device us/call':>15s}")
    with torch.no_grad():
        for name, fn in cases.items():
            h, d = _host_and_device(fn, a.calls, a.repeats, cuda)
            print(f"{name:16s} {h:13.1f} {d:15.1f}", flush=True)


if __name__ == "__main__":
    main()
