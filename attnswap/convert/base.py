"""The swap mechanism: a base class for replacement attention modules and a registry of methods.

A replacement takes over the original module's projections (q_proj, k_proj, v_proj, o_proj and, where
the family has them, q_norm/k_norm) under the same names, so a base checkpoint's weights load into it
unchanged and LoRA finds the usual target names. It adds only its own parameters.

Every replacement runs in one of three modes, which distillation switches without knowing the method:
- ``student``: the replacement attention (the default, and what a saved model runs);
- ``teacher``: the original softmax attention, computed from the same projections;
- ``transfer``: returns the teacher output, and stores the MSE between student and teacher outputs
  in ``transfer_loss`` (stage 1 attention transfer, with teacher forcing between layers);
- ``calibrate``: ``alpha * exact + (1 - alpha) * cheap`` per calibration unit, where ``alpha =
  sigmoid(calib_logit)`` and a unit is the whole layer (``calib_logit`` of size 1) or one KV head
  (size ``num_kv_heads``; its query heads share it). ``distill/calibrate.py`` gives the modules their
  ``calib_logit``, trains it and takes it away again; a method changes what "exact" and "cheap" mean
  by overriding ``calibration_outputs`` (by default: softmax attention and the method's student).
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..hf_compat import (CacheContractError, apply_rope, key_padding, layer_slot, mask_key_length, padding_plan,
                         pop_cache)

MODES = ("student", "teacher", "transfer", "calibrate")


class QKV(NamedTuple):
    """Projected heads, (B, T, heads, D): q, k after RoPE; qn, kn the same before RoPE; h the
    layer's input (B, T, hidden), for methods that compute more from it (gates)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    qn: torch.Tensor
    kn: torch.Tensor
    h: torch.Tensor

    def rows(self, b: int, start: int = 0) -> "QKV":
        return QKV(*(t[b : b + 1, start:] for t in self))

    def span(self, a: int, b: int) -> "QKV":
        return QKV(*(t[:, a:b] for t in self))
METHODS: dict[str, type[SwappedAttention]] = {}


def register_method(name: str):
    """Register a replacement attention class under ``name``. It must say how it generates: from a
    fixed-size state (``prefill_state`` + ``decode``) or from an ordinary KV cache (``KVCacheAttention``)."""

    def deco(cls):
        recurrent = cls.decode is not SwappedAttention.decode and cls.prefill_state is not SwappedAttention.prefill_state
        if not recurrent and not issubclass(cls, KVCacheAttention):
            raise TypeError(f"method {name!r}: define prefill_state and decode, or derive from KVCacheAttention")
        cls.method = name
        METHODS[name] = cls
        return cls

    return deco


class SwappedAttention(nn.Module):
    method: ClassVar[str] = ""
    decode_piece: ClassVar[int] = 256  # tokens attended per call when continuing from a state
    runtime_options: ClassVar[tuple[str, ...]] = ()  # options that may change at load time (no weights depend on them)
    _stolen = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")

    def __init__(self, original: nn.Module, config, layer_idx: int, options: dict):
        super().__init__()
        for name in self._stolen:
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.options = dict(options)
        self.mode = "student"
        self.transfer_loss: torch.Tensor | None = None
        self.calib_logit: nn.Parameter | None = None  # only while calibrating (distill/calibrate.py)

    # --- to be provided by each method -------------------------------------------------------
    @classmethod
    def default_options(cls, config) -> dict:
        return {}

    def student(self, x: QKV) -> torch.Tensor:
        """Attention output (B, T, H, D) of the replacement, causal over x's T tokens."""
        raise NotImplementedError

    def transfer_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by attention transfer (stage 1)."""
        raise NotImplementedError

    def transfer_objective(self, x: QKV, teacher_out: torch.Tensor, attention_mask) -> torch.Tensor:
        """Stage 1's loss for this layer, given the teacher's attention output (B, T, H, D): by default
        the MSE between the student's and the teacher's outputs after o_proj."""
        B, T = teacher_out.shape[:2]
        pred = self._student_padded(x, attention_mask).reshape(B, T, -1)
        dt = x.h.dtype
        return F.mse_loss(self.o_proj(pred.to(dt)).float(), self.o_proj(teacher_out.reshape(B, T, -1).to(dt)).float())

    def calibration_outputs(self, x: QKV, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(exact, cheap) attention outputs (B, T, H, D) that ``calibrate`` mode mixes."""
        return self.softmax_attention(x.q, x.k, x.v, attention_mask), self._student_padded(x, attention_mask)

    def calibration_units(self, per_head: bool) -> int:
        """How many calibration weights this layer has: one, or one per KV head."""
        return self.num_kv_heads if per_head else 1

    def calibrated(self, x: QKV, attention_mask) -> torch.Tensor:
        exact, cheap = self.calibration_outputs(x, attention_mask)
        a = torch.sigmoid(self.calib_logit.float())
        a = a.repeat_interleave(self.num_heads // a.numel()).view(1, 1, -1, 1)  # per query head
        return (a * exact.float() + (1.0 - a) * cheap.float()).to(exact.dtype)

    # --- shared machinery --------------------------------------------------------------------
    def project(self, hidden_states, position_embeddings):
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim)
        k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim)
        v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        qr, kr = apply_rope(q, k, cos, sin)
        return QKV(qr, kr, v, q, k, hidden_states)

    def softmax_attention(self, q, k, v, attention_mask=None):
        """Exact causal softmax attention (the teacher), via SDPA, GQA without copying KV heads."""
        Tq, Tk = q.shape[1], k.shape[1]
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask[..., -Tk:]
            if mask.dtype != torch.bool:
                mask = mask == 0
        elif Tq > 1:
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scaling, enable_gqa=True)
        return out.transpose(1, 2)

    # --- recurrent generation (constant memory); a method that cannot decode leaves these out ----
    def prefill_state(self, x: QKV, valid: torch.Tensor) -> dict:
        """The decoding state after x's tokens; ``valid`` (B, T) marks real (not padding) tokens.
        Its size must not depend on T."""
        raise NotImplementedError

    def decode(self, x: QKV, state: dict):
        """Attend x's new tokens, which directly follow ``state``; return (out, new state)."""
        raise NotImplementedError

    @property
    def can_decode(self) -> bool:
        return type(self).decode is not SwappedAttention.decode

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        cache = pop_cache(kwargs)  # raises if transformers hands the cache over under a name we do not know
        B, T, _ = hidden_states.shape
        x = self.project(hidden_states, position_embeddings)
        if self.mode == "student":
            if cache is not None:
                out = self._recurrent(x, attention_mask, cache) if self.can_decode else self._cached(x, attention_mask, cache)
            else:
                self._check_no_history(attention_mask, kwargs.get("use_cache"), T)
                out = self._student_padded(x, attention_mask)
        elif self.mode == "calibrate":
            if cache is not None or self.calib_logit is None:
                raise RuntimeError("calibrate mode runs without a cache, on a layer given a calib_logit")
            out = self.calibrated(x, attention_mask)
        else:
            q, k, v = x.q, x.k, x.v
            if cache is not None:  # softmax keeps the whole history, as the original does
                kc, vc = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
                k, v = kc.transpose(1, 2), vc.transpose(1, 2)
            out = self.softmax_attention(q, k, v, attention_mask)
            if self.mode == "transfer":
                self.transfer_loss = self.transfer_objective(x, out.detach(), attention_mask)
                out = out.detach()
        return self.o_proj(out.reshape(B, T, -1).to(hidden_states.dtype)), None

    def _check_no_history(self, attention_mask, use_cache, T: int) -> None:
        """Without a cache a converted layer sees only this call's tokens. If the call says there is
        history (use_cache, or a mask over more keys than queries), attending to those tokens alone
        would be silently wrong: raise instead."""
        keys = mask_key_length(attention_mask)
        if use_cache or (keys is not None and keys > T):
            why = "use_cache=True" if use_cache else f"an attention mask over {keys} keys for {T} new tokens"
            raise CacheContractError(
                f"layer {self.layer_idx} ({self.method}) was called with {why} but received no cache: it would "
                "decode without its state. Pass the cache as `cache`/`past_key_values`, or check that the installed "
                "transformers is in the range attnswap supports")

    def _cached(self, x: QKV, attention_mask, cache):
        """Generation through an ordinary KV cache (KVCacheAttention methods)."""
        kc, vc = cache.update(x.k.transpose(1, 2), x.v.transpose(1, 2), self.layer_idx)
        return self.attend(x.q, kc.transpose(1, 2), vc.transpose(1, 2), attention_mask)

    def _recurrent(self, x: QKV, attention_mask, cache):
        """Generation with a constant-size state, kept in this layer's slot of the transformers cache."""
        B, T = x.q.shape[:2]
        layer = layer_slot(cache, self.layer_idx)
        if layer.state is None:
            valid = key_padding(attention_mask, T)
            valid = torch.ones(B, T, dtype=torch.bool, device=x.q.device) if valid is None else valid
            out = self._student_padded(x, attention_mask)
            layer.state = self.prefill_state(x, valid)
        else:  # continue from the state, a bounded piece at a time (chunked prefill, decoding)
            outs = []
            for a in range(0, T, self.decode_piece):
                o, new = self.decode(x.span(a, a + self.decode_piece), layer.state)
                layer.set_state(new)
                outs.append(o)
            out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        layer.seen += T
        return out

    def _student_padded(self, x: QKV, attention_mask):
        """Run ``student``; with left padding, run each sequence on its real tokens only."""
        starts = padding_plan(attention_mask, x.k.shape[1])  # leading pad tokens per row; read once per forward
        if starts is None:
            return self.student(x)
        outs = []
        for b, start in enumerate(starts):
            o = self.student(x.rows(b, start))
            outs.append(torch.cat([o.new_zeros(1, start, *o.shape[2:]), o], dim=1))
        return torch.cat(outs)


class KVCacheAttention(SwappedAttention):
    """A replacement that keeps exact keys and values (sparse or streaming attention): it generates
    through transformers' ordinary KV cache, so it needs no state of its own. A method defines
    ``attend``, attention of the last ``Tq`` positions over ``Tk >= Tq`` keys (history first)."""

    def attend(self, q, k, v, attention_mask=None) -> torch.Tensor:
        raise NotImplementedError

    def student(self, x: QKV) -> torch.Tensor:
        return self.attend(x.q, x.k, x.v)

    def _student_padded(self, x: QKV, attention_mask):
        return self.attend(x.q, x.k, x.v, attention_mask)


def swapped_modules(model: nn.Module) -> list[SwappedAttention]:
    return [m for m in model.modules() if isinstance(m, SwappedAttention)]


@contextlib.contextmanager
def attention_mode(model: nn.Module, mode: str):
    """Run every replacement module of ``model`` in ``mode`` for the duration of the block."""
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}")
    mods = swapped_modules(model)
    old = [m.mode for m in mods]
    for m in mods:
        m.mode = mode
        m.transfer_loss = None
    try:
        yield mods
    finally:
        for m, o in zip(mods, old):
            m.mode = o
