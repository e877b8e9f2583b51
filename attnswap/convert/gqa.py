"""GQA merging: fewer key/value heads by weight surgery (no training here; see docs/GQA.md).

A layer with H query heads and K key/value heads becomes one with G < K key/value heads:

1. *Calibrate*: run the model on a few batches and accumulate, per layer, the cross second moments
   of every pair of KV heads' keys and values (``C[a, b] = sum_t x_a(t) x_b(t)^T``, before RoPE).
2. *Group*: split the K heads into G groups of equal size, either in order (``adjacent``) or so
   that heads which are close after alignment share a group (``similarity``: greedy balanced
   assignment, then pairwise swaps while the within-group cost falls).
3. *Align* (``aligned``): rotate every head of a group toward a common basis (generalised orthogonal
   Procrustes on the calibration moments). Key rotations are 2x2 rotations inside each RoPE
   frequency pair (dims i and i + D/2, the rotate_half convention), so they commute with RoPE; the
   same rotation is applied to the query heads reading that KV head, leaving q.k unchanged. Value
   rotations are any orthogonal matrices, undone in the o_proj columns of the heads reading them.
4. *Permute* KV heads (and their query heads: q_proj rows, o_proj columns) so that each group is
   contiguous, as stock GQA expects (query head h reads KV head h // (H / G)).
5. *Pool*: the K/V projections (weights and biases) of each group are averaged. Optionally
   (``refit``, on by default with aligned merging) each head's value read-out is refitted to the
   pooled values by least squares, M_a = E[v_a vbar^T] E[vbar vbar^T]^-1, folded into o_proj.
   ``subspace`` merging instead gives each group, per RoPE pair, the principal component of its keys
   (``principal_keys``) and the D-dimensional value that best preserves what its query heads write
   through o_proj (``subspace_values``).

Steps 3 and 4 do not change the model's function (tests check the logits); step 5 is the only lossy
one. When G does not divide K, every layer is first expanded to one KV head per query head (a copy,
which does not change the function either) and the H copies are grouped instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AttnSwapError
from .architectures import family_of

GROUPINGS = ("similarity", "adjacent")
MERGES = ("aligned", "mean", "subspace")


@dataclass(frozen=True)
class Geometry:
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> "Geometry":
        h = config.num_attention_heads
        k = getattr(config, "num_key_value_heads", None) or h
        d = getattr(config, "head_dim", None) or config.hidden_size // h
        return cls(h, k, d)


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token costs across all layers (keys and values)."""
    g = Geometry.of(config)
    return 2 * config.num_hidden_layers * g.kv_heads * g.head_dim * torch.empty((), dtype=dtype).element_size()


def _has_qk_norm(config) -> bool:
    return config.model_type.removeprefix("attnswap_") == "qwen3"


def check_request(config, kv_heads: int, grouping: str = "similarity", merge: str = "subspace") -> Geometry:
    """Refuse (one line) what this module cannot do; return the model's attention geometry."""
    if config.model_type.startswith("attnswap_"):
        raise AttnSwapError("this is a converted attnswap model; convert gqa needs a stock transformers model")
    family_of(config.model_type)
    if grouping not in GROUPINGS:
        raise AttnSwapError(f"unknown --grouping {grouping!r}; choose from {', '.join(GROUPINGS)}")
    if merge not in MERGES:
        raise AttnSwapError(f"unknown --merge {merge!r}; choose from {', '.join(MERGES)}")
    g = Geometry.of(config)
    if kv_heads < 1:
        raise AttnSwapError(f"--kv-heads must be at least 1 (got {kv_heads})")
    if g.heads % kv_heads:
        raise AttnSwapError(f"--kv-heads {kv_heads} must divide the number of query heads ({g.heads})")
    if kv_heads >= g.kv_heads:
        raise AttnSwapError(f"--kv-heads {kv_heads} must be smaller than the model's current {g.kv_heads} key/value heads")
    if merge in ("aligned", "subspace"):
        if _has_qk_norm(config):
            raise AttnSwapError(f"--merge {merge} does not support per-head q/k norms (qwen3): their weights do not commute "
                                "with the key rotations; use --merge mean")
        rope = getattr(config, "rope_parameters", None) or {}
        partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) if isinstance(rope, dict) else 1.0
        if partial not in (None, 1, 1.0) or g.head_dim % 2:
            raise AttnSwapError(f"--merge {merge} needs RoPE over the whole (even) head dim; use --merge mean")
    return g


def _layers(model):
    return getattr(model, "model", model).layers


# --- 1. calibration --------------------------------------------------------------------------------

@torch.no_grad()
def calibrate(model, batches) -> list[dict]:
    """Per layer {"k": (K, K, D, D), "v": (K, K, D, D)} float32 cross moments of the KV heads'
    projections (keys before RoPE), summed over every token of ``batches`` (an iterable of id tensors)."""
    g = Geometry.of(model.config)
    layers = _layers(model)
    stats = [{"k": None, "v": None} for _ in layers]
    hooks = []

    def hook(i, kind):
        def fn(_mod, _inp, out):
            x = out.detach().float().reshape(-1, g.kv_heads, g.head_dim)
            c = torch.einsum("nad,nbe->abde", x, x)
            stats[i][kind] = c if stats[i][kind] is None else stats[i][kind] + c
        return fn

    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.k_proj.register_forward_hook(hook(i, "k")))
        hooks.append(layer.self_attn.v_proj.register_forward_hook(hook(i, "v")))
    body = getattr(model, "model", model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            body(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if any(s["k"] is None for s in stats):
        raise AttnSwapError("calibration saw no tokens")
    return stats


# --- rotations -------------------------------------------------------------------------------------

def rope_rotation(angles: torch.Tensor) -> torch.Tensor:
    """(..., D/2) angles -> (..., D, D) block rotation acting on the RoPE pairs (i, i + D/2)."""
    half = angles.shape[-1]
    c, s = torch.cos(angles), torch.sin(angles)
    r = torch.zeros(*angles.shape[:-1], 2 * half, 2 * half, dtype=angles.dtype, device=angles.device)
    i = torch.arange(half, device=angles.device)
    r[..., i, i] = c
    r[..., i, i + half] = -s
    r[..., i + half, i] = s
    r[..., i + half, i + half] = c
    return r


def _pair_blocks(m: torch.Tensor):
    """The 2x2 entries (ii, ij, ji, jj) of every RoPE pair of (..., D, D) matrices, each (..., D/2)."""
    h = m.shape[-1] // 2
    return (m[..., :h, :h].diagonal(dim1=-2, dim2=-1), m[..., :h, h:].diagonal(dim1=-2, dim2=-1),
            m[..., h:, :h].diagonal(dim1=-2, dim2=-1), m[..., h:, h:].diagonal(dim1=-2, dim2=-1))


def best_rotation(m: torch.Tensor, kind: str) -> torch.Tensor:
    """argmax_R <R, m> over orthogonal R ('full') or over RoPE-pair rotations ('rope')."""
    if kind == "full":
        u, _, vh = torch.linalg.svd(m.double())
        return (u @ vh).to(m.dtype)
    ii, ij, ji, jj = _pair_blocks(m)
    return rope_rotation(torch.atan2(ji - ij, ii + jj))


def _aligned_overlap(c: torch.Tensor, kind: str) -> torch.Tensor:
    """max_R <R, c> for each (..., D, D) moment (the overlap after the best alignment)."""
    if kind == "full":
        return torch.linalg.svdvals(c.double()).sum(-1).to(c.dtype)
    ii, ij, ji, jj = _pair_blocks(c)
    return torch.sqrt((ii + jj) ** 2 + (ji - ij) ** 2).sum(-1)


# --- 2. grouping -----------------------------------------------------------------------------------

def pair_costs(stats: dict, aligned: bool) -> torch.Tensor:
    """(U, U) dissimilarity of KV heads: relative squared distance of their keys plus that of their
    values, after the best alignment of each pair (``aligned``) or as they are."""
    cost = 0
    for kind, rot in (("k", "rope"), ("v", "full")):
        c = stats[kind].double()
        tr = c.diagonal(dim1=-2, dim2=-1).sum(-1).diagonal()  # (U,) sum_t |x_a|^2
        overlap = _aligned_overlap(c, rot) if aligned else c.diagonal(dim1=-2, dim2=-1).sum(-1)
        denom = (tr[:, None] + tr[None, :]).clamp_min(1e-12)
        cost = cost + (tr[:, None] + tr[None, :] - 2 * overlap) / denom
    return cost.float()


def _within(cost: torch.Tensor, group: list[int]) -> float:
    return float(sum(cost[a, b] for i, a in enumerate(group) for b in group[i + 1:]))


def balanced_groups(cost: torch.Tensor, n_groups: int, passes: int = 20) -> list[list[int]]:
    """Split range(U) into n_groups equal groups of mutually close heads: greedy (seed the group with
    the remaining head farthest from the others, add its nearest remaining heads), then swap heads
    between groups while the total within-group cost falls."""
    u = cost.shape[0]
    size = u // n_groups
    left = list(range(u))
    groups: list[list[int]] = []
    while left:
        seed = max(left, key=lambda a: (float(sum(cost[a, b] for b in left)), -a))
        g = [seed]
        left.remove(seed)
        while len(g) < size:
            nxt = min(left, key=lambda a: (float(sum(cost[a, b] for b in g)), a))
            g.append(nxt)
            left.remove(nxt)
        groups.append(g)
    for _ in range(passes):
        improved = False
        for gi in range(len(groups)):
            for gj in range(gi + 1, len(groups)):
                for a in list(groups[gi]):
                    for b in list(groups[gj]):
                        A = [x for x in groups[gi] if x != a] + [b]
                        B = [x for x in groups[gj] if x != b] + [a]
                        before = _within(cost, groups[gi]) + _within(cost, groups[gj])
                        if _within(cost, A) + _within(cost, B) < before - 1e-9:
                            groups[gi], groups[gj] = A, B
                            improved = True
                            break
                    else:
                        continue
                    break
        if not improved:
            break
    return sorted(sorted(g) for g in groups)


def adjacent_groups(u: int, n_groups: int) -> list[list[int]]:
    size = u // n_groups
    return [list(range(i * size, (i + 1) * size)) for i in range(n_groups)]


# --- 3. alignment ----------------------------------------------------------------------------------

def align_group(c: torch.Tensor, members: list[int], kind: str, iters: int = 20) -> dict[int, torch.Tensor]:
    """Generalised Procrustes: rotations R_a (a in members) maximising sum_{a<b} <R_a x_a, R_b x_b>,
    by exact block-coordinate ascent (each R_a in turn is aligned to the sum of the others)."""
    d = c.shape[-1]
    eye = torch.eye(d, dtype=torch.float64, device=c.device)
    rots = {a: eye.clone() for a in members}
    if len(members) < 2:
        return rots
    c = c.double()
    for _ in range(iters):
        change = 0.0
        for a in members:
            m = sum(rots[b] @ c[b, a] for b in members if b != a)  # (sum_b R_b x_b) x_a^T
            new = best_rotation(m, kind)
            change = max(change, float((new - rots[a]).abs().max()))
            rots[a] = new
        if change < 1e-6:
            break
    return rots


# --- in-place, function-preserving surgery ---------------------------------------------------------

def _set_linear(attn, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    old = getattr(attn, name)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    setattr(attn, name, new)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """Surgery runs in float32, or float64 for a float64 model."""
    return torch.promote_types(t.dtype, torch.float32)


def _heads(lin: nn.Linear, d: int):
    """weight (n*D, in) -> (n, D, in) float32, bias -> (n, D) or None."""
    dt = _work_dtype(lin.weight)
    w = lin.weight.detach().to(dt).reshape(-1, d, lin.weight.shape[1])
    b = None if lin.bias is None else lin.bias.detach().to(dt).reshape(-1, d)
    return w, b


def _flat(w: torch.Tensor, b: torch.Tensor | None):
    return w.reshape(-1, w.shape[-1]), None if b is None else b.reshape(-1)


def expand_to_mha(attn, g: Geometry) -> None:
    """Give every query head its own copy of its KV head (same function, H KV heads)."""
    n_rep = g.heads // g.kv_heads
    for name in ("k_proj", "v_proj"):
        w, b = _heads(getattr(attn, name), g.head_dim)
        w, b = w.repeat_interleave(n_rep, 0), None if b is None else b.repeat_interleave(n_rep, 0)
        _set_linear(attn, name, *_flat(w, b))
    attn.num_key_value_groups = 1


def rotate_heads(attn, head_dim: int, rk: torch.Tensor | None, rv: torch.Tensor | None) -> None:
    """Rotate KV head u's keys by rk[u] (RoPE-pair rotations) and its values by rv[u] (orthogonal),
    compensated in the query heads that read it (q_proj rows, o_proj columns): same function."""
    wk, bk = _heads(attn.k_proj, head_dim)
    wq, bq = _heads(attn.q_proj, head_dim)
    u, h = wk.shape[0], wq.shape[0]
    src = torch.arange(h, device=wq.device) // (h // u)  # the KV head each query head reads
    if rk is not None:
        rk = rk.to(wk.device, wk.dtype)
        rot = lambda r, w: torch.einsum("nij,nj...->ni...", r, w)  # noqa: E731
        _set_linear(attn, "k_proj", *_flat(rot(rk, wk), None if bk is None else rot(rk, bk)))
        _set_linear(attn, "q_proj", *_flat(rot(rk[src], wq), None if bq is None else rot(rk[src], bq)))
    if rv is not None:
        rv = rv.to(wk.device, wk.dtype)
        wv, bv = _heads(attn.v_proj, head_dim)
        rot = lambda r, w: torch.einsum("nij,nj...->ni...", r, w)  # noqa: E731
        _set_linear(attn, "v_proj", *_flat(rot(rv, wv), None if bv is None else rot(rv, bv)))
        wo = attn.o_proj.weight.detach().to(wk.dtype).reshape(attn.o_proj.weight.shape[0], h, head_dim)
        wo = torch.einsum("ohj,hij->ohi", wo, rv[src])  # W_o[:, h] R^T
        bo = None if attn.o_proj.bias is None else attn.o_proj.bias.detach()
        _set_linear(attn, "o_proj", wo.reshape(wo.shape[0], -1), bo)


def refit_value_readout(attn, head_dim: int, cv: torch.Tensor, groups: list[list[int]], rv: torch.Tensor | None) -> None:
    """Least-squares read-out of the pooled values: for every KV head a (values already rotated by
    rv[a]) find M_a minimising E|v_a - M_a v_bar|^2, v_bar the mean of its group's values, and fold
    it into the o_proj columns of the query heads reading a. Exact before pooling only if M_a = I,
    so apply it right before ``pool_heads`` (after any permutation has been accounted for)."""
    h = attn.q_proj.weight.shape[0] // head_dim
    u = attn.k_proj.weight.shape[0] // head_dim
    cv = cv.double()
    maps = torch.eye(head_dim, dtype=torch.float64, device=cv.device).repeat(u, 1, 1)
    for grp in groups:
        m = len(grp)
        r = {a: (rv[a].double() if rv is not None else torch.eye(head_dim, dtype=torch.float64, device=cv.device)) for a in grp}
        cr = {(a, b): r[a] @ cv[a, b] @ r[b].T for a in grp for b in grp}
        s = sum(cr.values()) / m**2  # E[v_bar v_bar^T]
        s = s + 1e-6 * s.diagonal().mean() * torch.eye(head_dim, dtype=s.dtype, device=s.device)
        for a in grp:
            x = sum(cr[a, b] for b in grp) / m  # E[v_a v_bar^T]
            maps[a] = torch.linalg.solve(s, x.T).T  # x s^-1
    src = torch.arange(h, device=cv.device) // (h // u)
    wo = attn.o_proj.weight.detach()
    wo = wo.to(_work_dtype(wo)).reshape(wo.shape[0], h, head_dim)
    wo = torch.einsum("ohi,hij->ohj", wo, maps[src].to(wo.device, wo.dtype))
    _set_linear(attn, "o_proj", wo.reshape(wo.shape[0], -1), attn.o_proj.bias)


def principal_keys(attn, head_dim: int, ck: torch.Tensor, groups: list[list[int]]) -> None:
    """Give each group, per RoPE pair, the merged key that is the top principal component of its
    members' keys in that pair, and give each query head the factor that maps it back to the key it
    read; ``pool_heads`` then keeps it (every member gets the same key projection).

    A RoPE pair (dims i and i + D/2) is a complex number k_i = x_i + i y_i that RoPE multiplies by a
    unit phase, so a complex factor on it commutes with RoPE, and q.k over the pair is Re(conj(q_i) k_i).
    For the group's pair keys z = (k_a,i)_a with C = E[z z^H] (from the key moments), the merged key is
    k'_i = e^H z for e the top eigenvector of C, the rank-1 complex fit k_a,i ~ e_a k'_i. Each query head
    reading a is multiplied, pair by pair, by conj(lambda_a,i) with lambda_a,i of phase e_a and of
    modulus sqrt(E|k_a,i|^2 / E|k'_i|^2): the least-squares modulus |e_a| would shrink the logits of
    heads the merged key represents poorly, and measured worse on SmolLM2 (docs/BENCHMARKS.md). Keys of
    a group that are complex multiples of one another pair by pair merge exactly. Replaces the
    alignment and averaging of the keys; biases are merged the same way."""
    h = attn.q_proj.weight.shape[0] // head_dim
    wk, bk = _heads(attn.k_proj, head_dim)
    wq, bq = _heads(attn.q_proj, head_dim)
    u, half, dt, dev = wk.shape[0], head_dim // 2, torch.float64, wk.device
    ck = ck.to(dev, dt)
    src = torch.arange(h, device=dev) // (h // u)  # the KV head each query head reads
    i = torch.arange(half, device=dev)

    def cplx(w, dim):  # D entries along dim -> D/2 complex pairs (i, i + D/2)
        re, im = w.split(half, dim)
        return torch.complex(re, im)

    def real(z, dim):  # the inverse of cplx
        return torch.cat([z.real, z.imag], dim)

    new_wk = wk.to(dt).clone()
    new_bk = None if bk is None else bk.to(dt).clone()
    lam = torch.ones(u, half, dtype=torch.complex128, device=dev)
    for grp in groups:
        m = len(grp)
        C = torch.zeros(half, m, m, dtype=torch.complex128, device=dev)  # C[i, a, b] = E[k_a,i conj(k_b,i)]
        for x, a in enumerate(grp):
            for y, b in enumerate(grp):
                c = ck[a, b]
                C[:, x, y] = torch.complex(c[i, i] + c[i + half, i + half], c[i + half, i] - c[i, i + half])
        ev, vecs = torch.linalg.eigh(C)  # ascending, per pair
        e, energy = vecs[:, :, -1], ev[:, -1].clamp_min(1e-30)  # (D/2, m) unit vectors; E|k'_i|^2
        kz = torch.einsum("im,mij->ij", e.conj(), cplx(wk[grp].to(dt), 1))  # merged key rows, (D/2, in)
        bz = None if bk is None else (e.conj().T * cplx(bk[grp].to(dt), 1)).sum(0)
        for x, a in enumerate(grp):
            new_wk[a] = real(kz, 0)
            if new_bk is not None:
                new_bk[a] = real(bz, 0)
            phase = e[:, x] / e[:, x].abs().clamp_min(1e-30)
            lam[a] = phase * (C[:, x, x].real / energy).sqrt()
    f = lam[src].conj()  # (h, D/2): q' = conj(lambda) q, so that conj(q') k' = conj(q) lambda k' ~ conj(q) k_a
    wq_new = real(cplx(wq.to(dt), 1) * f[..., None], 1)
    bq_new = None if bq is None else real(cplx(bq.to(dt), 1) * f, 1)
    _set_linear(attn, "k_proj", *_flat(new_wk.to(wk.dtype), None if new_bk is None else new_bk.to(bk.dtype)))
    _set_linear(attn, "q_proj", *_flat(wq_new.to(wq.dtype), None if bq_new is None else bq_new.to(bq.dtype)))


def subspace_values(attn, head_dim: int, cv: torch.Tensor, groups: list[list[int]]) -> None:
    """Replace each group's values by the D-dimensional linear function of them that best preserves
    what the group's query heads write, in place of their (aligned) average; ``pool_heads`` then
    keeps it (every member of the group is given the same value projection).

    For a group with values v_a stacked into z (m*D), a merged value v' = P^T z and per-head
    read-outs M_a (folded into o_proj), the loss is sum_h E|W_o,h (v_a(h) - M_a(h) v')|^2 over the
    query heads h, W_o,h head h's o_proj columns and a(h) the KV head it reads: exact for heads that
    attend alike, and the part of the merge error the values control. With S = E[z z^T] (from the
    calibration moments) and S_a = E[v_a z^T] the best read-out is M_a = S_a P (P^T S P)^-1, and the
    best P spans the top D generalised eigenvectors of (B, S), B = sum_a S_a^T G_a S_a with
    G_a = sum_{h reads a} W_o,h^T W_o,h. The aligned average is one such P, so on this loss the
    subspace is never worse. Values only (the keys: ``principal_keys``)."""
    wv, bv = _heads(attn.v_proj, head_dim)
    dt = torch.float64
    h = attn.q_proj.weight.shape[0] // head_dim
    u = wv.shape[0]
    src = torch.arange(h, device=cv.device) // (h // u)  # the KV head each query head reads
    wo = attn.o_proj.weight.detach().to(dt).reshape(attn.o_proj.weight.shape[0], h, head_dim)
    cv = cv.to(wo.device, dt)
    new_wv, new_bv = wv.clone(), None if bv is None else bv.clone()
    maps = torch.zeros(h, head_dim, head_dim, dtype=dt, device=wo.device)
    for grp in groups:
        m = len(grp)
        S = torch.cat([torch.cat([cv[a, b] for b in grp], 1) for a in grp], 0)  # (mD, mD)
        S = 0.5 * (S + S.T)
        S = S + 1e-6 * S.diagonal().mean() * torch.eye(m * head_dim, dtype=dt, device=S.device)
        B = torch.zeros_like(S)
        for i, a in enumerate(grp):
            Sa = S[i * head_dim:(i + 1) * head_dim]  # E[v_a z^T] (D, mD)
            wa = wo[:, src == a]  # (hidden, n_a, D): the o_proj columns of the heads reading a
            Ga = torch.einsum("ond,one->de", wa, wa)
            B = B + Sa.T @ Ga @ Sa
        # generalised symmetric eigenproblem B p = lambda S p through S^-1/2
        ev, U = torch.linalg.eigh(S)
        Sih = U @ torch.diag(ev.clamp_min(ev.max() * 1e-12).rsqrt()) @ U.T
        _, V = torch.linalg.eigh(Sih @ B @ Sih)  # ascending
        P = Sih @ V[:, -head_dim:]  # (mD, D), the top D directions
        PSP = P.T @ S @ P
        wz = torch.cat([wv[a].to(dt) for a in grp], 0)  # (mD, in)
        w_new = (P.T @ wz).to(wv.dtype)
        b_new = None if bv is None else (P.T @ torch.cat([bv[a].to(dt) for a in grp], 0)).to(bv.dtype)
        for i, a in enumerate(grp):
            new_wv[a] = w_new
            if new_bv is not None:
                new_bv[a] = b_new
            Ma = torch.linalg.solve(PSP, (S[i * head_dim:(i + 1) * head_dim] @ P).T).T  # S_a P (P^T S P)^-1
            maps[src == a] = Ma
    _set_linear(attn, "v_proj", *_flat(new_wv, new_bv))
    wo = torch.einsum("ohi,hij->ohj", wo, maps).to(_work_dtype(attn.o_proj.weight))
    _set_linear(attn, "o_proj", wo.reshape(wo.shape[0], -1), attn.o_proj.bias)


def permute_heads(attn, head_dim: int, order: list[int]) -> None:
    """Reorder the KV heads as ``order`` and the query heads with them (same function)."""
    wk, bk = _heads(attn.k_proj, head_dim)
    u = wk.shape[0]
    h = attn.q_proj.weight.shape[0] // head_dim
    n_rep = h // u
    order_t = torch.tensor(order, device=wk.device)
    q_order = (order_t[:, None] * n_rep + torch.arange(n_rep, device=wk.device)).reshape(-1)
    for name, idx in (("k_proj", order_t), ("v_proj", order_t), ("q_proj", q_order)):
        w, b = _heads(getattr(attn, name), head_dim)
        _set_linear(attn, name, *_flat(w[idx], None if b is None else b[idx]))
    wo = attn.o_proj.weight.detach().reshape(attn.o_proj.weight.shape[0], h, head_dim)[:, q_order]
    bo = None if attn.o_proj.bias is None else attn.o_proj.bias.detach()
    _set_linear(attn, "o_proj", wo.reshape(wo.shape[0], -1), bo)


def pool_heads(attn, head_dim: int, n_groups: int) -> None:
    """Average the K/V projections of each contiguous block of KV heads: n_groups KV heads remain."""
    h = attn.q_proj.weight.shape[0] // head_dim
    for name in ("k_proj", "v_proj"):
        w, b = _heads(getattr(attn, name), head_dim)
        size = w.shape[0] // n_groups
        w = w.reshape(n_groups, size, head_dim, -1).mean(1)
        b = None if b is None else b.reshape(n_groups, size, head_dim).mean(1)
        _set_linear(attn, name, *_flat(w, b))
    attn.num_key_value_groups = h // n_groups


# --- the whole recipe ------------------------------------------------------------------------------

def merge_to_gqa(model, kv_heads: int, *, grouping: str = "similarity", merge: str = "subspace",
                 stats: list[dict] | None = None, pool: bool = True, refit: bool = False) -> dict:
    """Reduce every layer of ``model`` to ``kv_heads`` KV heads, in place. ``stats`` comes from
    ``calibrate`` (needed by similarity grouping, aligned merging and ``refit``). With ``pool=False``
    it stops before the (lossy) averaging: the model then computes the same function, grouped and
    aligned. ``refit``: also fit each head's value read-out to the pooled values (least squares).
    Returns {"groups": per layer the groups of (original, or expanded) KV heads, "expanded": bool}."""
    g = check_request(model.config, kv_heads, grouping, merge)
    if stats is None and (grouping == "similarity" or merge != "mean" or refit):
        raise ValueError("similarity grouping, aligned and subspace merging and refit need calibration stats")
    expand = g.kv_heads % kv_heads != 0
    n_rep = g.heads // g.kv_heads
    info = {"groups": [], "expanded": expand, "within_cost": []}
    for i, layer in enumerate(_layers(model)):
        attn = layer.self_attn
        st = None
        if stats is not None:
            st = {k: v.to(attn.k_proj.weight.device) for k, v in stats[i].items()}
            if expand:
                src = torch.arange(g.heads, device=st["k"].device) // n_rep
                st = {k: v[src][:, src] for k, v in st.items()}
        if expand:
            expand_to_mha(attn, g)
        u = g.heads if expand else g.kv_heads
        cost = pair_costs(st, merge != "mean") if st is not None else None
        groups = balanced_groups(cost, kv_heads) if grouping == "similarity" else adjacent_groups(u, kv_heads)
        info["groups"].append(groups)
        if cost is not None:
            info["within_cost"].append(sum(_within(cost, grp) for grp in groups))
        if merge == "aligned":
            rk = torch.empty(u, g.head_dim, g.head_dim, dtype=torch.float64, device=st["k"].device)
            rv = torch.empty_like(rk)
            for grp in groups:
                for kind, out, rot in (("k", rk, "rope"), ("v", rv, "full")):
                    for a, r in align_group(st[kind], grp, rot).items():
                        out[a] = r
            rotate_heads(attn, g.head_dim, rk, rv)
        if merge == "subspace" and pool:
            principal_keys(attn, g.head_dim, st["k"], groups)
            subspace_values(attn, g.head_dim, st["v"], groups)
        elif refit and pool:
            refit_value_readout(attn, g.head_dim, st["v"], groups, rv if merge == "aligned" else None)
        permute_heads(attn, g.head_dim, [a for grp in groups for a in grp])
        if pool:
            pool_heads(attn, g.head_dim, kv_heads)
    if pool:
        model.config.num_key_value_heads = kv_heads
    elif expand:
        model.config.num_key_value_heads = g.heads
    return info
