"""LoZA-style layer selection: some layers keep exact softmax attention, the others become streaming
attention (a few sink blocks plus a window of recent blocks), chosen from data.

A ``loza`` layer is one of two kinds, fixed by its ``streaming`` option (saved per swap, so a
converted model lists its streaming layers and its dense ones as two swaps):

- dense (``streaming=False``): exact causal softmax attention, the original layer's;
- streaming (``streaming=True``): query at position p attends the first ``sink_blocks`` blocks of
  ``block`` tokens and the ``local_blocks`` most recent blocks, its own included (causal), exactly
  (``kernels/streaming_attn/naive.py`` is the definition). During generation such a layer keeps only
  those keys: ``hf_compat.StreamingLayer`` drops the middle of the KV cache after each call, so its
  cache holds at most ``(sink_blocks + local_blocks) * block`` tokens however long the sequence.

No weights are added: the model's own projections run either way. Which layers stream is decided by
calibration (``distill/calibrate.py``): every layer starts as a candidate, mixes exact and streaming
outputs with a learned weight alpha, and the layers with the lowest alpha become streaming (see
``pipelines/sparsify.py``). Left-padded batches count each row's positions from its first real token,
so a padded prompt sees the same sink and window as the same prompt alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..hf_compat import StreamingLayer, key_padding, layer_slot, mask_key_length, padding_plan
from ..kernels import streaming_attn
from ..kernels.streaming_attn.naive import streaming_mask
from .base import KVCacheAttention, register_method


@register_method("loza")
class LoZAAttention(KVCacheAttention):

    def __init__(self, original, config, layer_idx, options):
        options = {**self.default_options(config), **options}
        super().__init__(original, config, layer_idx, options)
        self.streaming = bool(options["streaming"])
        self.block = int(options["block"])
        self.sink = int(options["sink_blocks"])
        self.local = int(options["local_blocks"])

    @classmethod
    def default_options(cls, config) -> dict:
        return {"streaming": True, "block": 128, "sink_blocks": 1, "local_blocks": 7}

    def transfer_parameters(self):
        return []

    @property
    def window_tokens(self) -> int:
        """Keys a streaming layer's cache holds at most."""
        return (self.sink + self.local) * self.block

    # --- attention ---------------------------------------------------------------------------------
    def attend(self, q, k, v, attention_mask=None, positions: torch.Tensor | None = None):
        """Attention of q (the last T positions) over k, v; ``positions`` (Tk,) are the keys' absolute
        positions when the cache dropped some (default: 0..Tk-1)."""
        if not self.streaming:
            return self.softmax_attention(q, k, v, attention_mask)
        return self.stream(q, k, v, attention_mask, positions)

    def stream(self, q, k, v, attention_mask=None, positions=None):
        T, Tk = q.shape[1], k.shape[1]
        starts = _row_starts(attention_mask)
        contiguous = positions is None or int(positions[0]) == 0 and positions.numel() == int(positions[-1]) + 1
        if starts is None and contiguous:  # the fast path: plain prefill, or a cache that dropped nothing yet
            return streaming_attn(q, k, v, sink=self.sink, local=self.local, block=self.block, scale=self.scaling)
        kpos = torch.arange(Tk, device=q.device) if positions is None else positions.to(q.device)
        kpos = kpos[None] if starts is None else kpos[None] - starts[:, None]  # (B|1, Tk), padding < 0
        qpos = kpos[:, Tk - T:]
        ok = streaming_mask(qpos, kpos, sink=self.sink, local=self.local, block=self.block)
        ok = ok | ~ok.any(-1, keepdim=True)  # a padding query sees everything (its output is unused), never NaN
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=ok[:, None], scale=self.scaling, enable_gqa=True)
        return out.transpose(1, 2)

    def calibration_outputs(self, x, attention_mask):
        return self.softmax_attention(x.q, x.k, x.v, attention_mask), self.stream(x.q, x.k, x.v, attention_mask)

    # --- generation: a cache that keeps only the sink and the window --------------------------------
    def _cached(self, x, attention_mask, cache):
        if not self.streaming:
            return super()._cached(x, attention_mask, cache)
        layer = layer_slot(cache, self.layer_idx, StreamingLayer)
        kc, vc = layer.update(x.k.transpose(1, 2), x.v.transpose(1, 2))
        # positions 0..Tk-1 (nothing dropped yet, known on the host) are what positions=None means
        out = self.stream(x.q, kc.transpose(1, 2), vc.transpose(1, 2), attention_mask,
                          layer.positions if layer.dropped else None)
        n = mask_key_length(attention_mask)
        layer.keep_ranges(self.needed_ranges(layer.seen, None if n is None else padding_plan(attention_mask, n)))
        return out

    def needed_ranges(self, seen: int, starts: list[int] | None) -> list[tuple[int, int]]:
        """``still_needed`` as absolute [a, b) ranges, on the host: row r (padded by ``starts[r]``) needs
        its sink blocks and its window from the next query's block ``(seen - start) // block`` back."""
        out = []
        for s in starts if starts is not None else [0]:
            qb = (seen - s) // self.block
            out += [(s, s + self.sink * self.block), (s + max(0, (qb - self.local + 1) * self.block), seen)]
        return out

    def still_needed(self, positions: torch.Tensor, seen: int, starts: torch.Tensor | None) -> torch.Tensor:
        """(L,) bool: the kept keys some later query (position >= seen) may still attend. The window only
        moves forward, so the next query's view is the widest any later one has."""
        rel = positions[None] - (starts[:, None] if starts is not None else 0)  # (B|1, L)
        nxt = seen - (starts[:, None] if starts is not None else 0)
        kb, qb = torch.div(rel, self.block, rounding_mode="floor"), torch.div(nxt, self.block, rounding_mode="floor")
        need = (rel >= 0) & ((kb < self.sink) | (kb > qb - self.local))
        return need.any(0)


def _row_starts(attention_mask) -> torch.Tensor | None:
    """Leading padding tokens per row (B,), read from the 4D mask over every position so far; None
    when no row is padded."""
    n = mask_key_length(attention_mask)
    if n is None:
        return None
    if padding_plan(attention_mask, n) is None:  # the mask is read on the host once per forward
        return None
    return (~key_padding(attention_mask, n)).int().cumprod(1).sum(1)
