"""Host-side arithmetic for kernel launches, in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects (Triton 3.6 and
later): callable from host code, but each call unwraps its arguments through Triton's frontend, about
1-2 us where plain integer arithmetic takes 0.05. A launch computes a dozen of them (grids, block
sizes, segment plans), and a prefill of a few thousand tokens is bound by the host
(docs/BENCHMARKS.md, issue 17), so the host side uses these instead. Inside ``@triton.jit`` code the
Triton forms stay.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
