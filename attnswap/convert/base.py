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

Mixed layers: a method that lists ``exact_heads`` in ``optional_options`` (lolcats, lizard) may keep
some of its KV heads exact. Those KV heads, with the query heads of their GQA groups, run full causal
softmax attention over the whole context; the method runs on the other heads only (it narrows its own
tensors with ``lin_q``/``lin_kv``). One module does both. In generation the layer's cache slot holds
the method's state for its linear heads plus the keys and values of its exact heads only
(``_recurrent_mixed``), in buffers of fixed capacity that grow by a quarter when full, so that the decode graph
(``modeling/decode.py``) can capture the step.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..hf_compat import CacheContractError, key_padding, layer_slot, mask_key_length, padding_plan, pop_cache
from ..kernels.dispatch import rope

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
    optional_options: ClassVar[dict] = {}  # options taken but left out of saved configs unless set (name -> default)
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
        self.exact_heads: list[int] = []
        if "exact_heads" in self.optional_options:
            self.set_exact_heads(self.options.get("exact_heads", []))

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

    # --- mixed layers: some KV heads exact ------------------------------------------------------
    def set_exact_heads(self, heads) -> None:
        """Keep the KV heads ``heads`` (and their query heads) exact; the method runs on the others."""
        if "exact_heads" not in self.optional_options:
            raise TypeError(f"{self.method} layers cannot keep heads exact")
        heads = list(heads)
        if any(not isinstance(h, int) or isinstance(h, bool) or not 0 <= h < self.num_kv_heads for h in heads) \
                or len(set(heads)) != len(heads):
            from ..errors import AttnSwapError

            raise AttnSwapError(f"layer {self.layer_idx}: exact_heads {heads} must be distinct KV-head indices "
                                f"in 0-{self.num_kv_heads - 1}")
        self.exact_heads = sorted(heads)
        if self.exact_heads:
            self.options["exact_heads"] = list(self.exact_heads)
        else:
            self.options.pop("exact_heads", None)
        G = self.num_heads // self.num_kv_heads
        ex_kv = self.exact_heads
        lin_kv = [h for h in range(self.num_kv_heads) if h not in ex_kv]
        ex_q = [h * G + g for h in ex_kv for g in range(G)]
        lin_q = [h * G + g for h in lin_kv for g in range(G)]
        # head indices as plain lists (no buffers: a model built on the meta device would leave them there)
        self._heads = {"ex_kv": ex_kv, "lin_kv": lin_kv, "ex_q": ex_q, "lin_q": lin_q,
                       "unmix": sorted(range(len(lin_q) + len(ex_q)), key=(lin_q + ex_q).__getitem__)}
        self._head_index = {}

    def _idx(self, name: str, device) -> torch.Tensor:
        key = (name, str(device))
        t = self._head_index.get(key)
        if t is None:
            t = self._head_index[key] = torch.tensor(self._heads[name], dtype=torch.long, device=device)
        return t

    @property
    def mixed(self) -> bool:
        return bool(self.exact_heads)

    @property
    def has_linear_heads(self) -> bool:
        return len(self.exact_heads) < self.num_kv_heads

    def lin_q(self, t, dim: int = 2):
        """``t`` narrowed to the query heads the method runs on (all of them in a layer without exact heads)."""
        return t if t is None or not self.exact_heads else t.index_select(dim, self._idx("lin_q", t.device))

    def lin_kv(self, t, dim: int = 2):
        """``t`` narrowed to the KV heads the method runs on."""
        return t if t is None or not self.exact_heads else t.index_select(dim, self._idx("lin_kv", t.device))

    def _exact_qkv(self, x: QKV, k=None, v=None):
        kv = self._idx("ex_kv", x.q.device)
        k = x.k.index_select(2, kv) if k is None else k
        v = x.v.index_select(2, kv) if v is None else v
        return x.q.index_select(2, self._idx("ex_q", x.q.device)), k, v

    def _join(self, lin, ex):
        """Outputs of the linear heads and of the exact heads (B, T, ., D) -> all heads in order."""
        if lin is None:
            return ex
        dt = ex.dtype
        both = torch.cat([lin.to(dt), ex], 2)
        return both.index_select(2, self._idx("unmix", both.device))

    def _mixed_student(self, x: QKV) -> torch.Tensor:
        """``student`` with the exact heads' softmax attention put in (no padding: causal over x)."""
        if not self.exact_heads:
            return self.student(x)
        q, k, v = self._exact_qkv(x)
        ex = self.softmax_attention(q, k, v)
        return self._join(self.student(x) if self.has_linear_heads else None, ex)

    # --- shared machinery --------------------------------------------------------------------
    def project(self, hidden_states, position_embeddings):
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim)
        k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim)
        v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        # transformers' RoPE (hf_compat.apply_rope); one fused launch on CUDA (kernels/rope)
        qr, kr = rope(q, k, cos, sin, step=T == 1)
        return QKV(qr, kr, v, q, k, hidden_states)

    def softmax_attention(self, q, k, v, attention_mask=None):
        """Exact causal softmax attention (the teacher), via SDPA, GQA without copying KV heads."""
        Tq, Tk = q.shape[1], k.shape[1]
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask, causal = None, False
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask[..., -Tk:]
            if mask.dtype != torch.bool:
                mask = mask == 0
        elif Tq == Tk and Tq > 1:  # SDPA's own causal path: no (T, T) mask in memory (1 GiB at 32k), flash
            causal = True
        elif Tq > 1:
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal, scale=self.scaling,
                                             enable_gqa=True)
        return out.transpose(1, 2)

    # --- recurrent generation (constant memory); a method that cannot decode leaves these out ----
    def prefill_state(self, x: QKV, valid: torch.Tensor | None) -> dict:
        """The decoding state after x's tokens; ``valid`` (B, T) marks real (not padding) tokens,
        None: all of them. Its size must not depend on T."""
        raise NotImplementedError

    def student_and_state(self, x: QKV):
        """``student(x)`` and ``prefill_state(x, None)`` for a prefill without padding. A method whose
        output and state read the same features overrides it to compute them once (a prefill's host
        time, not its device time, bounds a small model's prefill on a GPU: docs/BENCHMARKS.md)."""
        return self.student(x), self.prefill_state(x, None)

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
        T = x.q.shape[1]
        layer = layer_slot(cache, self.layer_idx)
        if self.exact_heads:
            out = self._recurrent_mixed(x, attention_mask, layer)
        elif layer.state is None:
            out, layer.state = self._first_prefill(x, attention_mask)
        else:  # continue from the state (chunked prefill, decoding)
            out, new = self._continue(x, layer.state, layer.seen, attention_mask)
            layer.set_state(new)
        layer.seen += T
        return out

    def _continue(self, x: QKV, state: dict, seen: int, attention_mask):
        """(out, new state) of the linear heads for x's tokens after ``state``: a chunked prefill's later
        piece through ``continue_fast`` where the method has one, else ``decode`` in pieces."""
        fast = None
        if x.q.shape[1] > 1 and not torch.is_grad_enabled():
            fast = self.continue_fast(x, state, seen, attention_mask)
        return fast if fast is not None else self._decode_pieces(x, state)

    def _first_prefill(self, x: QKV, attention_mask, linear_only: bool = False):
        """Output and state of the first call into a cache: one pass without padding (``student_and_state``),
        else each row on its real tokens and the state from the padding mask."""
        T = x.q.shape[1]
        if padding_plan(attention_mask, T) is None:
            return self.student_and_state(x)
        out = self._student_padded(x, attention_mask, linear_only=linear_only)
        return out, self.prefill_state(x, key_padding(attention_mask, T))

    def continue_fast(self, x: QKV, state: dict, seen: int, attention_mask) -> tuple | None:
        """(out, new state) for several new tokens after ``state`` through a whole-sequence kernel, or
        None to step through ``decode`` in pieces. Called only without gradients; ``seen``: tokens
        already in the state. An override must return None where the mask holds padding (``no_padding``)."""
        return None

    @staticmethod
    def no_padding(attention_mask) -> bool:
        """Every key of every row is a real token (reads the mask once per forward: ``padding_plan``)."""
        return attention_mask is None or attention_mask.dim() != 4 or \
            padding_plan(attention_mask, attention_mask.shape[-1]) is None

    def _decode_pieces(self, x: QKV, state: dict):
        outs = []
        for a in range(0, x.q.shape[1], self.decode_piece):
            o, state = self.decode(x.span(a, a + self.decode_piece), state)
            outs.append(o)
        return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)), state

    exact_capacity_min: ClassVar[int] = 256  # the exact heads' key slots grow in multiples of this

    def exact_capacity(self, need: int, cap: int = 0) -> int:
        """Slots for ``need`` exact keys, growing from ``cap``: by at least a quarter (so a long decode
        re-captures its graph O(log) times) and at most 25% + one unit over ``need``, in multiples of
        ``exact_capacity_min``."""
        unit = self.exact_capacity_min
        want = need if cap == 0 else max(need, cap + max(unit, cap // 4))
        return -(-want // unit) * unit

    EXACT_KEYS: ClassVar[tuple[str, ...]] = ("exact_k", "exact_v", "exact_ok", "exact_n")

    def reserve_exact(self, layer, new_tokens: int) -> None:
        """Make room in the exact heads' cache for ``new_tokens`` more (``exact_capacity``): before a
        step that writes into it in place of growing it (eager calls and the decode graph alike)."""
        st = layer.state
        if st is None or "exact_k" not in st:
            return
        cap, need = st["exact_k"].shape[1], layer.seen + new_tokens
        if need <= cap:
            return
        grow = self.exact_capacity(need, cap) - cap
        st = dict(st)
        for name in ("exact_k", "exact_v"):
            t = st[name]
            st[name] = torch.cat([t, t.new_zeros(t.shape[0], grow, *t.shape[2:])], 1)
        st["exact_ok"] = torch.cat([st["exact_ok"], st["exact_ok"].new_zeros(st["exact_ok"].shape[0], grow)], 1)
        layer.set_state(st)

    def _recurrent_mixed(self, x: QKV, attention_mask, layer):
        """A mixed layer's generation: the linear heads from their state, the exact heads by softmax over
        their own keys and values. Those live in the state with a fixed capacity (so the decode graph can
        hold them): ``exact_k``/``exact_v`` (B, C, n_exact, D), ``exact_ok`` (B, C) real tokens written,
        ``exact_n`` (B,) slots written (the same for every row); ``reserve_exact`` grows C when full."""
        B, T = x.q.shape[:2]
        dev = x.q.device
        kv = self._idx("ex_kv", dev)
        k_new, v_new = x.k.index_select(2, kv), x.v.index_select(2, kv)
        q = x.q.index_select(2, self._idx("ex_q", dev))
        valid = key_padding(attention_mask, T)  # None in the decode graph's step: new tokens are real
        valid = torch.ones(B, T, dtype=torch.bool, device=dev) if valid is None else valid
        first = layer.state is None
        lin = None
        if first:  # prefill: attend over the new tokens only, then store them with room to grow
            ex = self.softmax_attention(q, k_new, v_new, attention_mask)
            cap = self.exact_capacity(T)

            def room(t, fill=0):
                return torch.cat([t, t.new_full((B, cap - T, *t.shape[2:]), fill)], 1)

            exact = {"exact_k": room(k_new), "exact_v": room(v_new), "exact_ok": room(valid, False),
                     "exact_n": torch.full((B,), T, dtype=torch.long, device=dev)}
            lin_state = {}
            if self.has_linear_heads:
                lin, lin_state = self._first_prefill(x, attention_mask, linear_only=True)
        else:
            self.reserve_exact(layer, T)
            old = layer.state
            lin_state = {n: t for n, t in old.items() if n not in self.EXACT_KEYS}
            n0 = old["exact_n"]
            pos = n0[:1] + torch.arange(T, device=dev)  # the slots written now (a tensor: no host sync)
            k_all = old["exact_k"].index_copy(1, pos, k_new.to(old["exact_k"].dtype))
            v_all = old["exact_v"].index_copy(1, pos, v_new.to(old["exact_v"].dtype))
            ok = old["exact_ok"].index_copy(1, pos, valid)
            slot = torch.arange(k_all.shape[1], device=dev)
            see = ok[:, None, :] & (slot[None, None, :] <= pos[None, :, None])  # (B, T, C) causal over real keys
            see = see | (slot[None, None, :] == pos[None, :, None])  # a query always sees itself: no empty row
            ex = self.softmax_attention(q, k_all, v_all, see[:, None])
            exact = {"exact_k": k_all, "exact_v": v_all, "exact_ok": ok, "exact_n": n0 + T}
            if self.has_linear_heads:
                lin, lin_state = self._continue(x, lin_state, layer.seen, attention_mask)
        layer.set_state({**lin_state, **exact})
        return self._join(lin, ex)

    def _student_padded(self, x: QKV, attention_mask, linear_only: bool = False):
        """Run ``student`` (with the exact heads of a mixed layer, unless ``linear_only``); with left
        padding, run each sequence on its real tokens only."""
        fn = self.student if linear_only else self._mixed_student
        starts = padding_plan(attention_mask, x.k.shape[1])  # leading pad tokens per row; read once per forward
        if starts is None:
            return fn(x)
        outs = []
        for b, start in enumerate(starts):
            o = fn(x.rows(b, start))
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

    def _student_padded(self, x: QKV, attention_mask, linear_only: bool = False):
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
