"""The one seam between attnswap and transformers' internals.

Every other module reaches transformers through public API (``from_pretrained``, ``from_config``,
``generate``, the Auto classes, ``Cache``/``CacheLayerMixin`` objects) or through a function here.
When transformers renames or reshapes something, this file is the one to change, and its tests
(``tests/test_hf_compat.py``) are the ones that say so.

What still relies on internals, and how each is guarded:
- the forward argument that carries the cache: ``past_key_values`` up to 5.23, ``cache`` from 5.24
  (read from the decoder layer's signature, ``CACHE_KWARG``); a ``Cache`` arriving under any other
  name raises instead of being ignored (``pop_cache``);
- the output field holding the cache (``out.past_key_values`` / ``out.cache``): ``output_cache``,
  ``causal_lm_output``;
- the decoder-layer call and its return shape (a tensor, or a tuple in older releases):
  ``call_decoder_layer``;
- the rotary helper ``apply_rotary_pos_emb`` of the Llama modeling file: ``apply_rope``;
- the layout of the 4D attention mask that attention layers receive: ``key_padding``; and that every
  layer of a forward receives the same mask object (``padding_plan`` reads it once; were it not so,
  each layer would read it again: slower, not wrong);
- the list ``cache.layers`` and the ``DynamicLayer`` base class of our state layer, of our KV layer
  with per-block summaries and of the streaming KV layer (its ``keys``/``values`` fields, ``update``,
  ``get_seq_length``, and ``get_mask_sizes`` reading the latter): ``StateLayer``, ``BlockSummaryLayer``,
  ``summary_slot``, ``StreamingLayer``, ``layer_slot``;
- ``model.hf_quantizer`` left behind by a GGUF load: ``forget_quantizer``;
- peft's module-name prefix ``base_model.model.``: ``strip_peft_prefix``;
- layer checkpointing's switch, ``gradient_checkpointing_enable`` up to 5.24 and
  ``activation_checkpointing_enable`` from 5.25 (the old name warns there): ``layer_checkpointing``.

The versions the test suite runs on are ``TESTED``; another version warns once, at import.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama import modeling_llama

TESTED = ("5.17.0", "5.25.0")  # oldest and newest transformers the whole suite has passed on
VERSION = Version(transformers.__version__)


def _cache_kwarg() -> str:
    params = inspect.signature(modeling_llama.LlamaDecoderLayer.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ImportError(f"attnswap does not know how transformers {transformers.__version__} passes the KV cache to "
                      "decoder layers (neither 'cache' nor 'past_key_values'); supported: "
                      f"{TESTED[0]} to {TESTED[1]}")


CACHE_KWARG = _cache_kwarg()
CACHE_NAMES = ("cache", "past_key_values")


def check_version(warn=warnings.warn) -> bool:
    """Warn (once per process, from import) when transformers is outside the tested range."""
    lo, hi = (Version(v) for v in TESTED)
    if lo <= Version(VERSION.base_version) <= hi:
        return True
    warn(f"attnswap was tested with transformers {TESTED[0]} to {TESTED[1]}; {transformers.__version__} is "
         "installed. Converted models check their own state at run time and raise rather than decode "
         "wrongly, but pin transformers to the tested range if anything fails.", stacklevel=3)
    return False


class CacheContractError(RuntimeError):
    """A converted layer was asked to decode without the state it needs."""


# --- arguments and outputs ---------------------------------------------------------------------
def pop_cache(kwargs: dict) -> Cache | None:
    """Take the cache out of a forward's ``kwargs``, whatever this release calls it. A ``Cache``
    under a name we do not know means transformers changed its calling convention: raise."""
    found = [kwargs.pop(n) for n in CACHE_NAMES if n in kwargs]
    found = [c for c in found if c is not None]
    if len(found) > 1:
        raise ValueError("pass the cache once, as `cache` or `past_key_values`")
    for name, value in kwargs.items():
        if isinstance(value, Cache):
            raise CacheContractError(
                f"transformers {transformers.__version__} passed a cache as {name!r}, which attnswap does not "
                f"know; a converted layer would decode without its state (tested: {TESTED[0]} to {TESTED[1]})")
    return found[0] if found else None


def cache_kwargs(cache: Cache | None) -> dict:
    """The keyword under which this release's models and layers take ``cache``."""
    return {CACHE_KWARG: cache}


def output_cache(out) -> Cache | None:
    """The cache a model output carries (``out.cache`` from 5.24, ``out.past_key_values`` before)."""
    for name in CACHE_NAMES:
        value = out.get(name) if hasattr(out, "get") else None
        if value is None:
            value = getattr(out, name, None)
        if value is not None:
            return value
    return None


def causal_lm_output(logits: torch.Tensor, cache: Cache | None) -> CausalLMOutputWithPast:
    field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    return CausalLMOutputWithPast(logits=logits, **{field: cache})


def call_decoder_layer(layer, hidden_states, *, position_embeddings, position_ids, cache, attention_mask=None):
    """One decoder layer's forward; returns its hidden states (a tuple's first item in older releases)."""
    out = layer(hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings,
                position_ids=position_ids, use_cache=cache is not None, **cache_kwargs(cache))
    return out[0] if isinstance(out, tuple) else out


def layer_checkpointing(model, on: bool, checkpoint_kwargs: dict | None = None) -> None:
    """Turn transformers' per-layer activation checkpointing on (``checkpoint_kwargs`` go to
    ``torch.utils.checkpoint.checkpoint``) or off, under whichever names this release gives the switch
    and its keyword argument."""
    stem = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        getattr(model, f"{stem}_checkpointing_enable")(**{f"{stem}_checkpointing_kwargs": checkpoint_kwargs})
    else:
        getattr(model, f"{stem}_checkpointing_disable")()


def new_cache(config=None) -> Cache:
    """An empty dynamic cache, as ``generate()`` would make it."""
    return DynamicCache(config=config) if config is not None else DynamicCache()


# --- rotary embeddings and masks ------------------------------------------------------------------
def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE on (B, T, heads, D) queries and keys, with the (B, T, D) cos/sin the model computed."""
    return modeling_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)


def key_padding(attention_mask, n_keys: int) -> torch.Tensor | None:
    """Which of the last ``n_keys`` keys are real tokens (B, n_keys) bool, read from the 4D mask
    (B, 1, Tq, Tk) that attention layers receive (bool: True = attend; float: 0 = attend). None
    when there is no such mask (no padding)."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    row = attention_mask[:, 0, -1, -n_keys:]
    return row if row.dtype == torch.bool else row == 0


_padding_seen: tuple | None = None  # (weakref to a 4D mask, its version, n_keys, answer): see padding_plan
_unpadded = 0  # depth of unpadded_rows blocks


@contextlib.contextmanager
def unpadded_rows():
    """Within the block every row a model runs on is one whole sequence without padding (training
    batches: ``distill.train.StepGraph``), so ``padding_plan`` answers None without reading the mask.
    Reading it is a host synchronisation, which a CUDA graph capture forbids, and transformers builds a
    4D causal mask while capturing (5.17 does so for any mask; later versions when packed sequences
    are possible). The masks themselves still reach softmax attention, so the result is the same."""
    global _unpadded
    _unpadded += 1
    try:
        yield
    finally:
        _unpadded -= 1


def padding_plan(attention_mask, n_keys: int) -> list[int] | None:
    """Whether the last ``n_keys`` keys of the 4D mask hold padding: None when every key of every
    row is real (or there is no 4D mask), else the number of leading padding keys of each row.

    Reading the mask's values on the host waits for the device (one synchronisation). Every layer of
    a forward receives the same mask object, so the answer is remembered for that object (while it
    lives and is not changed in place) and the mask is read once per forward, not once per layer."""
    global _padding_seen
    if attention_mask is None or attention_mask.dim() != 4 or _unpadded:
        return None
    seen = _padding_seen
    if (seen is not None and seen[0]() is attention_mask and seen[1] == attention_mask._version
            and seen[2] == n_keys):
        return seen[3]
    valid = key_padding(attention_mask, n_keys)
    pads, lead = torch.stack([(~valid).sum(1), (~valid).int().cumprod(1).sum(1)]).tolist()  # the one sync
    answer = None if not any(pads) else lead
    _padding_seen = (weakref.ref(attention_mask), attention_mask._version, n_keys, answer)
    return answer


def mask_key_length(attention_mask) -> int | None:
    """Number of keys the 4D mask covers (history included), or None without a 4D mask."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    return attention_mask.shape[-1]


# --- the cache layer that holds a converted layer's state ------------------------------------------
class StateLayer(DynamicLayer):
    """A cache layer for a converted attention layer: it counts the tokens seen (so positions and
    masks come out right) and holds the method's fixed-size state instead of keys and values. A mixed
    layer (some heads exact, convert/base.py) adds its exact heads' keys and values to that state, in
    buffers it doubles when full; every tensor of the state has the batch first, so the batch
    operations below apply to all of them alike."""

    is_sliding = False
    is_compileable = False

    def __init__(self, state: dict | None = None):
        super().__init__()
        self.seen = 0
        self.state: dict | None = state

    def lazy_initialization(self, key_states, value_states=None, *args, **kwargs):
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise CacheContractError("a converted attention layer keeps no key/value history")

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen, self.state = 0, None

    def set_state(self, new: dict) -> None:
        self.state = new

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a recurrent state cannot be rolled back (assisted decoding is not supported)")

    def _map_state(self, fn) -> None:
        if self.state is not None:
            self.state = {k: fn(t) for k, t in self.state.items()}

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices) -> None:
        self._map_state(lambda t: t[indices])

    def reorder_cache(self, beam_idx) -> None:
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def offload(self):
        self._map_state(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        pass


class StreamingLayer(DynamicLayer):
    """A KV cache layer whose keys may be dropped from the middle (streaming attention keeps only its
    sink and its recent window). It remembers the absolute position of every key it keeps
    (``positions``, (L,) long, shared by the batch) and counts every token it was given (``seen``), so
    ``get_seq_length`` (and with it the model's positions and the masks of the other layers) stays the
    length of the whole sequence. Keys are stored after RoPE, so dropping some changes nothing for the
    rest. Which keys to drop is the attention method's business: it calls ``keep`` after attending."""

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self):
        super().__init__()
        self.seen = 0
        self.positions: torch.Tensor | None = None
        self.dropped = False  # whether keep() ever dropped a key: if not, positions are 0..seen-1
        self.spans: list[tuple[int, int]] = []  # the positions again, on the host: sorted [a, b) ranges

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        T = key_states.shape[-2]
        new = torch.arange(self.seen, self.seen + T, device=keys.device)
        self.positions = new if self.positions is None else torch.cat([self.positions.to(keys.device), new])
        if self.spans and self.spans[-1][1] == self.seen:
            self.spans[-1] = (self.spans[-1][0], self.seen + T)
        elif T:
            self.spans.append((self.seen, self.seen + T))
        self.seen += T
        return keys, values

    def keep_ranges(self, needed: list[tuple[int, int]]) -> None:
        """Keep only the stored keys whose position lies in one of the ``needed`` [a, b) ranges (any
        order, may overlap). Decided on the host from ``spans``: no wait for the device."""
        kept, idx, offset = [], [], 0
        for a, b in self.spans:
            for na, nb in _merged(needed):
                lo, hi = max(a, na), min(b, nb)
                if lo < hi:
                    kept.append((lo, hi))
                    idx.append((offset + lo - a, offset + hi - a))
            offset += b - a
        if kept == self.spans:
            return
        dev = self.keys.device
        index = torch.cat([torch.arange(i, j, device=dev) for i, j in idx]) if idx else \
            torch.zeros(0, dtype=torch.long, device=dev)
        self.dropped = True
        self.keys = self.keys.index_select(-2, index)
        self.values = self.values.index_select(-2, index)
        self.positions = self.positions[index]
        self.spans = _merged(kept)

    def keep(self, which: torch.Tensor) -> None:
        """Keep only the stored keys where ``which`` ((L,) bool over the stored columns) is True."""
        if bool(which.all()):
            return
        idx = which.nonzero().flatten()
        self.dropped = True
        self.keys = self.keys.index_select(-2, idx)
        self.values = self.values.index_select(-2, idx)
        self.positions = self.positions[idx]
        self.spans = _merged([(p, p + 1) for p in self.positions.tolist()])

    def stored(self) -> int:
        """How many keys are held (what the cache costs), not how many tokens were seen."""
        return 0 if self.positions is None else int(self.positions.numel())

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.seen

    def reset(self) -> None:
        super().reset()
        self.seen, self.positions, self.dropped, self.spans = 0, None, False, []

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a streaming cache cannot be rolled back (assisted decoding is not supported)")


def _merged(ranges) -> list[tuple[int, int]]:
    """Half-open [a, b) ranges, sorted, empty ones dropped and touching or overlapping ones joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(r for r in ranges if r[0] < r[1]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def layer_slot(cache: Cache, idx: int, cls: type = StateLayer):
    """The cache layer ``idx``, turned into a ``cls`` (a fresh one) unless it already is one. A layer
    that already holds keys and values from softmax attention cannot be continued from: raise."""
    layers = cache.layers
    while len(layers) <= idx:
        layers.append(DynamicLayer())
    if not isinstance(layers[idx], cls):
        if layers[idx].get_seq_length() > 0:
            raise CacheContractError("a converted layer cannot continue from a cache filled by softmax attention")
        layers[idx] = cls()
    return layers[idx]


def step_cache(states: list[dict]) -> Cache:
    """A cache over given per-layer states, for the captured decode step (modeling/decode.py)."""
    return Cache(layers=[StateLayer(s) for s in states])


def cache_layers(cache: Cache) -> list:
    return list(cache.layers)


# --- a KV cache layer that also keeps one summary row per completed block of keys -------------------
class BlockSummaryLayer(DynamicLayer):
    """An ordinary dynamic KV layer (keys and values grow as usual) that also holds, for each COMPLETED
    block of ``block`` keys, a summary row computed from that block's keys alone (seer's gate keys):
    ``(B, n_blocks, ...)``, appended as blocks complete. Whatever transformers does to the keys through
    the layer's methods (beam reordering, batch selection and repetition, cropping, reset) it does to
    the summaries too; a change to the keys by any other route (the ``keys`` attribute replaced from
    outside) drops them, so a caller recomputes rather than reads stale rows.

    The summaries carry a ``tag`` (the caller's proof of what computed them, e.g. the gate weights'
    version): ``summaries()`` returns them only under the same tag, block size and batch size."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rows: torch.Tensor | None = None  # (B, capacity, ...) with the first n_blocks rows filled
        self.n_blocks = 0
        self.block = 0
        self.tag = None
        self._seen_keys = getattr(self, "keys", None)  # the keys object the summaries describe

    @classmethod
    def adopt(cls, layer: DynamicLayer) -> "BlockSummaryLayer":
        """A summary layer holding ``layer``'s keys and values (and no summaries yet)."""
        new = cls()
        new.__dict__.update(layer.__dict__)  # keys, values, is_initialized, device: whatever this release keeps
        new.clear_summaries()
        new._mark()
        return new

    # the summaries
    def clear_summaries(self) -> None:
        self._rows, self.n_blocks, self.block, self.tag = None, 0, 0, None

    def summaries(self, tag, block: int, batch: int) -> torch.Tensor | None:
        """The rows of the completed blocks (B, n_blocks, ...), or None (after dropping them) when they
        were made under another tag or block size, for another batch, or for keys that are not these."""
        if self._rows is None:
            return None
        n_keys = self.get_seq_length()
        if (self._stale() or self.tag != tag or self.block != block
                or self._rows.shape[0] != batch or self.n_blocks * block > n_keys):
            self.clear_summaries()
            return None
        return self._rows[:, : self.n_blocks]

    def append_summaries(self, rows: torch.Tensor, tag, block: int, first: int) -> torch.Tensor:
        """Append the rows (B, n, ...) of completed blocks first..first + n - 1, which must continue the
        stored ones (``first == n_blocks``, as ``summaries()`` just returned them); returns all rows
        (B, n_blocks, ...). Storage grows by doubling: appending costs O(n) amortised, not O(n_blocks)."""
        if self._rows is not None and (self._stale() or self.tag != tag or self.block != block
                                       or tuple(self._rows.shape[:1]) + tuple(self._rows.shape[2:])
                                       != tuple(rows.shape[:1]) + tuple(rows.shape[2:])):
            raise CacheContractError("appending block summaries that do not continue the stored ones; call "
                                     "summaries() first (it drops stale rows)")
        if first != (self.n_blocks if self._rows is not None else 0):
            raise CacheContractError(f"appending the summary of block {first} after {self.n_blocks} stored blocks")
        if first + rows.shape[1] > self.get_seq_length() // block:
            raise CacheContractError(f"{first + rows.shape[1]} block summaries for "
                                     f"{self.get_seq_length()} keys in blocks of {block}")
        if self._rows is None:
            self._rows, self.n_blocks, self.block, self.tag = None, 0, block, tag
        n, add = self.n_blocks, rows.shape[1]
        if self._rows is None or self._rows.shape[1] < n + add or self._rows.device != rows.device:
            cap = max(n + add, 2 * (self._rows.shape[1] if self._rows is not None else 0), 16)
            grown = rows.new_empty(rows.shape[0], cap, *rows.shape[2:])
            if n:
                grown[:, :n] = self._rows[:, :n]
            self._rows = grown
        self._rows[:, n : n + add] = rows
        self.n_blocks = n + add
        self._seen_keys = self.keys
        return self._rows[:, : self.n_blocks]

    def _stale(self) -> bool:
        """Whether the keys were replaced since the layer last saw them (by something else than its methods)."""
        return getattr(self, "keys", None) is not self._seen_keys

    def _mark(self) -> None:
        """The keys were changed by this layer's own methods: the summaries (kept in step) describe them."""
        self._seen_keys = getattr(self, "keys", None)

    # the cache layer's methods, applied to the summaries too
    def update(self, key_states, value_states, *args, **kwargs):
        stale = self._stale()
        out = super().update(key_states, value_states, *args, **kwargs)
        if stale:
            self.clear_summaries()
        self._mark()
        return out

    def reset(self) -> None:
        super().reset()
        self.clear_summaries()
        self._mark()

    def crop(self, tokens_to_remove: int) -> None:
        stale = self._stale()
        super().crop(tokens_to_remove)
        if stale:
            self.clear_summaries()
        elif self.block:
            self.n_blocks = min(self.n_blocks, self.get_seq_length() // self.block)
        self._mark()

    def _map_rows(self, fn, method, arg) -> None:
        stale = self._stale()
        getattr(super(), method)(arg)
        if stale:
            self.clear_summaries()
        elif self._rows is not None:
            self._rows = fn(self._rows)
        self._mark()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0), "batch_repeat_interleave", repeats)

    def batch_select_indices(self, indices) -> None:
        self._map_rows(lambda t: t[indices], "batch_select_indices", indices)

    def reorder_cache(self, beam_idx) -> None:
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)), "reorder_cache", beam_idx)

    def offload(self):
        stale = self._stale()
        super().offload()
        if not stale:
            self._mark()

    def prefetch(self):
        stale = self._stale()
        super().prefetch()
        if not stale:
            self._mark()


def summary_slot(cache: Cache, idx: int) -> BlockSummaryLayer | None:
    """Cache layer ``idx`` (already updated with this call's keys) as a ``BlockSummaryLayer``: a plain
    dynamic layer is replaced by one holding the same keys and values (their summaries are then missing,
    and recomputed by the caller). Any other kind of layer (sliding window, static, quantised...) is left
    alone and None returned: the caller then summarises the keys it is given from scratch."""
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) <= idx:
        return None
    layer = layers[idx]
    if isinstance(layer, BlockSummaryLayer):
        return layer
    if type(layer) is not DynamicLayer:
        return None
    layers[idx] = BlockSummaryLayer.adopt(layer)
    return layers[idx]


# --- loading and peft ----------------------------------------------------------------------------
def forget_quantizer(model) -> None:
    """A GGUF checkpoint is de-quantised on load; drop the quantizer record so it saves like any model."""
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


PEFT_PREFIX = "base_model.model."


def strip_peft_prefix(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX)


def base_forward_kwargs(**kw: Any) -> dict:
    """Keyword arguments for a stock ``*ForCausalLM.forward``, the cache under this release's name."""
    cache = kw.pop("cache", None)
    return {**kw, **cache_kwargs(cache)}
