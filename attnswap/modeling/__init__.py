"""Model integration: the registered transformers classes of converted models, their runtime options,
the whole-model decode step, and ``convert_model`` (a loaded model becomes a converted one in place).

Imports point down only: ``modeling`` uses ``convert`` (the swapped attention modules), which uses
``hf_compat`` (the one seam into transformers' internals) and ``kernels``.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from ..convert.architectures import FAMILIES, family_of
from ..convert.swap import apply_swaps
from .classes import (
    CLASSES,
    PREFILL_CHUNK,
    AttnSwapLlamaConfig,
    AttnSwapLlamaForCausalLM,
    AttnSwapMistralConfig,
    AttnSwapMistralForCausalLM,
    AttnSwapQwen2Config,
    AttnSwapQwen2ForCausalLM,
    AttnSwapQwen3Config,
    AttnSwapQwen3ForCausalLM,
    ConvertedModelMixin,
    classes_for,
)
from .decode import reset_decode_graphs
from .runtime import RuntimeOptions

assert set(CLASSES) == set(FAMILIES), "every supported family needs its converted classes in modeling/classes.py"
for _cfg, _model in CLASSES.values():
    AutoConfig.register(_cfg.model_type, _cfg, exist_ok=True)
    AutoModelForCausalLM.register(_cfg, _model, exist_ok=True)


def convert_model(model, swaps: list[dict], source: str, runtime: RuntimeOptions | None = None):
    """Swap attention in ``model`` and turn it into the matching attnswap model class, in place."""
    from .. import __version__

    family = family_of(model.config.model_type)
    apply_swaps(model, swaps)
    cfg_cls, model_cls = classes_for(family.model_type)
    model.config.__class__ = cfg_cls  # a subclass that adds no fields: only model_type changes
    runtime = runtime or RuntimeOptions()
    model.config.attnswap = {"version": __version__, "source_model": source, "swaps": swaps, "runtime": runtime.to_dict()}
    model.__class__ = model_cls
    model.attnswap_runtime = runtime
    return model


REMOTE_CODE_FILE = "modeling_attnswap.py"


def remote_code_source(model_type: str) -> tuple[str, dict]:
    """The shim written beside a saved model, and the ``auto_map`` entry pointing at it."""
    cfg_cls, model_cls = classes_for(model_type)
    src = (
        '"""Loads this attnswap model with trust_remote_code=True; needs `pip install attnswap`."""\n'
        f"from attnswap.modeling import {cfg_cls.__name__}, {model_cls.__name__}  # noqa: F401\n"
    )
    stem = REMOTE_CODE_FILE.removesuffix(".py")
    auto_map = {
        "AutoConfig": f"{stem}.{cfg_cls.__name__}",
        "AutoModelForCausalLM": f"{stem}.{model_cls.__name__}",
    }
    return src, auto_map


__all__ = [
    "AttnSwapLlamaConfig", "AttnSwapLlamaForCausalLM", "AttnSwapMistralConfig", "AttnSwapMistralForCausalLM",
    "AttnSwapQwen2Config", "AttnSwapQwen2ForCausalLM", "AttnSwapQwen3Config", "AttnSwapQwen3ForCausalLM",
    "ConvertedModelMixin", "PREFILL_CHUNK", "REMOTE_CODE_FILE", "RuntimeOptions", "classes_for", "convert_model",
    "remote_code_source", "reset_decode_graphs",
]
