"""The evaluation report: results of a candidate (and its baseline), the checks, and how to write it
as JSON, Markdown and PNG plots."""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from ..errors import AttnSwapError
from .checks import RECALL_TASKS, CheckResult

REPORT_VERSION = 1


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.1f} MiB"


def _num(v, fmt="{:.3f}") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


@dataclass
class Report:
    candidate: dict  # {"name", "tokenizer", "max_positions", "results": {task: ...}, "seconds"}
    baseline: dict | None
    settings: dict
    checks: list[CheckResult] = field(default_factory=list)
    requested_checks: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    baseline_source: str = "run"  # run | report:<path>
    plots: dict = field(default_factory=dict)

    # --- verdict -------------------------------------------------------------------------------
    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def passed(self) -> bool:
        return not self.failures

    def verdict(self) -> str:
        done = [c for c in self.checks if c.status != "n/a"]
        na = len(self.checks) - len(done)
        tail = f"; {na} check{'s' if na != 1 else ''} could not be measured" if na else ""
        if not self.checks:
            return "PASS (no checks set: an informational report)"
        if self.failures:
            return (f"FAIL: {len(self.failures)} of {len(done)} checks failed: "
                    + "; ".join(c.describe() for c in self.failures) + tail)
        return f"PASS: all {len(done)} checks passed{tail}"

    # --- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        seq = str(self.settings.get("seq_len"))
        names = [self.candidate["name"]] + ([self.baseline["name"]] if self.baseline else [])
        sides = [self.candidate] + ([self.baseline] if self.baseline else [])
        legacy = {n: s["results"]["ppl"]["by_length"][seq] for n, s in zip(names, sides)
                  if seq in s["results"].get("ppl", {}).get("by_length", {})}
        return {
            "version": REPORT_VERSION, "verdict": self.verdict(), "passed": self.passed,
            "checks": [vars(c) for c in self.checks], "requested_checks": self.requested_checks,
            "models": {"candidate": self.candidate, "baseline": self.baseline}, "baseline_source": self.baseline_source,
            "settings": self.settings, "environment": self.environment, "plots": self.plots,
            # the layout `convert eval --json` always had: held-out perplexity at --seq-len per model
            "seq_len": self.settings.get("seq_len"), "results": legacy,
            "baseline": self.baseline["name"] if self.baseline else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        m = d["models"]
        r = cls(m["candidate"], m.get("baseline"), d.get("settings", {}),
                [CheckResult(**c) for c in d.get("checks", [])], d.get("requested_checks", {}),
                d.get("environment", {}), d.get("baseline_source", "run"), d.get("plots", {}))
        return r

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        """Read a report.json (or the one in a report directory); anything but a well-formed report,
        down to every number the comparison, the Markdown and the plots read, is one AttnSwapError."""
        from ..paths import kind

        p = Path(path)
        if kind(p) == "a directory":
            p = p / "report.json"
        k = kind(p)
        if k == "missing":
            raise AttnSwapError(f"baseline report not found: {path}")
        if k != "a file":
            raise AttnSwapError(f"baseline report {p} is {k}, not a report.json file")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise AttnSwapError(f"cannot read {p}: {e.strerror or e}") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise AttnSwapError(f"{path} is not a convert eval report.json (not valid JSON: {str(e).splitlines()[0][:80]})") from None
        try:
            check_report(d)
        except _Malformed as e:
            raise AttnSwapError(f"{path} is not a convert eval report.json: {e}") from None
        return cls.from_dict(d)

    # --- Markdown --------------------------------------------------------------------------------
    def _rows(self) -> list[tuple[str, str, str, str, str]]:
        c = self.candidate["results"]
        b = self.baseline["results"] if self.baseline else {}
        by_metric = {x.metric: x for x in self.checks}

        def mark(metric):
            x = by_metric.get(metric)
            if x is None:
                return ""
            if x.status == "n/a":
                return "n/a"
            lim = f"+{x.limit:g}%" if x.check in ("max-ppl-increase", "max-memory-increase") else (
                f"-{x.limit:g}%" if x.check == "max-speed-drop" else f"-{x.limit:g} pts")
            return ("**FAIL**" if x.status == "fail" else "pass") + f" (limit {lim})"

        rows = []
        for n, v in sorted(c.get("ppl", {}).get("by_length", {}).items(), key=lambda kv: int(kv[0])):
            bv = b.get("ppl", {}).get("by_length", {}).get(n, {}).get("ppl")
            ch = f"{100 * (v['ppl'] / bv - 1):+.2f}%" if bv else ""
            rows.append((f"perplexity @{n}", _num(bv), _num(v["ppl"]), ch, mark(f"perplexity @{n}")))
        dens = {k: v for k, v in c.get("density", {}).items() if v is not None}
        if dens:  # sparse layers: attended fraction of causal key blocks while scoring perplexity
            vals = list(dens.values())
            per = ", ".join(f"{k}: {100 * v:.0f}%" for k, v in sorted(dens.items(), key=lambda kv: int(kv[0])))
            rows.append(("attended key blocks (mean; per layer)", "100%", f"{100 * sum(vals) / len(vals):.1f}%",
                         per, ""))
        for t in RECALL_TASKS:
            if t in c:
                bv = b.get(t, {}).get("accuracy")
                ch = f"{100 * (c[t]['accuracy'] - bv):+.1f} pts" if bv is not None else ""
                rows.append((f"{t} accuracy", _num(bv, "{:.1%}"), _num(c[t]["accuracy"], "{:.1%}"), ch, mark(f"{t} accuracy")))
        if "speed" in c:
            lens = sorted(c["speed"]["by_length"], key=int)
            n = lens[-1]
            cv = c["speed"]["by_length"][n]
            bv = b.get("speed", {}).get("by_length", {}).get(n, {})
            for key, what in (("prefill_tok_s", "prefill tokens/s"), ("decode_tok_s", "decode tokens/s")):
                if cv.get(key) is None:
                    continue
                ch = f"{100 * (cv[key] / bv[key] - 1):+.1f}%" if bv.get(key) else ""
                rows.append((f"{what} @{n}", _num(bv.get(key), "{:,.0f}"), _num(cv[key], "{:,.0f}"), ch,
                             mark(f"{what} @{n}")))
            ch = f"{cv['cache_bytes'] / bv['cache_bytes']:.3f}x" if bv.get("cache_bytes") else ""
            rows.append((f"cache @{n}+{c['speed']['decode_tokens']}", _mib(bv.get("cache_bytes")) if bv else "—",
                         _mib(cv["cache_bytes"]), ch, ""))
            exact = c["speed"].get("exact_memory")
            what = "peak memory" if exact else "peak RSS growth (approx.)"
            pk = bv.get("peak_memory_bytes")
            ch = f"{100 * (cv['peak_memory_bytes'] / pk - 1):+.1f}%" if pk else ""
            rows.append((f"{what} @{n}", _mib(pk) if bv else "—", _mib(cv["peak_memory_bytes"]), ch,
                         mark(f"peak memory @{n}") or (mark("peak memory") if not exact else "")))
        return rows

    def to_markdown(self) -> str:
        c, b = self.candidate, self.baseline
        env, s = self.environment, self.settings
        title = f"# convert eval: `{c['name']}`" + (f" vs `{b['name']}`" if b else "")
        verdict = self.verdict()
        word, _, why = verdict.partition(":") if verdict.startswith(("PASS:", "FAIL:")) else (verdict, "", "")
        lines = [title, "", f"**{word}**" + (f":{why}" if why else ""), ""]
        src = "" if self.baseline_source == "run" else f" (baseline numbers read from `{self.baseline_source.removeprefix('report:')}`)"
        lines += [f"{env.get('device_note', '')} Data: `{s.get('data')}` (held-out split). Tasks: {', '.join(s.get('tasks', []))}.{src}", ""]
        bname = f" `{b['name']}`" if b else ""
        lines += [f"| metric | baseline{bname} | candidate `{c['name']}` | change | check |",
                  "|---|---:|---:|---:|---|"]
        lines += ["| " + " | ".join(r) + " |" for r in self._rows()]
        lines += ["", "Perplexity: lower is better. Accuracy and tokens/s: higher is better. "
                  "Cache: what generation holds after the context (keys/values, or the converted layers' fixed-size state).", ""]
        if self.plots:
            lines += ["## Plots", ""]
            captions = {"ppl": "Perplexity vs context length, and by token position",
                        "recall": "Passkey accuracy vs length; associative recall vs number of pairs",
                        "niah": "Needle in a haystack: accuracy (%) by needle depth and context length",
                        "speed": "Throughput and memory vs context length"}
            for k in ("ppl", "recall", "niah", "speed"):
                if k in self.plots:
                    lines += [f"![{captions[k]}]({self.plots[k]})", ""]
        lines += self._details()
        return "\n".join(lines).rstrip() + "\n"

    def _details(self) -> list[str]:
        sides = [(self.baseline["name"], self.baseline["results"])] if self.baseline else []
        sides.append((self.candidate["name"], self.candidate["results"]))
        out = ["## Details", ""]

        def table(title, header, keyfn, fmt, task, sub):
            present = [(n, r[task][sub]) for n, r in sides if task in r and sub in r[task]]
            if not present:
                return
            keys = sorted({k for _, d in present for k in d}, key=keyfn)
            out.extend([f"{title}", "", "| model | " + " | ".join(f"{header}{k}" for k in keys) + " |",
                        "|---|" + "---:|" * len(keys)])
            for n, d in present:
                out.append(f"| `{n}` | " + " | ".join(_num(d.get(k), fmt) for k in keys) + " |")
            out.append("")

        table("Passkey accuracy by context length:", "", int, "{:.0%}", "passkey", "by_length")
        table("Passkey accuracy by depth:", "depth ", float, "{:.0%}", "passkey", "by_depth")
        table("Passkey, the key scored by teacher forcing, by context length:", "", int, "{:.0%}", "passkey",
              "forced_by_length")
        table("Passkey, the key's digits by teacher forcing once its leading space is given, by context length:", "",
              int, "{:.0%}", "passkey", "forced_digits_by_length")
        table("Passkey, loose: the first number of a longer greedy answer (`loose_tokens` tokens), by context length:",
              "", int, "{:.0%}", "passkey", "loose_by_length")
        table("NIAH accuracy by context length:", "", int, "{:.0%}", "niah", "by_length")
        table("MQAR accuracy by number of key-value pairs:", "", int, "{:.0%}", "mqar", "by_pairs")
        pos = [(n, r["ppl"]["by_position"]) for n, r in sides if "ppl" in r]
        if pos:
            buckets = [f"{bk['from']}-{bk['to']}" for bk in pos[0][1]["buckets"]]
            out += [f"Perplexity by token position ({pos[0][1]['length']}-token windows):", "",
                    "| model | " + " | ".join(buckets) + " |", "|---|" + "---:|" * len(buckets)]
            out += [f"| `{n}` | " + " | ".join(f"{bk['ppl']:.2f}" for bk in p["buckets"]) + " |" for n, p in pos]
            out.append("")
        sp = [(n, r["speed"]) for n, r in sides if "speed" in r]
        if sp:
            out += ["Speed and memory by context length (batch 1):", "",
                    "| model | context | prefill tok/s | decode tok/s | cache | peak memory |", "|---|---:|---:|---:|---:|---:|"]
            for n, r in sp:
                for L, v in sorted(r["by_length"].items(), key=lambda kv: int(kv[0])):
                    out.append(f"| `{n}` | {L} | {v['prefill_tok_s']:,.0f} | {_num(v.get('decode_tok_s'), '{:,.1f}')} | "
                               f"{_mib(v['cache_bytes'])} | {_mib(v['peak_memory_bytes'])} |")
            out += ["", f"Memory: {sp[-1][1]['memory_method']}. Cache: bytes held by the cache after prefill and "
                        f"{sp[-1][1]['decode_tokens']} decode steps, counted from its tensors.", ""]
        s, env = self.settings, self.environment
        out += ["## Settings", "",
                f"- command: `{env.get('command', 'library call')}`",
                f"- device: {env.get('device')} ({env.get('dtype')}); torch {env.get('torch')}, transformers {env.get('transformers')}; {env.get('date', '')}",
                f"- perplexity: windows of {', '.join(map(str, s.get('ppl_lengths', [])))} tokens, up to {s.get('eval_tokens'):,} tokens each"
                if s.get("ppl_lengths") else "- perplexity: not run",
                f"- passkey / niah: lengths {s.get('lengths')}, depths {s.get('depths')}, {s.get('samples')} samples per cell; "
                f"mqar: pairs {s.get('mqar_pairs')}, {s.get('samples')} samples, up to {s.get('mqar_queries')} queries each; seed {s.get('seed')}",
                f"- speed: lengths {s.get('speed_lengths')}, {s.get('decode_tokens')} decode steps, best of {s.get('speed_repeats')}",
                "- wall time: " + ", ".join(f"{side['name']} {side.get('seconds', 0):.0f} s" for side in
                                             ([self.baseline] if self.baseline else []) + [self.candidate]),
                *[f"- note: {n}" for n in env.get("notes", [])], ""]
        return out

    # --- writing ---------------------------------------------------------------------------------
    def write(self, out: str | Path, *, plots: bool = True) -> Path:
        """report.json, report.md and the plots, written atomically into ``out`` (replacing it)."""
        from ..saving import atomic_dir
        from . import plots as P

        out = Path(out)
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").is_file())):
            raise AttnSwapError(f"--report-dir {out} exists and is not an eval report directory; choose another")
        with atomic_dir(out, overwrite=True, flag="--report-dir") as tmp:
            if plots:
                models = ({self.baseline["name"] + " (baseline)": self.baseline["results"]} if self.baseline else {})
                models[self.candidate["name"] + (" (candidate)" if self.baseline else "")] = self.candidate["results"]
                self.plots = P.all_plots(models, tmp)
            (tmp / "report.json").write_text(self.to_json())
            (tmp / "report.md").write_text(self.to_markdown())
        return out


# --- the shape of a saved report -------------------------------------------------------------------

class _Malformed(Exception):
    """Where a saved report departs from the shape this module writes (message: path and problem)."""


def _type(x) -> str:
    return "null" if x is None else {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
                                     "list": "a list", "dict": "an object"}.get(type(x).__name__, type(x).__name__)


def _is_num(x) -> bool:
    """A JSON number (NaN and infinities included, as reports are written with allow_nan); integers
    within 64 bits, so that every one converts to a float."""
    return isinstance(x, float) or isinstance(x, int) and not isinstance(x, bool) and abs(x) < 2**63


def _need(ok: bool, where: str, want: str, x) -> None:
    if not ok:
        raise _Malformed(f"{where} must be {want} (got {_type(x)})")


def _obj(x, where: str) -> dict:
    _need(isinstance(x, dict), where, "an object", x)
    return x


def _field(d: dict, key: str, where: str, check, *, optional: bool = False):
    if key not in d:
        if optional:
            return None
        raise _Malformed(f"{where} has no {key!r}")
    return check(d[key], f"{where}.{key}")


def _number(x, where):
    _need(_is_num(x), where, "a number", x)
    return x


def _number_or_null(x, where):
    _need(x is None or _is_num(x), where, "a number or null", x)
    return x


def _integer(x, where):
    _need(isinstance(x, int) and not isinstance(x, bool) and abs(x) < 2**63, where, "an integer", x)
    return x


def _string(x, where):
    _need(isinstance(x, str), where, "a string", x)
    return x


def _string_or_null(x, where):
    _need(x is None or isinstance(x, str), where, "a string or null", x)
    return x


def _keyed(x, where, value, *, key=int, what="integer", nonempty=True) -> dict:
    """An object whose keys read as numbers (lengths, depths, pair counts) and whose values pass ``value``."""
    d = _obj(x, where)
    if nonempty and not d:
        raise _Malformed(f"{where} is empty")
    for k, v in d.items():
        try:
            key(k)
        except ValueError:
            raise _Malformed(f"{where} has the key {k[:20]!r}, which is not an {what}") from None
        value(v, f"{where}[{k[:20]!r}]")
    return d


def _ppl(r, where):
    _field(r, "by_length", where, lambda v, w: _keyed(v, w, lambda x, wx: _field(_obj(x, wx), "ppl", wx, _number)))
    pos = _field(r, "by_position", where, _obj)
    pw = f"{where}.by_position"
    _field(pos, "length", pw, _integer)
    buckets = _field(pos, "buckets", pw, lambda v, w: v)
    _need(isinstance(buckets, list), f"{pw}.buckets", "a list", buckets)
    for i, b in enumerate(buckets):
        w = f"{pw}.buckets[{i}]"
        for k in ("from", "to", "ppl"):
            _field(_obj(b, w), k, w, _number)


def _accuracy_by(r, where, key, keytype=int, what="integer"):
    _field(r, "accuracy", where, _number)
    _field(r, key, where, lambda v, w: _keyed(v, w, _number, key=keytype, what=what))


def _passkey(r, where):
    _accuracy_by(r, where, "by_length")
    _field(r, "by_depth", where, lambda v, w: _keyed(v, w, _number, key=float, what="number", nonempty=False))
    # reports written before the teacher-forced score have neither field
    _field(r, "forced_accuracy", where, _number, optional=True)
    _field(r, "forced_by_length", where, lambda v, w: _keyed(v, w, _number, key=int, what="integer"), optional=True)
    _field(r, "forced_digits_accuracy", where, _number, optional=True)
    _field(r, "forced_digits_by_length", where, lambda v, w: _keyed(v, w, _number, key=int, what="integer"),
           optional=True)
    _field(r, "loose_accuracy", where, _number, optional=True)  # reports before the loose score lack these
    _field(r, "loose_by_length", where, lambda v, w: _keyed(v, w, _number, key=int, what="integer"), optional=True)


def _niah(r, where):
    _accuracy_by(r, where, "by_length")
    grid = _field(r, "grid", where, lambda v, w: _keyed(v, w, lambda row, wr: _keyed(row, wr, _number, key=float, what="number")))
    depths = [set(row) for row in grid.values()]
    if any(d != depths[0] for d in depths):
        raise _Malformed(f"{where}.grid: the lengths do not all have the same depths")


def _mqar(r, where):
    _accuracy_by(r, where, "by_pairs")


def _speed_row(v, w):
    row = _obj(v, w)
    for k in ("prefill_tok_s", "cache_bytes", "peak_memory_bytes"):
        _field(row, k, w, _number)
    _field(row, "decode_tok_s", w, _number_or_null, optional=True)


def _speed(r, where):
    _field(r, "device", where, _string)
    _field(r, "decode_tokens", where, _integer)
    _field(r, "memory_method", where, _string)
    _field(r, "exact_memory", where, lambda v, w: _need(isinstance(v, bool), w, "true or false", v))
    _field(r, "by_length", where, lambda v, w: _keyed(v, w, _speed_row))


TASK_SHAPES = {"ppl": _ppl, "passkey": _passkey, "niah": _niah, "mqar": _mqar, "speed": _speed}


def check_results(results, where: str) -> None:
    """Every task result a report holds, in the shape the tasks write it."""
    results = _obj(results, where)
    for task, check in TASK_SHAPES.items():
        if task in results:
            check(_obj(results[task], f"{where}.{task}"), f"{where}.{task}")


def check_side(side, where: str, *, strict: bool) -> None:
    """One model's entry. ``strict``: also what comparing against it needs (its tokenizer fingerprint)."""
    side = _obj(side, where)
    _field(side, "results", where, check_results)
    _field(side, "seconds", where, _number, optional=True)
    _field(side, "device", where, _string, optional=True)
    _field(side, "name", where, _string)
    tok = _field(side, "tokenizer", where, _obj, optional=not strict)
    if strict:
        tw = f"{where}.tokenizer"
        _field(tok, "sha256", tw, _string)
        _field(tok, "size", tw, _integer)
        for k in ("eos", "bos"):
            _field(tok, k, tw, _string_or_null, optional=True)


def check_report(d) -> None:
    """The whole of a saved report (raises _Malformed)."""
    d = _obj(d, "the file")
    models = _field(d, "models", "the report", _obj)
    _field(models, "candidate", "models", lambda v, w: check_side(v, w, strict=False))
    if models.get("baseline") is not None:
        check_side(models["baseline"], "models.baseline", strict=False)
    for key in ("settings", "requested_checks", "environment", "plots"):
        _field(d, key, "the report", _obj, optional=True)
    _field(d, "baseline_source", "the report", _string, optional=True)
    checks = d.get("checks", [])
    _need(isinstance(checks, list), "checks", "a list", checks)
    names = {f.name for f in fields(CheckResult)}
    required = {f.name for f in fields(CheckResult) if f.default is MISSING}
    for i, c in enumerate(checks):
        w = f"checks[{i}]"
        c = _obj(c, w)
        if set(c) - names or required - set(c):
            raise _Malformed(f"{w} does not have the fields of a check result")
        for k in ("check", "metric", "unit", "note"):
            _field(c, k, w, _string, optional=k == "note")
        for k in ("baseline", "candidate", "change"):
            _field(c, k, w, _number_or_null)
        _field(c, "limit", w, _number)
        _need(c["status"] in ("pass", "fail", "n/a"), f"{w}.status", "pass, fail or n/a", c["status"])
        if c["status"] != "n/a" and c["change"] is None:
            raise _Malformed(f"{w}: a check that ran has no change")
