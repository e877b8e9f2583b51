"""Prefill of a long prompt in fixed-size pieces, each piece replayed as a CUDA graph.

A small converted model's prefill is bound by the host: every layer issues the same launches
whatever the prompt's length, and on the lent H200 each Triton launch costs the host 70-90 us, so
SmolLM2 lolcats takes ~60 ms to prefill 2k or 8k tokens while the device is busy for a fraction of
that (docs/BENCHMARKS.md). The recurrent state has a fixed size, so a forward over a fixed number of
tokens after it has the same shapes and addresses at every position: like the one-token decode step
(decode.py) it can be captured once and replayed, one launch for the whole model.

A prompt of L >= P tokens (P = the runtime option ``prefill_piece``) on a fresh cache runs as one
first piece of P tokens from an empty state, then (L - P) // P later pieces of P tokens, then the rest
in pieces of the powers of two of its binary expansion (so at most log2(P) + 1 more sizes); a call
that continues a cache (``generate()``'s later prefill chunks) runs only later pieces. Each (kind,
size) is its own captured graph. They all read and write one set of static state buffers, so the
pieces chain without copies; the cache gets its own copy at the end. Positions go in as a static
buffer; the graphs run inside ``hf_compat.unpadded_rows`` (the rows are checked for padding once, on
the host, before the first piece), so nothing in them reads the mask.

The runtime option ``prefill_piece`` (env ``ATTNSWAP_PREFILL_PIECE`` overrides it) sets P; the runtime
option ``prefill_graph`` (env ``ATTNSWAP_PREFILL_GRAPH`` overrides it) picks the path:
``off`` (the default: on the H200 a prompt of one piece prefills 1.3-3.3x faster than one eager pass,
but one of several pieces is slower than one pass; docs/LINEARIZE.md), ``static`` (the same pieces
eagerly on the static buffers, any device: what the CPU tests check) or ``cuda``.
"""

from __future__ import annotations

import logging
import os

import torch

from ..convert.base import SwappedAttention
from ..convert.swap import decoder_layers
from ..hf_compat import StateLayer, cache_kwargs, causal_lm_output, layer_slot, step_cache, unpadded_rows
from ..kernels.dispatch import compile_setting
from ..kernels.hybrid_attn.step_torch import SUM_SPLIT_FROM_GRAPHED, split_sums_from
from .decode import capture_graph, copy_states
from .runtime import PREFILL_GRAPH_MODES, current

logger = logging.getLogger(__name__)
MAX_PLANS = 2  # captured plans kept per model (one per batch size, device, piece and setting)
PLAIN_KWARGS = {"return_dict", "cache_position"}  # what else a plain prefill call may carry (5.17's generate)


def prefill_mode(device: torch.device) -> str:
    env = os.environ.get("ATTNSWAP_PREFILL_GRAPH")
    mode = env.lower() if env else current().prefill_graph
    if mode not in PREFILL_GRAPH_MODES:
        raise ValueError(f"ATTNSWAP_PREFILL_GRAPH={mode!r}: use off, static or cuda")
    if mode == "cuda" and device.type != "cuda":
        return "off"
    return mode


def prefill_piece() -> int:
    env = os.environ.get("ATTNSWAP_PREFILL_PIECE")
    if not env:
        return current().prefill_piece
    if not env.isdigit() or int(env) < 1:
        raise ValueError(f"ATTNSWAP_PREFILL_PIECE={env!r}: give a positive integer")
    return int(env)


def piece_sizes(total: int, piece: int, fresh: bool) -> list[tuple[str, int]]:
    """The pieces a prefill of ``total`` tokens runs as: ("first", P) from an empty state when
    ``fresh``, ("next", P) while P tokens remain, then ("next", 2^k) for the binary expansion of the rest."""
    out = [("first", piece)] if fresh else []
    left = total - piece if fresh else total
    out += [("next", piece)] * (left // piece)
    left %= piece
    size = 1 << max(0, left.bit_length() - 1)
    while left:
        if left >= size:
            out.append(("next", size))
            left -= size
        size >>= 1
    return out


class _Piece:
    """One captured forward over ``size`` tokens: from an empty state (``first``) or after the plan's
    static state (``next``), writing the new state into that static state in place."""

    def __init__(self, plan: "PrefillPlan", kind: str, size: int, keep: int):
        self.plan, self.kind, self.size, self.keep = plan, kind, size, keep
        dev = plan.device
        self.ids = torch.zeros(plan.batch, size, dtype=torch.long, device=dev)
        self.pos = torch.zeros(plan.batch, size, dtype=torch.long, device=dev)
        self.logits = None
        self.graph = None

    def body(self):
        states = [None] * self.plan.layers if self.kind == "first" else self.plan.state
        cache = step_cache(states)
        if self.kind == "next":
            for layer in cache.layers:  # continuing: the state holds whole windows (the kernels' fast path checks
                layer.seen = self.plan.piece  # this count, and try_prefill checked that the piece covers a window)
        with unpadded_rows(), split_sums_from(SUM_SPLIT_FROM_GRAPHED):  # device time is what a graph leaves
            out = self.plan.model.stock_forward(input_ids=self.ids, position_ids=self.pos, use_cache=True,
                                                logits_to_keep=self.keep, **cache_kwargs(cache))
        new = [layer.state for layer in cache.layers]
        if self.plan.state is None:  # the first piece ever run makes the static buffers
            self.plan.state = [{k: t.clone() for k, t in s.items()} for s in new]
        elif any(static.keys() != fresh.keys() for static, fresh in zip(self.plan.state, new)):
            raise RuntimeError("a prefill piece changed the layout of the state")
        else:
            copy_states(self.plan.state, new)
        return out.logits

    def capture(self):
        self.graph, self.logits = capture_graph(self.body, self.plan.state)

    def run(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        self.ids.copy_(ids)
        self.pos.copy_(torch.arange(start, start + self.size, device=self.pos.device).expand_as(self.pos))
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self.body()


class PrefillPlan:
    """The static state and the captured pieces of one model, batch size and piece size."""

    def __init__(self, model, batch: int, piece: int, device, use_graph: bool):
        self.model, self.batch, self.piece, self.device, self.use_graph = model, batch, piece, device, use_graph
        self.layers = model.config.num_hidden_layers
        self.state: list[dict] | None = None
        self.pieces: dict[tuple[str, int, int], _Piece] = {}

    def _piece(self, kind: str, size: int, keep: int) -> _Piece:
        key = (kind, size, keep)
        p = self.pieces.get(key)
        if p is None:
            p = _Piece(self, kind, size, keep)
            if self.use_graph and self.state is not None:  # the first run of all makes the state: eager
                p.capture()
            self.pieces[key] = p
        elif self.use_graph and p.graph is None:
            p.capture()
        return p

    def run(self, cache, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """Prefill ``ids`` into ``cache`` (fresh, or holding a state of this plan's layout); returns the
        logits (of every position when ``keep`` is 0, else of the last)."""
        fresh = cache.get_seq_length() == 0
        if not fresh:
            copy_states(self.state, [layer.state for layer in cache.layers])
        start, outs = cache.get_seq_length(), []
        plan = piece_sizes(ids.shape[1], self.piece, fresh)
        at = 0
        for i, (kind, size) in enumerate(plan):
            last = i == len(plan) - 1
            logits = self._piece(kind, size, 0 if keep == 0 else 1).run(ids[:, at : at + size], start + at)
            if keep == 0 or last:
                outs.append(logits.clone())
            at += size
        for i, static in enumerate(self.state):
            layer = layer_slot(cache, i)
            layer.state = {k: t.clone() for k, t in static.items()}
            layer.seen += ids.shape[1]
        return torch.cat(outs, 1) if len(outs) > 1 else outs[0]


def _plain_prefill(model, input_ids, attention_mask, position_ids, cache, inputs_embeds, labels, logits_to_keep,
                   kwargs, piece: int) -> bool:
    if input_ids is None or inputs_embeds is not None or labels is not None or input_ids.dim() != 2:
        return False
    if input_ids.shape[1] < piece or torch.is_grad_enabled() or model.training or cache is None:
        return False
    if set(kwargs) - PLAIN_KWARGS or logits_to_keep not in (0, 1) or isinstance(logits_to_keep, bool):
        return False
    mods = [layer.self_attn for layer in decoder_layers(model)]
    if len(mods) != model.config.num_hidden_layers or not all(
            isinstance(m, SwappedAttention) and m.can_decode and not m.exact_heads and m.mode == "student" for m in mods):
        return False
    if piece < max(getattr(m, "window", 0) + getattr(m, "sinks", 0) for m in mods):
        return False  # a first piece shorter than a window would leave a state of another layout
    layers = list(getattr(cache, "layers", None) or [])
    if cache.get_seq_length() == 0:
        if any(isinstance(layer, StateLayer) and layer.state is not None for layer in layers):
            return False
    elif len(layers) != len(mods) or not all(isinstance(layer, StateLayer) and layer.state is not None
                                             for layer in layers):
        return False
    # the host reads these two once, before any piece runs
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != input_ids.shape[0] or not bool(attention_mask.all()):
            return False
    if position_ids is not None:
        start = cache.get_seq_length()
        want = torch.arange(start, start + input_ids.shape[1], device=position_ids.device)
        if position_ids.shape[-1] != input_ids.shape[1] or not bool((position_ids == want).all()):
            return False
    return True


def try_prefill(model, input_ids, attention_mask, position_ids, cache, inputs_embeds, labels, logits_to_keep, kwargs):
    """The prefill's output through graphed pieces, or None when this call should run as usual."""
    mode = prefill_mode(input_ids.device) if input_ids is not None else "off"
    if mode == "off":
        return None
    piece = prefill_piece()
    if not _plain_prefill(model, input_ids, attention_mask, position_ids, cache, inputs_embeds, labels,
                          logits_to_keep, kwargs, piece):
        return None
    plans = model.__dict__.setdefault("_attnswap_prefill_plans", {})
    # a graph reads the weights at fixed addresses: replacing a tensor (not updating it) needs a new plan
    key = (input_ids.shape[0], input_ids.device, mode, piece, model.lm_head.weight.data_ptr(),
           model.lm_head.weight.dtype, compile_setting())
    plan = plans.get(key)
    if plan is False:
        return None
    if plan is None:
        while len(plans) >= MAX_PLANS:  # each holds a copy of the state and a memory pool per piece
            plans.pop(next(iter(plans)))
        plan = plans[key] = PrefillPlan(model, input_ids.shape[0], piece, input_ids.device, mode == "cuda")
    if cache.get_seq_length():  # continuing: the cache's state must have the layout of the static one
        if plan.state is None or any(layer.state.keys() != s.keys() or any(layer.state[k].shape != t.shape
                                                                              for k, t in s.items())
                                     for layer, s in zip(cache.layers, plan.state)):
            return None
    try:
        logits = plan.run(cache, input_ids, logits_to_keep)
    except Exception as err:  # the cache is written only after the last piece: the usual path can still run
        if input_ids.device.type == "cuda":
            torch.cuda.synchronize(input_ids.device)
            torch.cuda.empty_cache()  # what a failed capture's pool held goes back to the usual path
        logger.warning("attnswap: prefill without graphed pieces for batch size %d (%s: %s); set "
                       "ATTNSWAP_PREFILL_GRAPH=off to skip this attempt", input_ids.shape[0], type(err).__name__, err)
        plans[key] = False
        return None
    return causal_lm_output(logits, cache)
