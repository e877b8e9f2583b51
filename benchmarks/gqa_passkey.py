"""Passkey retrieval (attnswap.evals.passkey) at a given prompt length for several models, e.g. the
original SmolLM2 and its GQA-merged, distilled copy. Greedy decoding through the DynamicCache.

    python benchmarks/gqa_passkey.py --models /root/smollm2.gguf,/tmp/smollm2-mqa --length 4096 --json passkey.json
"""

from __future__ import annotations

import argparse
import json

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True, help="comma-separated model specs (alias, directory, .gguf)")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json")
    a = ap.parse_args()

    from attnswap import loading
    from attnswap.evals import passkey
    from attnswap.evals.common import HFModel

    res = {}
    for spec in a.models.split(","):
        model, tok = loading.load_model(loading.resolve(spec), dtype=torch.bfloat16 if a.device != "cpu" else torch.float32,
                                        device=a.device)
        r = passkey.run(HFModel(model, tok.eos_token_id), tok, lengths=[a.length],
                        depths=[float(d) for d in a.depths.split(",")], samples=a.samples, label=f"passkey {spec}")
        res[spec] = r | {"kv_heads": model.config.num_key_value_heads}
        print(f"{spec}: kv_heads {model.config.num_key_value_heads} passkey@{a.length} accuracy {r['accuracy']:.3f} "
              f"({r['samples']} samples) by depth {r['by_depth']} e.g. {r['examples'][:1]}", flush=True)
        del model
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
