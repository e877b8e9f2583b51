"""Triton block-sparse causal attention (prefill) and exact attention with its pooled block map.

One kernel, two modes, FlashAttention-2 style: a program per (tile of BM query rows, batch x query
head) keeps its query tile in registers and walks key tiles of BN rows with an online softmax (row max
and sum in fp32, exp2 with the scale folded in), so scores only ever exist as BM x BN register tiles.

* ``SPARSE`` (``triton_block_sparse_attn``): the key blocks come from the index list of the tile's
  query block (``masks.block_mask_to_index``, ascending); blocks that are not listed are never read.
  Every entry but the last lies strictly before the query block, so it is visited without any mask;
  the last one (the diagonal when kept) gets the element-wise causal mask, and its sub-tiles that lie
  entirely above the query tile are skipped.
* dense + ``MAP`` (``triton_attn_with_block_map``): every causal block, then a second walk over the
  same key tiles that recomputes the scores and, with the rows' final log-sum-exp, takes each tile's
  largest probability: max_ij p_ij = max_i exp2(max_j s_ij - lse_i), so only BM exponentials per
  tile. The (block x block) maxima of the BLOCK // BM query tiles of a block are combined and each row
  normalised on the host side (an (nQ, nK) array per head, tiny next to L x L).

GQA: query head h reads KV head h // (H // Hk) straight from k/v (nothing repeated) and selection row
h // (H // Hg). q/k/v may be strided views (last dim contiguous). Forward only: no autograd.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..linear_attn.chunk import dot_precision, launch_fitting, p2
from .masks import block_layout, block_mask_to_index, check_block_mask

LOG2E = 1.0 / math.log(2.0)

# BM / BN: query rows / key rows per tile (None: min(128, block) / min(64, block)); warps, stages.
# autotune: on CUDA, the sparse forward picks BM, BN, warps and stages among AUTOTUNE_CONFIGS by timing
# them on its first call per (head dim, block, dtype) (triton.autotune); off: the fixed choice above.
TUNING = {"bm": None, "bn": None, "warps": None, "stages": (3, 2, 1), "autotune": True}
# (BM, BN, warps, stages); the ones whose tiles do not divide the block, or are much smaller than it,
# are pruned before timing
AUTOTUNE_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 32, 4, 3), (128, 64, 4, 3),
                    (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (64, 32, 4, 4), (64, 64, 8, 3),
                    (32, 32, 4, 3), (32, 16, 4, 3), (16, 16, 4, 2)]


@triton.jit
def _online(bq, bk, bv, valid, m_i, l_i, acc, qk_scale, MASKED: tl.constexpr, PREC: tl.constexpr):
    """Online-softmax update of (row max, row sum, numerator) with one key tile; the row max is kept in
    log2 units of the scaled scores, so the scale folds into one multiply-add per score."""
    s = tl.dot(bq, tl.trans(bk), input_precision=PREC)
    if MASKED:
        s = tl.where(valid, s, -1.0e30)
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    if MASKED:
        p = tl.where(valid, p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(bv.dtype), bv, input_precision=PREC)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _load_rows(ptr, rows, stride, cols, mrow, mcol, ROWMASK: tl.constexpr, COLMASK: tl.constexpr):
    """Tile ptr[rows, cols] (rows strided, cols contiguous), masking only what can be out of range."""
    addr = ptr + rows[:, None] * stride + cols[None, :]
    if ROWMASK:
        if COLMASK:
            x = tl.load(addr, mask=mrow[:, None] & mcol[None, :], other=0.0)
        else:
            x = tl.load(addr, mask=mrow[:, None], other=0.0)
    else:
        if COLMASK:
            x = tl.load(addr, mask=mcol[None, :], other=0.0)
        else:
            x = tl.load(addr)
    return x


@triton.jit
def _tile_max(bq, bk, valid, lse2, mq, qk_scale, MASKED: tl.constexpr, PREC: tl.constexpr):
    """Largest probability per query row of one key tile (0 for rows that are not queries)."""
    s = tl.dot(bq, tl.trans(bk), input_precision=PREC)
    if MASKED:
        s = tl.where(valid, s, -1.0e30)
    return tl.where(mq, tl.exp2(tl.max(s, 1) * qk_scale - lse2), 0.0)


@triton.jit
def _bs_fwd_kernel(
    q, k, v, o, idx, cnt, bmap,
    T, Tk, H, GROUP, SEL, Hg, nQ, nK, S, q0, qk_scale,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    SPARSE: tl.constexpr, MAP: tl.constexpr, PREC: tl.constexpr,
):
    SUB: tl.constexpr = BLOCK // BM
    NSUB: tl.constexpr = BLOCK // BN
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest rows (last query blocks) start first
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    r = pid_m // SUB
    qblk = q0 + r  # absolute block of this tile = its diagonal key block
    p0 = qblk * BLOCK + (pid_m % SUB) * BM  # absolute position of the tile's first row
    pos = p0 + tl.arange(0, BM)
    tq = pos - (Tk - T)
    mq = (tq >= 0) & (tq < T)
    rd = tl.arange(0, BD)
    rv = tl.arange(0, BDV)
    rn = tl.arange(0, BN)
    md = rd < D
    mv = rv < DV
    kb = k + b * skb + hk * skh
    vb = v + b * svb + hk * svh
    bq = tl.load(q + b * sqb + h * sqh + tq[:, None] * sqt + rd[None, :], mask=mq[:, None] & md[None, :], other=0.0)
    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    if SPARSE:
        row = (b * Hg + h // SEL) * nQ + r
        n = tl.load(cnt + row)
        ib = idx + row * S
    else:
        n = qblk + 1
        ib = idx
    # every entry but the last lies strictly before this query block: whole tiles, no mask
    for e in range(0, n - 1):
        if SPARSE:
            j = tl.load(ib + e)
        else:
            j = e
        for s in tl.static_range(NSUB):
            tk = j * BLOCK + s * BN + rn
            bk = _load_rows(kb, tk, skt, rd, 0, md, False, BD != D)
            bv = _load_rows(vb, tk, svt, rv, 0, mv, False, BDV != DV)
            m_i, l_i, acc = _online(bq, bk, bv, 0, m_i, l_i, acc, qk_scale, False, PREC)
    # the last entry (the diagonal block when kept): causal mask, sub-tiles above the rows skipped
    if n > 0:
        if SPARSE:
            j = tl.load(ib + n - 1)
        else:
            j = qblk
        for s in tl.static_range(NSUB):
            k0 = j * BLOCK + s * BN
            if k0 <= p0 + BM - 1:
                tk = k0 + rn
                mk = tk < Tk
                bk = _load_rows(kb, tk, skt, rd, mk, md, True, BD != D)
                bv = _load_rows(vb, tk, svt, rv, mk, mv, True, BDV != DV)
                valid = tk[None, :] <= pos[:, None]
                m_i, l_i, acc = _online(bq, bk, bv, valid, m_i, l_i, acc, qk_scale, True, PREC)
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # a row with nothing selected gives 0
    out = acc / l_safe[:, None]
    ob = o + b * T * H * DV + h * DV
    tl.store(ob + tq[:, None] * (H * DV) + rv[None, :], out.to(o.dtype.element_ty), mask=mq[:, None] & mv[None, :])
    if MAP:
        lse2 = m_i + tl.log2(l_safe)
        mb = bmap + (bh * tl.num_programs(0) + pid_m) * nK
        for j2 in range(0, qblk):
            t = tl.zeros([BM], dtype=tl.float32)
            for s in tl.static_range(NSUB):
                tk = j2 * BLOCK + s * BN + rn
                bk = _load_rows(kb, tk, skt, rd, 0, md, False, BD != D)
                t = tl.maximum(t, _tile_max(bq, bk, 0, lse2, mq, qk_scale, False, PREC))
            tl.store(mb + j2, tl.max(t, 0))
        t = tl.zeros([BM], dtype=tl.float32)
        for s in tl.static_range(NSUB):
            k0 = qblk * BLOCK + s * BN
            if k0 <= p0 + BM - 1:
                tk = k0 + rn
                bk = tl.load(kb + tk[:, None] * skt + rd[None, :], mask=(tk < Tk)[:, None] & md[None, :], other=0.0)
                valid = tk[None, :] <= pos[:, None]
                t = tl.maximum(t, _tile_max(bq, bk, valid, lse2, mq, qk_scale, True, PREC))
        tl.store(mb + qblk, tl.max(t, 0))


def _prune(configs, named_args, **kw):
    block = kw.get("BLOCK", named_args.get("BLOCK"))
    ok = [c for c in configs if block % c.kwargs["BM"] == 0 and block % c.kwargs["BN"] == 0]
    big = [c for c in ok if c.kwargs["BM"] >= min(64, block) and c.kwargs["BN"] >= min(32, block)]
    return big or ok


_bs_fwd_tuned = triton.autotune(
    configs=[triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in AUTOTUNE_CONFIGS],
    key=["D", "DV", "BLOCK", "SPARSE", "MAP"],
    prune_configs_by={"early_config_prune": _prune},
)(_bs_fwd_kernel)


def _tiles(block: int, bm: int | None, bn: int | None) -> tuple[int, int]:
    bm = bm or TUNING["bm"] or min(128, block)
    bn = bn or TUNING["bn"] or min(64, block)
    if block % bm or block % bn or min(bm, bn) < 16:
        raise ValueError(f"tiles BM={bm}, BN={bn} must be at least 16 and divide block={block}")
    return bm, bn


def _check(q, k, v, block):
    B, T, H, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[-1] != D or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"q (B, T, H, D), k/v (B, Tk, Hk, D): got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if H % k.shape[2]:
        raise ValueError(f"{k.shape[2]} KV heads do not divide {H} query heads")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError("q, k, v must share a dtype")


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _lastdim(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, v, idx, cnt, bmap, *, block, scale, bm, bn, sparse, want_map):
    B, T, H, D = q.shape
    Tk, Hk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v = _lastdim(q), _lastdim(k), _lastdim(v)
    q0, nQ, nK = block_layout(T, Tk, block)
    o = torch.empty(B, T, H, Dv, device=q.device, dtype=q.dtype)
    Hg = idx.shape[1] if sparse else 1
    S = idx.shape[-1] if sparse else 0
    scale = D**-0.5 if scale is None else scale
    args = (q, k, v, o, idx, cnt, bmap,
            T, Tk, H, H // Hk, H // Hg, Hg, nQ, nK, S, q0, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2))
    consts = dict(D=D, DV=Dv, BD=p2(D), BDV=p2(Dv), BLOCK=block, SPARSE=sparse, MAP=want_map, PREC=dot_precision(q))
    if bm is None:  # autotuned (CUDA, sparse forward only: the map's partial layout depends on BM)
        _bs_fwd_tuned[lambda meta: (nQ * (block // meta["BM"]), B * H)](*args, **consts)
        return o
    warps = TUNING["warps"] or (8 if bm >= 128 else 4)
    grid = (nQ * (block // bm), B * H)

    def launch(stages):
        _bs_fwd_kernel[grid](*args, **consts, BM=bm, BN=bn, num_warps=warps, num_stages=stages)

    key = ("bs_fwd", q.dtype, D, Dv, block, bm, bn, sparse, want_map, warps)
    launch_fitting(key, [(st,) for st in TUNING["stages"]], launch)
    return o


@torch.no_grad()
def triton_block_sparse_attn(q, k, v, block_mask=None, *, block: int = 64, scale: float | None = None,
                             index: tuple[torch.Tensor, torch.Tensor] | None = None,
                             bm: int | None = None, bn: int | None = None):
    """Block-sparse causal attention; see ``naive.naive_block_sparse_attn``. Give either ``block_mask``
    (B, Hg, nQ, nK) bool or ``index`` = (idx (B, Hg, nQ, S) int32, cnt (B, Hg, nQ) int32) from
    ``masks.block_mask_to_index`` (reuse it across layers that share a selection). Returns (B, T, H, Dv)."""
    _check(q, k, v, block)
    B, T, H, _ = q.shape
    _, nQ, nK = block_layout(T, k.shape[1], block)
    if index is None:
        if block_mask is None:
            raise ValueError("give block_mask or index")
        check_block_mask(block_mask, B, H, nQ, nK)
        index = block_mask_to_index(block_mask)
    idx, cnt = index
    if idx.dim() != 4 or idx.shape[0] != B or idx.shape[2] != nQ or cnt.shape != idx.shape[:3] or H % idx.shape[1]:
        raise ValueError(f"index must be idx (B, Hg, nQ={nQ}, S), cnt (B, Hg, nQ); got {tuple(idx.shape)}, {tuple(cnt.shape)}")
    idx, cnt = idx.to(torch.int32).contiguous(), cnt.to(torch.int32).contiguous()
    if bm is None and bn is None and q.is_cuda and TUNING["autotune"] and not _interpreted():
        return _launch(q, k, v, idx, cnt, None, block=block, scale=scale, bm=None, bn=None, sparse=True,
                       want_map=False)
    bm, bn = _tiles(block, bm, bn)
    return _launch(q, k, v, idx, cnt, None, block=block, scale=scale, bm=bm, bn=bn, sparse=True, want_map=False)


@torch.no_grad()
def triton_attn_with_block_map(q, k, v, *, block: int = 64, scale: float | None = None,
                               bm: int | None = None, bn: int | None = None):
    """Exact causal attention and its max-pooled, row-normalised block map; see
    ``naive.naive_attn_block_map``. Returns (out (B, T, H, Dv), block_map (B, H, nQ, nK) fp32)."""
    _check(q, k, v, block)
    B, T, H, _ = q.shape
    _, nQ, nK = block_layout(T, k.shape[1], block)
    bm, bn = _tiles(block, bm, bn)
    sub = block // bm
    part = torch.zeros(B, H, nQ * sub, nK, device=q.device, dtype=torch.float32)
    o = _launch(q, k, v, q.new_empty(1, dtype=torch.int32), q.new_empty(1, dtype=torch.int32), part,
                block=block, scale=scale, bm=bm, bn=bn, sparse=False, want_map=True)
    m = part.view(B, H, nQ, sub, nK).amax(3) if sub > 1 else part
    return o, m / m.sum(-1, keepdim=True)
