"""How far a chunked prefill's continuation (``triton_hybrid_continue``) and one pass of the Triton
hybrid forward each sit from the fp32 spec (``naive_hybrid_attn``), in 16 bits, on random inputs: P
tokens already in the state, T new ones; relative error of the new tokens' outputs. With ``--gated``,
lizard's form (log-gates, meta tokens). On CPU it needs the interpreter (TRITON_INTERPRET=1, fp16:
bf16 is wrong there).

    TRITON_INTERPRET=1 python benchmarks/continuation_precision.py --prefilled 4000 --new 128
"""

from __future__ import annotations

import argparse

import torch

from attnswap.kernels.gated_attn.chunk import triton_gated_hybrid_attn
from attnswap.kernels.gated_attn.naive import naive_gated_hybrid_attn
from attnswap.kernels.hybrid_attn.chunk import triton_hybrid_attn, triton_hybrid_continue
from attnswap.kernels.hybrid_attn.naive import naive_hybrid_attn
from attnswap.kernels.hybrid_attn.step_torch import hybrid_prefill_state
from _common import commit


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefilled", type=int, default=4000)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--feature-dim", type=int, default=32)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--sinks", type=int, default=4, help="ungated; with --gated, the number of meta tokens")
    ap.add_argument("--gated", action="store_true")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    P, T, H, Hk, D, F, W, S = a.prefilled, a.new, a.heads, a.kv_heads, a.head_dim, a.feature_dim, a.window, a.sinks
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(a.device)

    q, k, v = rnd(1, P + T, H, D), rnd(1, P + T, Hk, D), rnd(1, P + T, Hk, D) + 0.5
    fq, fk = torch.softmax(rnd(1, P + T, H, F), -1), torch.softmax(rnd(1, P + T, Hk, F), -1)
    gamma = torch.rand(H, generator=g).to(a.device) * 0.01  # the linear branch carries most of the output
    kw = dict(window=W, scale=D**-0.5)
    extra, state_kw = {"sinks": S}, {"sinks": S}
    if a.gated:
        lg = torch.nn.functional.logsigmoid(rnd(1, P + T, Hk) + 6.0)  # slow decay: old keys still count
        extra = {"meta_k": rnd(S, Hk, D).to(dt), "meta_v": rnd(S, Hk, D).to(dt)}
        state_kw = {"g": lg[:, :P]}
        ref = naive_gated_hybrid_attn(q, k, v, fq, fk, lg, gamma, use_linear=True, **kw,
                                      meta_k=extra["meta_k"].float(), meta_v=extra["meta_v"].float())
        one = triton_gated_hybrid_attn(q.to(dt), k.to(dt), v.to(dt), fq.to(dt), fk.to(dt), lg, gamma, **kw, **extra)
    else:
        ref = naive_hybrid_attn(q, k, v, fq, fk, gamma, use_linear=True, **kw, **extra)
        one = triton_hybrid_attn(q.to(dt), k.to(dt), v.to(dt), fq.to(dt), fk.to(dt), gamma, **kw, **extra)
    state = hybrid_prefill_state(k[:, :P].to(dt), v[:, :P].to(dt), fk[:, :P], None, window=W, **state_kw)
    new = (slice(None), slice(P, None))
    more = {"g": lg[new], **extra} if a.gated else extra
    cont, _ = triton_hybrid_continue(q[new].to(dt), k[new].to(dt), v[new].to(dt), fq[new].to(dt), fk[new], gamma,
                                     state, **kw, **more)
    ref = ref[new]

    def rel(x, y):
        return ((x.float() - y.float()).norm() / y.float().norm()).item()

    print(f"attnswap commit {commit()}, {a.device}, {a.dtype}, {'gated' if a.gated else 'ungated'}, "
          f"{P} prefilled + {T} new tokens")
    print(f"one pass against the fp32 spec:      {rel(one[new], ref):.2e}")
    print(f"continuation against the fp32 spec:  {rel(cont, ref):.2e}")
    print(f"continuation against one pass:       {rel(cont, one[new]):.2e}")


if __name__ == "__main__":
    main()
