"""The one place that checks the ``attnswap`` entry of a converted model's config.json.

    "attnswap": {"version": "0.1.0", "source_model": "llama",
                 "swaps": [{"method": "lolcats", "layers": [0, 1], "options": {"window": 64, ...}}]}

``validate_attnswap_config`` turns anything else (missing keys, wrong types, an unknown method or
option, layers out of range or converted twice, a version newer than the installed attnswap) into a
one-line ``AttnSwapError``, and returns a normalised copy. It runs when a converted model class is
built (``modeling.py``) and when the CLI reads a config (``loading.load_config``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

from ..errors import AttnSwapError
from .base import METHODS

# Which options a method takes, and their types, come from its ``default_options`` (so a new option
# or method needs no change here); options it reads without a default, and lower bounds, are listed.
OPTIONAL = {"use_linear": False}
LOWER_BOUNDS = {"window": 1, "feature_dim": 1, "sinks": 0, "meta_tokens": 0, "block": 1, "gate_dim": 2,
                "sparsity": 0, "threshold": 0, "token_budget": 0, "sink_blocks": 0, "local_blocks": 1}
UPPER_BOUNDS = {"sparsity": 1, "threshold": 1}  # sparsity below 1 (exclusive), threshold at most 1
_STUB = SimpleNamespace(hidden_size=64, num_attention_heads=1, num_key_value_heads=1, head_dim=64, num_hidden_layers=1)


def _bad(msg: str) -> AttnSwapError:
    return AttnSwapError(f"malformed attnswap config: {msg}")


def _version_tuple(v) -> tuple[int, ...]:
    if not isinstance(v, str):
        raise _bad(f"'version' must be a string, not {type(v).__name__}")
    from packaging.version import InvalidVersion, Version

    try:
        return Version(v).release
    except InvalidVersion:
        raise _bad(f"'version' {v[:40]!r} is not a version number") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _known_options(method: str) -> dict | None:
    try:
        cls = METHODS[method]
        return {**OPTIONAL, **cls.optional_options, **cls.default_options(_STUB)}
    except Exception:  # noqa: BLE001 - a method whose defaults need more of the config: check scalars only
        return None


def option_names(method: str) -> set[str] | None:
    """The options ``method`` takes (None if they cannot be listed without a real model config)."""
    known = _known_options(method)
    return None if known is None else set(known)


def check_options(method: str, options: dict) -> None:
    """Refuse options a method does not take, or of the wrong type: what loading the saved config would
    refuse, said at conversion time (``make_swap``) instead."""
    for name, value in options.items():
        _check_option(method, name, value, bad=AttnSwapError)


def _check_option(method: str, name, value, bad=_bad) -> None:
    known = _known_options(method)
    if known is None:
        if not isinstance(value, (bool, int, float, str)) or isinstance(value, float) and not math.isfinite(value):
            raise bad(f"option {str(name)[:40]!r} of {method} must be a finite number, a string or a boolean")
        return
    if name not in known:
        raise bad(f"unknown option {str(name)[:40]!r} for method {method} (known: {', '.join(sorted(known))})")
    default = known[name]
    if isinstance(default, list):  # exact_heads: distinct KV-head indices (their range the module checks)
        if not isinstance(value, list) or not all(_is_int(x) and x >= 0 for x in value) or len(set(value)) != len(value):
            raise bad(f"option {name!r} of {method} must be a list of distinct non-negative integers")
        return
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = _is_int(value), "an integer"
    elif isinstance(default, float):
        ok, want = (_is_int(value) or isinstance(value, float)) and math.isfinite(value), "a finite number"
    else:
        ok, want = isinstance(value, type(default)), f"a {type(default).__name__}"
    if not ok:
        raise bad(f"option {name!r} of {method} must be {want}")
    low = LOWER_BOUNDS.get(name)
    if low is not None and value < low:
        raise bad(f"option {name!r} of {method} must be at least {low} (got {value})")
    high = UPPER_BOUNDS.get(name)
    if high is not None and (value > high or name == "sparsity" and value >= high):
        raise bad(f"option {name!r} of {method} must be {'below' if name == 'sparsity' else 'at most'} {high} (got {value})")


def validate_attnswap_config(d, num_layers: int | None = None) -> dict:
    """Check the ``attnswap`` entry of a converted config; return a clean copy or raise AttnSwapError."""
    from .. import __version__

    if not isinstance(d, dict):
        raise _bad(f"expected an object, got {type(d).__name__}")
    if not _is_int(num_layers):
        num_layers = None
    for key in ("version", "swaps"):
        if key not in d:
            raise _bad(f"missing key {key!r}")
    made, have = _version_tuple(d["version"]), _version_tuple(__version__)
    if made > have:
        raise AttnSwapError(f"this model was converted by attnswap {d['version']}, newer than the installed "
                            f"{__version__}; upgrade attnswap to load it")
    if "source_model" in d and not isinstance(d["source_model"], str):
        raise _bad("'source_model' must be a string")
    if not isinstance(d["swaps"], list):
        raise _bad("'swaps' must be a list")
    seen: set[int] = set()
    swaps = []
    for i, s in enumerate(d["swaps"]):
        if not isinstance(s, dict):
            raise _bad(f"swap {i} must be an object")
        for key in ("method", "layers"):
            if key not in s:
                raise _bad(f"swap {i} has no {key!r}")
        method = s["method"]
        if not isinstance(method, str) or method not in METHODS:
            raise _bad(f"swap {i}: unknown attention method {str(method)[:40]!r}; available: {', '.join(sorted(METHODS))}")
        layers = s["layers"]
        if not isinstance(layers, list) or not all(_is_int(x) for x in layers):
            raise _bad(f"swap {i}: 'layers' must be a list of integers")
        for x in layers:
            if x < 0 or num_layers is not None and x >= num_layers:
                raise _bad(f"swap {i}: layer {x} is out of range" + (f" (the model has {num_layers})" if num_layers is not None else ""))
            if x in seen:
                raise _bad(f"layer {x} is converted twice")
            seen.add(x)
        options = s.get("options", {})
        if not isinstance(options, dict):
            raise _bad(f"swap {i}: 'options' must be an object")
        for name, value in options.items():
            _check_option(method, name, value)
        swaps.append({"method": method, "layers": list(layers), "options": dict(options)})
    return {**d, "swaps": swaps}


def read_converted_config(path: str | Path) -> dict:
    """Read a converted model's config.json (bytes as found on disk) and check its attnswap entry."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        cfg = json.loads(raw.decode("utf-8"))
    except OSError as e:
        raise AttnSwapError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AttnSwapError(f"{path} is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise AttnSwapError(f"{path} does not hold a JSON object")
    if "attnswap" not in cfg:
        raise _bad(f"{path} has no 'attnswap' entry")
    n = cfg.get("num_hidden_layers")
    if not _is_int(n) or n < 1:
        raise AttnSwapError(f"{path}: 'num_hidden_layers' must be a positive integer")
    cfg["attnswap"] = validate_attnswap_config(cfg["attnswap"], n)
    return cfg
