"""Does ``generate()``'s fast path stay faithful on long prompts of the real model? Issue 16: lizard with 9
exact KV heads found passkeys at 1k / 2k and none at 4k / 8k, lolcats' found them at 4k. This converts
SmolLM2 (untrained feature maps, nudged off their initial values as the tests do) with exact heads in the
layers calibration picked, builds a passkey prompt of each length, and prints, per method and length,
how far the first decoded positions' logits sit from one fp32 PyTorch-path forward without a cache:

- ``generate()``: generate() in bf16 (``--dtype``) on the default backend (Triton prefill in pieces, decode step);
- ``eval loop``: the passkey evaluation's own loop (``HFModel.greedy_steps``: one cached forward over the
  prompt, then a forward a token), on the default backend;
- ``torch``: one bf16 PyTorch-path forward over the same tokens: bf16's own noise, the yardstick.

A fast-path fault shows as the first two far above ``torch`` (or top-1 agreement far below) at the lengths
where passkey fails. A benchmark: it prints, it asserts nothing.

    python benchmarks/long_prompt_parity.py --model ~/smollm2.gguf --lengths 2048,4133,8300
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from attnswap import loading
from attnswap.convert.swap import make_swap
from attnswap.evals.common import HFModel
from attnswap.evals.passkey import build_prompt
from attnswap.modeling import convert_model
from _common import commit

# layer -> KV heads kept exact: the nine calibration chose for both methods at commit 2ad8b13 (BENCHMARKS)
EXACT = {7: [0], 8: [0], 14: [0], 17: [0], 18: [0], 20: [0, 1], 23: [0], 24: [0]}


def converted(base, method: str, exact: dict[int, list[int]], seed: int, gate_bias: float | None = None):
    m = copy.deepcopy(base)
    swaps = []
    for i in range(m.config.num_hidden_layers):
        opts = {"exact_heads": exact[i]} if exact.get(i) else {}
        swaps.append(make_swap(method, [i], opts, m.config))
    convert_model(m, swaps, "smollm2")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # off the initial values, as tests/test_generation_smollm2.py does
        for name, p in m.named_parameters():
            if any(s in name for s in ("feature_map", "window_factor", "gate_proj", "meta_")):
                p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p.device, p.dtype))
        if gate_bias is not None:  # lizard: log-gate log sigmoid(bias) a token, a decay trained gates may reach
            for name, p in m.named_parameters():
                if name.endswith("gate_proj.bias"):
                    p.fill_(gate_bias)
    return m


def generated_logits(m, ids, new: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the prompt's last position and of ``new - 1`` greedy decode steps, and the sequence,
    through generate()."""
    os.environ["ATTNSWAP_KERNELS"] = backend
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return torch.stack(out.logits, 1).float(), out.sequences


def eval_loop_logits(m, ids, new: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The same through the evaluations' own loop (``HFModel.greedy_steps``, what passkey decodes with)."""
    os.environ["ATTNSWAP_KERNELS"] = backend
    steps = list(HFModel(m).greedy_steps(ids[0].tolist(), new))
    seq = torch.cat([ids, torch.tensor([[t for t, _ in steps]], device=ids.device)], 1)
    return torch.stack([lg.float() for _, lg in steps])[None], seq


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama")
    ap.add_argument("--methods", default="lizard,lolcats")
    ap.add_argument("--lengths", default="2048,4133,8300")
    ap.add_argument("--new", type=int, default=6, help="decoded tokens compared (the first is the prompt's last position)")
    ap.add_argument("--gate-bias", type=float, default=None,
                    help="lizard's gate bias everywhere (default: the initial 5, a memory of ~150 tokens; 0 halves a token's weight a step)")
    ap.add_argument("--no-exact", action="store_true", help="convert every head (no exact heads)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="fp16 under the CPU's Triton interpreter")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    base, tok = loading.load_model(loading.resolve(a.model), dtype=torch.float32, device=a.device)
    exact = {} if a.no_exact else EXACT
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    print(f"commit {commit()}, {torch.cuda.get_device_name() if a.device == 'cuda' else 'cpu'}, exact heads "
          f"{sum(len(h) for h in exact.values())}, gate bias {a.gate_bias}")
    print(f"| method | prompt tokens | generate() rel | eval loop rel | torch {a.dtype} rel | generate() top-1 | eval loop top-1 "
          f"| torch top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for method in a.methods.split(","):
        m32 = converted(base, method, exact, seed=3, gate_bias=a.gate_bias).to(a.device)
        m16 = copy.deepcopy(m32).to(dt)
        for length in (int(x) for x in a.lengths.split(",")):
            ids, _ = build_prompt(tok, length, 0.5, "48613")
            ids = torch.tensor([ids], device=a.device)
            got, seq = generated_logits(m16, ids, a.new, "triton")
            loop, seq2 = eval_loop_logits(m16, ids, a.new, "triton")
            os.environ["ATTNSWAP_KERNELS"] = "torch"
            with torch.no_grad():  # both follow the Triton run's tokens
                yard = m16(seq[:, :-1], use_cache=False).logits[:, ids.shape[1] - 1:].float()
                ref = m32(seq[:, :-1], use_cache=False).logits[:, ids.shape[1] - 1:].float()
            scale = ref.abs().max()

            def rel(x):
                return ((x - ref).abs().max() / scale).item()

            def agree(x):
                return (x.argmax(-1) == ref.argmax(-1)).float().mean().item()

            same = torch.equal(seq, seq2)  # the loop's tokens are the reference's only where they match generate()'s
            print(f"| {method} | {ids.shape[1]} | {rel(got):.2e} | {rel(loop) if same else float('nan'):.2e} | {rel(yard):.2e} "
                  f"| {agree(got):.0%} | {agree(loop):.0%}{'' if same else ' (other tokens)'} | {agree(yard):.0%} |", flush=True)
            del ref
            if a.device == "cuda":
                torch.cuda.empty_cache()
        del m32, m16


if __name__ == "__main__":
    main()
