"""Faults the distillation loop survives: non-finite numbers, Ctrl-C, and hooks that let tests kill it.

Non-finite loss or gradients: the step makes no update, a warning names where the first non-finite
value came from, and the learning rate of the stage is halved. After ``max_retries`` such steps in a
row the run stops with ``NonFiniteError`` (one line: stage, step, module or parameter, layer).
A step whose numbers are finite resets the count; the lowered learning rate stays.

Ctrl-C (SIGINT): the first one lets the current step finish; the loop then writes a checkpoint and
raises ``Interrupted`` (exit code 130, one line saying how to resume). A second Ctrl-C stops at once.

Test hooks (environment variables read by the loop; for the test suite, not for users):
- ``ATTNSWAP_TEST_KILL_AFTER_CHECKPOINT=N``: SIGKILL this process right after the checkpoint of
  global step N has been written (a crash at a known point);
- ``ATTNSWAP_TEST_SIGINT_AFTER_STEP=N``: send this process SIGINT right after global step N.
"""

from __future__ import annotations

import os
import re
import signal

import torch

from ..convert.base import swapped_modules
from ..errors import AttnSwapError
from ..hf_compat import strip_peft_prefix
from ..progress import console

KILL_HOOK = "ATTNSWAP_TEST_KILL_AFTER_CHECKPOINT"
SIGINT_HOOK = "ATTNSWAP_TEST_SIGINT_AFTER_STEP"


class NonFiniteError(AttnSwapError):
    """Training kept producing NaN/inf; the message names the stage and the layer."""

    exit_code = 3


class Interrupted(AttnSwapError):
    """Ctrl-C during training; a checkpoint was written."""

    exit_code = 130


def test_hook(name: str, global_step: int) -> None:
    """Act on a test hook if its variable names this global step (see the module docstring)."""
    want = os.environ.get(name)
    if not want or int(want) != global_step:
        return
    os.kill(os.getpid(), signal.SIGKILL if name == KILL_HOOK else signal.SIGINT)


class InterruptFlag:
    """While active, the first SIGINT only sets ``hit``; a second one raises KeyboardInterrupt."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._old = None
        return self

    def _handler(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True
        console.print("interrupt: finishing this step and saving a checkpoint (Ctrl-C again stops at once)")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
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


def nonfinite_grads(named_params: list[tuple[str, torch.nn.Parameter]]) -> list[str]:
    """Names of parameters whose gradient holds NaN or inf (one device sync)."""
    have = [(n, p.grad) for n, p in named_params if p.grad is not None]
    if not have:
        return []
    ok = torch.stack([g.isfinite().all() for _, g in have])
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

