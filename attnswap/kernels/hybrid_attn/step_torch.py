"""Continuing the hybrid window + linear attention from a constant-size state, in PyTorch.

State after t tokens (fp32 sums; the window and sinks keep the input dtype):
    S (B, Hk, F, Dv), z (B, Hk, F)   sums of fk_j^T v_j and fk_j over keys that left the window
    win_k (B, W, Hk, D), win_v (B, W, Hk, Dv), win_fk (B, W, Hk, F): the last W keys, oldest first
    win_rank (B, W)                  each slot's index among the sequence's real tokens; -1 = empty
    sink_k (B, Sk, Hk, D), sink_v    the first Sk real tokens (Sk = max(sinks, 1); unused if sinks=0)
    sink_on (B, Sk)                  sinks that have left the window (attended through this store)
    n_real (B,)                      real tokens seen
    win_g (B, W, Hk)                 log-gates of the window's tokens (gated variant; zeros otherwise)
With gates (``g``, log-space, <= 0), S and z are decayed to the last token seen, and a linear key j
counts exp(g_{j+1} + ... + g_i) for query i, as in ``gated_attn/naive.py``. ``meta_k``/``meta_v``
(M, Hk, D) are learned sink tokens every query scores exactly (Lizard's meta-memory).
Its size is independent of t. ``hybrid_step`` attends Tq new queries (usually 1) and returns the
updated state; it matches ``naive_hybrid_attn`` on the full sequence (tests/test_generation.py).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F_

from ..dispatch import compile_setting
from ..gated_attn.torch_chunk import time_cumsum

_COMPILED = None


def _one_token_step():
    """``_step_one``, compiled with torch.compile when ATTNSWAP_COMPILE_DECODE=attn (fused kernels)."""
    global _COMPILED
    if compile_setting() != "attn":
        return _step_one
    if _COMPILED is None:
        _COMPILED = torch.compile(_step_one, fullgraph=True, dynamic=False)
    return _COMPILED


def owned(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied when it is a view into a buffer much larger than itself. A state slices its window
    and sinks out of the whole prompt's keys, values and features; kept as views in the cache, they would
    hold those per-token buffers alive (at 32k about 75 MB a SmolLM2 layer, 2.2 GB for the model)."""
    return t.clone() if t.untyped_storage().nbytes() > 2 * t.numel() * t.element_size() else t


def hybrid_prefill_state(k, v, fk, valid, *, window: int, sinks: int = 0, g=None) -> dict:
    """The state after keys k (B, T, Hk, D), values v, key features fk; ``valid`` (B, T) bool, or
    None when every token is real (no padding: the state is then slices and two sums, a few operators
    instead of the masked search below); ``g`` (B, T, Hk) log-gates for the gated variant."""
    if valid is None:
        return _prefill_state_unpadded(k, v, fk, window=window, sinks=sinks, g=g)
    B, T, Hk, D = k.shape
    W, Sk = window, max(sinks, 1)
    rank = torch.where(valid, valid.long().cumsum(1) - 1, torch.full_like(valid, -1, dtype=torch.long))
    is_sink = valid & (rank < sinks)
    old = max(0, T - W)
    lin = (valid & ~is_sink)[:, :old].float()[..., None, None]
    g = torch.zeros(B, T, Hk, device=k.device) if g is None else g.float() * valid[..., None]
    G = time_cumsum(g)
    lin = lin * (G[:, -1:] - G[:, :old]).exp()[..., None]
    S = torch.einsum("btxf,btxd->bxfd", fk[:, :old].float() * lin, v[:, :old].float())
    z = (fk[:, :old].float() * lin).sum(1)
    pad = max(0, W - T)

    def last(x, fill=0):
        x = x[:, old:]
        return F_.pad(x, (0, 0) * (x.dim() - 2) + (pad, 0), value=fill) if pad else owned(x)

    if sinks:  # sink r of row b is that row's r-th real token: found by search, not by nonzero (no host sync)
        n_before = valid.long().cumsum(1)  # real tokens up to and including each position, nondecreasing
        want = torch.arange(1, Sk + 1, device=k.device).expand(B, Sk).contiguous()
        t = torch.searchsorted(n_before, want)  # (B, Sk): first position holding that many real tokens
        has = t < T  # rows with fewer real tokens than sinks leave the last slots empty
        t = t.clamp_max(T - 1)

        def pick(x):
            got = x.gather(1, t.view(B, Sk, *([1] * (x.dim() - 2))).expand(B, Sk, *x.shape[2:]))
            zero = torch.zeros((), dtype=x.dtype, device=x.device)
            return torch.where(has.view(B, Sk, *([1] * (x.dim() - 2))), got, zero)

        sink_k, sink_v, sink_on = pick(k), pick(v), has & (t < old)
    else:
        sink_k = k.new_zeros(B, Sk, Hk, D)
        sink_v = v.new_zeros(B, Sk, Hk, v.shape[-1])
        sink_on = torch.zeros(B, Sk, dtype=torch.bool, device=k.device)
    return {"S": S, "z": z, "win_k": last(k), "win_v": last(v), "win_fk": last(fk.float()),
            "win_rank": last(rank, fill=-1), "sink_k": sink_k, "sink_v": sink_v, "sink_on": sink_on,
            "n_real": valid.long().sum(1), "win_g": last(g)}


def _prefill_state_unpadded(k, v, fk, *, window: int, sinks: int = 0, g=None) -> dict:
    """``hybrid_prefill_state`` when every token is real: token t has rank t, the sinks are the first
    ``sinks`` tokens, the linear sums run over tokens [sinks, T - W)."""
    B, T, Hk, D = k.shape
    W, Sk = window, max(sinks, 1)
    old = max(0, T - W)
    a = min(sinks, old)  # tokens before a are sinks: they never enter the linear sums
    dev = k.device
    gf = None if g is None else g.float()
    decay = None
    if gf is not None:
        G = time_cumsum(gf)
        decay = (G[:, -1:] - G[:, a:old]).exp()  # (B, t, Hk): each linear key decayed to the last token
    S, z = _linear_sums(fk[:, a:old], v[:, a:old], decay)
    pad = max(0, W - T)

    def last(x, dtype=None):
        x = x[:, old:]
        if pad:
            return F_.pad(x if dtype is None else x.to(dtype), (0, 0) * (x.dim() - 2) + (pad, 0))
        if dtype is not None and x.dtype != dtype:
            return x.to(dtype)  # a compact copy already: owned() would copy it once more
        return owned(x)

    n = min(Sk, T) if sinks else 0
    c = _unpadded_constants(B, T, W, Sk, min(n, old), Hk, k.shape[-1], v.shape[-1], k.dtype, v.dtype, dev)

    def first(x, zeros):  # the first n tokens, zero-filled up to Sk slots
        if n == 0:
            return zeros
        return F_.pad(x[:, :n], (0, 0) * (x.dim() - 2) + (0, Sk - n)) if n < Sk else owned(x[:, :Sk])

    return {"S": S, "z": z, "win_k": last(k), "win_v": last(v), "win_fk": last(fk, torch.float32),
            "win_rank": c["win_rank"], "sink_k": first(k, c["sink_k"]), "sink_v": first(v, c["sink_v"]),
            "sink_on": c["sink_on"], "n_real": c["n_real"], "win_g": last(gf) if gf is not None else c["win_g"]}


# Linear keys from which the state's sums are split into pieces of SUM_PIECE tokens: an fp32 product
# with a few (B x KV head) output tiles over tens of thousands of keys keeps a few SMs busy (0.30 ms a
# SmolLM2 layer at 32k on the H200, 2e90941's trace); pieces give it B x Hk x pieces tiles, for one
# launch more (two with padding). Below it a prefill is bound by the host, where launches cost more.
SUM_SPLIT_FROM = 16384
SUM_PIECE = 512
# Replayed as a CUDA graph (modeling/prefill.py), a launch costs the host nothing and the device time is
# what is left (lolcats' 8k prefill: 26 ms graphed, 3.3 of it host, cf9a050), so the split starts lower.
SUM_SPLIT_FROM_GRAPHED = 2048
_split_from: int | None = None  # split_sums_from's setting while it is active


@contextlib.contextmanager
def split_sums_from(n: int):
    """Within the block, prefill states split their linear sums from ``n`` keys on (not SUM_SPLIT_FROM)."""
    global _split_from
    old, _split_from = _split_from, n
    try:
        yield
    finally:
        _split_from = old


def _linear_sums(fk, v, decay=None):
    """S = sum_t fk_t^T v_t (B, Hk, F, Dv) and z = sum_t fk_t (B, Hk, F) in fp32, over keys fk (B, t, Hk, F)
    and values v (B, t, Hk, Dv), each key weighted by ``decay`` (B, t, Hk) when given. Inputs are cast
    and laid out for a batched product in one copy each."""
    B, t, Hk, Fd = fk.shape
    Dv = v.shape[-1]
    if t < (SUM_SPLIT_FROM if _split_from is None else _split_from):
        ft = fk.permute(0, 2, 3, 1).to(torch.float32, memory_format=torch.contiguous_format)  # (B, Hk, F, t)
        vt = v.permute(0, 2, 1, 3).to(torch.float32, memory_format=torch.contiguous_format)  # (B, Hk, t, Dv)
        if decay is not None:
            ft = ft * decay.permute(0, 2, 1)[:, :, None, :]
        return ft @ vt, ft.sum(-1)
    n = -(-t // SUM_PIECE)
    pad = n * SUM_PIECE - t
    if pad:  # zero keys at the end add nothing to either sum
        fk, v = F_.pad(fk, (0, 0, 0, 0, 0, pad)), F_.pad(v, (0, 0, 0, 0, 0, pad))
        decay = None if decay is None else F_.pad(decay, (0, 0, 0, pad))
    ft = fk.reshape(B, n, SUM_PIECE, Hk, Fd).permute(0, 3, 1, 4, 2).to(torch.float32, memory_format=torch.contiguous_format)
    vt = v.reshape(B, n, SUM_PIECE, Hk, Dv).permute(0, 3, 1, 2, 4).to(torch.float32, memory_format=torch.contiguous_format)
    if decay is not None:  # (B, Hk, pieces, 1, piece)
        ft = ft * decay.reshape(B, n, SUM_PIECE, Hk).permute(0, 3, 1, 2)[:, :, :, None, :]
    return (ft @ vt).sum(2), ft.sum((2, 4))


@functools.lru_cache(maxsize=16)
def _unpadded_constants(B, T, W, Sk, n_on, Hk, D, Dv, k_dtype, v_dtype, dev) -> dict:
    """The parts of an unpadded prefill's state that depend only on shapes (the window's ranks, which
    sinks have left the window, the tokens seen, zero sinks and gates), made once and shared by every
    layer and every prefill of the same shape: each would cost a layer 2-4 launches. Safe because no
    state tensor is ever written in place (decoding builds new ones; the decode graph copies a state
    into buffers of its own). Made outside inference mode, so that a later prefill with autograd on
    may use them."""
    with torch.inference_mode(False):
        return {"win_rank": torch.arange(T - W, T, device=dev).clamp_min(-1).expand(B, W).contiguous(),
                "sink_on": (torch.arange(Sk, device=dev) < n_on).expand(B, Sk).contiguous(),
                "n_real": torch.full((B,), T, dtype=torch.long, device=dev),
                "sink_k": torch.zeros(B, Sk, Hk, D, dtype=k_dtype, device=dev),
                "sink_v": torch.zeros(B, Sk, Hk, Dv, dtype=v_dtype, device=dev),
                "win_g": torch.zeros(B, W, Hk, dtype=torch.float32, device=dev)}


def hybrid_step(q, k, v, fq, fk, gamma, state: dict, *, window: int, scale: float, sinks: int = 0, eps: float = 1e-6,
                g=None, meta_k=None, meta_v=None):
    """Attend queries q (B, Tq, H, D) whose keys k/v/fk (B, Tq, Hk, .) directly follow the state."""
    if q.shape[1] == 1:
        return _one_token_step()(q, k, v, fq, fk, gamma, state, scale=scale, sinks=sinks, eps=eps, g=g,
                         meta_k=meta_k, meta_v=meta_v)
    B, Tq, H, D = q.shape
    Hk = k.shape[2]
    G, W = H // Hk, window
    dev = q.device
    new_rank = state["n_real"][:, None] + torch.arange(Tq, device=dev)  # (B, Tq)
    kl = torch.cat([state["win_k"], k.to(state["win_k"].dtype)], 1)  # (B, W+Tq, Hk, D)
    vl = torch.cat([state["win_v"], v.to(state["win_v"].dtype)], 1)
    fkl = torch.cat([state["win_fk"], fk.float()], 1)
    rank = torch.cat([state["win_rank"], new_rank], 1)
    ok = rank >= 0
    sink_tok = ok & (rank < sinks)
    t = torch.arange(Tq, device=dev)[:, None]
    j = torch.arange(W + Tq, device=dev)[None, :]
    older = (j <= t) & ok[:, None, :]  # query t sits at local index W + t
    exact = ((j <= W + t) & (j > t) & ok[:, None, :]) | (older & sink_tok[:, None, :])
    linear = older & ~sink_tok[:, None, :]
    qg = q.float().view(B, Tq, Hk, G, D)
    fqg = fq.float().view(B, Tq, Hk, G, -1)
    s = torch.einsum("btxgd,bjxd->bxgtj", qg, kl.float()) * scale
    s = s.masked_fill(~exact[:, None, None], float("-inf"))
    ss = torch.einsum("btxgd,bjxd->bxgtj", qg, state["sink_k"].float()) * scale
    ss = ss.masked_fill(~state["sink_on"][:, None, None, None, :], float("-inf"))
    m = torch.maximum(s.amax(-1, keepdim=True), ss.amax(-1, keepdim=True))
    if meta_k is not None:
        sm = torch.einsum("btxgd,mxd->bxgtm", qg, meta_k.float()) * scale
        m = torch.maximum(m, sm.amax(-1, keepdim=True))
    gam = gamma.float().view(1, Hk, G, 1, 1)
    a = gam * torch.exp(s - m)
    a_s = gam * torch.exp(ss - m)
    gl = torch.cat([state["win_g"], torch.zeros(B, Tq, Hk, device=dev) if g is None else g.float()], 1)
    Gc = time_cumsum(gl)  # (B, W+Tq, Hk)
    Gq = Gc[:, W:]  # at each query
    dec = (Gq.permute(0, 2, 1)[..., :, None] - Gc.permute(0, 2, 1)[..., None, :]).clamp_max(0).exp()  # (B,Hk,Tq,W+Tq)
    lin = torch.einsum("btxgf,bjxf->bxgtj", fqg, fkl) * dec[:, :, None]
    a = a + lin.masked_fill(~linear[:, None, None], 0.0)
    fqs = fqg * (Gq - Gc[:, W - 1 : W]).exp()[..., None, None]  # the state is referenced to local W-1
    num = (torch.einsum("bxgtj,bjxd->btxgd", a, vl.float())
           + torch.einsum("bxgtj,bjxd->btxgd", a_s, state["sink_v"].float())
           + torch.einsum("btxgf,bxfd->btxgd", fqs, state["S"]))
    den = (a.sum(-1) + a_s.sum(-1)).permute(0, 3, 1, 2) + torch.einsum("btxgf,bxf->btxg", fqs, state["z"])
    if meta_k is not None:
        am = gam * torch.exp(sm - m)
        num = num + torch.einsum("bxgtm,mxd->btxgd", am, meta_v.float())
        den = den + am.sum(-1).permute(0, 3, 1, 2)
    out = (num / (den.unsqueeze(-1) + eps)).reshape(B, Tq, H, -1)

    # new sinks enter the sink store; the first Tq local slots leave the window (no host syncs here)
    sink_k, sink_v, sink_on = state["sink_k"], state["sink_v"], state["sink_on"]
    if sinks:
        Sk = sink_k.shape[1]
        slots = torch.arange(Sk, device=dev)
        enter = (new_rank[..., None] == slots).to(sink_k.dtype)  # (B, Tq, Sk) one-hot
        filled = enter.amax(1)[..., None, None]  # (B, Sk, 1, 1)
        sink_k = sink_k * (1 - filled) + torch.einsum("bts,btxd->bsxd", enter, k.to(sink_k.dtype))
        sink_v = sink_v * (1 - filled) + torch.einsum("bts,btxd->bsxd", enter, v.to(sink_v.dtype))
        gone = sink_tok[:, :Tq, None] & (rank[:, :Tq, None] == slots)  # (B, Tq, Sk)
        sink_on = sink_on | gone.any(1)
    leave = (ok & ~sink_tok)[:, :Tq].float()[..., None]
    leave = leave * (Gc[:, -1:] - Gc[:, :Tq]).exp()  # decayed to the last new token
    carry = (Gc[:, -1] - Gc[:, W - 1]).exp()  # (B, Hk)
    new = {
        "S": state["S"] * carry[..., None, None] + torch.einsum("btxf,btxd->bxfd", fkl[:, :Tq] * leave[..., None], vl[:, :Tq].float()),
        "z": state["z"] * carry[..., None] + (fkl[:, :Tq] * leave[..., None]).sum(1),
        "win_g": gl[:, Tq:],
        "win_k": kl[:, Tq:], "win_v": vl[:, Tq:], "win_fk": fkl[:, Tq:], "win_rank": rank[:, Tq:],
        "sink_k": sink_k, "sink_v": sink_v, "sink_on": sink_on, "n_real": state["n_real"] + Tq,
    }
    return out.to(q.dtype), new


def _step_one(q, k, v, fq, fk, gamma, state, *, scale, sinks, eps, g, meta_k, meta_v):
    """``hybrid_step`` for one new token (the decoding case), with about a fifth of the operations:
    the new query scores window slots 1..W-1 and itself exactly; slot 0, which leaves the window
    now, is scored through its features (or exactly, if it is a sink) and then folded into S, z."""
    B, _, H, D = q.shape
    Hk = k.shape[2]
    G = H // Hk
    wk, wv, wfk, wr = state["win_k"], state["win_v"], state["win_fk"], state["win_rank"]
    nr = state["n_real"]
    kx = torch.cat([wk, k.to(wk.dtype)], 1)  # (B, W+1, Hk, D), slot 0 first
    vx = torch.cat([wv, v.to(wv.dtype)], 1)
    rx = torch.cat([wr, nr[:, None]], 1)
    ok = rx >= 0
    sink0 = ok[:, 0] & (wr[:, 0] < sinks)  # (B,)
    lin0 = ok[:, 0] & ~sink0
    exact = torch.cat([sink0[:, None], ok[:, 1:]], 1)
    qg = q.float().view(B, Hk, G, D)
    fqg = fq.float().view(B, Hk, G, -1)
    gam = gamma.float().view(1, Hk, G, 1)
    s = torch.einsum("bxgd,bjxd->bxgj", qg, kx.float()) * scale
    s = s.masked_fill(~exact[:, None, None, :], float("-inf"))
    ss = torch.einsum("bxgd,bsxd->bxgs", qg, state["sink_k"].float()) * scale
    ss = ss.masked_fill(~state["sink_on"][:, None, None, :], float("-inf"))
    m = torch.maximum(s.amax(-1, keepdim=True), ss.amax(-1, keepdim=True))
    if meta_k is not None:
        sm = torch.einsum("bxgd,mxd->bxgm", qg, meta_k.float()) * scale
        m = torch.maximum(m, sm.amax(-1, keepdim=True))
    a = gam * torch.exp(s - m)
    a_s = gam * torch.exp(ss - m)
    if g is None:
        d0 = lin0.float()[:, None]  # (B, Hk) broadcast: weight of slot 0 in the linear branch
        S, z = state["S"], state["z"]
    else:
        gn = g.float()[:, 0]  # (B, Hk)
        d0 = lin0.float()[:, None] * (state["win_g"][:, 1:].sum(1) + gn).exp()
        S, z = state["S"] * gn.exp()[..., None, None], state["z"] * gn.exp()[..., None]
    fk0 = wfk[:, 0].float() * d0[..., None]  # (B, Hk, F), decayed to the new token
    v0 = wv[:, 0].float()
    l0 = torch.einsum("bxgf,bxf->bxg", fqg, fk0)
    num = (torch.einsum("bxgj,bjxd->bxgd", a, vx.float()) + torch.einsum("bxgs,bsxd->bxgd", a_s, state["sink_v"].float())
           + l0[..., None] * v0[:, :, None] + torch.einsum("bxgf,bxfd->bxgd", fqg, S))
    den = a.sum(-1) + a_s.sum(-1) + l0 + torch.einsum("bxgf,bxf->bxg", fqg, z)
    if meta_k is not None:
        am = gam * torch.exp(sm - m)
        num = num + torch.einsum("bxgm,mxd->bxgd", am, meta_v.float())
        den = den + am.sum(-1)
    out = (num / (den[..., None] + eps)).reshape(B, 1, H, -1)

    sink_k, sink_v, sink_on = state["sink_k"], state["sink_v"], state["sink_on"]
    if sinks:
        slots = torch.arange(sink_k.shape[1], device=q.device)
        enter = (nr[:, None] == slots).to(sink_k.dtype)[..., None, None]  # (B, Sk, 1, 1)
        sink_k = sink_k * (1 - enter) + enter * k.to(sink_k.dtype)
        sink_v = sink_v * (1 - enter) + enter * v.to(sink_v.dtype)
        sink_on = sink_on | (sink0[:, None] & (wr[:, :1] == slots))
    new = {
        "S": S + fk0[..., None] * v0[:, :, None, :], "z": z + fk0,
        "win_k": kx[:, 1:], "win_v": vx[:, 1:], "win_fk": torch.cat([wfk[:, 1:], fk.float()], 1), "win_rank": rx[:, 1:],
        "win_g": torch.cat([state["win_g"][:, 1:], torch.zeros_like(state["win_g"][:, :1]) if g is None else g.float()], 1),
        "sink_k": sink_k, "sink_v": sink_v, "sink_on": sink_on, "n_real": nr + 1,
    }
    return out.to(q.dtype), new
