"""Triton causal linear attention (forward and backward), same contract as ``naive.naive_linear_attn``.

The kernels here are written once for a family of operators and reused by ``hybrid_attn`` and
``gated_attn``:

* ``LAG``: key j is visible to query i when j <= i - LAG (0 = ordinary causal; the hybrid's linear
  branch uses LAG = window). Keys are read at ``query position - LAG`` so the intra-chunk mask is the
  same lower triangle for every lag.
* ``GATED``: scores get exp(G_i - G_j) with G the inclusive cumulative sum (fp32, per KV head) of a
  log-space gate g <= 0.

Forward: one program per (query head, block of value columns) walks the chunks in order, keeping
the running state S (F x BV, fp32) and z (F) in registers; per chunk it does the intra-chunk
quadratic form and the inter-chunk q @ S. No per-chunk states are written to memory. Backward:
three kernels (dq: forward walk over a block of feature columns; dk and dv: reverse walks per KV
head that sum the G query heads of the group, so repeated KV heads are never built).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..host import cdiv, next_pow2


def p2(n: int, lo: int = 16) -> int:
    return max(lo, next_pow2(int(n)))


def dot_precision(x: torch.Tensor) -> str:
    # fp32 inputs on a GPU: full fp32 products (tf32 would cost ~1e-3 relative error)
    return "ieee" if x.dtype == torch.float32 else "tf32"


@triton.jit
def split16(x, lo_dtype: tl.constexpr):
    """fp32 x as hi + lo in a 16-bit type: two tensor-core products keep about 16 mantissa bits
    where one rounding to bf16 keeps 8 (which showed in gradients that cancel, e.g. d gamma)."""
    hi = x.to(lo_dtype)
    return hi, (x - hi.to(tl.float32)).to(lo_dtype)


@triton.jit
def dot_l(a, b, PREC: tl.constexpr, SPLIT: tl.constexpr):
    """a (fp32) @ b (input dtype), without rounding a to 16 bits when SPLIT."""
    if SPLIT:
        hi, lo = split16(a, b.dtype)
        return tl.dot(hi, b, input_precision=PREC) + tl.dot(lo, b, input_precision=PREC)
    return tl.dot(a.to(b.dtype), b, input_precision=PREC)


@triton.jit
def dot_r(a, b, PREC: tl.constexpr, SPLIT: tl.constexpr):
    """a (input dtype) @ b (fp32), without rounding b to 16 bits when SPLIT."""
    if SPLIT:
        hi, lo = split16(b, a.dtype)
        return tl.dot(a, hi, input_precision=PREC) + tl.dot(a, lo, input_precision=PREC)
    return tl.dot(a, b.to(a.dtype), input_precision=PREC)


@triton.jit
def add_keys(S, z, bk, bv, wk, dec, GATED: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr):
    """Add a tile of keys (rows of bk) and values to the state: S = S * dec + bk^T (wk * bv) and
    z = z * dec + sum wk * bk when GATED (the keys' decay scales the (C, BV) value rows, not an fp32
    copy of the (C, F) key tile), plain sums otherwise (wk, dec unused)."""
    if GATED:
        S = S * dec + dot_r(tl.trans(bk), bv.to(tl.float32) * wk[:, None], PREC, SPLIT)
        z = z * dec + tl.sum(bk.to(tl.float32) * wk[:, None], 0)
    else:
        S += tl.dot(tl.trans(bk), bv, input_precision=PREC)
        z += tl.sum(bk.to(tl.float32), 0)
    return S, z


@triton.jit
def gload(Gb, pos, T, sg):
    """Cumulative log-gate at absolute positions ``pos``: 0 before the sequence, G[T-1] after it."""
    p = tl.minimum(tl.maximum(pos, 0), T - 1)
    return tl.load(Gb + p * sg, mask=pos >= 0, other=0.0)



@triton.jit
def _seg_program(Hk, F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Where a program of a (F x DV block, segment, batch row x KV head) grid works: its segment, batch
    row and KV head, feature rows and value columns with their masks, and whether its value block is the
    first (the one that also writes the F-vector sums)."""
    pid = tl.program_id(0)
    bhk = tl.program_id(2).to(tl.int64)
    nvb = tl.cdiv(DV, BV)
    rf = (pid // nvb) * BK + tl.arange(0, BK)
    rv = (pid % nvb) * BV + tl.arange(0, BV)
    return tl.program_id(1), bhk // Hk, bhk % Hk, rf, rv, rf < F, rv < DV, pid % nvb == 0


@triton.jit
def _seg_state_kernel(
    k, v, Gc, Sl, zl,
    T, Hk, LAG, SINKS, NCH,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    GATED: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    """State contribution of one segment (NCH chunks) of keys, read at ``chunk position - LAG`` as in
    the forward kernels and skipping the first SINKS keys; gated: decayed to the segment's end."""
    seg, b, hk, rf, rv, mf, mv, first_v = _seg_program(Hk, F, DV, BK, BV)
    rc = tl.arange(0, C)
    kb = k + b * T * Hk * F + hk * F
    vb = v + b * T * Hk * DV + hk * DV
    if GATED:
        Gb = Gc + b * T * Hk + hk
    S = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    c0 = seg * NCH
    c1 = tl.minimum(c0 + NCH, tl.cdiv(T, C))
    for c in range(c0, c1):
        tk = c * C + rc - LAG
        mk = (tk >= 0) & (tk >= SINKS) & (tk < T)
        bk = tl.load(kb + tk[:, None] * (Hk * F) + rf[None, :], mask=mk[:, None] & mf[None, :], other=0.0)
        bv = tl.load(vb + tk[:, None] * (Hk * DV) + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        if GATED:
            gk = gload(Gb, tk, T, Hk)
            g0 = gload(Gb, c * C - LAG - 1, T, Hk)
            g1 = gload(Gb, c * C - LAG + C - 1, T, Hk)
            S, z = add_keys(S, z, bk, bv, tl.exp(g1 - gk), tl.exp(g1 - g0), GATED, PREC, SPLIT)
        else:
            S, z = add_keys(S, z, bk, bv, 1.0, 1.0, GATED, PREC, SPLIT)
    so = ((b * Hk + hk) * tl.num_programs(1) + seg) * F * DV
    tl.store(Sl + so + rf[:, None] * DV + rv[None, :], S, mask=mf[:, None] & mv[None, :])
    if first_v:
        tl.store(zl + ((b * Hk + hk) * tl.num_programs(1) + seg) * F + rf, z, mask=mf)


@triton.jit
def _rev_seg_kernel(
    q, do, rden, dden, per, perz,
    T, H, Hk, G, NCH,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    NORM: tl.constexpr, PREC: tl.constexpr,
):
    """One segment's (NCH chunks) share of the backward's reverse sums, over the G query heads of KV head
    hk: per = sum_i q_i^T dnum_i, perz = sum_i q_i dden_i, with dnum_i = do_i * rden_i rounded to do's
    dtype as the dk / dv kernels round it (``reverse_segment_states`` is the PyTorch reference)."""
    seg, b, hk, rf, rv, mf, mv, first_v = _seg_program(Hk, F, DV, BK, BV)
    rc = tl.arange(0, C)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    accz = tl.zeros([BK], dtype=tl.float32)
    c0 = seg * NCH
    c1 = tl.minimum(c0 + NCH, tl.cdiv(T, C))
    for c in range(c0, c1):
        t = c * C + rc
        mt = t < T
        for g in range(G):
            h = hk * G + g
            bq = tl.load(q + b * T * H * F + t[:, None] * (H * F) + h * F + rf[None, :],
                         mask=mt[:, None] & mf[None, :], other=0.0)
            bdo = tl.load(do + b * T * H * DV + t[:, None] * (H * DV) + h * DV + rv[None, :],
                          mask=mt[:, None] & mv[None, :], other=0.0)
            if NORM:
                r = tl.load(rden + b * T * H + t * H + h, mask=mt, other=0.0)
                bdo = (bdo.to(tl.float32) * r[:, None]).to(do.dtype.element_ty)
                dd = tl.load(dden + b * T * H + t * H + h, mask=mt, other=0.0)
                accz += tl.sum(bq.to(tl.float32) * dd[:, None], 0)
            acc += tl.dot(tl.trans(bq), bdo, input_precision=PREC)
    so = (b * Hk + hk) * tl.num_programs(1) + seg
    tl.store(per + so * F * DV + rf[:, None] * DV + rv[None, :], acc, mask=mf[:, None] & mv[None, :])
    if NORM:
        if first_v:
            tl.store(perz + so * F + rf, accz, mask=mf)


@triton.jit
def _seg_scan_kernel(
    Sl, zl, Gc, S0, z0, ST, zT,
    T, Hk, LAG, NSEG, NCH,
    F: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    GATED: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
):
    """In place: segment contributions -> the state before each segment (from S0), and the final state."""
    pid = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    nvb = tl.cdiv(DV, BV)
    b = bhk // Hk
    hk = bhk % Hk
    rf = (pid // nvb) * BK + tl.arange(0, BK)
    rv = (pid % nvb) * BV + tl.arange(0, BV)
    mf = rf < F
    m2 = mf[:, None] & (rv < DV)[None, :]
    zmask = mf & ((rf * 0 + pid % nvb) == 0)
    sb = (b * Hk + hk) * F * DV
    S = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    if HAS_INIT:
        S = tl.load(S0 + sb + rf[:, None] * DV + rv[None, :], mask=m2, other=0.0)
        z = tl.load(z0 + (b * Hk + hk) * F + rf, mask=mf, other=0.0)
    if GATED:
        Gb = Gc + b * T * Hk + hk
    N = tl.cdiv(T, C)
    for s in range(0, NSEG):
        po = sb * NSEG + s * F * DV + rf[:, None] * DV + rv[None, :]
        zo = (b * Hk + hk) * NSEG * F + s * F + rf
        loc = tl.load(Sl + po, mask=m2, other=0.0)
        zloc = tl.load(zl + zo, mask=zmask, other=0.0)
        tl.store(Sl + po, S, mask=m2)
        tl.store(zl + zo, z, mask=zmask)
        if GATED:
            e0 = gload(Gb, s * NCH * C - LAG - 1, T, Hk)
            e1 = gload(Gb, tl.minimum(s * NCH + NCH, N) * C - LAG - 1, T, Hk)
            dec = tl.exp(e1 - e0)
            S = S * dec + loc
            z = z * dec + zloc
        else:
            S += loc
            z += zloc
    if STORE_FINAL:
        tl.store(ST + sb + rf[:, None] * DV + rv[None, :], S, mask=m2)
        tl.store(zT + (b * Hk + hk) * F + rf, z, mask=zmask)


@triton.jit
def _la_fwd_kernel(
    q, k, v, o, den_out, Gc, S0, z0, ST, zT,
    T, H, Hk, GROUP, LAG, eps, NCH,
    F: tl.constexpr, DV: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    NORM: tl.constexpr, GATED: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    PREC: tl.constexpr, SEGINIT: tl.constexpr,
):
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rf = tl.arange(0, BF)
    rv = pid_v * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    mf = rf < F
    mv = rv < DV
    causal = rc[:, None] >= rc[None, :]
    qb = q + b * T * H * F + h * F
    kb = k + b * T * Hk * F + hk * F
    vb = v + b * T * Hk * DV + hk * DV
    ob = o + b * T * H * DV + h * DV
    if GATED:
        Gb = Gc + b * T * Hk + hk
    else:
        Gb = Gc
    sb = (b * Hk + hk) * F * DV
    S = tl.zeros([BF, BV], dtype=tl.float32)
    z = tl.zeros([BF], dtype=tl.float32)
    if SEGINIT:  # this segment's state from _seg_scan_kernel, (B, Hk, segments, F, DV)
        so = (b * Hk + hk) * tl.num_programs(2) + seg
        S = tl.load(S0 + so * F * DV + rf[:, None] * DV + rv[None, :], mask=mf[:, None] & mv[None, :], other=0.0)
        z = tl.load(z0 + so * F + rf, mask=mf, other=0.0)
    elif HAS_INIT:
        S = tl.load(S0 + sb + rf[:, None] * DV + rv[None, :], mask=mf[:, None] & mv[None, :], other=0.0)
        z = tl.load(z0 + (b * Hk + hk) * F + rf, mask=mf, other=0.0)
    N = tl.cdiv(T, C)
    for c in range(seg * NCH, tl.minimum(seg * NCH + NCH, N)):
        tq = c * C + rc
        tk = tq - LAG
        mq = tq < T
        mk = (tk >= 0) & (tk < T)
        bq = tl.load(qb + tq[:, None] * (H * F) + rf[None, :], mask=mq[:, None] & mf[None, :], other=0.0)
        bk = tl.load(kb + tk[:, None] * (Hk * F) + rf[None, :], mask=mk[:, None] & mf[None, :], other=0.0)
        bv = tl.load(vb + tk[:, None] * (Hk * DV) + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        s = tl.dot(bq, tl.trans(bk), input_precision=PREC)
        if GATED:
            gq = gload(Gb, tq, T, Hk)
            gk = gload(Gb, tk, T, Hk)
            g0 = gload(Gb, c * C - LAG - 1, T, Hk)
            g1 = gload(Gb, c * C - LAG + C - 1, T, Hk)
            s = s * tl.exp(tl.where(causal, gq[:, None] - gk[None, :], 0.0))
        s = tl.where(causal, s, 0.0)
        acc = tl.dot(s.to(bv.dtype), bv, input_precision=PREC)
        # the query rows' decay exp(G_i - G_0) scales the inter-chunk product's rows afterwards, so no
        # fp32 copy of the (C, F) query tile is kept (registers) and q is not rounded twice
        inter = tl.dot(bq, S.to(bq.dtype), input_precision=PREC)
        if GATED:
            wq = tl.exp(gq - g0)
            inter = inter * wq[:, None]
        acc += inter
        if NORM:
            zq = tl.sum(bq.to(tl.float32) * z[None, :], 1)
            if GATED:
                zq = zq * wq
            den = tl.sum(s, 1) + zq
            acc = acc / (den + eps)[:, None]
            if den_out is not None:
                if pid_v == 0:
                    tl.store(den_out + b * T * H + tq * H + h, den, mask=mq)
        tl.store(ob + tq[:, None] * (H * DV) + rv[None, :], acc.to(o.dtype.element_ty), mask=mq[:, None] & mv[None, :])
        if GATED:
            S, z = add_keys(S, z, bk, bv, tl.exp(g1 - gk), tl.exp(g1 - g0), GATED, PREC, False)
        else:
            S, z = add_keys(S, z, bk, bv, 1.0, 1.0, GATED, PREC, False)
    if STORE_FINAL:
        if (h % GROUP) == 0:
            tl.store(ST + sb + rf[:, None] * DV + rv[None, :], S, mask=mf[:, None] & mv[None, :])
            if pid_v == 0:
                tl.store(zT + (b * Hk + hk) * F + rf, z, mask=mf)


@triton.jit
def _la_bwd_dq_kernel(
    do, rden, dden, k, v, dq, Gc, S0, z0, Sg, zg,
    T, H, Hk, GROUP, LAG, NCH,
    F: tl.constexpr, DV: tl.constexpr, BFB: tl.constexpr, BDV: tl.constexpr, C: tl.constexpr,
    NORM: tl.constexpr, GATED: tl.constexpr, HAS_INIT: tl.constexpr, PREC: tl.constexpr, SEG: tl.constexpr,
):
    pid_f = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rf = pid_f * BFB + tl.arange(0, BFB)
    rv = tl.arange(0, BDV)
    rc = tl.arange(0, C)
    mf = rf < F
    mv = rv < DV
    causal = rc[:, None] >= rc[None, :]
    kb = k + b * T * Hk * F + hk * F
    vb = v + b * T * Hk * DV + hk * DV
    dob = do + b * T * H * DV + h * DV
    dqb = dq + b * T * H * F + h * F
    if GATED:
        Gb = Gc + b * T * Hk + hk
    else:
        Gb = Gc
    S = tl.zeros([BFB, BDV], dtype=tl.float32)
    z = tl.zeros([BFB], dtype=tl.float32)
    if SEG:  # the keys' state before this segment (segment_states; the initial state included)
        so = (b * Hk + hk) * tl.num_programs(2) + seg
        S = tl.load(Sg + so * F * DV + rf[:, None] * DV + rv[None, :], mask=mf[:, None] & mv[None, :], other=0.0)
        z = tl.load(zg + so * F + rf, mask=mf, other=0.0)
    elif HAS_INIT:
        S = tl.load(S0 + (b * Hk + hk) * F * DV + rf[:, None] * DV + rv[None, :], mask=mf[:, None] & mv[None, :], other=0.0)
        z = tl.load(z0 + (b * Hk + hk) * F + rf, mask=mf, other=0.0)
    N = tl.cdiv(T, C)
    for c in range(seg * NCH, tl.minimum(seg * NCH + NCH, N)):
        tq = c * C + rc
        tk = tq - LAG
        mq = tq < T
        mk = (tk >= 0) & (tk < T)
        bdo = tl.load(dob + tq[:, None] * (H * DV) + rv[None, :], mask=mq[:, None] & mv[None, :], other=0.0)
        bk = tl.load(kb + tk[:, None] * (Hk * F) + rf[None, :], mask=mk[:, None] & mf[None, :], other=0.0)
        bv = tl.load(vb + tk[:, None] * (Hk * DV) + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        if NORM:
            r = tl.load(rden + b * T * H + tq * H + h, mask=mq, other=0.0)
            dd = tl.load(dden + b * T * H + tq * H + h, mask=mq, other=0.0)
            dn = (bdo.to(tl.float32) * r[:, None]).to(bv.dtype)
        else:
            dn = bdo
        dA = tl.dot(dn, tl.trans(bv), input_precision=PREC)
        if NORM:
            dA += dd[:, None]
        if GATED:
            gq = gload(Gb, tq, T, Hk)
            gk = gload(Gb, tk, T, Hk)
            g0 = gload(Gb, c * C - LAG - 1, T, Hk)
            g1 = gload(Gb, c * C - LAG + C - 1, T, Hk)
            dA = dA * tl.exp(tl.where(causal, gq[:, None] - gk[None, :], 0.0))
        dA = tl.where(causal, dA, 0.0)
        acc = tl.dot(dA.to(bk.dtype), bk, input_precision=PREC)
        inter = tl.dot(dn, tl.trans(S.to(bv.dtype)), input_precision=PREC)
        if NORM:
            inter += dd[:, None] * z[None, :]
        if GATED:
            inter = inter * tl.exp(gq - g0)[:, None]
        acc += inter
        tl.store(dqb + tq[:, None] * (H * F) + rf[None, :], acc.to(dq.dtype.element_ty), mask=mq[:, None] & mf[None, :])
        if GATED:
            kd = bk.to(tl.float32) * tl.exp(g1 - gk)[:, None]
            dec = tl.exp(g1 - g0)
            S = S * dec + tl.dot(tl.trans(kd.to(bk.dtype)), bv, input_precision=PREC)
            z = z * dec + tl.sum(kd, 0)
        else:
            S += tl.dot(tl.trans(bk), bv, input_precision=PREC)
            z += tl.sum(bk.to(tl.float32), 0)


@triton.jit
def _la_bwd_dk_kernel(
    q, do, rden, dden, v, dk, Gc, dSg, dzg,
    T, H, Hk, GROUP, LAG, NCH,
    F: tl.constexpr, DV: tl.constexpr, BFB: tl.constexpr, BDV: tl.constexpr, C: tl.constexpr,
    NORM: tl.constexpr, GATED: tl.constexpr, PREC: tl.constexpr, SEG: tl.constexpr,
):
    pid_f = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    b = bhk // Hk
    hk = bhk % Hk
    rf = pid_f * BFB + tl.arange(0, BFB)
    rv = tl.arange(0, BDV)
    rc = tl.arange(0, C)
    mf = rf < F
    mv = rv < DV
    causal_t = rc[None, :] >= rc[:, None]  # [key, query]
    vb = v + b * T * Hk * DV + hk * DV
    dkb = dk + b * T * Hk * F + hk * F
    if GATED:
        Gb = Gc + b * T * Hk + hk
    else:
        Gb = Gc
    dS = tl.zeros([BFB, BDV], dtype=tl.float32)
    dz = tl.zeros([BFB], dtype=tl.float32)
    if SEG:  # the later queries' sums (reverse_segment_states)
        so = (b * Hk + hk) * tl.num_programs(2) + seg
        dS = tl.load(dSg + so * F * DV + rf[:, None] * DV + rv[None, :], mask=mf[:, None] & mv[None, :], other=0.0)
        if NORM:
            dz = tl.load(dzg + so * F + rf, mask=mf, other=0.0)
    N = tl.cdiv(T, C)
    c_hi = tl.minimum(seg * NCH + NCH, N)
    for i in range(0, c_hi - seg * NCH):
        c = c_hi - 1 - i
        tq = c * C + rc
        tk = tq - LAG
        mq = tq < T
        mk = (tk >= 0) & (tk < T)
        bv = tl.load(vb + tk[:, None] * (Hk * DV) + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        acc = tl.dot(bv, tl.trans(dS.to(bv.dtype)), input_precision=PREC)
        if NORM:
            acc += dz[None, :]
        if GATED:
            gq = gload(Gb, tq, T, Hk)
            gk = gload(Gb, tk, T, Hk)
            g0 = gload(Gb, c * C - LAG - 1, T, Hk)
            g1 = gload(Gb, c * C - LAG + C - 1, T, Hk)
            acc = acc * tl.exp(g1 - gk)[:, None]
            dec = tl.exp(g1 - g0)
            dS = dS * dec
            dz = dz * dec
        for g in range(0, GROUP):
            h = hk * GROUP + g
            bq = tl.load(q + b * T * H * F + h * F + tq[:, None] * (H * F) + rf[None, :], mask=mq[:, None] & mf[None, :], other=0.0)
            bdo = tl.load(do + b * T * H * DV + h * DV + tq[:, None] * (H * DV) + rv[None, :], mask=mq[:, None] & mv[None, :], other=0.0)
            if NORM:
                r = tl.load(rden + b * T * H + tq * H + h, mask=mq, other=0.0)
                dd = tl.load(dden + b * T * H + tq * H + h, mask=mq, other=0.0)
                dn = (bdo.to(tl.float32) * r[:, None]).to(bv.dtype)
            else:
                dn = bdo
            dAt = tl.dot(bv, tl.trans(dn), input_precision=PREC)
            if NORM:
                dAt += dd[None, :]
            if GATED:
                dAt = dAt * tl.exp(tl.where(causal_t, gq[None, :] - gk[:, None], 0.0))
                qs = (bq.to(tl.float32) * tl.exp(gq - g0)[:, None]).to(bq.dtype)
            else:
                qs = bq
            dAt = tl.where(causal_t, dAt, 0.0)
            acc += tl.dot(dAt.to(bq.dtype), bq, input_precision=PREC)
            dS += tl.dot(tl.trans(qs), dn, input_precision=PREC)
            if NORM:
                dz += tl.sum(qs.to(tl.float32) * dd[:, None], 0)
        tl.store(dkb + tk[:, None] * (Hk * F) + rf[None, :], acc.to(dk.dtype.element_ty), mask=mk[:, None] & mf[None, :])


@triton.jit
def _la_bwd_dv_kernel(
    q, k, do, rden, dv, Gc, dSg,
    T, H, Hk, GROUP, LAG, NCH,
    F: tl.constexpr, DV: tl.constexpr, BF: tl.constexpr, BVB: tl.constexpr, C: tl.constexpr,
    NORM: tl.constexpr, GATED: tl.constexpr, PREC: tl.constexpr, SEG: tl.constexpr,
):
    pid_v = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    b = bhk // Hk
    hk = bhk % Hk
    rf = tl.arange(0, BF)
    rv = pid_v * BVB + tl.arange(0, BVB)
    rc = tl.arange(0, C)
    mf = rf < F
    mv = rv < DV
    causal_t = rc[None, :] >= rc[:, None]
    kb = k + b * T * Hk * F + hk * F
    dvb = dv + b * T * Hk * DV + hk * DV
    if GATED:
        Gb = Gc + b * T * Hk + hk
    else:
        Gb = Gc
    dS = tl.zeros([BF, BVB], dtype=tl.float32)
    if SEG:  # the later queries' sums (reverse_segment_states)
        so = (b * Hk + hk) * tl.num_programs(2) + seg
        dS = tl.load(dSg + so * F * DV + rf[:, None] * DV + rv[None, :], mask=mf[:, None] & mv[None, :], other=0.0)
    N = tl.cdiv(T, C)
    c_hi = tl.minimum(seg * NCH + NCH, N)
    for i in range(0, c_hi - seg * NCH):
        c = c_hi - 1 - i
        tq = c * C + rc
        tk = tq - LAG
        mq = tq < T
        mk = (tk >= 0) & (tk < T)
        bk = tl.load(kb + tk[:, None] * (Hk * F) + rf[None, :], mask=mk[:, None] & mf[None, :], other=0.0)
        if GATED:
            gq = gload(Gb, tq, T, Hk)
            gk = gload(Gb, tk, T, Hk)
            g0 = gload(Gb, c * C - LAG - 1, T, Hk)
            g1 = gload(Gb, c * C - LAG + C - 1, T, Hk)
            kd = (bk.to(tl.float32) * tl.exp(g1 - gk)[:, None]).to(bk.dtype)
        else:
            kd = bk
        acc = tl.dot(kd, dS.to(bk.dtype), input_precision=PREC)
        if GATED:
            dS = dS * tl.exp(g1 - g0)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            bq = tl.load(q + b * T * H * F + h * F + tq[:, None] * (H * F) + rf[None, :], mask=mq[:, None] & mf[None, :], other=0.0)
            bdo = tl.load(do + b * T * H * DV + h * DV + tq[:, None] * (H * DV) + rv[None, :], mask=mq[:, None] & mv[None, :], other=0.0)
            if NORM:
                r = tl.load(rden + b * T * H + tq * H + h, mask=mq, other=0.0)
                dn = (bdo.to(tl.float32) * r[:, None]).to(bk.dtype)
            else:
                dn = bdo
            st = tl.dot(bk, tl.trans(bq), input_precision=PREC)
            if GATED:
                st = st * tl.exp(tl.where(causal_t, gq[None, :] - gk[:, None], 0.0))
                qs = (bq.to(tl.float32) * tl.exp(gq - g0)[:, None]).to(bq.dtype)
            else:
                qs = bq
            st = tl.where(causal_t, st, 0.0)
            acc += tl.dot(st.to(bk.dtype), dn, input_precision=PREC)
            dS += tl.dot(tl.trans(qs), dn, input_precision=PREC)
        tl.store(dvb + tk[:, None] * (Hk * DV) + rv[None, :], acc.to(dv.dtype.element_ty), mask=mk[:, None] & mv[None, :])


# ----------------------------------------------------------------------------------------------
# launchers shared with hybrid_attn and gated_attn


def _fwd_blocks(B: int, H: int, F: int, Dv: int) -> int:
    """Value columns per forward program: as many as keep the F x BV fp32 state in registers (the
    segment split, not narrower blocks, is what fills the GPU)."""
    BV = p2(Dv)
    while BV > 16 and p2(F) * BV > TUNING["linear_state_elems"]:
        BV //= 2
    return BV


_FITS: dict = {}


def warps(knob: str, rule: int) -> int:
    """A launch's warps: ``TUNING[knob]`` where set (non-zero), else the launch's own ``rule``."""
    return int(TUNING.get(knob) or rule)


def launch_fitting(key, configs, launch):
    """Call ``launch(*config)`` with the first config (largest blocks first) whose kernel fits the
    GPU's shared memory; the choice is remembered per ``key``. Large head dims with a long window
    need more shared memory than an H100 has at the widest value block."""
    if key in _FITS:
        return launch(*_FITS[key])
    err = None
    for cfg in configs:
        try:
            out = launch(*cfg)
        except triton.runtime.errors.OutOfResources as e:
            err = e
            continue
        _FITS[key] = cfg
        return out
    raise err


# tuning knobs (benchmarks/kernel_speed.py --sweep changes them): programs per SM the segment split aims
# for, and the fewest chunks a segment may have
# (and the most F x BV state elements one program keeps in registers: linear forward, hybrid forward;
# at 32 heads x 128 on the H100 the linear forward took 0.66 ms at 16k with 128 x 128 against 0.81 ms
# with 128 x 64)
TUNING = {"programs_per_sm": 4, "min_segment_chunks": 8, "linear_state_elems": 128 * 128, "state_elems": 128 * 64,
          # warps of each kernel launch; 0 keeps the rule at its launch (kernel_speed.py --warps-sweep times
          # them). The hybrid forward's rule is hybrid_forward_warps: 8 only for the gated training forward
          "hybrid_warps": 0, "bwd_dq_warps": 0, "hybrid_bwd_dkv_warps": 0, "la_fwd_warps": 0, "la_bwd_warps": 0,
          "la_bwd_dv_warps": 0, "seg_state_warps": 0, "rev_seg_warps": 0,
          # la_backward's segments: on the H200 (be04255) the graphed lolcats LoRA step on rows of 2 x 4,096 went
          # from 195.8 to 184.9 ms, the transfer step from 139.0 to 122.9 ms (dk / dv kernels 464 -> 64 us a call)
          "bwd_segments": True,
          # ... but only while its programs are at most this many per SM. With the reverse sums in PyTorch (fp32
          # copies) 32 heads at 16k (64 programs) lost: 6.38 ms against 4.38 without (H200, 9dd94e2). With
          # reverse_segment_states_triton they gain on the H100 (492c17e): 3.96 against 4.51 ms at 16k, 14.9
          # against 17.4 at 64k; 48 programs (rows of 8 x 1,024) break even (LoRA step 158.4 against 157.2 ms).
          # Above one program per SM it is not measured
          "bwd_segments_max_per_sm": 1.0,
          # the hybrid backward's sink keys: their far queries in _hy_bwd_dsink_kernel, not in one tail program
          "bwd_sink_split": True}


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def bwd_segments_wanted(programs: int, sms: int) -> bool:
    """Whether la_backward's automatic plan cuts rows into segments: only with few programs for the SMs,
    since the segments' states cost two passes of their own (``TUNING``'s figures)."""
    return TUNING["bwd_segments"] and programs <= TUNING["bwd_segments_max_per_sm"] * sms


def plan_segments(T: int, C: int, programs: int, segment_chunks: int | None, device) -> tuple[int, int]:
    """(chunks per segment, segments). The forward walks its chunks in order, so with few programs
    (one head and value block each) a long sequence leaves most of the GPU idle; splitting it into
    segments that start from precomputed states gives every SM several programs. ``segment_chunks``
    forces the split (tests); on CPU the default is one segment."""
    N = cdiv(T, C)
    if segment_chunks is None:
        if device.type != "cuda":
            return N, 1
        want = cdiv(TUNING["programs_per_sm"] * _sm_count(device.index or 0), programs)
        nseg = max(1, min(want, N // TUNING["min_segment_chunks"]))
        segment_chunks = cdiv(N, nseg)
    nch = max(1, min(int(segment_chunks), N))
    return nch, cdiv(N, nch)


def segment_states(k, v, Gc, *, lag, sinks, chunk_size, nch, nseg, initial_state=None, final=None, split=False):
    """The linear state (S, z) before each segment of ``nch`` chunks, as (B, Hk, nseg, F, Dv) and
    (B, Hk, nseg, F) fp32, for keys read at ``position - lag`` (sinks skipped); fills ``final``."""
    B, T, Hk, F = k.shape
    Dv = v.shape[-1]
    Sl = torch.empty(B, Hk, nseg, F, Dv, device=k.device, dtype=torch.float32)
    zl = torch.empty(B, Hk, nseg, F, device=k.device, dtype=torch.float32)
    BK, BV = min(p2(F), 64), min(p2(Dv), 64)
    nblk = cdiv(F, BK) * cdiv(Dv, BV)
    _seg_state_kernel[(nblk, nseg, B * Hk)](
        k, v, Gc, Sl, zl, T, Hk, lag, sinks, nch,
        F=F, DV=Dv, BK=BK, BV=BV, C=chunk_size, GATED=Gc is not None, PREC=dot_precision(k), SPLIT=split,
        num_warps=warps("seg_state_warps", 4), num_stages=2,
    )
    S0, z0 = initial_state if initial_state is not None else (None, None)
    _seg_scan_kernel[(nblk, B * Hk)](
        Sl, zl, Gc, S0, z0, final[0] if final else None, final[1] if final else None,
        T, Hk, lag, nseg, nch,
        F=F, DV=Dv, BK=BK, BV=BV, C=chunk_size, GATED=Gc is not None, HAS_INIT=S0 is not None,
        STORE_FINAL=final is not None, num_warps=4,
    )
    return Sl, zl


def la_forward(q, k, v, *, normalize, eps, lag=0, Gc=None, initial_state=None, output_final_state=False,
               chunk_size=64, want_den=False, segment_chunks=None):
    B, T, H, F = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    o = torch.empty(B, T, H, Dv, device=q.device, dtype=q.dtype)
    den = torch.empty(B, T, H, device=q.device, dtype=torch.float32) if (want_den and normalize) else None
    final = None
    if output_final_state:
        final = (torch.zeros(B, Hk, F, Dv, device=q.device, dtype=torch.float32),
                 torch.zeros(B, Hk, F, device=q.device, dtype=torch.float32))
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = (x.float().contiguous() for x in initial_state)
    BV = _fwd_blocks(B, H, F, Dv)
    BF = p2(F)
    nch, nseg = plan_segments(T, chunk_size, cdiv(Dv, BV) * B * H, segment_chunks, q.device)
    if nseg > 1:  # segment states first, then every segment runs in parallel from its own state
        S0, z0 = segment_states(k, v, Gc, lag=lag, sinks=0, chunk_size=chunk_size, nch=nch, nseg=nseg,
                                initial_state=(S0, z0) if S0 is not None else None, final=final, split=False)

    def launch(bv, stages):
        _la_fwd_kernel[(cdiv(Dv, bv), B * H, nseg)](
            q, k, v, o, den, Gc, S0, z0, final[0] if final else None, final[1] if final else None,
            T, H, Hk, H // Hk, lag, eps, nch,
            F=F, DV=Dv, BF=BF, BV=bv, C=chunk_size, NORM=normalize, GATED=Gc is not None,
            HAS_INIT=S0 is not None, STORE_FINAL=final is not None and nseg == 1, PREC=dot_precision(q),
            # 4 warps up to 128 x 128 state elements: at 32 heads x 128, 16k, on the H100 (afb04c4) the linear
            # forward took 0.587 ms on 4 against 0.663 on 8 (gated 0.832 against 0.859); 2 and 16 lost
            SEGINIT=nseg > 1, num_warps=warps("la_fwd_warps", 4 if BF * bv <= 128 * 128 else 8), num_stages=stages,
        )

    # smaller GPUs than the H100 may not fit the widest value block
    configs = [(bv, st) for bv in (BV, BV // 2, BV // 4) if bv >= 16 for st in (2, 1)]
    launch_fitting(("la_fwd", q.dtype, F, Dv, chunk_size, normalize, Gc is not None, S0 is not None,
                    final is not None and nseg == 1, nseg > 1, BV, TUNING["la_fwd_warps"]), configs, launch)
    return o, den, final


def reverse_segment_states_triton(q, do, rden, dden, Hk: int, C: int, nch: int, nseg: int):
    """``reverse_segment_states`` with each segment's sums from one Triton kernel (``_rev_seg_kernel``)
    reading q and do in their own dtype, where the reference makes fp32 copies of both (B, T, H, .)
    tensors first; the exclusive sums over later segments are one small PyTorch scan."""
    B, T, H, F = q.shape
    Dv = do.shape[-1]
    q, do = q.contiguous(), do.contiguous()
    norm = rden is not None
    per = torch.empty(B, Hk, nseg, F, Dv, device=q.device, dtype=torch.float32)
    perz = torch.empty(B, Hk, nseg, F, device=q.device, dtype=torch.float32) if norm else None
    BK, BV = min(p2(F), 64), min(p2(Dv), 64)
    _rev_seg_kernel[(cdiv(F, BK) * cdiv(Dv, BV), nseg, B * Hk)](
        q, do, rden.contiguous() if norm else None, dden.contiguous() if norm else None, per, perz,
        T, H, Hk, H // Hk, nch,
        # 8 warps: with 4 the sm_90 build spills 680 bytes a thread, with 8 none (tests/compile_sm90.py, Triton 3.9)
        F=F, DV=Dv, BK=BK, BV=BV, C=C, NORM=norm, PREC=dot_precision(q), num_warps=warps("rev_seg_warps", 8),
        num_stages=2,
    )
    return _after_each(per), _after_each(perz) if norm else None


def _after_each(per):
    """Per-segment sums (B, Hk, nseg, ...) -> for each segment the sum over the segments after it."""
    return (per.flip(2).cumsum(2).flip(2) - per).contiguous()


def reverse_segment_states(q, do, rden, dden, Hk: int, C: int, nch: int, nseg: int):
    """For each segment of ``nch`` chunks, what the dk/dv kernels' reverse walk has summed when it
    reaches the segment's last chunk: dS = sum_i q_i^T dnum_i and dz = sum_i q_i dden_i over the queries
    of every later segment (all query heads of a KV head), as (B, Hk, nseg, F, Dv) and (B, Hk, nseg, F)
    fp32. dnum_i = do_i * rden_i, rounded to the inputs' dtype as the kernels round it. Ungated only.
    The PyTorch reference of ``reverse_segment_states_triton``."""
    B, T, H, F = q.shape
    Dv = do.shape[-1]
    G = H // Hk
    L = nch * C
    pad = nseg * L - T
    dn = do.float() * rden[..., None] if rden is not None else do.float()
    dn = dn.to(do.dtype).float()
    qf = q.float()
    if pad:
        qf = torch.nn.functional.pad(qf, (0, 0, 0, 0, 0, pad))
        dn = torch.nn.functional.pad(dn, (0, 0, 0, 0, 0, pad))
    qs = qf.view(B, nseg, L, Hk, G, F)
    per = torch.einsum("bslxgf,bslxgd->bxsfd", qs, dn.view(B, nseg, L, Hk, G, Dv))
    if dden is None:
        return _after_each(per), None
    dd = dden.float()
    if pad:
        dd = torch.nn.functional.pad(dd, (0, 0, 0, pad))
    perz = torch.einsum("bslxgf,bslxg->bxsf", qs, dd.view(B, nseg, L, Hk, G))
    return _after_each(per), _after_each(perz)


def la_backward_warps(BFB: int, BDV: int, gated: bool) -> int:
    """Warps of the linear backward's dq and dk programs: 8 only for gated blocks of at least 64 x 128.
    On the H100 (74524bc, benchmarks/kernel_speed.py --warps-sweep, 32 heads x 128 at 16k, two runs) 4
    warps against 8 took the linear forward+backward from 3.87 to 3.50 ms and the hybrid's (window 64)
    from 8.55 to 8.31 ms, but the gated one from 7.93 to 8.13 ms and lizard's from 18.9 to 19.3 ms.
    Smaller blocks (SmolLM2's 64 x 64) always took 4."""
    return 8 if gated and BFB * BDV >= 64 * 128 else 4


def la_backward(q, k, v, do, rden, dden, *, lag=0, Gc=None, initial_state=None, chunk_size=64,
                qk_grad_dtype=None, segment_chunks=None):
    """Gradients of sum_{j<=i-lag} a_ij v_j with a_ij = q_i.k_j (times the gate decay).
    With ``rden``/``dden`` given (normalised forms): dnum_i = do_i * rden_i and every score also gets
    ``dden_i``. Returns dq, dk, dv (fp32 accumulation, stored in the input dtype).
    Each kernel walks a row's chunks in order, one program per feature or value block and head; with
    few rows that leaves most of the GPU idle (BENCHMARKS: at 2 x 4,096 the dk and dv kernels ran 12
    and 6 programs and took 3.8x as long as at 8 x 1,024). Ungated, the rows can be cut into segments
    that start from precomputed states (``segment_states`` forwards, ``reverse_segment_states``
    backwards): ``segment_chunks`` forces it (tests), ``TUNING["bwd_segments"]`` turns the automatic
    plan on or off (on: it cut those kernels 7x on the H200), and ``bwd_segments_wanted`` keeps it to
    few programs."""
    B, T, H, F = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    G = H // Hk
    norm = rden is not None
    prec = dot_precision(q)
    C = chunk_size
    alloc = torch.zeros if lag > 0 else torch.empty  # keys after T-1-lag see no query
    dq = torch.empty(q.shape, device=q.device, dtype=qk_grad_dtype or q.dtype)
    dk = alloc(k.shape, device=k.device, dtype=qk_grad_dtype or k.dtype)
    dv = alloc(v.shape, device=v.device, dtype=v.dtype)
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = (x.float().contiguous() for x in initial_state)
    BF, BDV = p2(F), p2(Dv)
    BFB = min(BF, 64)
    nw = warps("la_bwd_warps", la_backward_warps(BFB, BDV, Gc is not None))
    N = cdiv(T, C)
    nch, nseg = N, 1
    programs = cdiv(F, BFB) * B * Hk
    if Gc is None and (segment_chunks is not None or (
            q.device.type == "cuda" and bwd_segments_wanted(programs, _sm_count(q.device.index or 0)))):
        nch, nseg = plan_segments(T, C, programs, segment_chunks, q.device)
    Sg = zg = dSg = dzg = None
    if nseg > 1:
        Sg, zg = segment_states(k, v, None, lag=lag, sinks=0, chunk_size=C, nch=nch, nseg=nseg,
                                initial_state=(S0, z0) if S0 is not None else None)
        dSg, dzg = reverse_segment_states_triton(q, do, rden if norm else None, dden if norm else None, Hk, C, nch,
                                                 nseg)
    seg = nseg > 1
    _la_bwd_dq_kernel[(cdiv(F, BFB), B * H, nseg)](
        do, rden, dden, k, v, dq, Gc, S0, z0, Sg, zg, T, H, Hk, G, lag, nch,
        F=F, DV=Dv, BFB=BFB, BDV=BDV, C=C, NORM=norm, GATED=Gc is not None, HAS_INIT=S0 is not None,
        PREC=prec, SEG=seg, num_warps=nw, num_stages=2,
    )
    _la_bwd_dk_kernel[(cdiv(F, BFB), B * Hk, nseg)](
        q, do, rden, dden, v, dk, Gc, dSg, dzg, T, H, Hk, G, lag, nch,
        F=F, DV=Dv, BFB=BFB, BDV=BDV, C=C, NORM=norm, GATED=Gc is not None, PREC=prec, SEG=seg,
        num_warps=nw, num_stages=2,
    )
    BVB = min(BDV, 32 if BF > 128 else 64)
    _la_bwd_dv_kernel[(cdiv(Dv, BVB), B * Hk, nseg)](
        q, k, do, rden, dv, Gc, dSg, T, H, Hk, G, lag, nch,
        F=F, DV=Dv, BF=BF, BVB=BVB, C=C, NORM=norm, GATED=Gc is not None, PREC=prec, SEG=seg,
        num_warps=warps("la_bwd_dv_warps", 8 if BF * BVB >= 128 * 64 else 4), num_stages=2,
    )
    return dq, dk, dv


def norm_grads(o, do, den, eps):
    """dnum = do * rden, dden = -(do . o) * rden for out = num / (den + eps)."""
    rden = 1.0 / (den + eps)
    dden = -(do.float() * o.float()).sum(-1) * rden
    return rden.contiguous(), dden.contiguous()


class _LinearAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, S0, z0, normalize, eps, output_final_state, chunk_size, segment_chunks):
        init = (S0, z0) if S0 is not None else None
        o, den, final = la_forward(q, k, v, normalize=normalize, eps=eps, initial_state=init,
                                   output_final_state=output_final_state, chunk_size=chunk_size,
                                   want_den=True, segment_chunks=segment_chunks)
        ctx.save_for_backward(q, k, v, o, den, S0, z0)
        ctx.cfg = (normalize, eps, chunk_size, segment_chunks)
        if final is None:
            return o
        ctx.mark_non_differentiable(*final)
        return o, final[0], final[1]

    @staticmethod
    def backward(ctx, do, *_):
        q, k, v, o, den, S0, z0 = ctx.saved_tensors
        normalize, eps, C, seg = ctx.cfg
        do = do.contiguous()
        rden = dden = None
        if normalize:
            rden, dden = norm_grads(o, do, den, eps)
        init = (S0, z0) if S0 is not None else None
        dq, dk, dv = la_backward(q, k, v, do, rden, dden, initial_state=init, chunk_size=C, segment_chunks=seg)
        return dq, dk, dv, None, None, None, None, None, None, None


def triton_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    segment_chunks: int | None = None,
):
    """Triton causal linear attention; returns ``(out, (S, z) or None)``. No gradient flows into or
    out of the recurrent state (q, k, v get gradients). ``segment_chunks``: split the sequence into
    segments of this many chunks that run in parallel (default: chosen from the GPU's size)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = (x.detach().float().contiguous() for x in initial_state)
    res = _LinearAttnFn.apply(q, k, v, S0, z0, normalize, eps, output_final_state, chunk_size, segment_chunks)
    if output_final_state:
        return res[0], (res[1], res[2])
    return res, None
