"""What every pipeline shares: the common settings, input and output checks, loading the model and
the data for training, the resume hint."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
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
    given: frozenset = field(default=frozenset(), repr=False)  # settings given explicitly (the CLI's flags)

    def default_out(self, suffix: str) -> Path:
        return Path(f"{stem(self.model)}-{suffix}")


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc), or None where that cannot be read."""
    import os

    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class Clock:
    """A conversion's wall time by phase (loading, evaluation, training, saving), for the summary: where
    a run's minutes go besides its training steps. Every phase ends by reading a value on the host
    (a perplexity, a loss, a written file), so on a GPU these are device-inclusive."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}
        # before the clock: the interpreter, the imports, the command line (None where unknown)
        self.startup = process_age()

    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def timed(self, name: str, fn):
        """``fn``, each call of it counted in phase ``name``."""
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return call

    def wall(self) -> float:
        return time.perf_counter() - self.t0

    def report(self) -> dict:
        """Seconds by phase, and ``other`` (checks, conversion, the rest) so that they add up to the wall time."""
        wall = self.wall()
        return {**{k: round(v, 2) for k, v in self.seconds.items()}, "other": round(max(0.0, wall - sum(self.seconds.values())), 2)}


def check_positive(**values) -> None:
    for name, v in values.items():
        if v is not None and v < 1:
            raise AttnSwapError(f"--{name.replace('_', '-')} must be at least 1 (got {v})")


def refuse_given(cfg: RunConfig, names, why: str) -> None:
    """Refuse settings given explicitly that the chosen mode does not use."""
    for name in names:
        if name in cfg.given:
            raise AttnSwapError(f"--{name.replace('_', '-')} does not apply to {why}")


def check_seq_len(seq_len: int, mcfg) -> None:
    max_len = getattr(mcfg, "max_position_embeddings", None)
    if max_len is not None and seq_len > max_len:
        raise AttnSwapError(f"--seq-len {seq_len} is beyond the model's maximum of {max_len} positions")


def check_convertible(model: str, mcfg) -> None:
    """A model of a supported family that is not converted already."""
    from ..convert import family_of

    if mcfg.model_type.startswith("attnswap_"):
        raise AttnSwapError(f"{model} is already a converted attnswap model")
    family_of(mcfg.model_type)


def tokens_hash(seqs) -> str:
    """The training tokens' fingerprint in a checkpoint's settings (a resumed run must read the same)."""
    return hashlib.sha256(seqs.contiguous().numpy().tobytes()).hexdigest()


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
    processes: int = 1  # how many processes the launch started


def processes(dev):
    """accelerate's view of the launch: one process unless started by `accelerate launch`."""
    from accelerate import PartialState

    return PartialState(cpu=dev.type == "cpu")


def sharded_launch(cfg: RunConfig, verb: str, supported: bool = True) -> bool:
    """Whether this launch asks for FSDP (``sharding.wanted``: an accelerate config with distributed_type
    FSDP, i.e. ACCELERATE_USE_FSDP=true, and several processes), checked before anything is loaded. A
    command that cannot run sharded is refused."""
    from .. import loading
    from ..distill import sharding

    try:
        dev = loading.pick_device(cfg.device)
    except AttnSwapError:
        return False  # refused where it always was (load_for_training), after the model's own checks
    if not sharding.wanted(processes(dev)):
        return False
    if not supported:
        raise AttnSwapError(f"{verb} does not run sharded (FSDP) yet: launch it without FSDP "
                            "(examples/accelerate/ddp.yaml) or on one process; see docs/MULTIGPU.md")
    return True


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
    return Loaded(dev, dt, procs.is_main_process, net, tok, d.train, d.heldout, d.ood, d.info, procs.num_processes)


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


def plan_training_outputs(cfg: RunConfig, out: Path):
    """Every location a training command writes (``out``, the checkpoints, --json), checked before
    anything is loaded; the Checkpointer."""
    from ..distill.checkpoint import Checkpointer
    from ..paths import OutputPlan

    if cfg.save_every < 0 or cfg.nan_retries < 0:
        raise AttnSwapError("--save-every and --nan-retries must not be negative")
    plan = OutputPlan(model=cfg.model, data=cfg.data)
    plan.add_replaced_dir("--out", out, overwrite=cfg.overwrite)
    root = cfg.checkpoint_dir or out.with_name(out.name + ".ckpt")
    plan.add_checkpoint_dir("--checkpoint-dir" if cfg.checkpoint_dir else "the checkpoint directory", root)
    plan.add_file("--json", cfg.json_out)
    ckpts = Checkpointer(root, cfg.save_every)
    ckpts.check_start(cfg.resume)
    return ckpts


def save_output(cfg: RunConfig, net, tok, out, ckpts, state_dict=None) -> None:
    """Save (atomically, read back first), then drop the checkpoints; a failure says where the
    trained weights still are. ``state_dict``: the weights to write instead of ``net``'s own (a
    sharded run's, gathered to the main process by ``gather_sharded``)."""
    from ..distill.faults import Interrupted, Terminated
    from ..saving import save_converted

    def kept():
        return f"; the trained weights are checkpointed in {ckpts.root}: rerun with --resume" if ckpts.latest() else ""

    try:
        save_converted(net, tok, out, overwrite=cfg.overwrite, state_dict=state_dict)
    except AttnSwapError as e:
        raise AttnSwapError(f"{e}{kept()}") from None
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM while saving: the temporary output is already gone
        how, sig = ("stopped by SIGTERM", signal.SIGTERM) if isinstance(e, Terminated) else ("interrupted", signal.SIGINT)
        raise Interrupted(f"{how} while saving {out}; nothing was written there{kept()}", sig) from None
    if not cfg.keep_checkpoints:
        ckpts.remove()


def save_run(cfg: RunConfig, ld, net, out, ckpts, shard: bool) -> bool:
    """The end of every pipeline: a sharded run gathers its whole model to the main process (every
    process must call this), then the main process saves it (``save_output``). False on the other
    processes, which have nothing more to report."""
    state = None
    if shard:  # the whole model, LoRA merged, to the main process's CPU
        net, state = gather_sharded(net)
    if not ld.main:
        return False
    save_output(cfg, net, ld.tokenizer, out, ckpts, state_dict=state)
    return True


def gather_sharded(net):
    """A sharded run's result for saving: (the plain model, for its config and save_pretrained; the
    whole model's state dict with LoRA merged, on the main process's CPU, empty on the others). Every
    process must call it."""
    from ..distill import sharding

    state = sharding.merged_state_dict(net, main_only=True)
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    return base, state


def write_json(path: Optional[Path], text: str, done: str) -> None:
    from ..paths import write_text

    if path is None:
        return
    try:
        write_text(path, text, "--json")
    except AttnSwapError as e:
        raise AttnSwapError(f"{e} ({done})") from None


def check_share(flag: str, fraction: float) -> None:
    """A share of the training rows (--retrieval-mix, --teacher-text): in [0, 1)."""
    if not 0 <= fraction < 1:  # also refuses NaN
        raise AttnSwapError(f"{flag} must be at least 0 and below 1 (got {fraction:g})")


def retrieval_mix(seqs, tokenizer, fraction: float, seed: int):
    """The training sequences with ``fraction`` of them rewritten to carry retrieval (attnswap/synthetic.py),
    and how many were (rows too short for the smallest insertion stay as they are)."""
    from ..synthetic import build_mix

    mix = build_mix(seqs, tokenizer, fraction=fraction, seed=seed)
    return mix.ids, len(mix.rows)
