"""Triton block-sparse decoding step over a KV cache (same contract as ``naive.naive_block_sparse_decode``).

Split-K (flash-decoding): the selected blocks of each (sequence, selection head) are cut into
``nsplit`` runs of consecutive list entries; a program per (sequence x selection head, run) reads only
its blocks' keys and values, once for all the query heads that share the selection (they share one KV
head; their rows are padded to 16 for tl.dot), and keeps a partial online softmax (row max, row sum,
numerator) in fp32. A second small kernel merges the runs. Memory traffic is the selected blocks
(plus O(heads x runs x Dv) partials), so it falls with sparsity. The grid depends only on the shapes
(S, the list width, and the GPU's SM count), never on the counts, so the step can be captured in a
CUDA graph when ``block_idx`` has a fixed width.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..host import cdiv
from ..linear_attn.chunk import dot_precision, p2
from .chunk import LOG2E

# programs per SM the split aims for; list entries per run at least
TUNING = {"programs_per_sm": 4, "min_blocks_per_split": 2, "warps": 4, "stages": 2}


@triton.jit
def _bs_decode_kernel(
    q, k, v, idx, cnt, lens, pacc, pml, o,
    L, Hg, R, QPG, S, PER, qk_scale,
    skb, skt, skh, svb, svt, svh,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BG: tl.constexpr,
    BLOCK: tl.constexpr, BN: tl.constexpr, HAS_LENS: tl.constexpr, DIRECT: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # b * Hg + g
    sp = tl.program_id(1)
    b = pid // Hg
    hk = (pid % Hg) // R
    rg = tl.arange(0, BG)
    mg = rg < QPG
    rd = tl.arange(0, BD)
    rv = tl.arange(0, BDV)
    rn = tl.arange(0, BN)
    md = rd < D
    mv = rv < DV
    heads = pid * QPG + rg  # b * H + h for the query heads of this selection head
    bq = tl.load(q + heads[:, None] * D + rd[None, :], mask=mg[:, None] & md[None, :], other=0.0)
    if HAS_LENS:
        n_tok = tl.load(lens + b)
    else:
        n_tok = L
    n = tl.load(cnt + pid)
    e0 = sp * PER
    e1 = tl.minimum(e0 + PER, n)
    kb = k + b * skb + hk * skh
    vb = v + b * svb + hk * svh
    m_i = tl.full([BG], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BG], dtype=tl.float32)
    acc = tl.zeros([BG, BDV], dtype=tl.float32)
    for e in range(e0, e1):
        j = tl.load(idx + pid * S + e)
        for s in tl.static_range(BLOCK // BN):
            tk = j * BLOCK + s * BN + rn
            mk = tk < n_tok
            bk = tl.load(kb + tk[:, None] * skt + rd[None, :], mask=mk[:, None] & md[None, :], other=0.0)
            bv = tl.load(vb + tk[:, None] * svt + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
            sc = tl.dot(bq, tl.trans(bk), input_precision=PREC) * qk_scale
            sc = tl.where(mk[None, :], sc, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.where(mk[None, :], tl.exp2(sc - m_new[:, None]), 0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(bv.dtype), bv, input_precision=PREC)
            m_i = m_new
    if DIRECT:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o + heads[:, None] * DV + rv[None, :], out.to(o.dtype.element_ty), mask=mg[:, None] & mv[None, :])
    else:
        part = (pid * tl.num_programs(1) + sp) * QPG + rg  # (B * Hg, nsplit, QPG) rows: no padding rows
        tl.store(pacc + part[:, None] * BDV + rv[None, :], acc, mask=mg[:, None])
        tl.store(pml + part * 2, m_i, mask=mg)
        tl.store(pml + part * 2 + 1, l_i, mask=mg)


@triton.jit
def _bs_decode_merge_kernel(pacc, pml, o, QPG, NSPLIT, DV: tl.constexpr, BDV: tl.constexpr, BG: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rg = tl.arange(0, BG)
    rv = tl.arange(0, BDV)
    mg = rg < QPG
    m = tl.full([BG], -1.0e30, dtype=tl.float32)
    l = tl.zeros([BG], dtype=tl.float32)
    acc = tl.zeros([BG, BDV], dtype=tl.float32)
    for sp in range(0, NSPLIT):
        part = (pid * NSPLIT + sp) * QPG + rg
        ms = tl.load(pml + part * 2, mask=mg, other=-1.0e30)
        ls = tl.load(pml + part * 2 + 1, mask=mg, other=0.0)
        a = tl.load(pacc + part[:, None] * BDV + rv[None, :], mask=mg[:, None], other=0.0)
        m_new = tl.maximum(m, ms)
        w_old = tl.exp2(m - m_new)
        w_new = tl.exp2(ms - m_new)
        l = l * w_old + ls * w_new
        acc = acc * w_old[:, None] + a * w_new[:, None]
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    heads = pid * QPG + rg
    tl.store(o + heads[:, None] * DV + rv[None, :], out.to(o.dtype.element_ty), mask=mg[:, None] & (rv < DV)[None, :])


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan_splits(S: int, programs: int, device) -> int:
    """Runs of list entries per (sequence, selection head): enough programs to fill the GPU, each run
    at least ``min_blocks_per_split`` blocks. One run on CPU (the interpreter)."""
    if device.type != "cuda":
        return 1
    want = cdiv(TUNING["programs_per_sm"] * _sm_count(device.index or 0), programs)
    return max(1, min(want, S // TUNING["min_blocks_per_split"]))


@torch.no_grad()
def triton_block_sparse_decode(q, k_cache, v_cache, block_idx, block_cnt, *, block: int = 64,
                               scale: float | None = None, cache_seqlens: torch.Tensor | None = None,
                               nsplit: int | None = None, bn: int | None = None):
    """q (B, H, D); caches (B, L, Hk, D) (any strides, last dim contiguous); block_idx (B, Hg, S) and
    block_cnt (B, Hg) int32 (Hk divides Hg, Hg divides H); cache_seqlens (B,) int32 valid lengths
    (default L). Returns (B, H, Dv). ``nsplit`` forces the number of runs (tests)."""
    B, H, D = q.shape
    L, Hk, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    Hg, S = block_idx.shape[1], block_idx.shape[2]
    if Hg % Hk or H % Hg or block_cnt.shape != (B, Hg) or block_idx.shape[0] != B:
        raise ValueError(f"block_idx (B, Hg, S) / block_cnt (B, Hg) with Hk={Hk} | Hg | H={H}; "
                         f"got {tuple(block_idx.shape)}, {tuple(block_cnt.shape)}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    q = q.contiguous()
    idx, cnt = block_idx.to(torch.int32).contiguous(), block_cnt.to(torch.int32).contiguous()
    lens = cache_seqlens.to(device=q.device, dtype=torch.int32).contiguous() if cache_seqlens is not None else None
    scale = D**-0.5 if scale is None else scale
    QPG = H // Hg
    BG, BDV = p2(QPG), p2(Dv)
    bn = bn or min(64, block)
    nsplit = nsplit or plan_splits(S, B * Hg, q.device)
    nsplit = max(1, min(nsplit, S))
    per = cdiv(S, nsplit)
    nsplit = cdiv(S, per)
    o = torch.empty(B, H, Dv, device=q.device, dtype=q.dtype)
    direct = nsplit == 1
    pacc = pml = None
    if not direct:
        pacc = torch.empty(B * Hg * nsplit * QPG, BDV, device=q.device, dtype=torch.float32)
        pml = torch.empty(B * Hg * nsplit * QPG, 2, device=q.device, dtype=torch.float32)
    _bs_decode_kernel[(B * Hg, nsplit)](
        q, k_cache, v_cache, idx, cnt, lens, pacc, pml, o,
        L, Hg, Hg // Hk, QPG, S, per, scale * LOG2E,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        D=D, DV=Dv, BD=p2(D), BDV=BDV, BG=BG, BLOCK=block, BN=bn, HAS_LENS=lens is not None, DIRECT=direct,
        PREC=dot_precision(q), num_warps=TUNING["warps"], num_stages=TUNING["stages"],
    )
    if not direct:
        _bs_decode_merge_kernel[(B * Hg,)](pacc, pml, o, QPG, nsplit, DV=Dv, BDV=BDV, BG=BG, num_warps=4)
    return o
