"""On a GPU: a converted model's decode logits through the CUDA-graph step (and the compiled one) vs
the eager step, after the same prompt. Usage: python benchmarks/decode_paths.py MODEL [PROMPT_LEN] [STEPS]"""

import os
import sys

import torch

import attnswap  # noqa: F401
from attnswap import loading
from attnswap.modeling import reset_decode_graphs

path = sys.argv[1]
L = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
n = int(sys.argv[3]) if len(sys.argv) > 3 else 32
m, tok = loading.load_model(loading.resolve(path), dtype=torch.bfloat16, device=torch.device("cuda"))
ids = torch.randint(100, len(tok) - 1, (2, L), generator=torch.Generator().manual_seed(0)).cuda()


@torch.no_grad()
def run(graph: str, compiled: str):
    os.environ["ATTNSWAP_DECODE_GRAPH"], os.environ["ATTNSWAP_COMPILE_DECODE"] = graph, compiled
    reset_decode_graphs(m)
    out = m(ids, use_cache=True, logits_to_keep=1)
    past, teacher_forced = out.past_key_values, ids[:, -n:].flip(1)  # the same tokens for every path
    logits = []
    for t in range(n):
        o = m(teacher_forced[:, t : t + 1], past_key_values=past, use_cache=True)
        past = o.past_key_values
        logits.append(o.logits[:, -1].float())
    return torch.stack(logits, 1)


ref = run("off", "0")
for graph, compiled, name in (("auto", "0", "cuda graph"), ("auto", "1", "cuda graph + compile")):
    got = run(graph, compiled)
    err = (got - ref).abs().max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{path} prompt {L}, {n} steps, {name} vs eager: max |diff| {err:.4g} "
          f"(relative to max |logit| {err / ref.abs().max().item():.3g}), top-1 agreement {agree:.4f}")
