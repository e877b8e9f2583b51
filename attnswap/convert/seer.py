"""SeerAttention-style sparse attention: exact softmax attention over the key blocks a small learned
gate selects, with the model's own weights untouched.

The gate, per layer (blocks of ``block`` tokens, absolute positions ``p // block``):

    q_pool[i] = mean of the queries in block i                     (B, nQ, H, D), after RoPE
    k_pool[j] = [max, min, mean] of the keys in block j            (B, nK, Hk, 3D), after RoPE
    g_q = RoPE_blocks(q_pool W_q),  g_k = RoPE_blocks(k_pool W_k)  per-head projections to gate_dim
    P[h, i, :] = softmax_j<=i (g_q[h, i] . g_k[h // group, j] / sqrt(gate_dim))

A GQA group shares its key pooling. Selection is per KV head, from the largest gate probability in
its group: ``sparsity`` s keeps the top ceil((1 - s) * (i + 1)) causal blocks of query block i,
``threshold`` t > 0 keeps blocks with probability >= t, ``token_budget`` n > 0 keeps the top
ceil(n / block); the first block (sinks) and the diagonal block are always kept. Attention is then
exact softmax over the kept blocks (causal inside the diagonal one). ``sparsity=0`` keeps every
causal block: the teacher's attention exactly.

Training (stage 1, ``transfer`` mode): the gate learns KL(ground truth || P), where the ground truth
is the teacher's attention map max-pooled over (block x block) tiles and normalised per row
(``block_attention_map``), computed a slab of query rows at a time so no T x T map is held.

Generation keeps an ordinary KV cache (``KVCacheAttention``); each new token's gate scores the
cached key blocks and attends only the selected ones. The gate keys of completed blocks never change,
so the cache layer keeps them (``hf_compat.BlockSummaryLayer``): a step pools only the current partial
block, plus a block it completes (docs/SPARSIFY.md, "Decoding").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..hf_compat import padding_plan, summary_slot
from ..kernels import attn_with_block_map, block_sparse_attn, block_sparse_decode, decode_index
from .base import KVCacheAttention, register_method

NEG = float("-inf")


# --- the gate's pieces (plain PyTorch) ------------------------------------------------------------
def _block_ids(start: int, n: int, block: int, device) -> torch.Tensor:
    return torch.div(torch.arange(start, start + n, device=device), block, rounding_mode="floor")


def pool_queries(q: torch.Tensor, start: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the queries (B, T, H, D) at absolute positions start.. per block. Returns the pooled
    (B, nQ, H, D) in float32 and the absolute block index of each row (nQ,)."""
    B, T, H, D = q.shape
    ids = _block_ids(start, T, block, q.device)
    first = start // block  # ids[0] and ids[-1], from the shapes: reading them would wait for the device
    rel = ids - first
    n = (start + T - 1) // block - first + 1
    sums = q.new_zeros(B, n, H, D, dtype=torch.float32).index_add_(1, rel, q.float())
    counts = torch.bincount(rel, minlength=n).clamp_min(1).to(torch.float32)
    return sums / counts.view(1, n, 1, 1), torch.arange(first, first + n, device=q.device)


def pool_keys(k: torch.Tensor, block: int) -> torch.Tensor:
    """[max, min, mean] of the keys (B, Tk, Hk, D) per block from position 0: (B, nK, Hk, 3D) float32."""
    B, Tk, Hk, D = k.shape
    nK = -(-Tk // block)
    pad = nK * block - Tk
    kf = k.float()
    blocks = F.pad(kf, (0, 0, 0, 0, 0, pad)).view(B, nK, block, Hk, D)
    valid = torch.arange(nK * block, device=k.device).view(nK, block) < Tk
    v = valid.view(1, nK, block, 1, 1)
    mx = blocks.masked_fill(~v, NEG).amax(2)
    mn = blocks.masked_fill(~v, float("inf")).amin(2)
    mean = blocks.sum(2) / valid.sum(1).clamp_min(1).view(1, nK, 1, 1)
    return torch.cat([mx, mn, mean], dim=-1)


def block_rope(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding over the last dim of x (B, n, h, G) at block positions pos (n,)."""
    G = x.shape[-1]
    inv = base ** (-torch.arange(0, G, 2, device=x.device, dtype=torch.float32) / G)
    ang = pos.float()[:, None] * inv[None]  # (n, G/2)
    cos, sin = ang.cos().repeat(1, 2)[None, :, None], ang.sin().repeat(1, 2)[None, :, None]
    x1, x2 = x[..., : G // 2], x[..., G // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def block_attention_map(q, k, scale: float, block: int, attention_mask=None, rows: int = 256) -> torch.Tensor:
    """The ground truth: causal softmax attention of q (B, T, H, D) over k (B, T, Hk, D), max-pooled
    over (block x block) tiles, normalised to sum 1 per query-block row: (B, H, nQ, nK) float32.
    Computed ``rows`` query rows at a time (memory O(rows x T), not T x T)."""
    B, T, H, D = q.shape
    Hk = k.shape[2]
    g = H // Hk
    nB = -(-T // block)
    kh = k.transpose(1, 2).float().repeat_interleave(g, dim=1)  # (B, H, T, D)
    key_ok = None
    if attention_mask is not None and attention_mask.dim() == 4:
        row = attention_mask[:, 0, -1, -T:]
        key_ok = (row if row.dtype == torch.bool else row == 0)[:, None, None, :]
    out = q.new_zeros(B, H, nB, nB, dtype=torch.float32)
    rows = max(block, rows // block * block)
    kpos = torch.arange(T, device=q.device)
    for a in range(0, T, rows):
        b = min(T, a + rows)
        s = torch.einsum("bthd,bhsd->bhts", q[:, a:b].float(), kh) * scale  # (B, H, r, T)
        allowed = kpos[None, :] <= torch.arange(a, b, device=q.device)[:, None]
        if key_ok is not None:
            allowed = allowed & key_ok
        p = torch.softmax(s.masked_fill(~allowed, NEG), -1).nan_to_num(0.0)
        r = b - a
        pad_k = nB * block - T
        p = F.pad(p, (0, pad_k)).view(B, H, r, nB, block).amax(-1)  # max over each key block's tokens
        qb = (torch.arange(a, b, device=q.device) // block) - a // block
        nq = int(qb[-1]) + 1
        tile = p.new_full((B, H, nq, nB), 0.0).scatter_reduce_(
            2, qb.view(1, 1, r, 1).expand(B, H, r, nB), p, reduce="amax", include_self=True)
        out[:, :, a // block : a // block + nq] = torch.maximum(out[:, :, a // block : a // block + nq], tile)
    return out / out.sum(-1, keepdim=True).clamp_min(1e-30)


def select_blocks(probs: torch.Tensor, qpos: torch.Tensor, *, sparsity: float, threshold: float,
                  token_budget: int, block: int) -> torch.Tensor:
    """Which key blocks each query block attends: (B, Hk, nQ, nK) bool from gate probabilities
    (B, Hk, nQ, nK) over causal blocks; qpos (nQ,) are the absolute query-block indices."""
    nK = probs.shape[-1]
    kb = torch.arange(nK, device=probs.device)
    causal = kb[None, :] <= qpos[:, None]  # (nQ, nK)
    forced = (kb[None, :] == 0) | (kb[None, :] == qpos[:, None])
    if token_budget > 0:
        keep_n = torch.full_like(qpos, math.ceil(token_budget / block))
        keep = _top_n(probs, causal, keep_n)
    elif threshold > 0:
        keep = probs >= threshold
    else:
        n_causal = (qpos + 1).float()
        keep_n = torch.ceil((1.0 - sparsity) * n_causal - 1e-6).long().clamp_min(1)
        keep = _top_n(probs, causal, keep_n)
    return (keep | forced) & causal


def _top_n(probs, causal, keep_n):
    """Keep the keep_n[i] most probable causal blocks of each row i."""
    scores = probs.masked_fill(~causal, NEG)
    order = scores.argsort(-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank < keep_n.view(1, 1, -1, 1)


def block_sparse_attention(q, k, v, keep: torch.Tensor, qpos_of_row: torch.Tensor, block: int, scale: float,
                           attention_mask=None) -> torch.Tensor:
    """Exact softmax attention of q (B, T, H, D), the last T of Tk positions, over the keys of the kept
    blocks (keep: (B, Hk, nQ, nK); qpos_of_row (T,) indexes keep's nQ rows), causal; (B, T, H, D)."""
    B, T, H, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    g = H // Hk
    kb = torch.arange(Tk, device=q.device) // block
    tok = keep[:, :, qpos_of_row][..., kb]  # (B, Hk, T, Tk)
    causal = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(Tk - T)
    mask = tok & causal
    if attention_mask is not None and attention_mask.dim() == 4:
        m = attention_mask[..., -Tk:]
        mask = mask & (m if m.dtype == torch.bool else m == 0)[:, :1]
    mask = mask.repeat_interleave(g, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         scale=scale, enable_gqa=True)
    return out.transpose(1, 2).nan_to_num(0.0)


# --- the method -------------------------------------------------------------------------------------
@register_method("seer")
class SeerAttention(KVCacheAttention):
    runtime_options = ("sparsity", "threshold", "token_budget")  # may change at load time: no weights depend on them

    def __init__(self, original, config, layer_idx, options):
        options = {**self.default_options(config), **options}
        super().__init__(original, config, layer_idx, options)
        self.block = int(options["block"])
        G = int(options["gate_dim"])
        self.gate_dim = G
        self.gate_q = nn.Parameter(torch.randn(self.num_heads, self.head_dim, G) / math.sqrt(self.head_dim))
        self.gate_k = nn.Parameter(torch.randn(self.num_kv_heads, 3 * self.head_dim, G) / math.sqrt(3 * self.head_dim))
        # densities of the calls since reset_density(), kept on the device (reading one would wait for it):
        # the last one, the float64 sum and the count
        self._last_density: torch.Tensor | None = None
        self._density_sum: torch.Tensor | None = None
        self._density_n = 0

    @classmethod
    def default_options(cls, config) -> dict:
        return {"block": 64, "gate_dim": 64, "sparsity": 0.9, "threshold": 0.0, "token_budget": 0}

    def transfer_parameters(self):
        return [self.gate_q, self.gate_k]

    # the gate
    def gate_queries(self, q, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate queries (B, nQ, Hk, group, G) of q (the last T of n_keys positions), grouped by the KV head
        they share, and the absolute index of each query block (nQ,)."""
        B, T = q.shape[:2]
        qp, qpos = pool_queries(q, n_keys - T, self.block)
        gq = block_rope(torch.einsum("bnhd,hdg->bnhg", qp, self.gate_q.float()), qpos)
        return gq.view(B, gq.shape[1], self.num_kv_heads, -1, self.gate_dim), qpos

    def gate_keys(self, k, first_block: int = 0) -> torch.Tensor:
        """Gate keys (B, n, Hk, G) of the blocks of k (B, Tk, Hk, D), whose first position starts absolute
        block ``first_block``: each depends on its own block's keys only."""
        kp = pool_keys(k, self.block)
        pos = torch.arange(first_block, first_block + kp.shape[1], device=k.device)
        return block_rope(torch.einsum("bnhd,hdg->bnhg", kp, self.gate_k.float()), pos)

    def gate_scores(self, gq, qpos, gate_keys: list[torch.Tensor]) -> torch.Tensor:
        """Gate probabilities (B, Hk, group, nQ, nK) of the grouped queries over the key blocks, whose
        gate keys come in consecutive pieces (B, n_i, Hk, G) (stored blocks, then the new ones): the
        scores are computed piece by piece, so no (nK x heads) copy of the keys is made."""
        s = torch.cat([torch.einsum("bihrg,bjhg->bhrij", gq, gk) for gk in gate_keys], -1) / math.sqrt(self.gate_dim)
        causal = torch.arange(s.shape[-1], device=s.device)[None, :] <= qpos[:, None]
        return torch.softmax(s.masked_fill(~causal, NEG), -1)

    def gate_probs(self, q, k) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate probabilities (B, H, nQ, nK) for queries q (the last T of k's Tk positions), and the
        absolute index of each query block (nQ,)."""
        gq, qpos = self.gate_queries(q, k.shape[1])
        p = self.gate_scores(gq, qpos, [self.gate_keys(k)])
        return p.flatten(1, 2), qpos

    def select(self, q, k, gate_keys: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The key blocks each query block attends (B, Hk, nQ, nK) and the query blocks' indices. The
        gate keys of k's blocks are computed here (every block pooled again: the reference) unless
        given (``cached_gate_keys``: the same values, kept in the cache)."""
        gq, qpos = self.gate_queries(q, k.shape[1])
        probs = self.gate_scores(gq, qpos, gate_keys if gate_keys is not None else [self.gate_keys(k)])
        B, _, _, nQ, nK = probs.shape
        per_kv = probs.amax(2)
        o = self.options
        keep = select_blocks(per_kv, qpos, sparsity=float(o["sparsity"]), threshold=float(o["threshold"]),
                             token_budget=int(o["token_budget"]), block=self.block)
        causal = (torch.arange(nK, device=q.device)[None, :] <= qpos[:, None]).sum()
        d = (keep.sum() / (causal * B * self.num_kv_heads)).detach().double()
        self._last_density = d
        self._density_sum = d if self._density_sum is None else self._density_sum + d
        self._density_n += 1
        return keep, qpos

    # the gate keys kept in the KV cache
    reuse_gate_keys: bool = True  # False: re-pool every key block at every call (the reference path)

    def _cached(self, x, attention_mask, cache):
        kc, vc = cache.update(x.k.transpose(1, 2), x.v.transpose(1, 2), self.layer_idx)
        k, v = kc.transpose(1, 2), vc.transpose(1, 2)
        gate_keys = self.cached_gate_keys(cache, k) if self.reuse_gate_keys else None
        return self.attend(x.q, k, v, attention_mask, gate_keys=gate_keys)

    def _gate_tag(self):
        """What the stored gate keys depend on besides the keys: these gate weights, unchanged (an
        in-place update bumps ``_version``; a move or cast gives new storage)."""
        w = self.gate_k
        return (id(self), w._version, w.data_ptr(), w.dtype, w.device)

    def cached_gate_keys(self, cache, k) -> list[torch.Tensor] | None:
        """The gate keys of all of k's blocks (the cache's keys, this call's included), as pieces: those
        of the completed blocks, kept in the cache layer (``hf_compat.BlockSummaryLayer``) and extended
        by the blocks this call completed, then the current partial block's, computed afresh. None (the
        caller re-pools everything) when the cache layer cannot keep them, or when gradients must flow."""
        if torch.is_grad_enabled() and self.gate_k.requires_grad:
            return None
        layer = summary_slot(cache, self.layer_idx)
        if layer is None:
            return None
        B, Tk = k.shape[:2]
        full = Tk // self.block
        tag = self._gate_tag()
        done = layer.summaries(tag, self.block, B)  # None when missing or stale (then dropped)
        n = 0 if done is None else done.shape[1]
        if full > n:
            done = layer.append_summaries(self.gate_keys(k[:, n * self.block : full * self.block], n), tag,
                                          self.block, first=n)
        parts = [done.to(k.device)] if full else []
        if Tk > full * self.block:
            parts.append(self.gate_keys(k[:, full * self.block :], full))
        return parts

    def reset_density(self) -> None:
        self._density_sum, self._density_n = None, 0

    @property
    def last_density(self) -> float | None:
        """Fraction of causal key blocks the last call attended."""
        return None if self._last_density is None else float(self._last_density)

    @property
    def mean_density(self) -> float | None:
        """Mean fraction of causal key blocks attended over the calls since reset_density()."""
        return float(self._density_sum) / self._density_n if self._density_n else None

    def attend(self, q, k, v, attention_mask=None, gate_keys: list[torch.Tensor] | None = None):
        T, Tk = q.shape[1], k.shape[1]
        keep, qpos = self.select(q, k, gate_keys)
        if _has_padding(attention_mask, Tk):  # left-padded batches: the reference path masks the pad keys
            rows = torch.div(torch.arange(Tk - T, Tk, device=q.device), self.block, rounding_mode="floor") - qpos[0]
            return block_sparse_attention(q, k, v, keep, rows, self.block, self.scaling, attention_mask)
        if T == 1:  # a decoding step reads only the selected blocks of the cache
            idx, cnt = decode_index(keep[:, :, 0])
            return block_sparse_decode(q[:, 0], k, v, idx, cnt, block=self.block, scale=self.scaling)[:, None]
        return block_sparse_attn(q, k, v, keep, block=self.block, scale=self.scaling)

    def transfer_objective(self, x, teacher_out, attention_mask):
        """KL(teacher's pooled attention map || gate distribution), averaged over heads and query blocks."""
        with torch.no_grad():
            if _has_padding(attention_mask, x.k.shape[1]):
                truth = block_attention_map(x.q, x.k, self.scaling, self.block, attention_mask)
            else:  # the fused kernel: exact attention and its pooled map, no T x T matrix
                truth = attn_with_block_map(x.q, x.k, x.v, block=self.block, scale=self.scaling)[1]
        probs, _ = self.gate_probs(x.q, x.k)
        logp = probs.clamp_min(1e-30).log()
        kl = torch.where(truth > 0, truth * (truth.clamp_min(1e-30).log() - logp), torch.zeros_like(truth))
        return kl.sum(-1).mean()


def _has_padding(attention_mask, n_keys: int) -> bool:
    return padding_plan(attention_mask, n_keys) is not None  # the mask is read once per forward
