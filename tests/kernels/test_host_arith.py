"""The host-side launch arithmetic (``kernels.host``) agrees with Triton's own ``cdiv`` and
``next_power_of_2``, which it replaces outside ``@triton.jit`` code."""

import random

import pytest

triton = pytest.importorskip("triton")

from attnswap.kernels.host import cdiv, next_pow2  # noqa: E402


def test_host_arith_matches_triton():
    rng = random.Random(0)
    values = list(range(1, 300)) + [rng.randrange(1, 1 << 40) for _ in range(300)] + [1 << k for k in range(40)]
    for n in values:
        assert next_pow2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 64, 100, rng.randrange(1, 1 << 20)):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
