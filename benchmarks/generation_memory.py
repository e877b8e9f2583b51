"""Peak memory of generate() against context length, each measurement in a fresh process.

On CUDA it reports torch.cuda.max_memory_allocated; on CPU the process's peak resident set size
(getrusage), which includes the Python runtime and the weights, so compare rows, not absolutes.
``--prefill-chunk`` feeds the prompt through the cache in pieces (transformers' prefill_chunk_size):
a converted model then never holds more than one piece's activations, and its recurrent state is
fixed, so its peak should not grow with the context.

    python benchmarks/generation_memory.py --model runs/smollm2-linear --baseline llama --lengths 1024,8192 --prefill-chunk 1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
import attnswap
from attnswap import loading
name, L, chunk, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
dev = loading.pick_device("auto"); dt = loading.pick_dtype("auto", dev)
model, tok = loading.load_model(loading.resolve(name), dtype=dt, device=dev)
ids = torch.randint(100, len(tok) - 1, (1, L), generator=torch.Generator().manual_seed(L)).to(dev)
if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kw = {"prefill_chunk_size": chunk} if chunk else {}
with torch.no_grad():
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id, **kw)
peak = (torch.cuda.max_memory_allocated() / 2**20) if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mib": peak, "rss_before_generate_mib": base / 1024, "device": str(dev)}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--lengths", default="1024,8192")
    ap.add_argument("--prefill-chunk", type=int, default=0, help="0: the whole prompt in one forward pass")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = {}
    for name in a.model + ([a.baseline] if a.baseline else []):
        for L in map(int, a.lengths.split(",")):
            r = subprocess.run([sys.executable, "-c", CHILD, name, str(L), str(a.prefill_chunk), str(a.new_tokens)],
                               capture_output=True, text=True, check=True)
            rows[f"{name}@{L}"] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{name[-40:]:40s} L={L:6d} prefill chunk {a.prefill_chunk or 'none':>5} peak {rows[f'{name}@{L}']['peak_mib']:8.0f} MiB"
                  f" ({rows[f'{name}@{L}']['device']})", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
