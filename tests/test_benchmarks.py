"""The benchmark scripts start: each imports attnswap and transformers from benchmarks/ (its own folder
first on sys.path, as ``python benchmarks/X.py`` runs it) and prints its help. A script named like a
package transformers imports (``kernels.py`` shadowed Hugging Face's ``kernels`` from transformers 5.25
on) fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts(script):
    r = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"{script} --help exited {r.returncode}:\n{r.stderr[-3000:]}"
    assert "usage" in r.stdout.lower()
