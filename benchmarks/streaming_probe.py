"""Does a passkey miss need training to appear? Issue 16: every converted model with 9 exact heads
misses the key at 8k when it sits just before the question, inside the softmax window, yet finds its
digits once the leading space is given: it answers " the" where the original starts the number.

This asks the original model, untrained. Its attention is replaced (transformers' AttentionInterface)
by one in which every KV head is either exact (causal softmax over the whole prompt) or streaming
(softmax over the first ``--sinks`` tokens and the last ``--window``), the cheap attention that a
converted head keeps exactly; what the linear branch adds is left out. Exact are the heads of
``--exact`` (``LAYER.HEAD`` items, or a converted model's directory, whose exact heads are read from its
config) and every head of ``--full-layers`` (alternatives separated by ';', each a streaming variant
of its own, as '0-14;0-7;8-14'). Each variant (``--variants``: ``teacher``, every head exact;
``streaming``, the rule above) is scored on the same passkey prompts: the key and its digits by
teacher forcing (as ``passkey.key_forced`` scores them) and the top token after the prompt with its
probability, all from one forward; with ``--answer N`` also the greedy answer of N tokens (decoded
through the cache, under the same rule) and whether its first number is the key (``passkey``'s loose
score when N is its ``LOOSE_TOKENS``).

If the streaming variant misses where the converted models do, the miss comes from the far attention
the streaming heads leave out, not from training; ``--far mean`` gives those heads back their hidden keys at
one shared weight (the far attention's mass kept, its content averaged: what a far branch that only
averages could do at best); ``--full-layers`` bisects which layers' far
attention the answer needs; ``--attribute`` ranks the streaming heads instead, by the gradient of the
key's first token's log-probability with respect to a weight per KV head that would move the head's
output toward its exact attention (taken at 0: every one of them streaming), which says whether the
far attention the answer needs sits in a few heads or is spread. A benchmark: it prints a table and
writes JSON, it asserts nothing. One unpadded sequence at a time.

    python benchmarks/streaming_probe.py --model llama --exact runs/lolcats-x9 --lengths 2048,4096,8192 --depths 1
    python benchmarks/streaming_probe.py --model llama --exact runs/lolcats-x9 --full-layers "0-14;0-7;8-14" --variants streaming
    python benchmarks/streaming_probe.py --model llama --exact runs/lolcats-x9 --attribute --lengths 8192 --depths 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from attnswap import loading
from attnswap.convert.swap import parse_layers
from attnswap.errors import AttnSwapError
from attnswap.evals.common import HFModel, encode
from attnswap.hf_compat import layer_checkpointing
from attnswap.evals.passkey import build_prompt, first_number, leading_blanks
from _common import commit

NAME = "attnswap_streaming_probe"
QUERY_BLOCK = 1024  # queries a score block holds: (heads, 1024, keys) at a time
SETTINGS: dict = {}  # what the registered function reads: exact {layer: set of KV heads}, sinks, window


def parse_exact(spec: str | None) -> dict[int, set[int]]:
    """``LAYER.HEAD`` items ('3.1,20.1,20.2'), or a converted model's directory: {layer: KV heads}."""
    if not spec:
        return {}
    if Path(spec).is_dir():
        swaps = json.loads((Path(spec) / "config.json").read_text())["attnswap"]["swaps"]
        return {i: set(s["options"]["exact_heads"]) for s in swaps if s["options"].get("exact_heads")
                for i in s["layers"]}
    out: dict[int, set[int]] = {}
    for item in spec.split(","):
        layer, dot, head = item.strip().partition(".")
        if not (dot and layer.isdigit() and head.isdigit()):
            raise SystemExit(f"--exact: {item!r} is not LAYER.HEAD (e.g. 3.1) and {spec!r} is not a directory")
        out.setdefault(int(layer), set()).add(int(head))
    return out


def streaming_mask(q_pos: torch.Tensor, n_keys: int, exact: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """(H, Q, K) bool, True where query head h at position ``q_pos`` may see key j: j <= q for exact
    heads, and also j < sinks or q - j < window for the others."""
    j = torch.arange(n_keys, device=q_pos.device)
    causal = j[None] <= q_pos[:, None]
    local = causal & ((q_pos[:, None] - j[None] < window) | (j[None] < sinks))
    return torch.where(exact.to(q_pos.device)[:, None, None], causal[None], local[None])


def probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The AttentionInterface function: (B, H, T, D) queries against (B, Hk, S, D) keys and values,
    T queries being the last T of S positions; returns (B, T, H, D) and no weights."""
    B, H, T, D = query.shape
    Hk, S = key.shape[1], key.shape[2]
    if B != 1:
        raise ValueError("streaming_probe attention takes one unpadded sequence at a time")
    G = H // Hk
    kv_exact = SETTINGS["exact"].get(module.layer_idx, set())
    exact = torch.tensor([h // G in kv_exact for h in range(H)])
    k, v = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
    mix = SETTINGS.get("mix")
    m = None if mix is None else mix[module.layer_idx].repeat_interleave(G)[None, :, None, None].to(query.dtype)
    blocks = []
    for s in range(0, T, QUERY_BLOCK):
        e = min(T, s + QUERY_BLOCK)
        pos = torch.arange(s, e, device=query.device) + (S - T)
        mask = streaming_mask(pos, S, exact, SETTINGS["sinks"], SETTINGS["window"])[None]
        q = query[:, :, s:e]
        if SETTINGS.get("far") == "mean":
            o = _far_mean(q, k, v, mask, pos, scaling or D ** -0.5)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        if m is not None:  # attribution: each KV head's output moved toward its exact one by its weight
            causal = streaming_mask(pos, S, torch.ones(H, dtype=torch.bool), 0, 1)[None]
            o = o + m * (F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scaling) - o)
        blocks.append(o)
    return torch.cat(blocks, 2).transpose(1, 2).contiguous(), None


def _far_mean(q, k, v, seen, pos, scale):
    """Softmax attention in which the causal keys a head's rule hides (``seen`` False) are not dropped but
    share their total weight equally: each takes the log-mean-exp of their scores. An oracle of a far
    branch that gets the far attention's mass right and averages its content."""
    dt = torch.promote_types(q.dtype, torch.float32)  # 16-bit inputs scored in fp32
    s = torch.einsum("bhqd,bhkd->bhqk", q.to(dt), k.to(dt)) * scale
    causal = torch.arange(k.shape[2], device=q.device)[None] <= pos[:, None]
    far = causal & ~seen
    n_far = far.sum(-1, keepdim=True).to(dt)
    lme = torch.logsumexp(s.masked_fill(~far, float("-inf")), -1, keepdim=True) - n_far.clamp(min=1).log()
    s = torch.where(far, lme, s).masked_fill(~causal, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v.to(dt)).to(q.dtype)


AttentionInterface.register(NAME, probe_attention)


@contextlib.contextmanager
def streaming(model, exact: dict[int, set[int]], sinks: int, window: int, far: str = "none"):
    """The model's attention replaced by ``probe_attention`` with these settings, restored after."""
    before = model.config._attn_implementation
    SETTINGS.update(exact=exact, sinks=sinks, window=window, far=far)
    model.set_attn_implementation(NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


@torch.no_grad()
def score(model, tok, ids: list[int], key: str, answer_tokens: int = 0) -> dict:
    """The key and its digits by teacher forcing (``passkey.key_forced``'s rule: every token top-1), and
    the top token after the prompt, from one forward over the prompt and the key; with ``answer_tokens``
    also the greedy answer of that many tokens and whether its first number is the key (``loose``)."""
    key_ids = encode(tok, " " + key)
    lm = HFModel(model)
    logits = lm.logits_at(ids + key_ids, range(len(ids) - 1, len(ids) + len(key_ids) - 1))
    hit = (logits.argmax(-1) == torch.tensor(key_ids, device=logits.device)).tolist()
    p = logits[0].float().softmax(-1)
    top = int(p.argmax())
    out = {"forced": float(all(hit)), "digits": float(all(hit[leading_blanks(tok, key_ids):])),
           "top": tok.decode([top]), "top_p": float(p[top]), "key_p": float(p[key_ids[0]])}
    if answer_tokens > 0:
        answer = tok.decode(lm.complete(ids, answer_tokens), skip_special_tokens=True,
                            clean_up_tokenization_spaces=False)
        out |= {"answer": answer, "loose": float(first_number(answer) == key)}
    return out


def attribute(model, tok, ids: list[int], key: str, exact: dict[int, set[int]], sinks: int, window: int) -> torch.Tensor:
    """(layers, KV heads): the gradient of log p(the key's first token | prompt) with respect to a weight
    m per KV head that moves the head's output from streaming (m = 0; every head streaming but
    ``exact``'s) toward its exact attention (m = 1), taken at m = 0: by how much each head's far
    attention alone would raise the answer. One forward and backward, layers recomputed (checkpointed)."""
    n_layers, n_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    dev = next(model.parameters()).device
    mix = torch.zeros(n_layers, n_kv, device=dev, requires_grad=True)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    layer_checkpointing(model, True, {"use_reentrant": False})
    model.train()  # transformers checkpoints layers only in training mode (SmolLM2 has no dropout)
    SETTINGS["mix"] = mix
    try:
        with streaming(model, exact, sinks, window):
            logits = HFModel(model).logits_at(ids, [len(ids) - 1])[0]
            logits.float().log_softmax(-1)[encode(tok, " " + key)[0]].backward()
    finally:
        SETTINGS.pop("mix", None)
        layer_checkpointing(model, False)
        model.eval()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return mix.grad.detach().cpu()


def plan_runs(variants: list[str], base: dict[int, set[int]], full_layers: str | None, n_layers: int,
              n_kv: int) -> list[tuple[str, dict[int, set[int]]]]:
    """(label, exact KV heads by layer) for each variant: ``teacher`` every head; ``streaming`` the
    ``base`` heads, once for each ';'-separated alternative of ``full_layers`` with its layers' heads."""
    runs = []
    for v in variants:
        if v == "teacher":
            runs.append(("teacher", {i: set(range(n_kv)) for i in range(n_layers)}))
            continue
        for spec in full_layers.split(";") if full_layers else [None]:
            full = parse_layers(spec, n_layers) if spec else []
            runs.append((f"streaming, layers {spec} exact" if spec else "streaming",
                         base | {i: set(range(n_kv)) for i in full}))
    return runs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama", help="the original model (anything attnswap loads)")
    ap.add_argument("--exact", default=None, help="LAYER.HEAD items kept exact, or a converted model's directory")
    ap.add_argument("--full-layers", default=None,
                    help="layers whose every head is exact too ('0-14,20'); alternatives separated by ';' ('0-14;0-7')")
    ap.add_argument("--sinks", type=int, default=4, help="first tokens a streaming head sees (lolcats' default)")
    ap.add_argument("--window", type=int, default=256, help="last tokens a streaming head sees (the converters' default)")
    ap.add_argument("--far", default="none", choices=("none", "mean"),
                    help="what a streaming head does with the keys its rule hides: none (drop them) or mean (keep "
                         "their total weight, shared equally: an oracle of a far branch that averages)")
    ap.add_argument("--variants", default="teacher,streaming")
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--depths", default="0.5,1")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--answer", type=int, default=0, metavar="N",
                    help="also decode a greedy answer of N tokens (16: the passkey evaluation's loose score)")
    ap.add_argument("--attribute", action="store_true",
                    help="instead of scoring: each streaming KV head's gradient toward its exact attention, on the "
                         "log-probability of the key's first token, averaged over the prompts; prints the heads "
                         "ranked and the top ones as an --exact list")
    ap.add_argument("--rounds", type=int, default=0, metavar="N",
                    help="with --attribute: also choose N heads greedily, each round making the best head exact and "
                         "taking the gradient again from there (a forward and backward a prompt a round)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.rounds < 0 or (a.rounds and not a.attribute):
        raise SystemExit("--rounds takes a non-negative count, and only with --attribute")
    variants = a.variants.split(",")
    if bad := [v for v in variants if v not in ("teacher", "streaming")]:
        raise SystemExit(f"--variants: unknown {bad}; use teacher and/or streaming")
    dev = loading.pick_device(a.device)
    model, tok = loading.load_model(loading.resolve(a.model), dtype=loading.pick_dtype(a.dtype, dev), device=dev)
    model.eval()
    base = parse_exact(a.exact)
    n_layers, n_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    if any(i >= n_layers or max(h) >= n_kv for i, h in base.items() if h):
        raise SystemExit(f"--exact names a head beyond the model's {n_layers} layers x {n_kv} KV heads")
    try:
        runs = plan_runs(variants, base, a.full_layers, n_layers, n_kv)
    except AttnSwapError as e:
        raise SystemExit(f"--full-layers: {e}") from None
    n_exact = sum(len(h) for h in base.values())
    if a.attribute:
        return attribute_main(a, model, tok, base, n_layers, n_kv)
    print(f"# {a.model}  device {dev}  dtype {next(model.parameters()).dtype}  attnswap commit {commit()}")
    print(f"# streaming: {n_exact} of {n_layers * n_kv} KV heads exact, the rest sinks {a.sinks} + window {a.window}"
          + (", the keys beyond them at their mean weight" if a.far == "mean" else ""))
    print("| variant | length | depth | forced | digits | top token (p) | key's first token p |"
          + (" loose | answers |" if a.answer else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if a.answer else ""))
    records = []
    for label, exact in runs:
        rng = random.Random(a.seed)  # the same prompts for every variant
        with streaming(model, exact, a.sinks, a.window, a.far):
            for n in (int(s) for s in a.lengths.split(",")):
                for d in (float(s) for s in a.depths.split(",")):
                    rows = []
                    for _ in range(a.samples):
                        key = str(rng.randint(10000, 99999))
                        ids, _ = build_prompt(tok, n, d, key)
                        rows.append(score(model, tok, ids, key, a.answer) | {"key": key})
                    records.append({"variant": label, "length": n, "depth": d, "samples": rows})
                    mean = {c: sum(r[c] for r in rows) / len(rows) for c in ("forced", "digits", "key_p")}
                    tops = ", ".join(f"{r['top']!r} ({r['top_p']:.2f})" for r in rows)
                    extra = ""
                    if a.answer:
                        loose = sum(r["loose"] for r in rows) / len(rows)
                        extra = f" {loose:.2f} | " + "; ".join(repr(r["answer"][:40]) for r in rows) + " |"
                    print(f"| {label} | {n} | {d:g} | {mean['forced']:.2f} | {mean['digits']:.2f} | {tops} | "
                          f"{mean['key_p']:.2f} |" + extra, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "commit": commit(), "exact": {i: sorted(h) for i, h in base.items()},
                       "sinks": a.sinks, "window": a.window, "far": a.far, "answer_tokens": a.answer,
                       "prompts": records}, f)


def attribute_main(a, model, tok, base, n_layers: int, n_kv: int) -> None:
    rng = random.Random(a.seed)
    prompts = []
    for n in (int(x) for x in a.lengths.split(",")):
        for d in (float(x) for x in a.depths.split(",")):
            for _ in range(a.samples):
                key = str(rng.randint(10000, 99999))
                prompts.append({"length": n, "depth": d, "key": key, "ids": build_prompt(tok, n, d, key)[0]})

    def mean_gradient(exact):
        grads = [attribute(model, tok, p["ids"], p["key"], exact, a.sinks, a.window) for p in prompts]
        return torch.stack(grads).mean(0), grads

    def ranked(g, exact):
        return sorted(((float(g[i, h]), i, h) for i in range(n_layers) for h in range(n_kv)
                       if h not in exact.get(i, set())), reverse=True)

    g, grads = mean_gradient(base)
    order = ranked(g, base)
    print(f"# {a.model}, attnswap commit {commit()}: d log p(key's first token) / d m at m = 0, mean of {len(prompts)} "
          f"prompts; streaming heads sinks {a.sinks} + window {a.window}, {sum(map(len, base.values()))} exact already")
    print("| rank | head | gradient |\n|---|---|---|")
    for r, (v, i, h) in enumerate(order[:20], 1):
        print(f"| {r} | {i}.{h} | {v:+.4f} |")
    print(f"# sum over the {len(order)} streaming heads {sum(v for v, _, _ in order):+.4f}, the top 9 "
          f"{sum(v for v, _, _ in order[:9]):+.4f}; by layer: " + ", ".join(f"{i}: {float(g[i].sum()):+.3f}" for i in range(n_layers)))
    print("# top 9 as --exact: " + ",".join(f"{i}.{h}" for _, i, h in order[:9]), flush=True)
    greedy = []
    if a.rounds:  # greedy: the best head made exact, the gradient taken again from there, a round each
        exact = {i: set(h) for i, h in base.items()}
        v, i, h = order[0]
        for r in range(a.rounds):
            if r:
                v, i, h = ranked(mean_gradient(exact)[0], exact)[0]
            greedy.append({"head": f"{i}.{h}", "gradient": v})
            exact.setdefault(i, set()).add(h)
            print(f"# round {r + 1}: {i}.{h} ({v:+.4f})", flush=True)
        print(f"# greedy {a.rounds} as --exact: " + ",".join(x["head"] for x in greedy))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "commit": commit(), "exact": {i: sorted(h) for i, h in base.items()},
                       "sinks": a.sinks, "window": a.window,
                       "prompts": [{k: p[k] for k in ("length", "depth", "key")} for p in prompts],
                       "gradient": g.tolist(), "per_prompt": [x.tolist() for x in grads], "greedy": greedy}, f)


if __name__ == "__main__":
    main()
