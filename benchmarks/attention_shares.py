"""Where does each head of a converted model look when it must say the pass key? Issue 16: lizard with 9
exact heads fails passkey prompts of 4k / 8k even when the key sits a few tokens before the question,
inside the softmax window, and finds it at 2k. One reading: the linear branch shares the window's
normaliser, and its weights add up over every key older than the window, so on longer prompts the
window's share of each head shrinks.

This measures it. For each passkey prompt it runs the model once, keeps every converted layer's input,
then runs each layer's attention again on that input with its values replaced by indicator columns,
so that each head's output at the prompt's last position (the one that predicts the key) is the share
of its attention weight that falls on:

- ``window``: the last ``window`` tokens (the softmax part of a hybrid head);
- ``needle``: the needle sentence (" The pass key is NNNNN. Remember it.");
- ``first4``: the first four tokens (where attention sinks form).

Lizard's meta tokens get zero values, so their share is what the three leave of 1 (``1 - all``).
The same is done with the layer in ``teacher`` mode (full softmax with the converted model's weights) for
comparison. Heads are split into the linear ones and those a mixed layer keeps exact.

It prints, per length and depth, averages over samples: whether the key is predicted by teacher forcing
(every key token top-1, as the passkey evaluation's ``forced_accuracy``; also with every layer in teacher
mode, and with ``--baseline`` for the original model), the same for the key's digits once its leading
space is given (``digits``: a model that answers " a" or " the" where the teacher starts the number
misses the first score, not this one), the linear heads' mean window share, the largest needle share
of any linear head and of any exact head, and the needle shares summed over each kind.

``--caps 0,1024`` repeats everything with the linear branch's weight capped, an experiment that needs no
training: the query features of position i are scaled by min(1, CAP / n_i), n_i the keys older than the
window, so that the linear branch's share of the normaliser stops growing with the number of old keys
beyond CAP (0: no cap). It acts on the forward without a cache (what this script runs) by wrapping the
methods' operators, and changes nothing saved. A benchmark: it prints and writes JSON, it asserts nothing.

    python benchmarks/attention_shares.py --model runs/lizard-x9 --lengths 2048,4096,8192 --depths 0.5,1 --caps 0,1024
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random

import torch

from attnswap import loading
from attnswap.convert import lizard, lolcats
from attnswap.convert.base import attention_mode, swapped_modules
from attnswap.evals.common import HFModel, encode, split_head
from attnswap.evals.passkey import NEEDLE, build_prompt, key_forced, leading_blanks
from _common import commit

CHANNELS = ("window", "needle", "first4", "all")


def probe_values(like: torch.Tensor, T: int, window: int, needle: tuple[int, int]) -> torch.Tensor:
    """(B, T, Hk, D) values whose first channels are the indicators of ``CHANNELS`` for the last query."""
    v = torch.zeros_like(like)
    v[:, max(0, T - window):, :, 0] = 1
    v[:, needle[0]:needle[1], :, 1] = 1
    v[:, :4, :, 2] = 1
    v[:, :, :, 3] = 1
    return v


@torch.no_grad()
def shares(model, ids: list[int], needle: tuple[int, int]) -> list[dict]:
    """Per converted layer: ``linear`` / ``exact`` / ``softmax`` -> (heads, channels) shares at the last position."""
    mods = swapped_modules(model)
    inputs: dict[int, tuple] = {}

    def keep(i):
        def hook(_mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            inputs[i] = (h, args[1] if len(args) > 1 else kwargs.get("position_embeddings"))
        return hook

    handles = [m.register_forward_pre_hook(keep(i), with_kwargs=True) for i, m in enumerate(mods)]
    dev = next(model.parameters()).device
    x_ids = torch.tensor([ids], device=dev)
    try:
        with attention_mode(model, "student"):
            parts = split_head(model)  # the trunk alone where it can: no (T, vocab) logits
            (parts[0] if parts else model)(input_ids=x_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    T = len(ids)
    out = []
    for i, m in enumerate(mods):
        h, pe = inputs[i]
        x = m.project(h, pe)
        window = int(getattr(m, "window", 0) or T)
        x = x._replace(v=probe_values(x.v, T, window, needle))
        meta_v = getattr(m, "meta_v", None)  # lizard's learned sink values: zero, so they add to no channel
        old = meta_v.detach().clone() if meta_v is not None else None
        if meta_v is not None:
            meta_v.zero_()
        try:
            mixed = m._student_padded(x, None)[0, -1, :, :4].float()  # (H, 4)
        finally:
            if meta_v is not None:
                meta_v.copy_(old)
        soft = m.softmax_attention(x.q, x.k, x.v)[0, -1, :, :4].float()
        exact_q = list(m._heads["ex_q"]) if m.exact_heads else []
        lin_q = [q for q in range(m.num_heads) if q not in exact_q]
        out.append({"layer": m.layer_idx, "method": m.method, "window": window,
                    "linear": mixed[lin_q].tolist(), "exact": mixed[exact_q].tolist(), "softmax": soft.tolist(),
                    "linear_heads": lin_q, "exact_heads": exact_q})
    return out


def capped(op, cap: int):
    """``op`` (a hybrid operator taking q, k, v, fq, ... and ``window=``) with fq of position i scaled by
    min(1, cap / n_i), n_i = i - window + 1 the keys older than the window (positions from 0: no cache)."""
    def run(*args, **kw):
        args = list(args)
        fq = args[3]
        if fq is not None:
            T = fq.shape[1]
            older = (torch.arange(T, device=fq.device) - kw["window"] + 1).clamp(min=1).float()
            args[3] = fq * (cap / older).clamp(max=1).to(fq.dtype).view(1, T, 1, 1)
        return op(*args, **kw)
    return run


@contextlib.contextmanager
def linear_cap(cap: int):
    """Every lolcats / lizard layer's no-cache forward with ``capped`` operators (cap 0: unchanged)."""
    if not cap:
        yield
        return
    old = lolcats.hybrid_attn, lizard.gated_hybrid_attn
    lolcats.hybrid_attn, lizard.gated_hybrid_attn = capped(old[0], cap), capped(old[1], cap)
    try:
        yield
    finally:
        lolcats.hybrid_attn, lizard.gated_hybrid_attn = old


def forced_pair(model, ids: list[int], key_ids: list[int], mode: str | None = "student", skip: int = 0):
    """(the whole key, the key after its first ``skip`` tokens) top-1 by teacher forcing, in one forward
    (``passkey.key_forced``); ``mode`` None for a model without converted layers."""
    with attention_mode(model, mode) if mode else contextlib.nullcontext():
        return tuple(key_forced(HFModel(model), ids, key_ids, skip))


def forced(model, ids: list[int], key_ids: list[int], mode: str | None = "student", skip: int = 0) -> bool:
    """Every key token after the first ``skip`` top-1 after the prompt (``skip`` 0: the passkey
    evaluation's forced score)."""
    return forced_pair(model, ids, key_ids, mode, skip)[1]


def summary(layers: list[dict]) -> dict:
    """Scalars of one prompt (see the module docstring)."""
    lin = [h for L in layers for h in L["linear"]]
    ex = [h for L in layers for h in L["exact"]]
    soft = [h for L in layers for h in L["softmax"]]
    return {"linear window mean": sum(h[0] for h in lin) / max(1, len(lin)),
         "linear meta mean": sum(1 - h[3] for h in lin) / max(1, len(lin)),
         "linear needle max": max((h[1] for h in lin), default=0.0),
         "linear needle sum": sum(h[1] for h in lin),
         "exact needle max": max((h[1] for h in ex), default=0.0),
         "exact needle sum": sum(h[1] for h in ex),
         "softmax needle max": max((h[1] for h in soft), default=0.0),
         "softmax needle sum": sum(h[1] for h in soft)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a converted model (directory) or anything attnswap loads")
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--depths", default="0,0.5,1")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", default=None, help="the original model, for its forced scores on the same prompts")
    ap.add_argument("--caps", default="0", help="comma-separated caps on the linear branch's weight (0: none)")
    ap.add_argument("--json", default=None, help="write every layer's shares here")
    a = ap.parse_args()
    dev = loading.pick_device(a.device)
    dtype = loading.pick_dtype(a.dtype, dev)
    model, tok = loading.load_model(loading.resolve(a.model), dtype=dtype, device=dev)
    model.eval()
    if not swapped_modules(model):
        raise SystemExit(f"{a.model}: no converted attention layers to probe")
    base = loading.load_model(loading.resolve(a.baseline), dtype=dtype, device=dev)[0].eval() if a.baseline else None
    lengths = [int(s) for s in a.lengths.split(",")]
    depths = [float(s) for s in a.depths.split(",")]
    print(f"# {a.model}  device {dev}  dtype {next(model.parameters()).dtype}  attnswap commit {commit()}")
    print("# shares of each head's attention at the prompt's last position, and the key by teacher forcing; "
          "mean over samples")
    cols = ["forced", "forced (teacher mode)", "forced (baseline)", "digits", "digits (teacher mode)",
            "digits (baseline)", "linear window mean", "linear meta mean", "linear needle max",
            "linear needle sum", "exact needle max", "exact needle sum", "softmax needle max", "softmax needle sum"]
    print("| cap | length | depth | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    records = []
    for cap in [int(s) for s in a.caps.split(",")]:
        rng = random.Random(a.seed)  # the same prompts under every cap
        for n in lengths:
            for d in depths:
                rows = []
                for _ in range(a.samples):
                    key = str(rng.randint(10000, 99999))
                    ids, start = build_prompt(tok, n, d, key)
                    span = (start, start + len(encode(tok, NEEDLE.format(key=key))))
                    key_ids = encode(tok, " " + key)
                    blanks = leading_blanks(tok, key_ids)
                    with linear_cap(cap):
                        layers = shares(model, ids, span)
                        whole, digits = forced_pair(model, ids, key_ids, skip=blanks)
                    row = summary(layers) | {"forced": float(whole), "digits": float(digits)}
                    for mode, m, name in (("teacher", model, "teacher mode"), (None, base, "baseline")):
                        # neither depends on the cap
                        pair = forced_pair(m, ids, key_ids, mode, blanks) if cap == 0 and m is not None else (None, None)
                        row[f"forced ({name})"], row[f"digits ({name})"] = (float("nan") if p is None else float(p)
                                                                            for p in pair)
                    rows.append(row)
                    records.append({"cap": cap, "length": n, "depth": d, "key": key, "tokens": len(ids),
                                    "needle": span, "summary": row, "layers": layers})
                mean = {c: sum(r[c] for r in rows) / len(rows) for c in cols}
                print(f"| {cap} | {n} | {d:g} | " + " | ".join(f"{mean[c]:.3f}" for c in cols) + " |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "commit": commit(), "channels": CHANNELS, "prompts": records}, f)


if __name__ == "__main__":
    main()
