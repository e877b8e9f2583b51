"""The evaluation report: results of a candidate (and its baseline), the checks, and how to write it
as JSON, Markdown and PNG plots."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
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
        p = Path(path)
        if p.is_dir():
            p = p / "report.json"
        if not p.is_file():
            raise AttnSwapError(f"baseline report not found: {path}")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(d, dict) or "results" not in d.get("models", {}).get("candidate", {}):
                raise ValueError("no candidate results")
            return cls.from_dict(d)
        except (ValueError, UnicodeDecodeError, TypeError, KeyError) as e:
            raise AttnSwapError(f"{path} is not a convert eval report.json ({str(e).splitlines()[0][:120]})") from None

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
