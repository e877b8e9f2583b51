"""Host-side cost of a forward, counted on any device: host-device synchronisations and ATen calls.

On a GPU, reading a tensor's value on the host (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``)
or producing a tensor whose shape depends on values (``nonzero``, boolean indexing, ``masked_select``,
``unique``) makes the CPU wait until the GPU has finished everything queued before it: the host can no
longer run ahead and launch kernels while the GPU works, and a forward made of many small launches
becomes as slow as their sum. The same calls are visible on CPU, as ATen operators, so they can be
counted (and kept out in CI) without a GPU; ``count_host_ops`` does that with a dispatch mode.

The number of ATen calls is a proxy for kernel launches (it also counts views, which launch nothing).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen operators that wait for the device: a value read on the host, or an output sized by values
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "equal", "repeat_interleave.Tensor", "_assert_async")


def _is_sync(name: str) -> bool:
    """``name``: "aten.<op>.<overload>"; an entry of SYNC_OPS names an operator or one overload."""
    op = name.removeprefix("aten.")
    return any(op == s or op.startswith(s + ".") for s in SYNC_OPS)


class HostOps:
    """What a block ran: ``syncs`` (host-device synchronisations), ``ops`` (all ATen calls), ``by_op``
    (calls per operator), ``where`` (for each sync, the innermost frames of attnswap that made it)."""

    def __init__(self):
        self.syncs = 0
        self.ops = 0
        self.by_op: collections.Counter = collections.Counter()
        self.where: list[str] = []


class _Counter(TorchDispatchMode):
    def __init__(self, record: HostOps, stacks: bool):
        super().__init__()
        self.record, self.stacks = record, stacks

    def note(self, name: str) -> None:
        """Count a synchronisation called ``name``, and where it was made."""
        r = self.record
        r.syncs += 1
        if self.stacks:
            frames = [f for f in traceback.extract_stack()[:-1] if "attnswap" in f.filename
                      and not f.filename.endswith("profiling.py")]
            here = " < ".join(f"{f.filename.rsplit('attnswap/', 1)[-1]}:{f.lineno}" for f in frames[::-1][:3])
            r.where.append(f"{name} at {here or 'outside attnswap'}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)  # "aten.<op>.<overload>"
        self.record.ops += 1
        self.record.by_op[name] += 1
        if _is_sync(name):
            self.note(name)
        return func(*args, **(kwargs or {}))


# Tensor methods that copy to the host without an ATen call on a CPU tensor (on a GPU they wait for it)
HOST_READS = ("tolist", "numpy", "cpu")


@contextlib.contextmanager
def _host_reads(counter: "_Counter"):
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name, fn):
        @functools.wraps(fn)
        def read(self, *args, **kwargs):
            counter.note(f"Tensor.{name}")
            return fn(self, *args, **kwargs)
        return read

    for name, fn in saved.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def count_host_ops(fn, *args, stacks: bool = False, **kwargs) -> tuple[object, HostOps]:
    """Run ``fn(*args, **kwargs)``; return its result and the ``HostOps`` it ran. ``stacks``: note
    where each synchronisation was made (slower). Besides the ATen calls of ``SYNC_OPS``, the
    ``HOST_READS`` methods count as synchronisations: on a CPU tensor they make no ATen call."""
    record = HostOps()
    counter = _Counter(record, stacks)
    with _host_reads(counter), counter:
        out = fn(*args, **kwargs)
    return out, record
