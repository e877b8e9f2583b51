"""Fault injection for the reliability tests, kept out of the package: it wraps the loop's own
methods from the outside, so production code carries no test hooks.

In-process (CliRunner)::

    with faults(signal_after_step=3):          # a real SIGINT, sent to this process after global step 3
        runner.invoke(app, [...])

As a program, for faults that end the process (SIGKILL) or that a test wants in a fresh one::

    run_cli(["linearize", ...], cwd=tmp, kill_after_checkpoint=7)
    run_cli(["gqa", ...], cwd=tmp, signal_after_step=2, signum=signal.SIGTERM)

``signal_after_step=N`` sends the signal right after global step N (stage-1 steps count first);
``kill_after_checkpoint=N`` SIGKILLs the process right after the checkpoint of global step N is written.
``rank=R`` (``--rank R``): under a launcher of several processes, only the process of that RANK
faults (the others must notice and stop with it); as a program under a launcher::

    python -m torch.distributed.run --nproc_per_node 2 tests/inject.py --signal-after-step 3 --signum 15 --rank 1 -- ...

(``--signum``: torchrun would take ``--signal`` for an abbreviation of one of its own options)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def faults(*, signal_after_step: int | None = None, signum: int = signal.SIGINT,
           kill_after_checkpoint: int | None = None, rank: int | None = None):
    from attnswap.distill import checkpoint as ck

    if rank is not None and int(os.environ.get("RANK", "0")) != rank:
        yield
        return

    real_done, real_save, real_save_state = ck.StageRun.step_done, ck.Checkpointer.save, ck.Checkpointer.save_state

    def step_done(self, done):
        if signal_after_step is not None and self.offset + done == signal_after_step:
            os.kill(os.getpid(), signum)
        return real_done(self, done)

    def save(self, meta, *a, **kw):
        path = real_save(self, meta, *a, **kw)
        if kill_after_checkpoint is not None and meta["global_step"] == kill_after_checkpoint:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    def save_state(self, meta, *a, **kw):  # the several-process checkpoint
        path = real_save_state(self, meta, *a, **kw)
        if kill_after_checkpoint is not None and meta["global_step"] == kill_after_checkpoint:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    ck.StageRun.step_done, ck.Checkpointer.save, ck.Checkpointer.save_state = step_done, save, save_state
    try:
        yield
    finally:
        ck.StageRun.step_done, ck.Checkpointer.save, ck.Checkpointer.save_state = real_done, real_save, real_save_state


def run_cli(args, *, cwd, signal_after_step=None, signum=signal.SIGINT, kill_after_checkpoint=None, timeout=180):
    """``convert <args>`` in a fresh Python process (this checkout's attnswap) with the given faults."""
    flags = []
    if signal_after_step is not None:
        flags += ["--signal-after-step", str(signal_after_step), "--signal", str(int(signum))]
    if kill_after_checkpoint is not None:
        flags += ["--kill-after-checkpoint", str(kill_after_checkpoint)]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *flags, "--", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _main(argv: list[str]) -> None:
    split = argv.index("--")
    opts, args = argv[:split], argv[split + 1:]
    kw = {}
    for flag, value in zip(opts[::2], opts[1::2]):
        kw[{"--signal-after-step": "signal_after_step", "--signal": "signum", "--signum": "signum",
            "--kill-after-checkpoint": "kill_after_checkpoint", "--rank": "rank"}[flag]] = int(value)
    sys.argv = ["convert", *args]  # what the resume hint repeats
    from attnswap.cli import main

    with faults(**kw):
        main()


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # tests/ holds names (kernels/) that must not shadow installed packages
    _main(sys.argv[1:])
