"""Triton sliding-window softmax + linear hybrid (same contract as ``naive.naive_hybrid_attn``).

Forward (one fused kernel): a program per (query head, block of value columns) walks query chunks of
C rows in order. For the chunk starting at m0 every key older than L0 = m0 - window + 1 is in the
linear region of every row, and lives in the running state (S = sum fk^T v, z = sum fk) kept in
registers. The keys [L0, m0 + C) are visited in C-wide tiles: window scores with an online row max
(the exact window max m_i is what the spec subtracts) and, for the first tile only, the linear scores
of keys j <= i - window. That first tile is also the one added to the state afterwards. Scores exist
only as C x C register tiles. Saved for backward: total denominator, m_i and the arg-max key index.

Backward: window part in two kernels (query-centric for dq and the row sums D_i, key-centric for
dk, dv), and a third for the sink keys' share from queries past their tile's window walk (spread over
programs, so that the sink tile's program does not walk the whole row); the gradient of m_i flows to the arg-max key, as in the spec (amax). The linear branch is
linear attention with lag = window and the hybrid's shared normaliser, so it reuses the
``linear_attn.chunk`` backward kernels. d gamma_h = sum_i sum_{j in window} e_ij da_ij.
The same kernels serve the gated hybrid (``GATED``: linear scores times exp(G_i - G_j)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gated_attn.torch_chunk import time_cumsum
from ..host import cdiv, next_pow2
from ..linear_attn.chunk import (add_keys, dot_l, dot_precision, dot_r, gload, la_backward, norm_grads, p2,
                                 TUNING, launch_fitting, plan_segments, segment_states, warps)
from .step_torch import owned


@triton.jit
def _softmax_tile(bq, bk, bv, inw, j0, scale, mrow, lrow, acc, arg, PREC: tl.constexpr, SPLIT: tl.constexpr):
    """Online-softmax update of (row max, row sum, numerator, arg-max key) with the keys bk/bv
    (absolute index j0 + column) where ``inw``."""
    s = tl.where(inw, tl.dot(bq, tl.trans(bk), input_precision=PREC) * scale, -1.0e30)
    bmax = tl.max(s, 1)
    arg = tl.where(bmax > mrow, tl.argmax(s, 1).to(tl.int32) + j0, arg)
    mnew = tl.maximum(mrow, bmax)
    alpha = tl.exp(mrow - mnew)
    p = tl.where(inw, tl.exp(s - mnew[:, None]), 0.0)
    return mnew, lrow * alpha + tl.sum(p, 1), acc * alpha[:, None] + dot_l(p, bv, PREC, SPLIT), arg


@triton.jit
def _hy_fwd_kernel(
    q, k, v, fq, fk, gamma, Gc, o, den_out, m_out, arg_out,
    T, H, Hk, GROUP, W, scale, eps, SINKS, Sl, zl, NCH,
    D: tl.constexpr, F: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
    BV: tl.constexpr, C: tl.constexpr, NKB: tl.constexpr, BS: tl.constexpr,
    USE_LIN: tl.constexpr, GATED: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
    SEGINIT: tl.constexpr,
):
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rd = tl.arange(0, BD)
    rv = pid_v * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    md = rd < D
    mv = rv < DV
    qb = q + b * T * H * D + h * D
    kb = k + b * T * Hk * D + hk * D
    vb = v + b * T * Hk * DV + hk * DV
    ob = o + b * T * H * DV + h * DV
    gam = tl.load(gamma + h).to(tl.float32)
    if USE_LIN:
        rf = tl.arange(0, BF)
        mf = rf < F
        fqb = fq + b * T * H * F + h * F
        fkb = fk + b * T * Hk * F + hk * F
        if SEGINIT:  # state of the keys before this segment (linear_attn.chunk.segment_states)
            so = (b * Hk + hk) * tl.num_programs(2) + seg
            S = tl.load(Sl + so * F * DV + rf[:, None] * DV + rv[None, :], mask=mf[:, None] & mv[None, :], other=0.0)
            z = tl.load(zl + so * F + rf, mask=mf, other=0.0)
        else:
            S = tl.zeros([BF, BV], dtype=tl.float32)
            z = tl.zeros([BF], dtype=tl.float32)
        if GATED:
            Gb = Gc + b * T * Hk + hk
    N = tl.cdiv(T, C)
    for c in range(seg * NCH, tl.minimum(seg * NCH + NCH, N)):
        m0 = c * C
        L0 = m0 - W + 1
        tq = m0 + rc
        mq = tq < T
        bq = tl.load(qb + tq[:, None] * (H * D) + rd[None, :], mask=mq[:, None] & md[None, :], other=0.0)
        mrow = tl.full([C], -1.0e30, dtype=tl.float32)
        lrow = tl.zeros([C], dtype=tl.float32)
        arg = tl.zeros([C], dtype=tl.int32)
        acc = tl.zeros([C, BV], dtype=tl.float32)
        if USE_LIN:
            bfq = tl.load(fqb + tq[:, None] * (H * F) + rf[None, :], mask=mq[:, None] & mf[None, :], other=0.0)
            acc_l = dot_r(bfq, S, PREC, SPLIT)
            den_l = tl.sum(bfq.to(tl.float32) * z[None, :], 1)
            if GATED:  # the rows' decay exp(G_i - G_0) applied after the product (see linear_attn.chunk)
                gq = gload(Gb, tq, T, Hk)
                g0 = gload(Gb, L0 - 1, T, Hk)
                g1 = gload(Gb, L0 + C - 1, T, Hk)
                wq = tl.exp(gq - g0)
                acc_l = acc_l * wq[:, None]
                den_l = den_l * wq
        if BS > 0:  # sink keys older than this chunk's first window tile: exact for every row
            ts = tl.arange(0, BS)
            ms = (ts < SINKS) & (ts < L0) & (ts < T)
            sk = tl.load(kb + ts[:, None] * (Hk * D) + rd[None, :], mask=ms[:, None] & md[None, :], other=0.0)
            sv = tl.load(vb + ts[:, None] * (Hk * DV) + rv[None, :], mask=ms[:, None] & mv[None, :], other=0.0)
            mrow, lrow, acc, arg = _softmax_tile(bq, sk, sv, ms[None, :], 0, scale, mrow, lrow, acc, arg, PREC, SPLIT)
        for kb_i in tl.static_range(NKB):
            j0 = L0 + kb_i * C
            tk = j0 + rc
            mk = (tk >= 0) & (tk < T)
            bk = tl.load(kb + tk[:, None] * (Hk * D) + rd[None, :], mask=mk[:, None] & md[None, :], other=0.0)
            bv = tl.load(vb + tk[:, None] * (Hk * DV) + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
            rel = tq[:, None] - tk[None, :]
            inw = (rel >= 0) & ((rel < W) | (tk[None, :] < SINKS)) & mk[None, :]
            mrow, lrow, acc, arg = _softmax_tile(bq, bk, bv, inw, j0, scale, mrow, lrow, acc, arg, PREC, SPLIT)
            if USE_LIN:
                if kb_i == 0:
                    lk = mk & (tk >= SINKS)  # sinks never enter the linear branch
                    bfk = tl.load(fkb + tk[:, None] * (Hk * F) + rf[None, :], mask=lk[:, None] & mf[None, :], other=0.0)
                    lin = tl.dot(bfq, tl.trans(bfk), input_precision=PREC)
                    older = (rel >= W) & lk[None, :]
                    if GATED:
                        gk = gload(Gb, tk, T, Hk)
                        lin = lin * tl.exp(tl.where(older, gq[:, None] - gk[None, :], 0.0))
                    lin = tl.where(older, lin, 0.0)
                    acc_l += dot_l(lin, bv, PREC, SPLIT)
                    den_l += tl.sum(lin, 1)
                    if GATED:
                        S, z = add_keys(S, z, bfk, bv, tl.exp(g1 - gk), tl.exp(g1 - g0), GATED, PREC, SPLIT)
                    else:
                        S, z = add_keys(S, z, bfk, bv, 1.0, 1.0, GATED, PREC, SPLIT)
        num = gam * acc
        den = gam * lrow
        if USE_LIN:
            num += acc_l
            den += den_l
        out = num / (den + eps)[:, None]
        tl.store(ob + tq[:, None] * (H * DV) + rv[None, :], out.to(o.dtype.element_ty), mask=mq[:, None] & mv[None, :])
        if SAVE:
            if pid_v == 0:
                ro = b * H * T + h * T + tq
                tl.store(den_out + ro, den, mask=mq)
                tl.store(m_out + ro, mrow, mask=mq)
                tl.store(arg_out + ro, arg, mask=mq)


@triton.jit
def _query_rows(q, do, rden, dden, m_in, arg_in, b, h, T, H, D, DV, tq, rd, rv, md, mv):
    """Query rows tq of head h: q, dnum = do / den, dden, the row max and its arg-max key."""
    mq = tq < T
    bq = tl.load(q + b * T * H * D + h * D + tq[:, None] * (H * D) + rd[None, :], mask=mq[:, None] & md[None, :], other=0.0)
    bdo = tl.load(do + b * T * H * DV + h * DV + tq[:, None] * (H * DV) + rv[None, :], mask=mq[:, None] & mv[None, :], other=0.0)
    rowoff = b * T * H + tq * H + h
    r = tl.load(rden + rowoff, mask=mq, other=0.0)
    dd = tl.load(dden + rowoff, mask=mq, other=0.0)
    ro = b * H * T + h * T + tq
    mrow = tl.load(m_in + ro, mask=mq, other=0.0)
    arg = tl.load(arg_in + ro, mask=mq, other=-1)
    return bq, bdo.to(tl.float32) * r[:, None], dd, mrow, arg


@triton.jit
def _dq_tile(bq, bk, bv, tk, inw, mrow, arg, dnf, dd, scale, PREC: tl.constexpr, DSPLIT: tl.constexpr):
    """One key tile's share of d p_i (row sums of e da), sum_j e da k_j and the arg-max key row."""
    s = tl.dot(bq, tl.trans(bk), input_precision=PREC) * scale
    e = tl.where(inw, tl.exp(s - mrow[:, None]), 0.0)
    # sum_j e_ij da_ij (d gamma, dq) cancels strongly: with bf16 or tf32 operands (10-bit mantissa)
    # d gamma came out 3-6% off on the H100. So dnf keeps ~16 bits as hi + lo bf16 halves (DSPLIT,
    # two tensor-core products; v is exact in its own dtype), or full fp32 products for fp32 inputs
    if DSPLIT:
        da = dot_l(dnf, tl.trans(bv), PREC, True) + dd[:, None]
    else:
        da = tl.dot(dnf, tl.trans(bv.to(tl.float32)), input_precision="ieee") + dd[:, None]
    pe = e * da
    ind = tl.where(inw & (arg[:, None] == tk[None, :]), 1.0, 0.0)
    return (tl.sum(pe, 1), tl.dot(pe.to(bk.dtype), bk, input_precision=PREC),
            tl.dot(ind.to(bk.dtype), bk, input_precision=PREC))


@triton.jit
def _hy_bwd_dq_kernel(
    q, k, v, do, rden, dden, gamma, m_in, arg_in, dq, dp_out,
    T, H, Hk, GROUP, W, scale, SINKS,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, C: tl.constexpr,
    NKB: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr, DSPLIT: tl.constexpr,
):
    pid_t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rd = tl.arange(0, BD)
    rv = tl.arange(0, BDV)
    rc = tl.arange(0, C)
    md = rd < D
    mv = rv < DV
    m0 = pid_t * C
    L0 = m0 - W + 1
    tq = m0 + rc
    mq = tq < T
    kb = k + b * T * Hk * D + hk * D
    vb = v + b * T * Hk * DV + hk * DV
    bq, dnf, dd, mrow, arg = _query_rows(q, do, rden, dden, m_in, arg_in, b, h, T, H, D, DV, tq, rd, rv, md, mv)
    ro = b * H * T + h * T + tq
    gam = tl.load(gamma + h).to(tl.float32)
    acc1 = tl.zeros([C, BD], dtype=tl.float32)
    acc2 = tl.zeros([C, BD], dtype=tl.float32)
    dp = tl.zeros([C], dtype=tl.float32)
    if BS > 0:  # sink keys older than the first window tile
        ts = tl.arange(0, BS)
        ms = (ts < SINKS) & (ts < L0) & (ts < T)
        sk = tl.load(kb + ts[:, None] * (Hk * D) + rd[None, :], mask=ms[:, None] & md[None, :], other=0.0)
        sv = tl.load(vb + ts[:, None] * (Hk * DV) + rv[None, :], mask=ms[:, None] & mv[None, :], other=0.0)
        d0, a1, a2 = _dq_tile(bq, sk, sv, ts, ms[None, :] & mq[:, None], mrow, arg, dnf, dd, scale, PREC, DSPLIT)
        dp += d0
        acc1 += a1
        acc2 += a2
    for kb_i in tl.static_range(NKB):
        j0 = L0 + kb_i * C
        tk = j0 + rc
        mk = (tk >= 0) & (tk < T)
        bk = tl.load(kb + tk[:, None] * (Hk * D) + rd[None, :], mask=mk[:, None] & md[None, :], other=0.0)
        bv = tl.load(vb + tk[:, None] * (Hk * DV) + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        rel = tq[:, None] - tk[None, :]
        inw = (rel >= 0) & ((rel < W) | (tk[None, :] < SINKS)) & mk[None, :] & mq[:, None]
        d0, a1, a2 = _dq_tile(bq, bk, bv, tk, inw, mrow, arg, dnf, dd, scale, PREC, DSPLIT)
        dp += d0
        acc1 += a1
        acc2 += a2
    dqv = scale * gam * (acc1 - dp[:, None] * acc2)
    tl.store(dq + b * T * H * D + h * D + tq[:, None] * (H * D) + rd[None, :], dqv.to(dq.dtype.element_ty), mask=mq[:, None] & md[None, :])
    tl.store(dp_out + ro, dp, mask=mq)


@triton.jit
def _dkv_tile(q, do, rden, dden, m_in, arg_in, dp_in, b, h, T, H, D, DV, tq, rd, rv, md, mv, bk, bv, tk, mk, gam,
              W, SINKS, scale, PREC: tl.constexpr, DSPLIT: tl.constexpr):
    """One query tile's share of dk (before the scale) and dv for the key tile bk/bv."""
    mq = tq < T
    bq, dnf, dd, mrow, arg = _query_rows(q, do, rden, dden, m_in, arg_in, b, h, T, H, D, DV, tq, rd, rv, md, mv)
    dp = tl.load(dp_in + b * H * T + h * T + tq, mask=mq, other=0.0)
    dn = dnf.to(bk.dtype)
    rel = tq[None, :] - tk[:, None]  # [key, query]
    inw = (rel >= 0) & ((rel < W) | (tk[:, None] < SINKS)) & mk[:, None] & mq[None, :]
    st = tl.dot(bk, tl.trans(bq), input_precision=PREC) * scale
    et = tl.where(inw, gam * tl.exp(st - mrow[None, :]), 0.0)
    if DSPLIT:  # as in _dq_tile
        dat = dot_r(bv, tl.trans(dnf), PREC, True) + dd[None, :]
    else:
        dat = tl.dot(bv.to(tl.float32), tl.trans(dnf), input_precision="ieee") + dd[None, :]
    dst = et * dat - tl.where(inw & (arg[None, :] == tk[:, None]), gam * dp[None, :], 0.0)
    return tl.dot(dst.to(bq.dtype), bq, input_precision=PREC), tl.dot(et.to(bk.dtype), dn, input_precision=PREC)


@triton.jit
def _key_rows(k, v, b, hk, T, Hk, tk, mk, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    """The key and value rows ``tk`` (where ``mk``) of KV head ``hk``, with the column ranges and masks."""
    rd = tl.arange(0, BD)
    rv = tl.arange(0, BDV)
    md = rd < D
    mv = rv < DV
    bk = tl.load(k + b * T * Hk * D + hk * D + tk[:, None] * (Hk * D) + rd[None, :], mask=mk[:, None] & md[None, :], other=0.0)
    bv = tl.load(v + b * T * Hk * DV + hk * DV + tk[:, None] * (Hk * DV) + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
    return rd, rv, md, mv, bk, bv


@triton.jit
def _hy_bwd_dkv_kernel(
    q, k, v, do, rden, dden, gamma, m_in, arg_in, dp_in, dk, dv,
    T, H, Hk, GROUP, W, scale, SINKS, FAR_END,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, C: tl.constexpr,
    NKB: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr, DSPLIT: tl.constexpr,
):
    pid_t = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // Hk
    hk = bhk % Hk
    rc = tl.arange(0, C)
    j0 = pid_t * C
    tk = j0 + rc
    mk = tk < T
    rd, rv, md, mv, bk, bv = _key_rows(k, v, b, hk, T, Hk, tk, mk, D, DV, BD, BDV)
    acc_k = tl.zeros([C, BD], dtype=tl.float32)
    acc_v = tl.zeros([C, BDV], dtype=tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        gam = tl.load(gamma + h).to(tl.float32)
        for qb_i in tl.static_range(NKB):
            a_k, a_v = _dkv_tile(q, do, rden, dden, m_in, arg_in, dp_in, b, h, T, H, D, DV, j0 + qb_i * C + rc,
                                 rd, rv, md, mv, bk, bv, tk, mk, gam, W, SINKS, scale, PREC, DSPLIT)
            acc_k += a_k
            acc_v += a_v
        if BS > 0:
            if j0 < SINKS:  # sink keys: every later query scores them exactly (those from FAR_END on: _hy_bwd_dsink_kernel)
                for t0 in range(j0 + NKB * C, FAR_END, C):
                    a_k, a_v = _dkv_tile(q, do, rden, dden, m_in, arg_in, dp_in, b, h, T, H, D, DV, t0 + rc,
                                         rd, rv, md, mv, bk, bv, tk, mk, gam, W, SINKS, scale, PREC, DSPLIT)
                    acc_k += a_k
                    acc_v += a_v
    tl.store(dk + b * T * Hk * D + hk * D + tk[:, None] * (Hk * D) + rd[None, :], (acc_k * scale).to(dk.dtype.element_ty), mask=mk[:, None] & md[None, :])
    tl.store(dv + b * T * Hk * DV + hk * DV + tk[:, None] * (Hk * DV) + rv[None, :], acc_v.to(dv.dtype.element_ty), mask=mk[:, None] & mv[None, :])


def needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


@triton.jit
def _hy_bwd_dsink_kernel(
    q, k, v, do, rden, dden, gamma, m_in, arg_in, dp_in, pdk, pdv,
    T, H, Hk, GROUP, W, scale, SINKS, Q0, PER,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, C: tl.constexpr,
    BS: tl.constexpr, PREC: tl.constexpr, DSPLIT: tl.constexpr,
):
    """The sink keys' dk, dv from the queries at Q0 and later, PER tiles of C queries a program; partial
    sums (fp32, scaled) per program in pdk / pdv (part, B, Hk, BS, BD / BDV). Left to the sink tile's own
    program in _hy_bwd_dkv_kernel, this walk over every query most likely made that one program the
    kernel's tail (on rows of 4,096 it took 2.2x the time of rows of 1,024 for as many tokens)."""
    part = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // Hk
    hk = bhk % Hk
    rc = tl.arange(0, C)
    tk = tl.arange(0, BS)
    mk = (tk < SINKS) & (tk < T)
    rd, rv, md, mv, bk, bv = _key_rows(k, v, b, hk, T, Hk, tk, mk, D, DV, BD, BDV)
    acc_k = tl.zeros([BS, BD], dtype=tl.float32)
    acc_v = tl.zeros([BS, BDV], dtype=tl.float32)
    t_lo = Q0 + part * PER * C
    t_hi = tl.minimum(t_lo + PER * C, T)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        gam = tl.load(gamma + h).to(tl.float32)
        for t0 in range(t_lo, t_hi, C):
            a_k, a_v = _dkv_tile(q, do, rden, dden, m_in, arg_in, dp_in, b, h, T, H, D, DV, t0 + rc,
                                 rd, rv, md, mv, bk, bv, tk, mk, gam, W, SINKS, scale, PREC, DSPLIT)
            acc_k += a_k
            acc_v += a_v
    po = (part * tl.num_programs(1) + bhk) * BS
    tl.store(pdk + (po + tk[:, None]) * BD + rd[None, :], acc_k * scale)
    tl.store(pdv + (po + tk[:, None]) * BDV + rv[None, :], acc_v)


def _nkb(window: int, C: int) -> int:
    return cdiv(window + C - 1, C)


def _dkv_configs(C: int) -> list[tuple[int, int]]:
    """(stages, key tile) for the dk / dv kernel, widest first: head dim 128 with a window of 128 needs
    233 KB of shared memory at C = 64 in one stage, over the H100's and H200's 227 KB."""
    return [(2, C), (1, C)] + ([(2, C // 2), (1, C // 2)] if C >= 32 else [])


def _sink_far(T: int, window: int, C: int, sinks: int) -> tuple[int, int]:
    """(q0, per): the sink keys' queries from q0 on go to _hy_bwd_dsink_kernel, ``per`` query tiles of C
    a program; q0 = T keeps them all in the dk / dv kernel (no sinks, or TUNING['bwd_sink_split'] off).
    A key tile at j0 walks the queries [j0, j0 + NKB c) and, holding sinks, on to q0; so q0 is at least
    where the last tile holding sinks ends that walk, for each key tile c the kernel may take, and a
    multiple of C (no query tile crosses it)."""
    if sinks <= 0 or not TUNING.get("bwd_sink_split", True):
        return T, 1
    q0 = max(cdiv(sinks, c) * c + (_nkb(window, c) - 1) * c for _, c in _dkv_configs(C))
    return min(cdiv(q0, C) * C, T), _nkb(window, C)


def _sink_tile(sinks: int) -> int:
    """Size of the extra key tile that holds the sink tokens (0: none). At least 32: a 16-wide tile
    (the smallest tl.dot takes) gave illegal memory accesses with head dim 128 on the H100 (Triton 3.6)."""
    return 0 if sinks <= 0 else max(TUNING.get("sink_tile_min", 32), next_pow2(sinks))


def hybrid_forward_warps(use_linear: bool, gated: bool, save: bool) -> int:
    """Warps of one hybrid forward program: 8 only for the gated training forward. On the H100 (492c17e,
    benchmarks/kernel_speed.py) 4 warps against 8 took SmolLM2's 8k prefill kernel from 0.390 to 0.197 ms
    (32k: 0.852 -> 0.465), window 64 with 32 heads at 64k 6.80 -> 5.59 ms under no_grad, the ungated
    training forward 9.22 -> 8.80 ms, but the gated training forward 21.8 -> 25.1 ms."""
    return 8 if use_linear and gated and save else 4


def hy_forward(q, k, v, fq, fk, gamma, Gc, *, window, scale, use_linear, eps, chunk_size=64, save=True,
               out_fp32=False, sinks=0, split=None, segment_chunks=None, initial_state=None):
    """``split``: 16-bit operands as hi + lo halves (default: for 16-bit inputs); it costs extra
    products and only matters for gradients that cancel, so forward-only callers turn it off.
    ``initial_state``: (S0 (B, Hk, F, Dv), z0 (B, Hk, F)) fp32, linear-branch sums of keys before the
    sequence, seen by every query (ungated only; forward only)."""
    B, T, H, D = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    F = fq.shape[-1] if use_linear else 16
    C = chunk_size
    # out_fp32: the backward's dden = -(do . out) / den feeds a sum that cancels strongly (the
    # gamma and q/k gradients), so it gets the unrounded output
    o = torch.empty(B, T, H, Dv, device=q.device, dtype=torch.float32 if out_fp32 else q.dtype)
    den = m = arg = None
    if save:
        den = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        m = torch.empty_like(den)
        arg = torch.empty(B, H, T, device=q.device, dtype=torch.int32)
    BV = TUNING.get("hybrid_bv") or p2(Dv)  # every value block recomputes the window scores
    while BV > 16 and use_linear and p2(F) * BV > TUNING["state_elems"]:
        BV //= 2
    split = q.dtype != torch.float32 and (split is None or bool(split))
    nch, nseg = plan_segments(T, C, cdiv(Dv, BV) * B * H, segment_chunks, q.device)
    Sl = zl = None
    if initial_state is not None and (Gc is not None or not use_linear):
        raise ValueError("hy_forward: an initial state needs the ungated linear branch")
    if use_linear and nseg > 1:  # the linear branch's state at each segment start (keys < start - W + 1)
        Sl, zl = segment_states(fk, v, Gc, lag=window - 1, sinks=sinks, chunk_size=C, nch=nch, nseg=nseg,
                                split=split, initial_state=initial_state)
    elif initial_state is not None:  # one segment, starting from the given sums
        Sl, zl = (t.float().unsqueeze(2).contiguous() for t in initial_state)
    nw = warps("hybrid_warps", hybrid_forward_warps(use_linear, Gc is not None, save))

    def launch(bv, stages):
        _hy_fwd_kernel[(cdiv(Dv, bv), B * H, nseg)](
            q, k, v, fq, fk, gamma, Gc, o, den, m, arg,
            T, H, Hk, H // Hk, window, scale, eps, sinks, Sl, zl, nch,
            D=D, F=F, DV=Dv, BD=p2(D), BF=p2(F), BV=bv, C=C, NKB=_nkb(window, C), BS=_sink_tile(sinks),
            USE_LIN=use_linear, GATED=Gc is not None, SAVE=save, PREC=dot_precision(q), SPLIT=split,
            SEGINIT=Sl is not None, num_warps=nw, num_stages=stages,
        )

    stages = TUNING.get("hybrid_stages") or (2, 1)
    # with sink tokens a 32-wide value block read shared memory out of range on the H100 (Triton 3.6,
    # compute-sanitizer; 16, 64 and 128 were clean), so that width is skipped there
    widths = [bv for bv in (BV, BV // 2, BV // 4) if bv >= 16 and not (sinks and bv == 32)] or [16]
    configs = [(bv, st) for bv in widths for st in stages]
    key = ("hy_fwd", q.dtype, D, F, Dv, window, C, _sink_tile(sinks), use_linear, Gc is not None, save, split,
           Sl is not None, BV, nw, stages)
    launch_fitting(key, configs, launch)
    return o, den, m, arg


def hy_backward(q, k, v, fq, fk, gamma, Gc, o, den, m, arg, do, *, window, scale, use_linear, eps, chunk_size=64,
                qk_grad_dtype=None, sinks=0, segment_chunks=None):
    """Returns dq, dk, dv, dfq, dfk, dgamma (dfq/dfk None without the linear branch)."""
    B, T, H, D = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    C = chunk_size
    prec = dot_precision(q)
    den_bth = den.transpose(1, 2)
    rden, dden = norm_grads(o, do, den_bth, eps)  # (B, T, H)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v) if not use_linear else torch.empty(v.shape, device=v.device, dtype=torch.float32)
    dp = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    BD, BDV = p2(D), p2(Dv)
    nkb = _nkb(window, C)
    dsplit = q.dtype != torch.float32 and TUNING.get("bwd_split", True)
    dq_warps = warps("bwd_dq_warps", 8 if BD * BDV >= 128 * 128 else 4)
    dkv_warps = warps("hybrid_bwd_dkv_warps", 8)
    key = (q.dtype, D, Dv, window, C, sinks > 0, dsplit)

    def dq_launch(stages):
        _hy_bwd_dq_kernel[(cdiv(T, C), B * H)](
            q, k, v, do, rden, dden, gamma, m, arg, dq, dp, T, H, Hk, H // Hk, window, scale, sinks,
            D=D, DV=Dv, BD=BD, BDV=BDV, C=C, NKB=nkb, BS=_sink_tile(sinks), PREC=prec, DSPLIT=dsplit,
            num_warps=dq_warps, num_stages=stages,
        )

    # the sink keys' far queries (from q0 on), cut into parts of about a key tile's work
    q0, per = _sink_far(T, window, C, sinks)
    parts = cdiv(T - q0, per * C) if q0 < T else 0

    def dkv_launch(stages, c):  # c: the key tile (C, or C / 2 where C does not fit; dq's tiles stay C)
        _hy_bwd_dkv_kernel[(cdiv(T, c), B * Hk)](
            q, k, v, do, rden, dden, gamma, m, arg, dp, dk, dv, T, H, Hk, H // Hk, window, scale, sinks, q0,
            D=D, DV=Dv, BD=BD, BDV=BDV, C=c, NKB=_nkb(window, c), BS=_sink_tile(sinks), PREC=prec,
            DSPLIT=dsplit, num_warps=dkv_warps, num_stages=stages,
        )

    launch_fitting(("hy_bwd_dq", dq_warps) + key, [(2,), (1,)], dq_launch)
    launch_fitting(("hy_bwd_dkv", dkv_warps) + key, _dkv_configs(C), dkv_launch)
    if parts:
        BS = _sink_tile(sinks)
        pdk = torch.empty(parts, B, Hk, BS, BD, device=q.device, dtype=torch.float32)
        pdv = torch.empty(parts, B, Hk, BS, BDV, device=q.device, dtype=torch.float32)

        def sink_launch(stages):
            _hy_bwd_dsink_kernel[(parts, B * Hk)](
                q, k, v, do, rden, dden, gamma, m, arg, dp, pdk, pdv, T, H, Hk, H // Hk, window, scale, sinks,
                q0, per, D=D, DV=Dv, BD=BD, BDV=BDV, C=C, BS=BS, PREC=prec, DSPLIT=dsplit,
                num_warps=4, num_stages=stages,
            )

        launch_fitting(("hy_bwd_dsink",) + key, [(2,), (1,)], sink_launch)
        # (B, Hk, sinks, D) -> (B, sinks, Hk, D), added to what the key tiles wrote
        dk[:, :sinks] = (dk[:, :sinks].float() + pdk.sum(0)[:, :, :sinks, :D].transpose(1, 2)).to(dk.dtype)
        dv[:, :sinks] = (dv[:, :sinks].float() + pdv.sum(0)[:, :, :sinks, :Dv].transpose(1, 2)).to(dv.dtype)
    dgamma = dp.sum((0, 2)).to(gamma.dtype)
    dfq = dfk = None
    if use_linear:
        fk_lin = fk
        if sinks:  # the sink tokens are not in the linear branch: no linear scores, no feature gradient
            fk_lin = fk.clone()
            fk_lin[:, :sinks] = 0
        dfq, dfk, dv_lin = la_backward(fq, fk_lin, v, do, rden, dden, lag=window, Gc=Gc, chunk_size=C,
                                       qk_grad_dtype=qk_grad_dtype, segment_chunks=segment_chunks)
        if sinks:
            dfk[:, :sinks] = 0
        dv = (dv + dv_lin.float()).to(v.dtype)
    return dq, dk, dv, dfq, dfk, dgamma


class _HybridAttnFn(torch.autograd.Function):
    """The forward that training differentiates (``triton_hybrid_attn`` runs inference without it)."""

    @staticmethod
    def forward(ctx, q, k, v, fq, fk, gamma, window, scale, use_linear, eps, chunk_size, sinks, segment_chunks):
        o, den, m, arg = hy_forward(q, k, v, fq, fk, gamma, None, window=window, scale=scale,
                                    use_linear=use_linear, eps=eps, chunk_size=chunk_size,
                                    out_fp32=q.dtype != torch.float32, sinks=sinks, split=True,
                                    segment_chunks=segment_chunks, save=True)
        ctx.save_for_backward(q, k, v, fq, fk, gamma, o, den, m, arg)
        ctx.cfg = (window, scale, use_linear, eps, chunk_size, sinks, segment_chunks)
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, fq, fk, gamma, o, den, m, arg = ctx.saved_tensors
        window, scale, use_linear, eps, C, sinks, seg = ctx.cfg
        dq, dk, dv, dfq, dfk, dgamma = hy_backward(
            q, k, v, fq, fk, gamma, None, o, den, m, arg, do.contiguous(), window=window, scale=scale,
            use_linear=use_linear, eps=eps, chunk_size=C, sinks=sinks, segment_chunks=seg)
        return dq, dk, dv, dfq, dfk, dgamma, None, None, None, None, None, None, None


def triton_hybrid_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor | None,
    fk: torch.Tensor | None,
    gamma: torch.Tensor,
    *,
    window: int,
    scale: float,
    use_linear: bool = True,
    eps: float = 1e-6,
    chunk_size: int = 64,
    sinks: int = 0,
    segment_chunks: int | None = None,
) -> torch.Tensor:
    """Fused Triton hybrid attention; gradients for q, k, v, fq, fk and gamma. ``sinks``: the first
    tokens every query scores exactly (they never enter the linear branch), as in the spec.
    Without gradients (inference) the forward skips what only the backward needs."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if use_linear:
        fq, fk = fq.contiguous(), fk.contiguous()
    else:
        fq = fk = None
    gamma = gamma.contiguous()
    if not needs_grad(q, k, v, fq, fk, gamma):  # inference: what the Function's forward runs, without its dispatch
        return hy_forward(q, k, v, fq, fk, gamma, None, window=int(window), scale=float(scale),
                          use_linear=bool(use_linear), eps=float(eps), chunk_size=int(chunk_size), sinks=int(sinks),
                          split=False, segment_chunks=segment_chunks, save=False)[0]
    return _HybridAttnFn.apply(q, k, v, fq, fk, gamma, int(window), float(scale),
                               bool(use_linear), float(eps), int(chunk_size), int(sinks), segment_chunks)


@torch.no_grad()
def triton_hybrid_continue(q, k, v, fq, fk, gamma, state: dict, *, window: int, scale: float, sinks: int = 0,
                           eps: float = 1e-6, chunk_size: int = 64, segment_chunks: int | None = None,
                           g=None, meta_k=None, meta_v=None):
    """Attend T new tokens that directly follow ``state`` (layout in ``step_torch.py``) with the Triton
    forward, and return (out (B, T, H, Dv), new state): what ``hybrid_step`` computes, for a chunked
    prefill. The cached sinks (or Lizard's ``meta_k``/``meta_v``) and window go in front of the new
    tokens. Ungated, the state's (S, z) are the kernel's initial linear sums. Gated (``g`` (B, T, Hk)
    log-gates), the kernel starts from empty sums and the state's share is added to its numerator and
    denominator here: the kernel would have to hold S referenced to a position before the window,
    exp(window's total decay) times larger, which can overflow. Needs every row to have seen at least
    ``window + sinks`` real tokens (full window, sinks already out of it); the caller checks that."""
    B, T, H, D = q.shape
    Hk, W = k.shape[2], window
    dt = q.dtype
    if meta_k is not None:
        if sinks:
            raise ValueError("triton_hybrid_continue: meta tokens and sinks together are not supported")
        front_k = meta_k.to(dt).unsqueeze(0).expand(B, *meta_k.shape)
        front_v = meta_v.to(dt).unsqueeze(0).expand(B, *meta_v.shape)
    else:
        front_k, front_v = state["sink_k"][:, :sinks], state["sink_v"][:, :sinks]
    P = front_k.shape[1]

    # (B, P + W + T, ...): sinks or meta tokens, window, new tokens
    kx = torch.cat([front_k.to(dt), state["win_k"].to(dt), k], 1)
    vx = torch.cat([front_v.to(dt), state["win_v"].to(dt), v], 1)
    fkw = torch.cat([state["win_fk"], fk.float()], 1)  # (B, W + T, Hk, F) fp32: the window's and the new keys' features
    fkx = torch.cat([fkw.new_zeros(B, P, Hk, fkw.shape[-1]), fkw], 1).to(dt)
    qx = torch.cat([q.new_zeros(B, P + W, H, D), q], 1)
    fqx = torch.cat([fq.new_zeros(B, P + W, H, fq.shape[-1], dtype=dt), fq.to(dt)], 1)
    S0, z0 = state["S"].float().contiguous(), state["z"].float().contiguous()
    new = dict(state)
    leaving, v_leaving = fkw[:, :T], vx[:, P : P + T].float()  # keys that leave the window: the oldest T of window + new
    if g is None:
        o = hy_forward(qx, kx, vx, fqx, fkx, gamma.contiguous(), None, window=W, scale=scale, use_linear=True,
                       eps=eps, chunk_size=chunk_size, save=False, sinks=P, split=False, initial_state=(S0, z0),
                       segment_chunks=segment_chunks)[0][:, P + W :]
        new["S"] = state["S"] + torch.einsum("btxf,btxd->bxfd", leaving, v_leaving)
        new["z"] = state["z"] + leaving.sum(1)
    else:
        gw = torch.cat([state["win_g"].float(), g.float()], 1)  # (B, W + T, Hk)
        Gw = time_cumsum(gw)
        Gc = torch.cat([Gw.new_zeros(B, P, Hk), Gw], 1).contiguous()  # the front tokens have no gate
        o, den = hy_forward(qx, kx, vx, fqx, fkx, gamma.contiguous(), Gc, window=W, scale=scale, use_linear=True,
                            eps=eps, chunk_size=chunk_size, save=True, out_fp32=True, sinks=P, split=False,
                            segment_chunks=segment_chunks)[:2]
        o, den = o[:, P + W :], den.transpose(1, 2)[:, P + W :]  # (B, T, H, Dv), (B, T, H)
        # the state's keys, referenced to the last token seen (local W - 1), decayed to each new query
        fqd = fq.float().view(B, T, Hk, H // Hk, -1) * (Gw[:, W:] - Gw[:, W - 1 : W]).exp()[..., None, None]
        num = torch.einsum("btxgf,bxfd->btxgd", fqd, S0).reshape(B, T, H, -1)
        extra = torch.einsum("btxgf,bxf->btxg", fqd, z0).reshape(B, T, H)
        o = ((o * (den + eps)[..., None] + num) / (den + extra + eps)[..., None]).to(dt)
        last = Gw[:, -1:]  # (B, 1, Hk)
        carry = (last - Gw[:, W - 1 : W]).exp()[:, 0]  # (B, Hk): the old sums, decayed to the last new token
        decayed = leaving * (last - Gw[:, :T]).exp()[..., None]
        new["S"] = state["S"] * carry[..., None, None] + torch.einsum("btxf,btxd->bxfd", decayed, v_leaving)
        new["z"] = state["z"] * carry[..., None] + decayed.sum(1)
        new["win_g"] = owned(gw[:, T:])
    # owned: not views of this piece's (P + W + T)-token buffers, which the cache would keep alive
    new["win_k"] = owned(kx[:, P + T :].to(state["win_k"].dtype))
    new["win_v"] = owned(vx[:, P + T :].to(state["win_v"].dtype))
    new["win_fk"] = owned(fkw[:, T:])
    new["win_rank"] = state["win_rank"] + T
    new["n_real"] = state["n_real"] + T
    return o, new
