"""transformers classes for converted models: one config/model pair per supported family.

``AttnSwapLlamaConfig`` is ``LlamaConfig`` with model_type ``attnswap_llama`` and an ``attnswap``
entry describing the swaps; ``AttnSwapLlamaForCausalLM`` builds the stock model, then swaps in the
replacement attention modules that entry names. Importing attnswap registers them with the Auto
classes; saved models also carry an ``auto_map`` for ``trust_remote_code=True``.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .convert.architectures import FAMILIES
from .convert.spec import validate_attnswap_config
from .convert.swap import apply_swaps
from .generation import try_decode_step

_CLASSES: dict[str, tuple[type, type]] = {}


def _build(family):
    cfg_name = f"AttnSwap{family.prefix}Config"
    model_name = f"AttnSwap{family.prefix}ForCausalLM"
    cfg_cls = type(cfg_name, (family.config_cls,), {"model_type": f"attnswap_{family.model_type}", "__module__": __name__})
    base = family.causal_lm_cls

    def __init__(self, config):
        base.__init__(self, config)
        spec = getattr(config, "attnswap", None)  # checked in one place: convert/spec.py
        spec = validate_attnswap_config(spec, config.num_hidden_layers) if spec is not None else {"swaps": []}
        apply_swaps(self, spec["swaps"])

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        fast = try_decode_step(self, input_ids, position_ids, past_key_values, inputs_embeds, labels, kwargs)
        if fast is not None:  # a one-token decoding step, replayed as a CUDA graph (generation.py)
            return fast
        return base.forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                            use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)

    forward.__doc__ = base.forward.__doc__
    attrs = {"config_class": cfg_cls, "__init__": __init__, "forward": forward, "__module__": __name__}
    model_cls = type(model_name, (base,), attrs)
    return cfg_cls, model_cls


for _fam in FAMILIES.values():
    _cfg, _model = _build(_fam)
    globals()[_cfg.__name__], globals()[_model.__name__] = _cfg, _model
    _CLASSES[_fam.model_type] = (_cfg, _model)
    AutoConfig.register(_cfg.model_type, _cfg, exist_ok=True)
    AutoModelForCausalLM.register(_cfg, _model, exist_ok=True)


def classes_for(model_type: str) -> tuple[type, type]:
    return _CLASSES[model_type.removeprefix("attnswap_")]


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
