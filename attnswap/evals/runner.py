"""Run the evaluation tasks on a candidate and its baseline, and compare them.

``compare(candidate, baseline, checks)`` is the library entry point (``convert eval`` is a thin
layer over it). A model is a spec string (what ``--model`` accepts), or a ``(model, tokenizer)`` /
``(model, tokenizer, name)`` tuple of objects already loaded. Both models are run on the same
held-out data, the same prompts and the same device, one after the other (one in memory at a time).
Instead of a baseline model, ``baseline_report`` reads the baseline's numbers from a saved
``report.json`` (its baseline side, or its candidate side if it had no baseline).
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import AttnSwapError
from .checks import Checks, evaluate
from .report import Report

TASKS = ("ppl", "passkey", "niah", "mqar", "speed")
DEFAULT_CONTEXTS = (1024, 2048, 4096, 8192)
DEFAULT_PPL = (512, 2048, 8192)
DEFAULT_SPEED = (512, 1024, 2048, 4096, 8192)
NIAH_HAY = 1 << 16  # --data general: niah's haystack is the first 64 K held-out tokens
# which settings must agree with a saved baseline report for a task's numbers to be comparable
COMPARABLE = {"ppl": ("data", "eval_tokens"), "passkey": ("lengths", "depths", "samples", "seed"),
              "niah": ("data", "lengths", "depths", "samples", "seed"),
              "mqar": ("mqar_pairs", "mqar_queries", "samples", "seed"), "speed": ("decode_tokens",)}


@dataclass
class EvalSettings:
    tasks: list[str] = field(default_factory=lambda: ["ppl"])
    data: str = "general"  # general: its in-domain held-out split; general:ood: its out-of-domain set
    seq_len: int = 1024  # the headline perplexity window (always among ppl_lengths)
    eval_tokens: int = 32768  # held-out tokens per perplexity length
    batch_size: int = 4
    ppl_lengths: list[int] | None = None  # None: seq_len plus 512, 2048, 8192 where they fit
    lengths: list[int] | None = None  # passkey and niah; None: 1024..8192 where they fit
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 5
    mqar_pairs: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])
    mqar_queries: int = 16
    speed_lengths: list[int] | None = None  # None: 512..8192 where they fit
    decode_tokens: int = 32
    speed_repeats: int = 2
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    sparsity: float | None = None  # the candidate's load-time sparsity (sparse methods), None = as saved

    def validate(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise AttnSwapError(f"unknown task {bad[0]!r} in --tasks; choose from {', '.join(TASKS)}" if bad
                                else f"--tasks is empty; choose from {', '.join(TASKS)}")
        for name in ("seq_len", "eval_tokens", "batch_size", "samples", "mqar_queries", "speed_repeats"):
            if getattr(self, name) < 1:
                raise AttnSwapError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.decode_tokens < 0:
            raise AttnSwapError(f"--decode-tokens must not be negative (got {self.decode_tokens})")
        for d in self.depths:
            if not 0.0 <= d <= 1.0:
                raise AttnSwapError(f"--depths must lie in [0, 1] (got {d:g})")
        for name in ("ppl_lengths", "lengths", "mqar_pairs", "speed_lengths"):
            v = getattr(self, name)
            if v is not None and (not v or min(v) < 1):
                raise AttnSwapError(f"--{name.replace('_', '-')} needs positive numbers (got {v})")
        if self.ppl_lengths is not None and min(self.ppl_lengths) < 2:
            raise AttnSwapError("--ppl-lengths must be at least 2 tokens")

    def resolve(self, max_len: int | None, max_name: str, notes: list[str]) -> "EvalSettings":
        """Fill the defaults that depend on the models' maximum context; refuse explicit lengths beyond it."""
        cap = max_len or 8192

        def pick(given, defaults, what, extra=0, add=()):
            if given is not None:
                for n in given:
                    if max_len is not None and n + extra > max_len:
                        more = f" plus {extra} decoded tokens" if extra else ""
                        raise AttnSwapError(f"{what} {n}{more} is beyond the maximum of {max_name} ({max_len} positions)")
                return sorted(set(given))
            keep = sorted({n for n in (*defaults, *add) if n + extra <= cap})
            dropped = [n for n in defaults if n + extra > cap]
            if dropped:
                notes.append(f"default {what} {dropped} skipped: beyond the {cap}-position maximum of {max_name}")
            return keep or [cap - extra]

        r = replace(self)
        if "ppl" in self.tasks:
            if self.seq_len > cap and max_len is not None:
                raise AttnSwapError(f"--seq-len {self.seq_len} is beyond the maximum of {max_name} ({max_len} positions)")
            r.ppl_lengths = pick(self.ppl_lengths, DEFAULT_PPL, "--ppl-lengths", add=(self.seq_len,))
            if self.seq_len not in r.ppl_lengths:
                r.ppl_lengths = sorted({*r.ppl_lengths, self.seq_len})
        if {"passkey", "niah"} & set(self.tasks):
            r.lengths = pick(self.lengths, DEFAULT_CONTEXTS, "--lengths")
        if "speed" in self.tasks:
            r.speed_lengths = pick(self.speed_lengths, DEFAULT_SPEED, "--speed-lengths", extra=self.decode_tokens)
        return r


# --- models -----------------------------------------------------------------------------------
class _Subject:
    """A model to evaluate: a spec to load, or objects already in memory."""

    def __init__(self, what: Any, role: str):
        from .. import loading

        self.role = role
        self.model = self.tok = self.source = None
        if isinstance(what, (str, Path)):
            self.name = str(what)
            self.source = loading.resolve(self.name)
            self.config = loading.load_config(self.source)
            loading.check_weight_files(self.source)  # safetensors only: refused before any work
        elif isinstance(what, tuple) and len(what) in (2, 3):
            self.model, self.tok = what[:2]
            self.config = self.model.config
            self.name = what[2] if len(what) == 3 else (getattr(self.config, "_name_or_path", "") or role)
        else:
            raise AttnSwapError(f"the {role} must be a model spec or a (model, tokenizer) tuple, not {type(what).__name__}")
        self.max_len = getattr(self.config, "max_position_embeddings", None)

    def tokenizer(self):
        if self.tok is None:
            from transformers import AutoTokenizer

            from ..loading import _one_line, _quiet

            try:
                with _quiet():
                    self.tok = AutoTokenizer.from_pretrained(self.source.path, **self.source.kwargs())
            except Exception as e:  # noqa: BLE001
                raise AttnSwapError(f"could not load the tokenizer of {self.name!r}: {_one_line(e)}") from None
        return self.tok

    def load(self, device: str, dtype: str, overrides: dict | None = None):
        from .. import loading

        if self.model is not None:
            return self.model, self.tok
        dev = loading.pick_device(device)
        model, tok = loading.load_model(self.source, dtype=loading.pick_dtype(dtype, dev), device=dev,
                                        model_kwargs=overrides)
        return model, tok


def tokenizer_fingerprint(tok) -> dict:
    vocab = tok.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()
    return {"sha256": digest, "size": len(vocab), "eos": tok.eos_token, "bos": tok.bos_token}


def tokenizer_difference(a: dict, b: dict, va: dict | None = None, vb: dict | None = None) -> str | None:
    """How two tokenizers differ, in a few words (None if they are the same)."""
    if a["size"] != b["size"]:
        return f"vocabulary size {a['size']:,} vs {b['size']:,}"
    for k in ("eos", "bos"):
        if a.get(k) != b.get(k):
            return f"{k} token {a.get(k)!r} vs {b.get(k)!r}"
    if a["sha256"] != b["sha256"]:
        if va is not None and vb is not None:
            for t, i in sorted(va.items(), key=lambda kv: kv[1]):
                if vb.get(t) != i:
                    return f"token {t!r} has id {i} vs {vb.get(t)}"
        return "same vocabulary size but different tokens (vocabulary hashes differ)"
    return None


def heldout_ids(data: str, tokenizer, tokens: int | None = None) -> torch.Tensor:
    """The held-out split of ``data``, tokenised exactly as ``convert linearize`` splits it (for
    ``general`` and ``general:ood``, its first ``tokens``)."""
    from ..data import heldout_ids as ids

    return ids(data, tokenizer, tokens)


# --- running ----------------------------------------------------------------------------------
def run_tasks(model, tok, s: EvalSettings, heldout: torch.Tensor | None, name: str) -> dict:
    """Every task of ``s`` on one loaded model -> {task: results}."""
    from . import mqar, niah, passkey, speed
    from .common import HFModel
    from .perplexity import perplexity_at_lengths

    lm = HFModel(model, tok.eos_token_id)
    out: dict = {}
    if "ppl" in s.tasks:
        gated = [m for m in model.modules() if hasattr(m, "reset_density")]
        for m in gated:
            m.reset_density()
        out["ppl"] = perplexity_at_lengths(model, heldout, s.ppl_lengths, eval_tokens=s.eval_tokens,
                                           batch_size=s.batch_size, name=name)
        if gated:  # sparse layers: the fraction of causal key blocks they attended while scoring
            out["density"] = {str(m.layer_idx): m.mean_density for m in gated}
    if "passkey" in s.tasks:
        out["passkey"] = passkey.run(lm, tok, lengths=s.lengths, depths=s.depths, samples=s.samples, seed=s.seed,
                                     label=f"{name} passkey")
    if "niah" in s.tasks:
        from ..data import is_general

        hay = heldout[: max(NIAH_HAY, *s.lengths) + 1] if is_general(s.data) else heldout  # the same for any --eval-tokens
        out["niah"] = niah.run(lm, tok, hay, lengths=s.lengths, depths=s.depths, samples=s.samples, seed=s.seed,
                               label=f"{name} niah")
    if "mqar" in s.tasks:
        out["mqar"] = mqar.run(lm, tok, pairs=s.mqar_pairs, samples=s.samples, queries=s.mqar_queries, seed=s.seed,
                               label=f"{name} mqar")
    if "speed" in s.tasks:
        out["speed"] = speed.measure(model, s.speed_lengths, decode_tokens=s.decode_tokens, repeats=s.speed_repeats,
                                     seed=s.seed, name=name)
    return out


def _side(subject: _Subject, s: EvalSettings, heldout, fingerprint: dict, overrides: dict | None = None) -> dict:
    t0 = time.perf_counter()
    model, tok = subject.load(s.device, s.dtype, overrides)
    try:
        results = run_tasks(model, tok, s, heldout, subject.name)
        dev, dt = str(next(model.parameters()).device), str(next(model.parameters()).dtype).removeprefix("torch.")
    finally:
        if subject.model is None:  # loaded here: free it before the next model loads
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return {"name": subject.name, "tokenizer": fingerprint, "max_positions": subject.max_len, "results": results,
            "device": dev, "dtype": dt, "seconds": time.perf_counter() - t0}


def _check_saved(saved: Report, s: EvalSettings, fp: dict, checks: Checks, device: str, path) -> dict:
    from .report import _Malformed, check_side

    side = saved.baseline or saved.candidate
    try:
        check_side(side, "models.baseline" if saved.baseline else "models.candidate", strict=True)
    except _Malformed as e:
        raise AttnSwapError(f"{path} is not a convert eval report.json: {e}") from None
    diff = tokenizer_difference(fp, side["tokenizer"])
    if diff:
        raise AttnSwapError(f"the candidate's tokenizer differs from the one in {path} ({side['name']}): {diff}")
    ss = saved.settings
    for t in s.tasks:
        if t not in side["results"]:
            raise AttnSwapError(f"{path} has no {t!r} results for {side['name']}; rerun it with --tasks including {t}")
        for k in COMPARABLE[t]:
            mine, theirs = asdict(s)[k], ss.get(k)
            if mine != theirs:
                raise AttnSwapError(f"{t} is not comparable with {path}: --{k.replace('_', '-')} is {mine} here but {theirs} there")
    if "speed" in s.tasks and (checks.max_speed_drop is not None or checks.max_memory_increase is not None):
        theirs = side.get("device", "?")
        if theirs.split(":")[0] != device.split(":")[0]:
            raise AttnSwapError(f"speed checks need the same device: {path} was measured on {theirs}, this run is on {device}")
    return side


def compare(candidate, baseline=None, checks: Checks | dict | None = None, *, baseline_report: str | Path | None = None,
            settings: EvalSettings | None = None, command: str | None = None, **overrides) -> Report:
    """Evaluate ``candidate`` (and ``baseline``, or the numbers in ``baseline_report``) and apply
    ``checks``. Keyword overrides set fields of ``EvalSettings`` (tasks=..., samples=..., ...)."""
    s = replace(settings or EvalSettings(), **overrides)
    if isinstance(s.tasks, str):
        s.tasks = [t.strip() for t in s.tasks.split(",") if t.strip()]
    s.validate()
    checks = Checks(**checks) if isinstance(checks, dict) else (checks or Checks())
    if baseline is not None and baseline_report is not None:
        raise AttnSwapError("give either a baseline model or a baseline report, not both")
    if checks.any and baseline is None and baseline_report is None:
        raise AttnSwapError("regression checks need something to compare with: --baseline MODEL or --baseline-report FILE")

    cand = _Subject(candidate, "candidate")
    base = _Subject(baseline, "baseline") if baseline is not None else None
    saved = Report.load(baseline_report) if baseline_report is not None else None
    tok = cand.tokenizer()
    fp = tokenizer_fingerprint(tok)
    fp_base = None
    if base is not None:
        btok = base.tokenizer()
        fp_base = tokenizer_fingerprint(btok)
        diff = tokenizer_difference(fp, fp_base, tok.get_vocab(), btok.get_vocab())
        if diff:
            raise AttnSwapError(f"candidate {cand.name} and baseline {base.name} have different tokenizers ({diff}); "
                                "compare models that share one")
    subjects = [x for x in (cand, base) if x is not None]
    limits = [(x.max_len, x.name) for x in subjects if x.max_len is not None]
    max_len, max_name = min(limits) if limits else (None, cand.name)
    notes: list[str] = []
    given_ppl = s.ppl_lengths
    s = s.resolve(max_len, max_name, notes)
    if "mqar" in s.tasks:
        from .mqar import prompt_length

        need = prompt_length(tok, max(s.mqar_pairs), s.mqar_queries, s.seed)
        if max_len is not None and need > max_len:
            raise AttnSwapError(f"--mqar-pairs {max(s.mqar_pairs)} needs a {need}-token prompt, beyond the maximum of "
                                f"{max_name} ({max_len} positions)")
    if "passkey" in s.tasks:  # refuse prompts that cannot fit before any model runs
        from .passkey import build_prompt

        build_prompt(tok, min(s.lengths), 0.0, "12345")
    if "niah" in s.tasks:
        from .niah import build_prompt as niah_prompt

        niah_prompt(tok, [0] * min(s.lengths), min(s.lengths), 0.0, "apple", "1234567", 0)
    from ..loading import pick_device

    device = str(pick_device(s.device)) if cand.model is None else str(next(cand.model.parameters()).device)
    side_saved = _check_saved(saved, s, fp, checks, device, baseline_report) if saved is not None else None
    hay = NIAH_HAY if "niah" in s.tasks else 0
    need = max([s.eval_tokens, hay, *(s.ppl_lengths or []), *(s.lengths or [])]) + 1  # general: build only this much
    heldout = heldout_ids(s.data, tok, need) if {"ppl", "niah"} & set(s.tasks) else None
    if heldout is not None and "ppl" in s.tasks and given_ppl is None:
        fits = [n for n in s.ppl_lengths if n <= heldout.numel() or n == s.seq_len]
        if fits != s.ppl_lengths:
            notes.append(f"default --ppl-lengths {sorted(set(s.ppl_lengths) - set(fits))} skipped: longer than the "
                         f"held-out split ({heldout.numel():,} tokens)")
            s.ppl_lengths = fits

    base_side = _side(base, s, heldout, fp_base) if base is not None else side_saved
    cand_side = _side(cand, s, heldout, fp, {"sparsity": s.sparsity} if s.sparsity is not None else None)
    if cand_side["device"].startswith("cpu"):
        notes.append("CPU is the only device in this run: speeds are CPU speeds, and peak memory is the growth of the "
                     "process's resident set size (approximate); the cache sizes are exact")
    env = {"device": cand_side["device"], "dtype": cand_side["dtype"], "torch": torch.__version__,
           "transformers": _version("transformers"), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": command or "attnswap.evals.compare(...)", "cpu_count": os.cpu_count(), "notes": notes,
           "device_note": f"Device: {cand_side['device']} ({cand_side['dtype']})."}
    report = Report(cand_side, base_side, _settings_dict(s), requested_checks=checks.to_dict(), environment=env,
                    baseline_source="run" if saved is None else f"report:{baseline_report}")
    if base_side is not None:
        report.checks = evaluate(checks, cand_side["results"], base_side["results"])
    return report


def _settings_dict(s: EvalSettings) -> dict:
    d = asdict(s)
    d.pop("device")
    return d


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001
        return "?"


def default_report_dir(candidate: str) -> Path:
    """Beside a candidate directory (``runs/x`` -> ``runs/x-eval``), else ``eval-<name>`` here."""
    p = Path(candidate)
    if p.is_dir():
        return p.parent / f"{p.resolve().name}-eval"
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in (p.stem or str(candidate)))
    return Path(f"eval-{safe}")
