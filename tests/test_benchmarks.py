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


def test_tuning_option_sets_knobs_with_their_types_and_refuses_bad_items(monkeypatch):
    """``--tuning`` (profile_layer.py, profile_train.py): a number for each named knob, cast to the knob's
    type; an unknown knob, a non-number or a missing '=' exits with one line."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from _common import apply_tuning

    from attnswap.kernels.linear_attn import chunk

    for key in ("bwd_segments", "bwd_segments_max_per_sm", "min_segment_chunks"):
        monkeypatch.setitem(chunk.TUNING, key, chunk.TUNING[key])
    got = apply_tuning(["bwd_segments=0", "bwd_segments_max_per_sm=1.5", "min_segment_chunks=1"])
    assert got == {"bwd_segments": False, "bwd_segments_max_per_sm": 1.5, "min_segment_chunks": 1}
    assert chunk.TUNING["bwd_segments"] is False and type(chunk.TUNING["min_segment_chunks"]) is int
    for bad in ("no_such_knob=1", "min_segment_chunks=two", "min_segment_chunks"):
        with pytest.raises(SystemExit, match="expected KEY=NUMBER"):
            apply_tuning([bad])
    monkeypatch.setitem(chunk.TUNING, "la_fwd_warps", 0)
    assert apply_tuning(["la_fwd_warps=16"]) == {"la_fwd_warps": 16}
    for bad in ("la_fwd_warps=3", "la_fwd_warps=32", "hybrid_warps=16"):
        with pytest.raises(SystemExit, match="warps are 0"):
            apply_tuning([bad])
