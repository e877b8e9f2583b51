"""Checkpoints of a distillation run, resuming from them, and the per-stage bookkeeping of the loop.

A run directory (default ``<out>.ckpt`` beside --out) holds the newest complete checkpoint:

    step-00000120/            global step 120 (stage-1 steps count first, then stage-2 steps)
        meta.json             stage, step in it, global step, the run's settings and their hash, counters
        params.safetensors    the stage's trainable parameters + every replacement layer's stage-1 parameters
        state.pt              optimizer and scheduler state, RNG states (torch CPU/CUDA, python random)

Under several processes (``accelerate launch``) a step directory holds what accelerate's
``save_state`` writes instead of params.safetensors and state.pt: ``custom_checkpoint_0.pkl`` (the
stage's trainable parameters, optimizer and scheduler state, written by the main process) and one
``random_states_<rank>.pkl`` per process (each process's RNG states); ``--resume`` reads it back with
``load_state``, and needs the same number of processes.

It is written into a hidden temporary directory, fsynced, and renamed into place; older checkpoints are
deleted only afterwards, so a crash at any moment leaves a complete checkpoint. Loading reads
safetensors and ``torch.load(weights_only=True)`` only. Batches depend only on (seed, global step)
and every piece of state that the next steps read is restored, so a resumed run computes bit for bit
what an uninterrupted run computes (on the same device and software).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from ..convert.base import swapped_modules
from ..errors import AttnSwapError
from ..paths import CHECKPOINT_ENTRY
from ..progress import console
from . import sharding
from .faults import InterruptFlag, Interrupted, StepGuard

FORMAT = 2  # 2: stage 2 of full training is named FULL_STAGE; format 1 called it "LoRA distillation"
READS = (1, FORMAT)
FULL_STAGE = "full-weight distillation"  # stage 2 with DistillConfig.full_train (gqa --train kv / attn / all)


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _why(e: OSError) -> str:
    return "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class Saved:
    path: Path
    meta: dict


class Checkpointer:
    """Where and how often a run is checkpointed; checks that a resumed run has the same settings."""

    def __init__(self, root: Path, save_every: int = 200):
        self.root, self.save_every = Path(root), save_every
        self.settings: dict = {}
        self.hash = ""
        self.resumed: Saved | None = None

    def latest(self) -> Saved | None:
        if not self.root.is_dir():
            return None
        found = [(int(m.group(1)), d) for d in self.root.iterdir()
                 if (m := re.fullmatch(r"step-(\d+)", d.name)) and (d / "meta.json").is_file()]
        if not found:
            return None
        path = max(found)[1]
        try:
            meta = json.loads((path / "meta.json").read_text())
            if not isinstance(meta, dict):
                raise ValueError
        except (OSError, ValueError):
            raise AttnSwapError(f"checkpoint {path} is unreadable (meta.json); delete {self.root} to start over") from None
        return Saved(path, meta)

    def check_start(self, resume: bool) -> None:
        """Before any work: --resume needs a checkpoint, and a fresh run must not bury an old one."""
        if self.root.exists() and not self.root.is_dir():
            raise AttnSwapError(f"the checkpoint directory {self.root} is a file, not a directory")
        last = self.latest()
        if resume and last is None:
            raise AttnSwapError(f"--resume: there is no checkpoint in {self.root} to resume from")
        if not resume and last is not None:
            raise AttnSwapError(f"{self.root} holds a checkpoint of an earlier run ({last.path.name}); "
                                "pass --resume to continue it, or delete that directory to start over")

    def bind(self, settings: dict, resume: bool) -> None:
        """Record the run's settings; with ``resume``, refuse a checkpoint made with other settings."""
        self.settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
        self.hash = settings_hash(self.settings)
        if not resume:
            return
        last = self.latest()
        if last is None:
            raise AttnSwapError(f"--resume: there is no checkpoint in {self.root} to resume from")
        if last.meta.get("format") not in READS:
            raise AttnSwapError(f"checkpoint {last.path} has format {last.meta.get('format')!r}, this attnswap reads "
                                f"{' and '.join(map(str, READS))}; delete {self.root} to start over")
        if last.meta.get("config_hash") != self.hash:
            old = last.meta.get("settings") if isinstance(last.meta.get("settings"), dict) else {}
            diff = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
            raise AttnSwapError(f"the checkpoint in {self.root} was made with different settings "
                                f"({', '.join(diff) or 'unknown'}); rerun with the original ones, or delete "
                                f"{self.root} to start over")
        self.resumed = last

    def save(self, meta: dict, tensors: dict[str, torch.Tensor], state: dict) -> Path:
        from safetensors.torch import save as st_bytes

        g = meta["global_step"]
        final = self.root / f"step-{g:08d}"
        tmp = self.root / f".step-{g:08d}.tmp-{os.getpid()}"
        meta = {"format": FORMAT, "config_hash": self.hash, "settings": self.settings, **meta}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            _write(tmp / "params.safetensors", st_bytes(tensors))
            with open(tmp / "state.pt", "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            _write(tmp / "meta.json", json.dumps(meta, indent=1).encode())
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.root.rmdir()  # only if empty: a directory we just created
            prev = self.latest()
            kept = f"the previous checkpoint ({prev.path.name}) is intact" if prev else "no checkpoint was kept"
            raise AttnSwapError(f"could not write a checkpoint to {self.root}: {_why(e)}; {kept}") from None
        for old in self.root.iterdir():
            if old != final and old.name.startswith(("step-", ".step-")):
                shutil.rmtree(old, ignore_errors=True)
        return final

    def save_state(self, meta: dict, acc) -> Path:
        """The several-process checkpoint: every process calls this at the same step. The main process
        prepares a temporary directory, every process writes its part through ``acc.save_state``, then
        the main process adds meta.json, fsyncs and renames it into place. Every process returns the
        path, or every process raises the same error (so none waits forever for the others)."""
        g = meta["global_step"]
        final = self.root / f"step-{g:08d}"
        tmp = self.root / f".step-{g:08d}.tmp"
        meta = {"format": FORMAT, "config_hash": self.hash, "settings": self.settings, **meta}
        main = acc.is_main_process

        def prepare():
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()

        def finish():
            for f in sorted(tmp.iterdir()):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _write(tmp / "meta.json", json.dumps(meta, indent=1).encode())
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)

        err = _everyone_agrees(acc, _attempt(prepare) if main else None)
        if err is None:
            err = _everyone_agrees(acc, _attempt(lambda: acc.save_state(str(tmp), safe_serialization=True)), any_rank=True)
        if err is None:
            err = _everyone_agrees(acc, _attempt(finish) if main else None)
        if err is not None:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                with contextlib.suppress(OSError):
                    self.root.rmdir()
            prev = self.latest()
            kept = f"the previous checkpoint ({prev.path.name}) is intact" if prev else "no checkpoint was kept"
            raise AttnSwapError(f"could not write a checkpoint to {self.root}: {err}; {kept}")
        if main:
            for old in self.root.iterdir():
                if old != final and old.name.startswith(("step-", ".step-")):
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load_state(self, acc) -> dict:
        """Every process reads its part of the several-process checkpoint (``acc.load_state``)."""
        s = self.resumed
        rngs = sorted(f.name for f in s.path.glob("random_states_*.pkl"))
        if len(rngs) != acc.num_processes or not (s.path / "custom_checkpoint_0.pkl").is_file():
            raise AttnSwapError(f"checkpoint {s.path} is incomplete; delete {self.root} to start over")
        try:
            acc.load_state(str(s.path))
        except AttnSwapError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated or corrupt files
            from ..loading import _one_line

            raise AttnSwapError(f"checkpoint {s.path} is damaged ({_one_line(e)[:200]}); delete {self.root} to start over") from None
        return s.meta

    def load(self) -> tuple[dict, dict[str, torch.Tensor], dict]:
        from safetensors.torch import load_file

        s = self.resumed
        try:
            tensors = load_file(s.path / "params.safetensors")
            state = torch.load(s.path / "state.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated or corrupt files
            from ..loading import _one_line

            first = _one_line(e)[:200]  # torch's unpickling refusal without its weights_only=False advice
            raise AttnSwapError(f"checkpoint {s.path} is damaged ({first}); delete {self.root} to start over") from None
        return s.meta, tensors, state

    def remove(self) -> None:
        """Delete this run's checkpoints, then the directory if that leaves it empty (never anything else)."""
        if not self.root.is_dir():
            return
        for d in self.root.iterdir():
            if CHECKPOINT_ENTRY.fullmatch(d.name) and d.is_dir() and not d.is_symlink():
                shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.root.rmdir()


def _attempt(fn) -> str | None:
    """Run ``fn``; None if it worked, else why not (an OSError, in words)."""
    try:
        fn()
    except OSError as e:
        return _why(e)
    return None


def _everyone_agrees(acc, err: str | None, any_rank: bool = False) -> str | None:
    """The main process's ``err`` (or, with ``any_rank``, the first process's that has one), on every
    process: a failure that only one process saw must stop them all at the same point."""
    from accelerate.utils import gather_object

    if any_rank:
        errs = [e for e in gather_object([err]) if e is not None]
        return errs[0] if errs else None
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([err], from_process=0)[0]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingRun:
    """What the loop needs beyond the maths: checkpoints and resuming, Ctrl-C, non-finite guards.
    With no Checkpointer nothing is written and Ctrl-C behaves as usual."""

    def __init__(self, checkpoints: Checkpointer | None = None, *, max_retries: int = 3,
                 resume_hint: str = "the same command with --resume"):
        self.checkpoints, self.max_retries, self.resume_hint = checkpoints, max_retries, resume_hint
        self.main_process = True
        self.accelerator = None  # set by the loop; several processes checkpoint through it
        self.done_stages: dict[str, dict] = {}
        self.carried: list[torch.nn.Parameter] = []  # changed by a finished stage, frozen since: later checkpoints keep them

    def carry(self, params) -> None:
        """Parameters a stage changed and later stages no longer train (attention-block transfer's
        weights under LoRA): every later checkpoint holds them too, so a resumed run that skips the
        finished stage gets them back."""
        known = {id(p) for p in self.carried}
        self.carried += [p for p in params if id(p) not in known]

    @property
    def processes(self) -> int:
        return 1 if self.accelerator is None else self.accelerator.num_processes

    def slot(self) -> "_StageSlot":
        """The one object registered for accelerate's save_state/load_state (per accelerator): it
        stands for whichever stage is running."""
        acc = self.accelerator
        slot = getattr(acc, "_attnswap_stage_slot", None)
        if slot is None:
            slot = _StageSlot()
            acc.register_for_checkpointing(slot)
            acc._attnswap_stage_slot = slot
        return slot

    def stage(self, name, offset, steps, module, opt, sched, params) -> "StageRun":
        return StageRun(self, name, offset, steps, module, opt, sched, params)


_CURRENT: contextvars.ContextVar[TrainingRun | None] = contextvars.ContextVar("attnswap_run", default=None)


@contextlib.contextmanager
def use_run(run: TrainingRun):
    """Make ``run`` the one the distillation loop uses (``current_run``) inside the block."""
    token = _CURRENT.set(run)
    try:
        yield run
    finally:
        _CURRENT.reset(token)


def current_run() -> TrainingRun:
    return _CURRENT.get() or TrainingRun()


class _StageSlot:
    """accelerate checkpoints registered objects through state_dict/load_state_dict; this one hands
    it the running stage's parameters, optimizer and scheduler (RNG states accelerate saves itself,
    one file per process)."""

    def __init__(self):
        self.stage: StageRun | None = None

    def state_dict(self) -> dict:
        return self.stage.state()

    def load_state_dict(self, state: dict) -> None:
        self.stage.load(state)


def _sharded_optimizer_state(opt, state: dict, convert) -> dict:
    """``state`` (an optimizer state dict) with each sharded parameter's tensors (Adam's moments) passed
    through ``convert(tensor, param)``: gathered whole to save, this process's shard to load. The
    state dict numbers parameters in the order of the optimizer's groups."""
    params = [p for g in opt.param_groups for p in g["params"]]
    out = {}
    for i, st in state["state"].items():
        p = params[int(i)]
        out[i] = {k: convert(v, p) if sharding.is_sharded(p) and torch.is_tensor(v) and v.dim() > 0 else v
                  for k, v in st.items()}
    return {**state, "state": out}


class StageRun:
    """One stage of the loop: where it starts (0, or a checkpoint's step), counters, saving."""

    def __init__(self, run: TrainingRun, name, offset, steps, module, opt, sched, params):
        self.run, self.name, self.offset, self.steps = run, name, offset, steps
        self.opt, self.sched = opt, sched
        trainable = {id(p) for p in params}
        kept = trainable | {id(p) for m in swapped_modules(module) for p in m.transfer_parameters()}
        kept |= {id(p) for p in run.carried}
        self.named = [(n, p) for n, p in module.named_parameters() if id(p) in kept]
        self.trainable = [(n, p) for n, p in self.named if id(p) in trainable]
        self.guard = StepGuard(name, module, run.max_retries)
        self.flag = InterruptFlag()
        self.start, self.tokens, self.ema = 0, 0, None
        self._resume()

    def _resume(self):
        ck = self.run.checkpoints
        if ck is None:
            return
        if self.run.processes > 1:
            self.run.slot().stage = self
        if ck.resumed is None:
            return
        meta = ck.resumed.meta
        if meta.get("processes", 1) != self.run.processes:
            raise AttnSwapError(f"the checkpoint in {ck.root} was written by {meta.get('processes', 1)} process(es); "
                                f"resume it with the same number (this run has {self.run.processes})")
        stage = meta.get("stage")
        if meta.get("format") == 1 and stage == "LoRA distillation" and self.name == FULL_STAGE:
            stage = self.name  # format 1 gave full training's stage 2 the LoRA stage's name
        if stage != self.name:
            if meta.get("global_step", 0) > self.offset:  # a later stage's checkpoint: this one is done
                done = meta.get("done_stages", {}).get(self.name, {})
                self.start, self.tokens, self.ema = self.steps, done.get("tokens", 0), done.get("ema")
                self.run.done_stages[self.name] = dict(done)  # with what the stage recorded (calibration's alphas)
            return
        if self.run.processes > 1:
            meta = ck.load_state(self.run.accelerator)  # calls self.load, and restores every process's RNG
        else:
            meta, tensors, state = ck.load()
            self.load({**state, "params": tensors})
            _set_rng_state(state["rng"])
        self.start, self.tokens, self.ema = meta["step"], meta["tokens"], meta["ema"]
        self.guard.fails = meta["fails"]
        self.run.done_stages.update(meta.get("done_stages", {}))
        console.print(f"resuming {self.name} at step {self.start}/{self.steps} from {ck.resumed.path}")

    def load(self, state: dict) -> None:
        """Parameters, optimizer and scheduler from a checkpoint (either format)."""
        ck, tensors = self.run.checkpoints, state["params"]
        if sorted(n for n, _ in self.named) != sorted(tensors):
            raise AttnSwapError(f"checkpoint {ck.resumed.path} does not hold this model's {self.name} parameters; "
                                f"delete {ck.root} to start over")
        with torch.no_grad():
            for n, p in self.named:
                if sharding.is_sharded(p):  # this process's shard of the whole tensor (every process calls this)
                    sharding.local(p).copy_(sharding.local(sharding.scatter(tensors[n].to(p.dtype), p)))
                else:
                    p.data = tensors[n].to(p.device, p.dtype)
        opt_state = state["optimizer"]
        if any(sharding.is_sharded(p) for _, p in self.named):
            opt_state = _sharded_optimizer_state(self.opt, opt_state, sharding.scatter)
        self.opt.load_state_dict(opt_state)
        self.sched.load_state_dict(state["scheduler"])

    def state(self) -> dict:
        """Parameters, optimizer and scheduler. Sharded (FSDP) parameters and their optimizer state are
        gathered whole (a collective: every process calls this, accelerate's save_state does), so a
        sharded checkpoint has the unsharded one's contents and is written by the main process."""
        opt_state = self.opt.state_dict()
        if any(sharding.is_sharded(p) for _, p in self.named):
            opt_state = _sharded_optimizer_state(self.opt, opt_state, lambda t, _p: sharding.full(t).to("cpu"))
        return {"params": {n: sharding.full(p.detach()).to("cpu").contiguous() for n, p in self.named},
                "optimizer": opt_state, "scheduler": self.sched.state_dict()}

    def __enter__(self):
        if self.run.checkpoints is not None:
            self.flag.__enter__()
        return self

    def __exit__(self, exc_type, *exc):
        self.flag.__exit__()
        if exc_type is None:  # a stage may add its own results to this record (later checkpoints keep it)
            self.run.done_stages.setdefault(self.name, {}).update(tokens=self.tokens, ema=self.ema)
        return False

    def add_loss(self, value: float) -> None:
        if math.isfinite(value):
            self.ema = value if self.ema is None else 0.9 * self.ema + 0.1 * value

    def finite(self, step: int, loss, forward) -> bool:
        return self.guard.check(step, loss, self.trainable, self.opt, self.sched, forward)

    def step_done(self, done: int) -> None:
        """After step ``done`` (1-based within the stage): periodic checkpoint, Ctrl-C or SIGTERM."""
        ck = self.run.checkpoints
        if ck is None:
            return
        due = ck.save_every > 0 and (done % ck.save_every == 0 or done == self.steps)
        if self.run.processes > 1:
            self._agree_on_interrupt()
            if due or self.flag.hit:
                self.save(done)  # every process takes part
        elif due or self.flag.hit:
            self.save(done)
        if self.flag.hit:
            raise Interrupted(f"{self.flag.description} during {self.name} at step {done}/{self.steps}; checkpoint "
                              f"saved in {ck.root}; resume with: {self.run.resume_hint}", self.flag.signum)

    def _agree_on_interrupt(self) -> None:
        """A signal may reach the processes at different steps (or only one of them): they all stop
        after the step in which any of them saw one, so that they checkpoint together."""
        acc = self.run.accelerator
        mine = torch.tensor([float(self.flag.signum or signal.SIGINT) if self.flag.hit else 0.0], device=acc.device)
        seen = acc.gather(mine).max().item()
        if seen and not self.flag.hit:
            self.flag.hit, self.flag.signum = True, int(seen)

    def save(self, done: int) -> Path:
        meta = {"stage": self.name, "step": done, "steps": self.steps, "global_step": self.offset + done,
                "fails": self.guard.fails, "tokens": self.tokens, "ema": self.ema,
                "done_stages": self.run.done_stages, "params": [n for n, _ in self.named]}
        if self.run.processes > 1:
            return self.run.checkpoints.save_state({**meta, "processes": self.run.processes}, self.run.accelerator)
        state = self.state()
        tensors = state.pop("params")
        return self.run.checkpoints.save(meta, tensors, {**state, "rng": _rng_state()})
