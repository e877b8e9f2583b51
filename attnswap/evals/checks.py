"""Regression checks: thresholds a candidate must meet against its baseline.

| check | applies to | fails when |
|---|---|---|
| ``max_ppl_increase`` (percent) | perplexity at every context length both sides measured | candidate / baseline - 1 > limit |
| ``max_recall_drop`` (points) | passkey, niah and mqar overall accuracy | 100 x (baseline - candidate) > limit |
| ``max_speed_drop`` (percent) | prefill and decode tokens/s at the longest speed length | candidate / baseline - 1 < -limit |
| ``max_memory_increase`` (percent) | peak memory at the longest speed length (exact on CUDA only; n/a on CPU) | candidate / baseline - 1 > limit |

Percentages are written ``5%`` or ``5`` (both mean five percent). A check left unset is not run.
The same settings can come from a TOML file (``--checks checks.toml``)::

    max-ppl-increase = "5%"
    max-recall-drop = 10
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import AttnSwapError

RECALL_TASKS = ("passkey", "niah", "mqar")


def parse_amount(value, name: str) -> float | None:
    """'5%', '5', 5 or 5.0 -> 5.0; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise AttnSwapError(f"{name} must be a number, not {value!r}")
    text = str(value).strip().removesuffix("%").strip()
    try:
        v = float(text)
    except ValueError:
        raise AttnSwapError(f"{name} must be a number like 5 or 5% (got {value!r})") from None
    if not math.isfinite(v) or v < 0:
        raise AttnSwapError(f"{name} must be a non-negative number (got {value!r})")
    return v


@dataclass
class Checks:
    max_ppl_increase: float | None = None  # percent
    max_recall_drop: float | None = None  # accuracy points (0-100 scale)
    max_speed_drop: float | None = None  # percent
    max_memory_increase: float | None = None  # percent

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, parse_amount(getattr(self, f.name), "--" + f.name.replace("_", "-")))

    @classmethod
    def from_toml(cls, path: str | Path) -> "Checks":
        from ..paths import kind

        p = Path(path)
        k = kind(p)
        if k == "missing":
            raise AttnSwapError(f"checks file not found: {path}")
        if k != "a file":
            raise AttnSwapError(f"checks file {path} is {k}, not a TOML file")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise AttnSwapError(f"cannot read checks file {path}: {e.strerror or e}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise AttnSwapError(f"{path} is not valid TOML: {str(e).splitlines()[0]}") from None
        raw = raw.get("checks", raw) if isinstance(raw.get("checks"), dict) else raw
        known = {f.name for f in fields(cls)}
        values = {}
        for k, v in raw.items():
            key = k.replace("-", "_")
            if key not in known:
                raise AttnSwapError(f"{path}: unknown check {k!r}; known: {', '.join(sorted(n.replace('_', '-') for n in known))}")
            values[key] = parse_amount(v, f"{path}: {k}")  # the file and its key, not the flag, name a bad value
        return cls(**values)

    def override(self, other: "Checks") -> "Checks":
        """These checks with every value ``other`` sets taking precedence."""
        return Checks(**{k: (v if v is not None else getattr(self, k)) for k, v in asdict(other).items()})

    @property
    def any(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class CheckResult:
    check: str  # e.g. max-ppl-increase
    metric: str  # e.g. perplexity @1024
    baseline: float | None
    candidate: float | None
    change: float | None  # percent or points, signed (candidate relative to baseline)
    unit: str  # "%" or "points"
    limit: float
    status: str  # pass | fail | n/a
    note: str = ""

    def describe(self) -> str:
        if self.status == "n/a":
            return f"{self.metric}: not checked ({self.note})"
        if self.check == "max-recall-drop":
            return f"{self.metric} dropped {-self.change:.1f} points (limit {self.limit:g})"
        if self.check == "max-speed-drop":
            return f"{self.metric} {self.change:+.1f}% (limit -{self.limit:g}%)"
        return f"{self.metric} {self.change:+.2f}% (limit +{self.limit:g}%)"


def _pct(c: float, b: float) -> float:
    return 100.0 * (c / b - 1.0) if b else float("inf")


def evaluate(checks: Checks, cand: dict, base: dict) -> list[CheckResult]:
    """Every requested check, applied to the metrics both result sets hold."""
    out: list[CheckResult] = []
    if checks.max_ppl_increase is not None:
        lim = checks.max_ppl_increase
        cl, bl = cand.get("ppl", {}).get("by_length", {}), base.get("ppl", {}).get("by_length", {})
        common = sorted(set(cl) & set(bl), key=int)
        for n in common:
            ch = _pct(cl[n]["ppl"], bl[n]["ppl"])
            out.append(CheckResult("max-ppl-increase", f"perplexity @{n}", bl[n]["ppl"], cl[n]["ppl"], ch, "%", lim,
                                   "fail" if ch > lim else "pass"))
        if not common:
            out.append(CheckResult("max-ppl-increase", "perplexity", None, None, None, "%", lim, "n/a",
                                   "the ppl task did not run on both sides"))
    if checks.max_recall_drop is not None:
        lim = checks.max_recall_drop
        ran = [t for t in RECALL_TASKS if t in cand and t in base]
        for t in ran:
            b, c = base[t]["accuracy"], cand[t]["accuracy"]
            ch = 100.0 * (c - b)
            out.append(CheckResult("max-recall-drop", f"{t} accuracy", b, c, ch, "points", lim,
                                   "fail" if -ch > lim + 1e-9 else "pass"))
        if not ran:
            out.append(CheckResult("max-recall-drop", "recall", None, None, None, "points", lim, "n/a",
                                   "no recall task (passkey, niah, mqar) ran on both sides"))
    cs, bs = cand.get("speed", {}).get("by_length", {}), base.get("speed", {}).get("by_length", {})
    common = sorted(set(cs) & set(bs), key=int)
    if checks.max_speed_drop is not None:
        lim = checks.max_speed_drop
        if not common:
            out.append(CheckResult("max-speed-drop", "speed", None, None, None, "%", lim, "n/a",
                                   "the speed task did not run on both sides"))
        else:
            n = common[-1]
            for key, what in (("prefill_tok_s", "prefill tokens/s"), ("decode_tok_s", "decode tokens/s")):
                b, c = bs[n].get(key), cs[n].get(key)
                if b is None or c is None:
                    continue
                ch = _pct(c, b)
                out.append(CheckResult("max-speed-drop", f"{what} @{n}", b, c, ch, "%", lim, "fail" if ch < -lim else "pass"))
    if checks.max_memory_increase is not None:
        lim = checks.max_memory_increase
        exact = cand.get("speed", {}).get("exact_memory") and base.get("speed", {}).get("exact_memory")
        if not common or not exact:
            out.append(CheckResult("max-memory-increase", "peak memory", None, None, None, "%", lim, "n/a",
                                   "peak memory is only measured exactly on CUDA" if common else
                                   "the speed task did not run on both sides"))
        else:
            n = common[-1]
            b, c = bs[n]["peak_memory_bytes"], cs[n]["peak_memory_bytes"]
            ch = _pct(c, b)
            out.append(CheckResult("max-memory-increase", f"peak memory @{n}", b, c, ch, "%", lim, "fail" if ch > lim else "pass"))
    return out
