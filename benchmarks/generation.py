"""Generation speed and memory against context length: a converted model vs its teacher.

For each context length L: prefill L tokens (keeping only the last position's logits, as generate()
does), then greedily decode N tokens, on the same device in the same run. Peak memory is reported
for the prefill and, separately, for the decode phase (the peak above what the prefill left
allocated, i.e. what generating more tokens costs). ``generate tok/s`` times the same number of
new tokens through ``model.generate()`` (greedy) and subtracts the measured prefill time, so it
includes generate()'s own per-token work. Each model first decodes a few tokens untimed (CUDA graph
capture, allocator warm-up). ``--modes`` measures converted models under several decode paths
(``ATTNSWAP_DECODE_GRAPH``: auto = CUDA graphs on GPU, off = eager; ``compile`` = graphs of the
torch.compile'd whole step, ``compile-attn`` = graphs with only the attention step compiled). Prints one table (median of --repeats) and writes JSON with --json.

    python benchmarks/generation.py --model runs/smollm2-linear --baseline llama --lengths 2048,8192,32768
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import attnswap  # noqa: F401  (registers converted models)
from attnswap import loading


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure(model, L: int, new: int, dev, repeats: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(L)
    ids = torch.randint(100, vocab - 1, (1, L), generator=g).to(dev)
    pref, dec, peak, dpeak, gen = [], [], [], [], []
    cuda = dev.type == "cuda"
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        _sync(dev)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        _sync(dev)
        t1 = time.perf_counter()
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        del out
        if cuda:
            peak.append(torch.cuda.max_memory_allocated() / 2**20)
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(new):
            o = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
        _sync(dev)
        t2 = time.perf_counter()
        pref.append(L / (t1 - t0))
        dec.append(new / (t2 - t1))
        if cuda:
            dpeak.append((torch.cuda.max_memory_allocated() - base) / 2**20)
        del past
        _sync(dev)
        t3 = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        _sync(dev)
        gen.append(new / max(time.perf_counter() - t3 - (t1 - t0), 1e-9))
    nan = float("nan")
    return {"prefill_tok_s": statistics.median(pref), "decode_tok_s": statistics.median(dec),
            "generate_tok_s": statistics.median(gen),
            "prefill_peak_mib": statistics.median(peak) if peak else nan,
            "decode_extra_peak_mib": statistics.median(dpeak) if dpeak else nan}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, action="append", help="repeat for several models")
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--lengths", default="1024,2048,8192,32768")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    ap.add_argument("--modes", default="auto", help="decode paths for converted models: auto,off,compile,compile-attn")
    a = ap.parse_args()
    dev = loading.pick_device(a.device)
    dt = loading.pick_dtype("auto", dev)
    lengths = [int(x) for x in a.lengths.split(",")]
    results = {}
    modes = a.modes.split(",")
    for name in a.model + ([a.baseline] if a.baseline else []):
        model, tok = loading.load_model(loading.resolve(name), dtype=dt, device=dev)
        model.generation_config.max_length = None
        converted = getattr(model.config, "attnswap", None) is not None
        for mode in modes if converted else ["-"]:
            os.environ["ATTNSWAP_DECODE_GRAPH"] = mode if mode in ("off", "static") else "auto"
            os.environ["ATTNSWAP_COMPILE_DECODE"] = {"compile": "model", "compile-attn": "attn"}.get(mode, "0")
            measure(model, min(lengths), 4, dev, 1, len(tok))  # warm-up, untimed
            label = name if mode == "-" else f"{name} [{mode}]"
            results[label] = {L: measure(model, L, a.new_tokens, dev, a.repeats, len(tok)) for L in lengths}
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, dtype {dt}, "
          f"{a.new_tokens} decoded tokens, median of {a.repeats}")
    print(f"{'model':40s} {'L':>7s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'generate tok/s':>15s} "
          f"{'prefill peak MiB':>17s} {'decode extra MiB':>17s}")
    for name, rows in results.items():
        for L, r in rows.items():
            print(f"{name[-40:]:40s} {L:7d} {r['prefill_tok_s']:14,.0f} {r['decode_tok_s']:13,.1f} "
                  f"{r['generate_tok_s']:15,.1f} {r['prefill_peak_mib']:17,.0f} {r['decode_extra_peak_mib']:17,.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({n: {str(L): r for L, r in rows.items()} for n, rows in results.items()}, f, indent=2)


if __name__ == "__main__":
    main()
