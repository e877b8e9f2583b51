"""Greedy decoding with the transformers DynamicCache at a long context: the original model against
its GQA-merged copy. For each model and batch size: prefill --context tokens, then time --new-tokens
greedy steps (one token per step, CUDA-synchronised). Reports measured KV-cache bytes (summed over
the cache's key/value tensors after prefill) and decode tokens/s. Writes JSON with --json.

    python benchmarks/gqa_decode.py --teacher /root/smollm2.gguf --merged /tmp/smollm2-mqa --context 8192
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def bench(model, context: int, new_tokens: int, batch: int, vocab: int, seed: int = 0) -> dict:
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, (batch, context - new_tokens), generator=g).to(dev)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cache = DynamicCache(config=model.config)
    sync()
    t0 = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync()
    prefill_s = time.perf_counter() - t0
    kv = cache_bytes(cache)
    nxt = out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(new_tokens):
        sync()
        t = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        sync()
        steps.append(time.perf_counter() - t)
    warm = sorted(steps[len(steps) // 4:])  # the first steps include allocator warm-up
    per_step = sum(warm) / len(warm)
    median = warm[len(warm) // 2]
    return {"batch": batch, "context": context, "prefill_tokens": context - new_tokens, "prefill_s": prefill_s,
            "kv_cache_bytes_after_prefill": kv, "kv_bytes_per_token": kv / (batch * (context - new_tokens)),
            "decode_ms_per_step": 1000 * per_step, "decode_ms_median": 1000 * median, "decode_tokens_per_s": batch / per_step,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--merged", required=True, help="a merged model, or 'auto:G' to mean-merge the teacher to G KV heads "
                    "in process (same shapes as any G-head merge: decode speed does not depend on the weights)")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json")
    a = ap.parse_args()

    from attnswap import loading

    rows = []
    teacher = None
    for name, spec in (("teacher", a.teacher), ("merged", a.merged)):
        if spec.startswith("auto:"):
            from attnswap.convert.gqa import merge_to_gqa

            model = teacher
            merge_to_gqa(model, int(spec[5:]), grouping="adjacent", merge="mean")
        else:
            model, tok = loading.load_model(loading.resolve(spec), dtype=torch.bfloat16, device=a.device)
        model.config.use_cache = True
        bench(model, 512, 8, 1, len(tok))  # warm-up (kernels, allocator)
        for b in map(int, a.batches.split(",")):
            if a.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            r = {"model": name, "kv_heads": model.config.num_key_value_heads, **bench(model, a.context, a.new_tokens, b, len(tok))}
            rows.append(r)
            print(json.dumps(r), flush=True)
        teacher = model if name == "teacher" and a.merged.startswith("auto:") else None
        del model
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"{'model':8} {'kv':>3} {'batch':>5} {'KV bytes/token':>15} {'KV cache GiB':>12} {'decode tok/s':>12} {'ms/step':>8}")
    for r in rows:
        print(f"{r['model']:8} {r['kv_heads']:>3} {r['batch']:>5} {r['kv_bytes_per_token']:>15,.0f} "
              f"{r['kv_cache_bytes_after_prefill'] / 2**30:>12.3f} {r['decode_tokens_per_s']:>12.1f} {r['decode_ms_per_step']:>8.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
