"""Fast decoding for converted models: one whole-model decode step replayed as a CUDA graph.

A converted model's cache has a fixed size (``hf_compat.StateLayer``), so the one-token
step has the same shapes and addresses at every position: it can be captured once as a CUDA graph
and replayed, which removes the per-operation launch cost that dominates decoding a small model.
``AttnSwap*ForCausalLM.forward`` sends a call here when it is a plain one-token decoding step
(what ``generate()`` makes after the prompt); everything else takes the ordinary eager path. The
step is the family's own forward (``stock_forward``) over a cache that holds the static state.
Mixed layers (some heads exact, ``convert/base.py``) keep their exact heads' keys in buffers of fixed
capacity inside that state; room for the step's key is made before it (``reserve_exact``, doubling the
buffers when full), and a new capacity is a new shape, so a new captured step (keyed by the capacities).

The graph owns static copies of the decoding state. A replay updates them in place and the cache
layers then point at them. A cache whose state is elsewhere (the first step after a prefill, after
an eager step, beam reordering) is copied in first; a cache that still points at the static buffers
when another cache takes the graph over gets its own copy, so two generations never share state.

The runtime option ``decode_graph`` (runtime.py; env ``ATTNSWAP_DECODE_GRAPH`` overrides it) picks
the path: ``auto`` (default; CUDA graphs on CUDA, eager elsewhere), ``off`` (always eager),
``static`` (the same static-buffer step without graph capture, on any device: for tests and
debugging). ``compile_decode`` (env ``ATTNSWAP_COMPILE_DECODE``) also compiles with torch.compile
(fewer, fused kernels inside the graph; the first step of each batch size compiles): ``model`` the
whole one-token step, ``attn`` each layer's attention step only. A whole step that fails to compile
is compiled again without Inductor's persistent reductions (on the H100 with Triton 3.6 one of
Lizard's fused step kernels failed Triton's compiler with them, and compiled without them), and
then taken uncompiled, still as a CUDA graph; a warning says which. Only a step that cannot be
captured at all decodes eagerly.
"""

from __future__ import annotations

import logging
import os
import weakref

import torch

from ..convert.base import SwappedAttention
from ..convert.swap import decoder_layers
from ..hf_compat import StateLayer, cache_kwargs, causal_lm_output, step_cache
from ..kernels.dispatch import compile_setting
from .runtime import GRAPH_MODES, current

logger = logging.getLogger(__name__)
MAX_GRAPHS = 4  # captured steps kept per model (one per batch size, device and setting)


def graph_mode(device: torch.device) -> str:
    env = os.environ.get("ATTNSWAP_DECODE_GRAPH")
    mode = env.lower() if env else current().decode_graph
    if mode not in GRAPH_MODES:
        raise ValueError(f"ATTNSWAP_DECODE_GRAPH={mode!r}: use auto, off, static or cuda")
    if mode == "auto":
        return "cuda" if device.type == "cuda" else "off"
    return mode


class DecodeGraph:
    """One captured decode step for a given model, batch size, dtype and device."""

    def __init__(self, model, cache, ids: torch.Tensor, pos: torch.Tensor, use_graph: bool, step_fn=None):
        self.model = model
        self.step_fn = step_fn or _pure_step  # the step itself, compiled or not (step_variants)
        self.ids = ids.clone()
        self.pos = pos.clone()
        self.state = [{k: t.clone() for k, t in layer.state.items()} for layer in cache.layers]
        self.owner = None
        self.logits = None
        self.graph = None
        if use_graph:
            self._capture()
        else:  # one step run and undone, as the capture's warm-up does: a step that fails, fails here
            saved = [{k: t.clone() for k, t in st.items()} for st in self.state]
            self._body()
            copy_states(self.state, saved)

    def _body(self):
        """One step on the static buffers: the new state is written into them in place."""
        logits, new = self.step_fn(self.model, self.ids, self.pos, self.state)
        copy_states(self.state, new)
        return logits

    def _capture(self):
        self.graph, self.logits = capture_graph(self._body, self.state)

    def step(self, cache, ids, pos) -> torch.Tensor:
        owner = self.owner() if self.owner is not None else None
        if owner is not None and owner is not cache:  # the previous user keeps its state
            mine = {id(t) for s in self.state for t in s.values()}
            for layer in owner.layers:
                if isinstance(layer, StateLayer) and layer.state is not None and any(id(t) in mine for t in layer.state.values()):
                    layer.state = {k: t.clone() for k, t in layer.state.items()}
        for layer, static in zip(cache.layers, self.state):
            cur = layer.state
            if not _is(cur, static):
                for k, t in static.items():
                    t.copy_(cur[k])
        self.ids.copy_(ids)
        self.pos.copy_(pos)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._body()
        for layer, static in zip(cache.layers, self.state):
            layer.state = static
            layer.seen += 1
        self.owner = weakref.ref(cache)
        return logits.clone()


def copy_states(static: list[dict], fresh: list[dict]) -> None:
    """Write each layer's new state into its static buffers, in place (a tensor already there is kept)."""
    for dst, src in zip(static, fresh):
        for k, t in dst.items():
            if t is not src[k]:
                t.copy_(src[k])


def capture_graph(body, state: list[dict]):
    """``body()`` (which advances the static ``state`` in place) captured as a CUDA graph, after two
    warm-up runs on a side stream (allocator, cuBLAS handles, autotuning and any compilation stay out
    of the graph). The state is put back as it was before. Returns (graph, body's output in the graph)."""
    saved = [{k: t.clone() for k, t in s.items()} for s in state]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()
    copy_states(state, saved)  # the warm-up and capture advanced the state: put it back
    return graph, out


def _pure_step(model, ids, pos, states):
    """The whole model's one-token step as a function of the state: returns (logits, new states)."""
    cache = step_cache(states)
    out = model.stock_forward(input_ids=ids, position_ids=pos, use_cache=True, **cache_kwargs(cache))
    return out.logits, [layer.state for layer in cache.layers]


def _pure_step_plain_reductions(model, ids, pos, states):
    """``_pure_step`` under a code object of its own, so that its compiled entry (other Inductor options)
    never meets the default one's in dynamo's cache."""
    return _pure_step(model, ids, pos, states)


# the whole step compiled, by name: Inductor's defaults, then without persistent reductions
COMPILE_VARIANTS = {"default": (_pure_step, None),
                    "no persistent reductions": (_pure_step_plain_reductions, {"triton.persistent_reductions": False})}
_COMPILED: dict[str, object] = {}


def compiled_step(variant: str):
    if variant not in _COMPILED:
        fn, options = COMPILE_VARIANTS[variant]
        _COMPILED[variant] = torch.compile(fn, dynamic=False, options=options)
    return _COMPILED[variant]


def step_variants() -> list[tuple[str, object]]:
    """(label, step function) to try in turn for a new captured step: under ``compile_decode="model"`` the
    compiled variants and then the plain step; otherwise the plain step alone."""
    compiled = [(f"compiled ({v})", compiled_step(v)) for v in COMPILE_VARIANTS] if compile_setting() == "model" else []
    return compiled + [("uncompiled", _pure_step)]


def _brief(err: Exception) -> str:
    """An error's first line, and its last one when they differ (Inductor wraps a compiler's failure in
    a subprocess traceback: the last line names it)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [""]
    return (lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}")[:400]


def _is(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


def _plain_step(model, input_ids, past_key_values, inputs_embeds, labels, kwargs) -> bool:
    if input_ids is None or inputs_embeds is not None or labels is not None or input_ids.shape[1] != 1:
        return False
    if torch.is_grad_enabled() or model.training or past_key_values is None:
        return False
    if any(kwargs.get(k) for k in ("output_attentions", "output_hidden_states")):
        return False
    layers = getattr(past_key_values, "layers", None)
    n = model.config.num_hidden_layers
    if layers is None or len(layers) != n:
        return False
    mods = [layer.self_attn for layer in decoder_layers(model)]
    return all(isinstance(mod, SwappedAttention) and mod.can_decode and mod.mode == "student" for mod in mods) and all(
        isinstance(layer, StateLayer) and layer.state is not None for layer in layers)


def try_decode_step(model, input_ids, position_ids, past_key_values, inputs_embeds, labels, kwargs):
    """The step's output through the decode graph, or None when this call should run eagerly."""
    if not _plain_step(model, input_ids, past_key_values, inputs_embeds, labels, kwargs):
        return None
    mode = graph_mode(input_ids.device)
    if mode == "off":
        return None
    if position_ids is None:
        position_ids = torch.full_like(input_ids, past_key_values.get_seq_length())
    # mixed layers: room for this step's key in their exact heads' buffers, whose size is part of the shapes
    caps = []
    for layer, mod in zip(past_key_values.layers, (d.self_attn for d in decoder_layers(model))):
        if mod.mixed:
            mod.reserve_exact(layer, 1)
            caps.append(layer.state["exact_k"].shape[1])
    graphs = model.__dict__.setdefault("_attnswap_decode_graphs", {})
    # a graph reads the weights at fixed addresses: replacing a tensor (not updating it) needs a new one
    key = (input_ids.shape[0], input_ids.device, mode, model.lm_head.weight.data_ptr(), model.lm_head.weight.dtype,
           compile_setting(), tuple(caps))
    g = graphs.get(key)
    if g is None:
        while len(graphs) >= MAX_GRAPHS:  # each holds a copy of the state and a memory pool
            graphs.pop(next(iter(graphs)))
        variants = step_variants()
        for i, (label, fn) in enumerate(variants):
            try:
                g = DecodeGraph(model, past_key_values, input_ids, position_ids, use_graph=mode == "cuda", step_fn=fn)
                break
            except Exception as err:  # never fail a generation over the fast path
                first = _brief(err)
                if i + 1 < len(variants):
                    logger.warning("attnswap: the %s decode step failed for batch size %d (%s: %s); trying it %s",
                                   label, input_ids.shape[0], type(err).__name__, first, variants[i + 1][0])
                    continue
                logger.warning("attnswap: decoding without a CUDA graph for batch size %d (%s: %s); set "
                               "ATTNSWAP_DECODE_GRAPH=off to skip this attempt", input_ids.shape[0],
                               type(err).__name__, first)
                g = False
        graphs[key] = g
    if g is False:
        return None
    logits = g.step(past_key_values, input_ids, position_ids)
    return causal_lm_output(logits, past_key_values)


def reset_decode_graphs(model) -> None:
    """Drop the captured steps, and the captured prefill pieces (prefill.py), after replacing weights
    or moving the model."""
    model.__dict__.pop("_attnswap_decode_graphs", None)
    model.__dict__.pop("_attnswap_prefill_plans", None)
