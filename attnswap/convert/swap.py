"""Module surgery: put replacement attention modules into a loaded model, in place.

A model's conversion is described by a list of *swaps*, each ``{"method", "layers", "options"}``;
the list is stored in ``config.attnswap["swaps"]`` so that loading rebuilds exactly the same modules.
"""

from __future__ import annotations

from torch import nn

from ..errors import AttnSwapError
from .base import METHODS


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """'all', '' or None -> every layer; otherwise comma-separated indices and ranges, e.g. '0-3,8'.
    A single index may be negative, counting from the end ('-1' is the last layer)."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return list(range(n_layers))
    out: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            a, b = (int(lo), int(hi)) if sep else (int(lo), int(lo))
        except ValueError:
            raise AttnSwapError(f"cannot read layer list {spec!r}: use indices and ranges like '0-3,8'") from None
        if b < a:
            hint = f"; write it as {b}-{a}" if b >= 0 else "; ranges take non-negative indices, lower first"
            raise AttnSwapError(f"layer range {part!r} in {spec!r} runs backwards{hint}")
        given = range(a, b + 1)
        for i in given:
            j = i + n_layers if i < 0 else i
            if not 0 <= j < n_layers:
                raise AttnSwapError(f"layer {i} is out of range: the model has {n_layers} layers (0-{n_layers - 1})")
            out.add(j)
    return sorted(out)


def make_swap(method: str, layers: list[int], options: dict, config) -> dict:
    if method not in METHODS:
        raise AttnSwapError(f"unknown attention method {method!r}; available: {', '.join(sorted(METHODS))}")
    from .spec import check_options

    check_options(method, options)  # what loading the saved model would refuse, refused now
    cls = METHODS[method]
    return {"method": method, "layers": list(layers), "options": {**cls.default_options(config), **options}}


def decoder_layers(model: nn.Module):
    inner = getattr(model, "model", model)
    return inner.layers


def apply_swaps(model: nn.Module, swaps: list[dict]) -> nn.Module:
    layers = decoder_layers(model)
    for swap in swaps:
        if swap["method"] not in METHODS:
            raise AttnSwapError(f"unknown attention method {swap['method']!r}; available: {', '.join(sorted(METHODS))}")
        cls = METHODS[swap["method"]]
        for idx in swap["layers"]:
            old = layers[idx].self_attn
            new = cls(old, model.config, idx, swap.get("options", {}))
            ref = next(old.parameters())
            layers[idx].self_attn = new.to(device=ref.device)
    return model
