"""Held-out perplexity right after merging (no training) for every merge variant, from one load and
one calibration: the original model, mean pooling, aligned (Procrustes) merging, each with and
without the least-squares value read-out refit. Same data, split, calibration batches and held-out
windows as `convert gqa` (seed 0).

    python benchmarks/gqa_merges.py --model /root/smollm2.gguf --kv-heads 1 --json merges.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--grouping", default="similarity")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--save", help="also save the aligned+refit merged model here (untrained; e.g. for decode timing)")
    a = ap.parse_args()

    from attnswap import loading
    from attnswap.convert.gqa import calibrate, kv_bytes_per_token, merge_to_gqa
    from attnswap.data import build_corpus, load_documents
    from attnswap.evals.perplexity import perplexity

    dev = loading.pick_device("auto")
    dt = loading.pick_dtype("auto", dev)
    net, tok = loading.load_model(loading.resolve(a.model), dtype=dt, device=dev)
    corpus = build_corpus(load_documents("default"), tok)
    train = corpus.sequences("train", a.seq_len)
    held = corpus.sequences("heldout", a.seq_len)[: max(1, a.eval_tokens // a.seq_len)]
    pick = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(a.seed))[: a.calib_batches * a.batch_size]
    stats = calibrate(net, [train[pick[i : i + a.batch_size]] for i in range(0, pick.numel(), a.batch_size)])
    res = {"model": a.model, "kv_heads": a.kv_heads, "grouping": a.grouping, "dtype": str(dt),
           "teacher": perplexity(net, held, label="teacher"), "kv_bytes_per_token_before": kv_bytes_per_token(net.config, dt)}
    for merge in ("mean", "aligned"):
        for refit in (False, True):
            m = copy.deepcopy(net)
            t = time.perf_counter()
            merge_to_gqa(m, a.kv_heads, grouping=a.grouping, merge=merge, stats=stats, refit=refit)
            key = merge + ("+refit" if refit else "")
            res[key] = perplexity(m, held, label=key) | {"merge_seconds": time.perf_counter() - t}
            res["kv_bytes_per_token_after"] = kv_bytes_per_token(m.config, dt)
            print(key, json.dumps(res[key]), flush=True)
            if a.save and key == "aligned+refit":
                m.save_pretrained(a.save)
                tok.save_pretrained(a.save)
            del m
    tp = res["teacher"]["ppl"]
    print(f"teacher ppl {tp:.3f}")
    for k in ("mean", "mean+refit", "aligned", "aligned+refit"):
        print(f"{k:14} ppl {res[k]['ppl']:10.3f}  ({res[k]['ppl'] / tp:.2f}x teacher)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
