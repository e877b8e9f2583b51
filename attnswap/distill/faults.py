"""Faults the distillation loop survives: non-finite numbers, Ctrl-C and SIGTERM.

Non-finite loss or gradients: the step makes no update, a warning names where the first non-finite
value came from, and the learning rate of the stage is halved. After ``max_retries`` such steps in a
row the run stops with ``NonFiniteError`` (one line: stage, step, module or parameter, layer).
A step whose numbers are finite resets the count; the lowered learning rate stays.

Ctrl-C (SIGINT) or SIGTERM (what ``timeout``, ``kill`` and job schedulers send): the first one lets
the current step finish; the loop then writes a checkpoint and raises ``Interrupted`` (exit code 130
for SIGINT, 143 for SIGTERM; one line saying how to resume). A second signal stops at once.
"""

from __future__ import annotations

import re
import signal

import torch

from ..convert.base import swapped_modules
from ..errors import AttnSwapError
from ..hf_compat import strip_peft_prefix
from ..progress import console

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class NonFiniteError(AttnSwapError):
    """Training kept producing NaN/inf; the message names the stage and the layer."""

    exit_code = 3


class Interrupted(AttnSwapError):
    """Ctrl-C or SIGTERM during training; a checkpoint was written."""

    exit_code = 130

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum or signal.SIGINT)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop: unwinds like Ctrl-C (temporary outputs are removed)."""


def terminate_like_interrupt(signum, frame):
    """A SIGTERM handler for the whole command: raise, so that cleanup runs, instead of dying at once."""
    raise Terminated


class InterruptFlag:
    """While active, the first SIGINT or SIGTERM only sets ``hit`` (and ``signum``); a second one
    raises KeyboardInterrupt (Terminated for SIGTERM)."""

    def __init__(self):
        self.hit = False
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave the signals alone
                break
        return self

    def _handler(self, signum, frame):
        if self.hit:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.hit, self.signum = True, signum
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
        console.print(f"{what}: finishing this step and saving a checkpoint ({again} again stops at once)")

    @property
    def description(self) -> str:
        return "interrupted" if self.signum in (None, signal.SIGINT) else f"stopped by {signal.Signals(self.signum).name}"

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        return False


def _display(name: str) -> str:
    return strip_peft_prefix(name)


def _layer_of(name: str) -> str:
    m = re.search(r"layers\.(\d+)\.", name + ".")
    return f"layer {m.group(1)}" if m else "no decoder layer"


def _nonfinite(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.is_floating_point() and not bool(torch.isfinite(x).all())
    if isinstance(x, dict):
        return any(_nonfinite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_nonfinite(v) for v in x)
    return False


def locate_nonfinite(module: torch.nn.Module, forward) -> str:
    """Run ``forward()`` again with hooks and name where the first non-finite value appeared: the
    first module whose output is not finite (children finish before their parents, so the innermost
    one), or else a replacement layer whose transfer loss is not finite."""
    names = {m: n for n, m in module.named_modules()}
    first: list[str] = []

    def hook(mod, args, out):
        if not first and _nonfinite(out):
            first.append(names[mod])

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            forward()
    except Exception:  # noqa: BLE001 - best effort: we are already reporting a failure
        pass
    finally:
        for h in handles:
            h.remove()
    if first:
        return f"{_display(first[0])} ({_layer_of(first[0])})"
    for m in swapped_modules(module):
        if m.transfer_loss is not None and _nonfinite(m.transfer_loss):
            return f"the transfer loss of {_display(names[m])} (layer {m.layer_idx})"
    return "no module (the forward pass was finite when repeated)"


def _norms_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor's 2-norm is finite: one multi-tensor launch per device and dtype and one
    sync per device, where an element-wise check costs four launches a tensor (a LoRA step has 330
    gradients). A NaN or inf element makes its norm non-finite; so can a finite one past ~1e19 (the
    square overflows), which is why a False is checked element by element."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    by_device: dict = {}
    for (dev, _), ts in groups.items():
        by_device.setdefault(dev, []).append(torch.stack(torch._foreach_norm(ts)).float())
    return all(bool(torch.cat(ns).isfinite().all()) for ns in by_device.values())


def nonfinite_grads(named_params: list[tuple[str, torch.nn.Parameter]]) -> list[str]:
    """Names of parameters whose gradient holds NaN or inf (one device sync)."""
    from .sharding import full

    have = [(n, full(p.grad)) for n, p in named_params if p.grad is not None]  # every process sees every NaN
    if not have or _norms_finite([g for _, g in have]):
        return []
    ok = torch.stack([g.isfinite().all() for _, g in have])  # element by element: a norm may overflow
    if bool(ok.all()):
        return []
    return [n for (n, _), good in zip(have, ok.tolist()) if not good]


class StepGuard:
    """Per-stage bookkeeping of non-finite steps: skip, halve the learning rate, give up eventually."""

    def __init__(self, stage: str, module: torch.nn.Module, max_retries: int = 3):
        self.stage, self.module, self.max_retries, self.fails = stage, module, max_retries, 0

    def check(self, step: int, loss: torch.Tensor, named_params, opt, sched, forward) -> bool:
        """True if the step may update the weights; False if it is skipped. ``forward`` re-runs the
        step's loss (only on failure, to find the module that produced the first NaN/inf)."""
        if not bool(torch.isfinite(loss.detach()).all()):
            what = f"non-finite loss ({loss.item()}) first produced by {locate_nonfinite(self.module, forward)}"
        else:
            bad = nonfinite_grads(named_params)
            if not bad:
                self.fails = 0
                return True
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            what = f"non-finite gradient in {_display(bad[0])}{more} ({_layer_of(bad[0])})"
        self.fails += 1
        if self.fails > self.max_retries:
            raise NonFiniteError(f"{self.stage} stopped at step {step + 1}: {what}; still non-finite after "
                                 f"{self.max_retries} retries at lower learning rates")
        for g in opt.param_groups:
            g["lr"] *= 0.5
        sched.base_lrs = [b * 0.5 for b in sched.base_lrs]
        console.print(f"[yellow]warning:[/yellow] {self.stage} step {step + 1}: {what}; step skipped, learning rate "
                      f"halved (retry {self.fails}/{self.max_retries})", highlight=False, soft_wrap=True)
        return False

