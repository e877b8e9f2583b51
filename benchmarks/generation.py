"""Generation suite: peak memory of a plain ``generate()`` and decode/prefill speed, the teacher
against its conversions, one model on the device at a time, in one run.

For each model and prompt length L (random token ids):
- ``generate peak GiB``: ``torch.cuda.max_memory_allocated`` over ``model.generate(ids,
  max_new_tokens=N)`` with default arguments (weights included, nothing else on the device);
- ``prefill tok/s``: one forward over the prompt with a cache (``logits_to_keep=1``, as generate()
  does), timed;
- ``decode tok/s``: N greedy one-token steps from that cache (a converted model's steps go through
  its default decode path: the CUDA-graph step on CUDA), timed; the median of ``--repeats``.

- ``cache MiB``: the bytes the cache holds after the N steps (keys/values of softmax layers, the
  fixed-size state of converted layers, the exact heads' buffers), counted from its tensors.

Converted models are made here from the teacher with default options (all layers, untrained):
speed and memory do not depend on training. ``--methods`` picks them (teacher, lolcats, lizard, seer;
``lolcats-x9``/``lizard-x9``: 9 exact KV heads in a fixed layout chosen by calibration, ``X9_LAYOUT``;
options other than the defaults after a colon, e.g. ``lolcats:window=256``;
seer's steps keep the completed blocks' gate keys in the cache and re-pool only the partial block).
An entry that is a directory is a saved conversion, loaded as a user loads it (for what only a
trained run decides: loza's streaming layers, ``--exact-heads``' chosen heads).
It also runs against older attnswap checkouts (``PYTHONPATH=old-tree``) for before/after figures.

    python benchmarks/generation.py --model llama --lengths 2048,8192,32768 --json gen.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from pathlib import Path

import torch

import attnswap  # noqa: F401  (registers converted models)
from attnswap import loading
from attnswap.convert.swap import make_swap
from attnswap.evals.speed import cache_bytes
from _common import commit as _commit, method_spec  # noqa: E402  (benchmarks/_common.py)

try:
    from attnswap.modeling import convert_model
except ImportError:  # attnswap before the modeling package
    from attnswap.convert import convert_model


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _out_cache(out):
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else getattr(out, "cache", None)


@torch.no_grad()
def measure(model, L: int, new: int, dev, repeats: int, vocab: int, gen_kwargs: dict | None = None) -> dict:
    g = torch.Generator().manual_seed(L)
    ids = torch.randint(100, vocab - 1, (1, L), generator=g).to(dev)
    cuda = dev.type == "cuda"
    peaks, pref, dec, cache, wall = [], [], [], [], []
    for _ in range(repeats):
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        tg = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **(gen_kwargs or {}))
        _sync(dev)
        wall.append(time.perf_counter() - tg)
        if cuda:
            peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        _sync(dev)
        t1 = time.perf_counter()
        past, nxt = _out_cache(out), out.logits[:, -1:].argmax(-1)
        del out
        t2 = time.perf_counter()
        for _ in range(new):
            o = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = _out_cache(o), o.logits[:, -1:].argmax(-1)
        _sync(dev)
        t3 = time.perf_counter()
        cache.append(cache_bytes(past) / 2**20)
        del past
        pref.append(L / (t1 - t0))
        dec.append(new / (t3 - t2))
    nan = float("nan")
    return {"generate_peak_gib": statistics.median(peaks) if peaks else nan,
            "prefill_tok_s": statistics.median(pref), "decode_tok_s": statistics.median(dec), "cache_mib": max(cache),
            "generate_s": statistics.median(wall)}



# 9 exact KV heads in the layers where a 20-step calibration on SmolLM2 put them (lent H200, commit 9fdadc9,
# `convert linearize --exact-heads 9 --steps 20`): ``lolcats-x9`` / ``lizard-x9`` rebuild that layout
# untrained, in process (decode speed does not depend on the values, only on which layers are mixed)
X9_LAYOUT = {7: [1], 8: [0, 1], 15: [2], 17: [1], 20: [0], 21: [2], 23: [2], 24: [0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama", help="the teacher: alias, directory or .gguf file")
    ap.add_argument("--methods", default="teacher,lolcats,lizard")
    ap.add_argument("--lengths", default="2048,8192,32768")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--label", default="", help="tag for the rows (e.g. 'before')")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="pass prefill_chunk_size to generate() (default: none given, so the model's default; 0: None, one pass)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dev = loading.pick_device(a.device)
    dt = loading.pick_dtype("auto", dev)
    lengths = [int(x) for x in a.lengths.split(",")]
    teacher, tok = loading.load_model(loading.resolve(a.model), dtype=dt, device="cpu")
    results = {}
    for method in a.methods.split(","):
        if Path(method).expanduser().is_dir():  # a saved conversion
            m, _ = loading.load_model(loading.resolve(str(Path(method).expanduser())), dtype=dt, device="cpu")
            method = Path(method).name
        else:
            m = copy.deepcopy(teacher)
            if method != "teacher":
                n = m.config.num_hidden_layers
                name, opts = method_spec(method)
                if name.endswith("-x9"):
                    base = name[: -len("-x9")]
                    if n != 30:
                        raise SystemExit(f"{method}: the fixed 9-head layout is SmolLM2's (30 layers), not {n}")
                    swaps = [make_swap(base, [i], {**opts, **({"exact_heads": X9_LAYOUT[i]} if i in X9_LAYOUT else {})},
                                       m.config) for i in range(n)]
                else:
                    swaps = [make_swap(name, list(range(n)), opts, m.config)]
                convert_model(m, swaps, a.model)
        m = m.to(device=dev, dtype=dt).eval()
        m.generation_config.max_length = None
        gk = {} if a.prefill_chunk is None else {"prefill_chunk_size": a.prefill_chunk or None}
        measure(m, min(lengths), 4, dev, 1, len(tok), gk)  # warm-up: graph capture, allocator, autotuning
        results[method] = {L: measure(m, L, a.new_tokens, dev, a.repeats, len(tok), gk) for L in lengths}
        del m
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    import transformers

    print(f"device {name}, {dt}, attnswap commit {_commit()} {a.label}, transformers {transformers.__version__}, "
          f"{a.new_tokens} new tokens, median of {a.repeats}")
    print(f"{'model':14s} {'L':>7s} {'generate peak GiB':>18s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'cache MiB':>10s} {'generate() s':>13s}")
    for method, rows in results.items():
        for L, r in rows.items():
            print(f"{method:14s} {L:7d} {r['generate_peak_gib']:18.3f} {r['prefill_tok_s']:14,.0f} {r['decode_tok_s']:13,.1f} "
                  f"{r['cache_mib']:10.2f} {r['generate_s']:13.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "label": a.label, "commit": _commit(),
                       "results": {n: {str(L): r for L, r in rows.items()} for n, rows in results.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
