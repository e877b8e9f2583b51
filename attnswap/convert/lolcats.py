"""LoLCATs-style attention: Hedgehog feature maps for linear attention over old keys, plus exact
softmax attention over a sliding window of recent keys, mixed by a learned per-head factor.

    phi(x) = softmax([x W + b, -(x W + b)])   per head, W initialised to the identity
    out_i  = (gamma_h sum_{window} e^{s_ij - m_i} v_j + sum_{older} phi(q_i).phi(k_j) v_j) / (same without v)

Two departures from the LoLCATs paper, both measured on SmolLM2 (docs/HISTORY.md, recipe search): ``sinks`` = S
(default 4) keeps the first S tokens in the exact part for every query (attention sinks), and the
feature maps read q/k before RoPE (``feature_rope: false``) while the window keeps RoPE. Setting
``sinks: 0, feature_rope: true`` gives the paper's form.

The operator itself lives in ``attnswap.kernels.hybrid_attn`` (naive.py is its specification).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import hedgehog, hedgehog_pair, hybrid_attn
from ..kernels.dispatch import backend_for, hybrid_continue
from ..kernels.hybrid_attn.step_torch import hybrid_prefill_state, hybrid_step
from .base import SwappedAttention, register_method


class HedgehogFeatureMap(nn.Module):
    """A per-head linear map followed by a softmax over [z, -z]: positive features of size 2 * feature_dim."""

    def __init__(self, n_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        eye = torch.eye(head_dim, feature_dim)
        self.weight = nn.Parameter(eye.unsqueeze(0).repeat(n_heads, 1, 1))  # (H, D, Fd)
        self.bias = nn.Parameter(torch.zeros(n_heads, feature_dim))

    def forward(self, x: torch.Tensor, dtype: torch.dtype = torch.float32, step: bool = False) -> torch.Tensor:
        """(B, T, H, D) -> (B, T, H, 2 Fd) in ``dtype`` (computed in fp32; one fused kernel on CUDA, see
        ``kernels/feature_map``). ``step``: a one-token decoding step."""
        return hedgehog(x, self.weight, self.bias, dtype, step=step)


def _observed(m: nn.Module) -> bool:
    """Something watches or replaces ``m``'s forward (hooks, a patched forward): it must run as a module."""
    from torch.nn.modules import module as M

    return bool(m._forward_hooks or m._forward_pre_hooks or M._global_forward_hooks or M._global_forward_pre_hooks
                or "forward" in m.__dict__)


def feature_pair(fq: HedgehogFeatureMap, xq, q_dtype, fk: HedgehogFeatureMap, xk, k_dtype, step: bool = False,
                 paired: bool = False):
    """(fq(xq) in ``q_dtype``, fk(xk) in ``k_dtype``): a layer's query and key features. ``paired`` (the
    generation paths: prefill into a cache, its later pieces) computes both in one Triton launch
    (``kernels.hedgehog_pair``) when no gradient is wanted and nothing observes the two modules; every
    other call runs each module, so training, hooks and fault location see them as before."""
    if paired and not torch.is_grad_enabled() and not (_observed(fq) or _observed(fk)):
        return hedgehog_pair(xq, fq.weight, fq.bias, xk, fk.weight, fk.bias, q_dtype, k_dtype, step=step)
    return fq(xq, q_dtype, step), fk(xk, k_dtype, step)


@register_method("lolcats")
class LolcatsAttention(SwappedAttention):
    optional_options = {"exact_heads": []}  # KV heads kept exact (a mixed layer, base.py)

    def __init__(self, original, config, layer_idx, options):
        options = {**self.default_options(config), **options}
        super().__init__(original, config, layer_idx, options)
        self.window = int(options["window"])
        fd = int(options["feature_dim"])
        self.feature_map_q = HedgehogFeatureMap(self.num_heads, self.head_dim, fd)
        self.feature_map_k = HedgehogFeatureMap(self.num_kv_heads, self.head_dim, fd)
        # gamma = sigmoid(logit): weight of the window's softmax terms against the linear terms
        self.window_factor = nn.Parameter(torch.full((self.num_heads,), float(options["init_window_logit"])))
        self.use_linear = bool(options.get("use_linear", True))
        self.feature_rope = bool(options["feature_rope"])
        self.sinks = int(options["sinks"])

    @classmethod
    def default_options(cls, config) -> dict:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return {"window": 256, "feature_dim": head_dim, "init_window_logit": 0.0, "feature_rope": False, "sinks": 4}

    def transfer_parameters(self):
        return [*self.feature_map_q.parameters(), *self.feature_map_k.parameters(), self.window_factor]

    def _features(self, x, dtype=torch.float32, key_dtype=None, step=False, paired=False):
        """Feature-mapped q and k (in ``dtype``; k in ``key_dtype`` if given): after RoPE (LoLCATs) or
        before it (``feature_rope: false``). ``paired``: see ``feature_pair``."""
        return feature_pair(self.feature_map_q, x.q if self.feature_rope else x.qn, dtype,
                            self.feature_map_k, x.k if self.feature_rope else x.kn,
                            dtype if key_dtype is None else key_dtype, step, paired)

    def _key_features(self, x, dtype=torch.float32, step=False):
        return self.feature_map_k(x.k if self.feature_rope else x.kn, dtype, step)

    def student(self, x):
        """The method on its linear heads (all heads unless the layer keeps some exact)."""
        return self._student(x, *(self._features(x, x.q.dtype) if self.use_linear else (None, None)))

    def _student(self, x, fq, fk):
        dt = x.q.dtype
        q, k, v = self.lin_q(x.q), self.lin_kv(x.k), self.lin_kv(x.v)
        fq, fk = self.lin_q(fq), self.lin_kv(fk)
        return hybrid_attn(
            q, k, v, fq.to(dt) if fq is not None else None, fk.to(dt) if fk is not None else None,
            self.lin_q(self.gamma(), 0), window=self.window, scale=self.scaling, use_linear=self.use_linear,
            sinks=self.sinks,
        )

    def gamma(self):
        return torch.sigmoid(self.window_factor.float())

    def prefill_state(self, x, valid, fk=None):
        fk = self._key_features(x) if fk is None else fk
        return hybrid_prefill_state(self.lin_kv(x.k), self.lin_kv(x.v), self.lin_kv(fk), valid,
                                    window=self.window, sinks=self.sinks)

    def student_and_state(self, x):
        fq, fk = self._features(x, x.q.dtype, torch.float32, paired=True)  # the state sums fp32 key features
        out = self._student(x, *((fq, fk) if self.use_linear else (None, None)))
        return out, self.prefill_state(x, None, fk)

    def continue_fast(self, x, state, seen, attention_mask):
        """A chunked prefill's later pieces through the Triton forward, once the window is full and the
        sinks have left it, without padding (otherwise, and on the PyTorch backend, ``decode`` steps in
        pieces)."""
        if not self.use_linear or seen < self.window + self.sinks or backend_for(x.q) != "triton" \
                or not self.no_padding(attention_mask):
            return None
        fq, fk = self._features(x, x.q.dtype, torch.float32, paired=True)  # the state sums fp32 key features
        return hybrid_continue(self.lin_q(x.q), self.lin_kv(x.k), self.lin_kv(x.v), self.lin_q(fq), self.lin_kv(fk),
                               self.lin_q(self.gamma(), 0), state, window=self.window, scale=self.scaling,
                               sinks=self.sinks)

    def decode(self, x, state):
        fq, fk = self._features(x, step=True)
        if not self.use_linear:
            fq, fk = torch.zeros_like(fq), torch.zeros_like(fk)
        return hybrid_step(self.lin_q(x.q), self.lin_kv(x.k), self.lin_kv(x.v), self.lin_q(fq), self.lin_kv(fk),
                           self.lin_q(self.gamma(), 0), state, window=self.window, scale=self.scaling, sinks=self.sinks)
