"""Evaluation: held-out perplexity, recall tasks (passkey, needle in a haystack, associative recall),
speed and memory, and the candidate-vs-baseline regression report behind ``convert eval``.

    from attnswap.evals import Checks, compare
    report = compare("runs/smollm2-linear", "llama", Checks(max_ppl_increase=5), tasks="ppl,passkey")
    assert report.passed, report.verdict()
"""

from .checks import CheckResult, Checks
from .report import Report
from .runner import EvalSettings, compare

__all__ = ["CheckResult", "Checks", "EvalSettings", "Report", "compare"]
