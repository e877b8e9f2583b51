"""Lizard-style attention: gated linear attention plus a sliding softmax window with learned
meta-memory sink tokens.

- Hedgehog feature maps on q and k, taken before RoPE (no RoPE in the linear branch);
- a scalar gate per KV head and token, g = log sigmoid(h W_g + b) <= 0, applied as a decay
  exp(g_{j+1} + ... + g_i) on the linear branch;
- exact softmax over the last ``window`` keys (default 256) and over ``meta_tokens`` (default 4)
  learned key/value pairs every query can attend to; both share one normaliser with the linear terms.

The operators live in ``attnswap.kernels.gated_attn`` (naive.py is their specification) and
``kernels/hybrid_attn/step_torch.py`` (decoding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import gated_hybrid_attn
from ..kernels.dispatch import backend_for, hybrid_continue
from ..kernels.hybrid_attn.step_torch import hybrid_prefill_state, hybrid_step
from .base import SwappedAttention, register_method
from .lolcats import HedgehogFeatureMap, feature_pair


@register_method("lizard")
class LizardAttention(SwappedAttention):
    optional_options = {"exact_heads": []}  # KV heads kept exact (a mixed layer, base.py)

    def __init__(self, original, config, layer_idx, options):
        options = {**self.default_options(config), **options}
        super().__init__(original, config, layer_idx, options)
        self.window = int(options["window"])
        fd = int(options["feature_dim"])
        M = int(options["meta_tokens"])
        self.feature_map_q = HedgehogFeatureMap(self.num_heads, self.head_dim, fd)
        self.feature_map_k = HedgehogFeatureMap(self.num_kv_heads, self.head_dim, fd)
        self.gate_proj = nn.Linear(config.hidden_size, self.num_kv_heads)
        nn.init.normal_(self.gate_proj.weight, std=1e-3)
        nn.init.constant_(self.gate_proj.bias, float(options["init_gate_bias"]))
        self.meta_k = nn.Parameter(torch.zeros(M, self.num_kv_heads, self.head_dim)) if M else None
        self.meta_v = nn.Parameter(torch.zeros(M, self.num_kv_heads, self.head_dim)) if M else None
        self.window_factor = nn.Parameter(torch.full((self.num_heads,), float(options["init_window_logit"])))

    @classmethod
    def default_options(cls, config) -> dict:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # sigmoid(5) = 0.993: a memory of a few hundred tokens to start from
        return {"window": 256, "feature_dim": head_dim, "meta_tokens": 4, "init_window_logit": 0.0,
                "init_gate_bias": 5.0}

    def transfer_parameters(self):
        extra = [self.meta_k, self.meta_v] if self.meta_k is not None else []
        return [*self.feature_map_q.parameters(), *self.feature_map_k.parameters(),
                *self.gate_proj.parameters(), self.window_factor, *extra]

    def _gates(self, x):
        """Log-gates (B, T, Hk)."""
        return F.logsigmoid(self.gate_proj(x.h.to(self.gate_proj.weight.dtype)).float())

    def _keys(self, x, dtype=torch.float32, step=False):
        """Key features (in ``dtype``) and log-gates (B, T, Hk): what the state needs."""
        return self.feature_map_k(x.kn, dtype, step), self._gates(x)

    def _parts(self, x, dtype=torch.float32, key_dtype=None, step=False, paired=False):
        """Everything the operators take, narrowed to the linear heads (all heads unless some are exact);
        query features in ``dtype``, key features in ``key_dtype`` (default: the same)."""
        fq, fk = feature_pair(self.feature_map_q, x.qn, dtype, self.feature_map_k, x.kn,
                              dtype if key_dtype is None else key_dtype, step, paired)
        g = self._gates(x)
        # every operator casts the meta tokens itself: a .float() copy here would be one more launch per layer
        meta = {} if self.meta_k is None else {"meta_k": self.lin_kv(self.meta_k, 1), "meta_v": self.lin_kv(self.meta_v, 1)}
        gamma = self.lin_q(torch.sigmoid(self.window_factor.float()), 0)
        return self.lin_q(fq), self.lin_kv(fk), self.lin_kv(g), gamma, meta

    def student(self, x):
        return self._student(x, self._parts(x, x.q.dtype))

    def _student(self, x, parts):
        fq, fk, g, gamma, meta = parts
        dt = x.q.dtype
        return gated_hybrid_attn(self.lin_q(x.q), self.lin_kv(x.k), self.lin_kv(x.v), fq.to(dt), fk.to(dt), g, gamma,
                                 window=self.window, scale=self.scaling, **meta)

    def prefill_state(self, x, valid):
        fk, g = self._keys(x)
        return hybrid_prefill_state(self.lin_kv(x.k), self.lin_kv(x.v), self.lin_kv(fk), valid, window=self.window,
                                    g=self.lin_kv(g))

    def student_and_state(self, x):
        parts = self._parts(x, x.q.dtype, torch.float32, paired=True)  # the state sums fp32 key features
        _, fk, g, _, _ = parts  # already narrowed to the linear heads, as the state takes them
        state = hybrid_prefill_state(self.lin_kv(x.k), self.lin_kv(x.v), fk, None, window=self.window, g=g)
        return self._student(x, parts), state

    def continue_fast(self, x, state, seen, attention_mask):
        """A chunked prefill's later pieces through the Triton forward once the window is full, without
        padding (otherwise, and on the PyTorch backend, ``decode`` steps in pieces)."""
        if seen < self.window or backend_for(x.q) != "triton" or not self.no_padding(attention_mask):
            return None
        fq, fk, g, gamma, meta = self._parts(x, x.q.dtype, torch.float32, paired=True)  # the state sums fp32 key features
        return hybrid_continue(self.lin_q(x.q), self.lin_kv(x.k), self.lin_kv(x.v), fq, fk, gamma, state,
                               window=self.window, scale=self.scaling, g=g, **meta)

    def decode(self, x, state):
        fq, fk, g, gamma, meta = self._parts(x, step=True)
        return hybrid_step(self.lin_q(x.q), self.lin_kv(x.k), self.lin_kv(x.v), fq, fk, gamma, state,
                           window=self.window, scale=self.scaling, g=g, **meta)
