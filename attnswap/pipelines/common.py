"""What every pipeline shares: the common settings, input and output checks, loading the model and
the data for training, the resume hint."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import signal
from typing import Optional

from ..errors import AttnSwapError
from ..progress import console


@dataclass
class RunConfig:
    """Settings every pipeline takes (the CLI declares their flags once)."""

    model: str = "llama"
    out: Path | None = None
    data: str = "general"
    steps: int = 1000
    seq_len: int = 1024
    batch_size: int = 8
    seed: int = 0
    eval_tokens: int = 32768
    device: str = "auto"
    dtype: str = "auto"
    overwrite: bool = False
    json_out: Path | None = None
    save_every: int = 200
    checkpoint_dir: Path | None = None
    resume: bool = False
    keep_checkpoints: bool = False
    nan_retries: int = 3
    command: str = field(default="", repr=False)  # the command line, for the resume hint

    def default_out(self, suffix: str) -> Path:
        stem = "smollm2" if self.model.strip().lower() in ("llama", "smollm2") else Path(self.model).stem
        return Path(f"{stem}-{suffix}")


def check_positive(**values) -> None:
    for name, v in values.items():
        if v is not None and v < 1:
            raise AttnSwapError(f"--{name.replace('_', '-')} must be at least 1 (got {v})")


@dataclass
class Loaded:
    device: object
    dtype: object
    main: bool  # this process evaluates and saves (accelerate's main process)
    model: object
    tokenizer: object
    train: object  # (N, seq_len) token ids
    heldout: object  # (M, seq_len) in-domain held-out sequences, or None
    ood: object = None  # out-of-domain sequences (a source training never sees), or None
    info: dict | None = None  # the data's record for the report (name, hash, tokens)


def processes(dev):
    """accelerate's view of the launch: one process unless started by `accelerate launch`."""
    from accelerate import PartialState

    return PartialState(cpu=dev.type == "cpu")


def load_for_training(name, src, device, dtype, data, seq_len, eval_tokens, tokens_needed=None) -> Loaded:
    """Device and dtype (this process's under `accelerate launch`), the model, and the packed data."""
    from .. import loading
    from ..data import check_general, is_general, load_documents, training_data

    dev = loading.pick_device(device)
    procs = processes(dev)
    dev = procs.device if procs.num_processes > 1 else dev
    dt = loading.pick_dtype(dtype, dev)
    check_general(data) if is_general(data) else load_documents(data)  # before the weights: bad data fails fast
    if procs.num_processes > 1 and not procs.is_main_process:
        console.quiet = True  # the main process speaks for all (tracebacks of internal errors still print)
    many = f" in each of {procs.num_processes} processes" if procs.num_processes > 1 else ""
    console.print(f"loading {name} on {dev} ({str(dt).removeprefix('torch.')}){many}")
    net, tok = loading.load_model(src, dtype=dt, device=dev)
    d = training_data(data, tok, seq_len, eval_tokens=eval_tokens,
                      tokens_needed=tokens_needed and tokens_needed * procs.num_processes)
    return Loaded(dev, dt, procs.is_main_process, net, tok, d.train, d.heldout, d.ood, d.info)


def resume_command(command: str, verb: str) -> str:
    """The command line that continues this run (what the user typed, plus --resume)."""
    args = shlex.split(command) if command else sys.argv[1:]
    if verb not in args:
        return f"convert {verb} <the same options> --resume"
    args = ["convert", *args[args.index(verb):]]
    return shlex.join(args if "--resume" in args else [*args, "--resume"])


def stem(model: str) -> str:
    return "smollm2" if model.strip().lower() in ("llama", "smollm2") else (Path(model).stem or "model")


def require_text(**values) -> None:
    """Refuse an empty model name or data source (an empty path would mean the current directory)."""
    for name, v in values.items():
        if v is not None and not str(v).strip():
            flag = "the MODEL argument" if name == "model_argument" else f"--{name.replace('_', '-')}"
            raise AttnSwapError(f"{flag} is empty")


def plan_training_outputs(model, data, out, overwrite, json_out, checkpoint_dir, save_every, resume, nan_retries):
    """Every location a training command writes, checked before anything is loaded; the Checkpointer."""
    from ..distill.checkpoint import Checkpointer
    from ..paths import OutputPlan

    if save_every < 0 or nan_retries < 0:
        raise AttnSwapError("--save-every and --nan-retries must not be negative")
    plan = OutputPlan(model=model, data=data)
    plan.add_replaced_dir("--out", out, overwrite=overwrite)
    root = checkpoint_dir or out.with_name(out.name + ".ckpt")
    plan.add_checkpoint_dir("--checkpoint-dir" if checkpoint_dir else "the checkpoint directory", root)
    plan.add_file("--json", json_out)
    ckpts = Checkpointer(root, save_every)
    ckpts.check_start(resume)
    return ckpts


def save_output(net, tok, out, overwrite, ckpts, keep_checkpoints) -> None:
    """Save (atomically, read back first), then drop the checkpoints; a failure says where the
    trained weights still are."""
    from ..distill.faults import Interrupted, Terminated
    from ..saving import save_converted

    def kept():
        return f"; the trained weights are checkpointed in {ckpts.root}: rerun with --resume" if ckpts.latest() else ""

    try:
        save_converted(net, tok, out, overwrite=overwrite)
    except AttnSwapError as e:
        raise AttnSwapError(f"{e}{kept()}") from None
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM while saving: the temporary output is already gone
        how, sig = ("stopped by SIGTERM", signal.SIGTERM) if isinstance(e, Terminated) else ("interrupted", signal.SIGINT)
        raise Interrupted(f"{how} while saving {out}; nothing was written there{kept()}", sig) from None
    if not keep_checkpoints:
        ckpts.remove()


def write_json(path: Optional[Path], text: str, done: str) -> None:
    from ..paths import write_text

    if path is None:
        return
    try:
        write_text(path, text, "--json")
    except AttnSwapError as e:
        raise AttnSwapError(f"{e} ({done})") from None
