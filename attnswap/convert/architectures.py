"""Which transformers architectures can be converted, and the pieces of each that conversion needs.

All supported families share the Llama attention layout: q_proj/k_proj/v_proj/o_proj, RoPE applied
to q and k, optional per-head RMSNorm on q and k (Qwen3). Adding a family means adding a row here and
its converted classes in modeling/classes.py (an import-time check keeps the two in step).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import AttnSwapError


@dataclass(frozen=True)
class Family:
    model_type: str
    module: str  # transformers.models.<module>.modeling_<module>
    prefix: str  # class-name prefix, e.g. "Llama"


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "llama", "Llama"),
        Family("mistral", "mistral", "Mistral"),
        Family("qwen2", "qwen2", "Qwen2"),
        Family("qwen3", "qwen3", "Qwen3"),
    )
}


def family_of(model_type: str) -> Family:
    base = model_type.removeprefix("attnswap_")
    if base not in FAMILIES:
        raise AttnSwapError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[base]
