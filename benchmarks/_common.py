"""What the benchmark suites share (run as scripts, so they import this as a sibling module)."""

from __future__ import annotations

import subprocess


def commit() -> str:
    """The short commit of the attnswap being measured ('?' outside a git checkout). ``ATTNSWAP_COMMIT``
    overrides it, for a copied tree whose git metadata is not its own."""
    import os

    import attnswap

    if os.environ.get("ATTNSWAP_COMMIT"):
        return os.environ["ATTNSWAP_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=attnswap.__path__[0]).stdout.strip() or "?"
    except OSError:
        return "?"


def method_spec(spec: str) -> tuple[str, dict]:
    """``name[:key=value,...]`` -> (name, options), e.g. ``lolcats:window=256``: a method made with options
    other than its defaults. Values are ints where they parse as ints."""
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"method {spec!r}: options are key=value pairs after ':'")
        opts[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, opts


def add_tuning_option(ap) -> None:
    """``--tuning KEY=VALUE`` (repeatable): a kernel knob of ``linear_attn.chunk.TUNING`` for this run."""
    ap.add_argument("--tuning", action="append", default=[], metavar="KEY=VALUE",
                    help="set a kernel knob (linear_attn.chunk.TUNING) for this run, e.g. bwd_segments=0, "
                         "bwd_segments_max_per_sm=1 or min_segment_chunks=1 (numbers; repeatable)")


def apply_tuning(items) -> dict:
    """Set each ``KEY=NUMBER`` of ``--tuning`` in ``linear_attn.chunk.TUNING`` (the knob keeps its type:
    0 / 1 for the on-off ones); returns the knobs set. A bad item exits with one line."""
    from attnswap.kernels.linear_attn import chunk

    done = {}
    for item in items:
        key, eq, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not eq or key not in chunk.TUNING or number is None or isinstance(chunk.TUNING[key], tuple):
            knobs = ", ".join(sorted(k for k, v in chunk.TUNING.items() if not isinstance(v, tuple)))
            raise SystemExit(f"--tuning {item}: expected KEY=NUMBER with KEY one of {knobs}")
        if key.endswith("_warps") and (number not in (0, 1, 2, 4, 8, 16) or (key == "hybrid_warps" and number > 8)):
            # Triton takes powers of two; the hybrid forward on 16 made an illegal memory access on the H100
            # (afb04c4), after which the process's CUDA context is unusable
            raise SystemExit(f"--tuning {item}: warps are 0 (the launch's rule) or 1, 2, 4, 8"
                             + ("" if key == "hybrid_warps" else ", 16"))
        chunk.TUNING[key] = done[key] = type(chunk.TUNING[key])(number)
    return done


def stub_triton_launches() -> None:
    """Every Triton kernel launch (plain, autotuned, interpreted) does nothing from here on: what the
    host issues on a GPU can then be counted or timed on a CPU (the outputs are garbage)."""
    from triton.runtime import autotuner, interpreter, jit

    for cls in (jit.JITFunction, autotuner.Autotuner, getattr(interpreter, "InterpretedFunction", None)):
        if cls is not None and hasattr(cls, "run"):
            cls.run = lambda self, *args, **kwargs: None
