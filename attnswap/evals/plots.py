"""PNG plots of a report (matplotlib, Agg backend: no display needed).

Each function takes ``{label: results}`` (one or two models) and a path, draws what those results
hold, and returns the path, or None when there is nothing to draw.
"""

from __future__ import annotations

from pathlib import Path

COLORS = ("#1f77b4", "#d62728")  # baseline blue, candidate red
MARKERS = ("o", "s")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(d: dict) -> tuple[list[int], list]:
    keys = sorted(d, key=lambda k: float(k))
    return [float(k) for k in keys], [d[k] for k in keys]


def _style(ax, title: str, xlabel: str, ylabel: str, logx: bool = True):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, alpha=0.3)


def ppl(models: dict[str, dict], path: Path) -> Path | None:
    models = {k: v["ppl"] for k, v in models.items() if "ppl" in v}
    if not models:
        return None
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (name, r) in enumerate(models.items()):
        xs, ys = _series({k: v["ppl"] for k, v in r["by_length"].items()})
        a.plot(xs, ys, marker=MARKERS[i], color=COLORS[i], label=name)
        buckets = r["by_position"]["buckets"]
        mids = [(bk["from"] + bk["to"]) / 2 for bk in buckets]
        b.plot(mids, [bk["ppl"] for bk in buckets], marker=MARKERS[i], color=COLORS[i], label=name)
    _style(a, "perplexity vs context length", "context length (tokens)", "held-out perplexity")
    n = next(iter(models.values()))["by_position"]["length"]
    _style(b, f"perplexity by token position ({n}-token windows)", "token position (bucket middle)", "perplexity")
    for ax in (a, b):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speed(models: dict[str, dict], path: Path) -> Path | None:
    models = {k: v["speed"] for k, v in models.items() if "speed" in v}
    if not models:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    exact = all(r.get("exact_memory") for r in models.values())
    for i, (name, r) in enumerate(models.items()):
        rows = r["by_length"]
        for ax, key, scale in ((axes[0], "prefill_tok_s", 1), (axes[1], "decode_tok_s", 1)):
            xs, ys = _series({k: v[key] for k, v in rows.items() if v.get(key) is not None})
            ax.plot(xs, ys, marker=MARKERS[i], color=COLORS[i], label=name)
        xs, ys = _series({k: v["cache_bytes"] / 2**20 for k, v in rows.items()})
        axes[2].plot(xs, ys, marker=MARKERS[i], color=COLORS[i], label=f"{name}: cache")
        xs, ys = _series({k: v["peak_memory_bytes"] / 2**20 for k, v in rows.items()})
        axes[2].plot(xs, ys, marker=MARKERS[i], color=COLORS[i], linestyle="--",
                     label=f"{name}: peak" + ("" if exact else " RSS growth (approx.)"))
    dev = ", ".join(sorted({r["device"] for r in models.values()}))
    _style(axes[0], f"prefill throughput ({dev})", "context length (tokens)", "tokens/s")
    _style(axes[1], f"decode throughput after the context ({dev})", "context length (tokens)", "tokens/s")
    _style(axes[2], "memory", "context length (tokens)", "MiB")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def niah(models: dict[str, dict], path: Path) -> Path | None:
    models = {k: v["niah"] for k, v in models.items() if "niah" in v}
    if not models:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(models), figsize=(1.2 + 4.2 * len(models), 3.6), squeeze=False)
    im = None
    for ax, (name, r) in zip(axes[0], models.items()):
        lengths = sorted(r["grid"], key=int)
        depths = sorted(r["grid"][lengths[0]], key=float)
        grid = [[r["grid"][n][d] for n in lengths] for d in depths]
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), depths)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{name}: {100 * r['accuracy']:.0f}% found", fontsize=10)
        for y, row in enumerate(grid):
            for x, v in enumerate(row):
                ax.text(x, y, f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy", fraction=0.05)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def recall(models: dict[str, dict], path: Path) -> Path | None:
    has = [t for t in ("passkey", "mqar") if any(t in v for v in models.values())]
    if not has:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(has), figsize=(5 * len(has), 3.6), squeeze=False)
    for ax, t in zip(axes[0], has):
        for i, (name, r) in enumerate(models.items()):
            if t not in r:
                continue
            xs, ys = _series(r[t]["by_length" if t == "passkey" else "by_pairs"])
            ax.plot(xs, [100 * y for y in ys], marker=MARKERS[i], color=COLORS[i], label=name)
        if t == "passkey":
            _style(ax, "passkey retrieval (mean over depths)", "context length (tokens)", "accuracy (%)")
        else:
            _style(ax, "multi-query associative recall", "key-value pairs in context", "accuracy (%)")
        ax.set_ylim(-5, 105)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def all_plots(models: dict[str, dict], folder: Path) -> dict[str, str]:
    """Draw every plot the results allow into ``folder``; {plot name: file name}."""
    out = {}
    for name, fn in (("ppl", ppl), ("speed", speed), ("niah", niah), ("recall", recall)):
        p = fn(models, Path(folder) / f"{name}.png")
        if p is not None:
            out[name] = p.name
    return out


def calibration(alpha: dict, probe: dict | None, streaming: list, path: Path, exact: dict | None = None) -> Path | None:
    """Calibrated alpha beside the retrieval-probe score. Per layer (loza): bars, the streaming layers
    hatched, the probe per layer as a line on the right axis, and the probe per KV head as a second
    panel when it has them. Per KV head (``linearize --exact-heads``: each alpha value is a list): a
    layer x head map of alpha with the heads kept exact (``exact``: {layer: [heads]}) boxed, beside the
    same map of the probe."""
    if not alpha:
        return None
    if any(isinstance(v, (list, tuple)) for v in alpha.values()):
        return _head_calibration(alpha, probe, exact or {}, path)
    plt = _plt()
    heads = (probe or {}).get("head") or {}
    fig, axes = plt.subplots(1, 2 if heads else 1, figsize=(12 if heads else 7, 3.8), squeeze=False)
    a = axes[0][0]
    layers = sorted(int(k) for k in alpha)
    vals = [alpha[str(i)] if str(i) in alpha else alpha[i] for i in layers]
    bars = a.bar(layers, vals, color=COLORS[0], alpha=0.8, label="alpha (exact weight)")
    for i, bar in zip(layers, bars):
        if i in streaming:
            bar.set_hatch("//")
            bar.set_color(COLORS[1])
    _style(a, "calibrated alpha per layer (red: streaming)", "layer", "alpha", logx=False)
    a.set_ylim(0, 1)
    score = (probe or {}).get("layer") or {}
    if score:
        b = a.twinx()
        b.plot(layers, [score.get(i, score.get(str(i), 0.0)) for i in layers], color="black", marker="o",
               label="retrieval probe")
        b.set_ylabel("attention mass on the fact (teacher)")
        b.set_ylim(bottom=0)
    if heads:
        _head_map(fig, axes[0][1], [_get(heads, i, []) for i in layers], layers, "retrieval probe per KV head")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _get(d: dict, i: int, default=None):
    return d.get(str(i), d.get(i, default))


def _head_map(fig, ax, grid: list, layers: list[int], title: str, lo=None, hi=None) -> None:
    """``grid`` (one list of per-KV-head values per layer) as a KV head x layer image on ``ax``."""
    im = ax.imshow([list(r) for r in zip(*grid)], aspect="auto", cmap="viridis", vmin=lo, vmax=hi,
                   extent=(layers[0] - 0.5, layers[-1] + 0.5, len(grid[0]) - 0.5, -0.5))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("layer")
    ax.set_ylabel("KV head")
    ax.set_yticks(range(len(grid[0])))  # whole heads, not matplotlib's half steps
    fig.colorbar(im, ax=ax)


def _head_calibration(alpha: dict, probe: dict | None, exact: dict, path: Path) -> Path:
    from matplotlib.patches import Rectangle

    plt = _plt()
    layers = sorted(int(k) for k in alpha)
    heads = (probe or {}).get("head") or {}
    fig, axes = plt.subplots(1, 2 if heads else 1, figsize=(13 if heads else 7, 3.8), squeeze=False)
    maps = [("calibrated alpha per KV head (boxed: kept exact)", [_get(alpha, i) for i in layers], (0, 1))]
    if heads:
        maps.append(("retrieval probe per KV head (teacher)", [_get(heads, i, []) for i in layers], (None, None)))
    for ax, (title, grid, (lo, hi)) in zip(axes[0], maps):
        _head_map(fig, ax, grid, layers, title, lo, hi)
        for i in layers:
            for h in _get(exact, i, []):
                ax.add_patch(Rectangle((i - 0.5, h - 0.5), 1, 1, fill=False, edgecolor=COLORS[1], linewidth=2))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
