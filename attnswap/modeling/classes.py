"""transformers classes for converted models: one config/model pair per supported family.

``AttnSwapLlamaConfig`` is ``LlamaConfig`` with model_type ``attnswap_llama`` and an ``attnswap``
entry naming the swaps and the runtime options; ``AttnSwapLlamaForCausalLM`` builds the stock model,
then swaps in the replacement attention modules that entry names. ``modeling/__init__.py`` registers
them with the Auto classes; saved models also carry an ``auto_map`` for ``trust_remote_code=True``.
"""

from __future__ import annotations

import torch

from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ..convert.spec import validate_attnswap_config
from ..convert.swap import apply_swaps
from ..hf_compat import cache_kwargs, pop_cache
from .decode import try_decode_step
from .prefill import try_prefill
from .runtime import RuntimeOptions

PREFILL_CHUNK = 2048  # generate() feeds a converted model long prompts this many tokens at a time...
PREFILL_CHUNK_CUDA = 8192  # ...or this many on CUDA (docs/BENCHMARKS.md: a 32k prompt in 253 ms against
# 1.05 s in 2,048-token pieces, peak 1.58 GiB against 0.73; SmolLM2 lolcats on the H200)
ONE_PASS_CUDA = 32768  # ...but a model whose every layer is recurrent (no exact heads) takes prompts up to this
# in one pass on CUDA: at 32k faster and with a lower peak than 8,192-token pieces (lolcats 76 ms / 0.85 GiB
# against 279 ms / 0.90 GiB, lizard 89 ms / 0.98 against 291 ms / 1.12; H200, 7373974): each later piece
# issues every launch again and gets a mask over all earlier keys


def default_prefill_chunk(device, prompt_len: int | None = None, recurrent: bool = False) -> int:
    """The piece size ``generate()`` uses for a ``prompt_len``-token prompt unless told otherwise;
    ``recurrent``: every layer of the model generates from a fixed-size state."""
    if torch.device(device).type != "cuda":
        return PREFILL_CHUNK
    if recurrent and prompt_len is not None and prompt_len <= ONE_PASS_CUDA:
        return max(PREFILL_CHUNK_CUDA, prompt_len)  # the whole prompt is one piece
    return PREFILL_CHUNK_CUDA


def _all_recurrent(model) -> bool:
    """Every decoder layer swapped for a method that generates from a fixed-size state, none keeping
    exact heads (whose KV cache grows with the prompt): the models the one-pass figures were measured on."""
    from ..convert.base import swapped_modules

    mods = swapped_modules(model)
    return len(mods) == model.config.num_hidden_layers and all(m.can_decode and not m.exact_heads for m in mods)


def _prompt_len(args, kwargs) -> int | None:
    x = kwargs.get("input_ids", args[0] if args else None)
    if x is None:
        x = kwargs.get("inputs_embeds")
    return int(x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else None


class ConvertedModelMixin:
    """What a converted causal LM adds to the stock class: the swaps at construction, runtime options
    (kernels, decode graph, sparsity...), the one-token decode step, and chunked prefill by default."""

    def __init__(self, config, *args, **kwargs):
        given = {k: kwargs.pop(k) for k in RuntimeOptions.names() if k in kwargs}  # from_pretrained(..., kernels=...)
        spec = getattr(config, "attnswap", None)  # checked in one place: convert/spec.py
        spec = validate_attnswap_config(spec, config.num_hidden_layers) if spec is not None else {"swaps": []}
        spec = _override_method_options(spec, kwargs)  # from_pretrained(..., sparsity=0.95)
        if spec.get("swaps"):
            config.attnswap = spec
        super().__init__(config, *args, **kwargs)
        apply_swaps(self, spec["swaps"])
        if given and spec.get("swaps"):
            merged = RuntimeOptions.from_dict({**(spec.get("runtime") or {}), **given})
            config.attnswap = {**config.attnswap, "runtime": merged.to_dict()}
        self.attnswap_runtime = RuntimeOptions.from_config(config)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep=0, **kwargs):
        cache = pop_cache(kwargs)
        with self.attnswap_runtime.active():
            fast = try_decode_step(self, input_ids, position_ids, cache, inputs_embeds, labels, kwargs)
            if fast is not None:  # a one-token decoding step, replayed as a CUDA graph (decode.py)
                return fast
            fast = try_prefill(self, input_ids, attention_mask, position_ids, cache, inputs_embeds, labels,
                               logits_to_keep, kwargs)
            if fast is not None:  # a long prompt in fixed-size pieces, each replayed as a CUDA graph (prefill.py)
                return fast
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                   logits_to_keep=logits_to_keep, **cache_kwargs(cache), **kwargs)

    def stock_forward(self, **kwargs):
        """The family's own forward, without the decode-step shortcut (the decode step runs this)."""
        return super().forward(**kwargs)

    def generate(self, *args, **kwargs):
        """``generate()``, with long prompts prefilled in pieces (``default_prefill_chunk``: 2048 tokens, 8192
        on CUDA, where a model recurrent in every layer takes prompts up to 32,768 tokens in one pass)
        unless the call or the generation config says otherwise: a converted model's activations then stay
        those of one piece however long the prompt (pass ``prefill_chunk_size=None`` for one pass)."""
        if "prefill_chunk_size" not in kwargs:
            gc = kwargs.get("generation_config") or self.generation_config
            caching = kwargs.get("use_cache", getattr(gc, "use_cache", True)) is not False
            if caching and getattr(gc, "prefill_chunk_size", None) is None:
                kwargs["prefill_chunk_size"] = self.attnswap_runtime.prefill_chunk or default_prefill_chunk(
                    self.device, _prompt_len(args, kwargs), _all_recurrent(self))
        with self.attnswap_runtime.active():
            return super().generate(*args, **kwargs)


def _override_method_options(spec: dict, kwargs: dict) -> dict:
    """Take the keyword arguments that name a load-time option of a swapped method (a method's
    ``runtime_options``, e.g. seer's ``sparsity``) out of ``kwargs`` and into the swaps' options."""
    from ..convert.base import METHODS

    names = {n for s in spec.get("swaps", []) for n in getattr(METHODS[s["method"]], "runtime_options", ())}
    given = {n: kwargs.pop(n) for n in names if n in kwargs}
    if not given:
        return spec
    swaps = []
    for s in spec["swaps"]:
        allowed = getattr(METHODS[s["method"]], "runtime_options", ())
        swaps.append({**s, "options": {**s.get("options", {}), **{k: v for k, v in given.items() if k in allowed}}})
    return validate_attnswap_config({**spec, "swaps": swaps})


class AttnSwapLlamaConfig(LlamaConfig):
    model_type = "attnswap_llama"


class AttnSwapMistralConfig(MistralConfig):
    model_type = "attnswap_mistral"


class AttnSwapQwen2Config(Qwen2Config):
    model_type = "attnswap_qwen2"


class AttnSwapQwen3Config(Qwen3Config):
    model_type = "attnswap_qwen3"


class AttnSwapLlamaForCausalLM(ConvertedModelMixin, LlamaForCausalLM):
    config_class = AttnSwapLlamaConfig


class AttnSwapMistralForCausalLM(ConvertedModelMixin, MistralForCausalLM):
    config_class = AttnSwapMistralConfig


class AttnSwapQwen2ForCausalLM(ConvertedModelMixin, Qwen2ForCausalLM):
    config_class = AttnSwapQwen2Config


class AttnSwapQwen3ForCausalLM(ConvertedModelMixin, Qwen3ForCausalLM):
    config_class = AttnSwapQwen3Config


CLASSES: dict[str, tuple[type, type]] = {
    "llama": (AttnSwapLlamaConfig, AttnSwapLlamaForCausalLM),
    "mistral": (AttnSwapMistralConfig, AttnSwapMistralForCausalLM),
    "qwen2": (AttnSwapQwen2Config, AttnSwapQwen2ForCausalLM),
    "qwen3": (AttnSwapQwen3Config, AttnSwapQwen3ForCausalLM),
}


def classes_for(model_type: str) -> tuple[type, type]:
    return CLASSES[model_type.removeprefix("attnswap_")]
