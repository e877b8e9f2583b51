"""A cheap retrieval probe per layer and KV head: how much attention the answer tokens of a retrieval
row put on the tokens where their fact was stated, with exact (teacher) attention.

For each rewritten row of a ``synthetic.build_mix`` mix and each of its facts, the softmax attention
of every position that predicts an answer token (over all earlier tokens) is summed over the fact's span; the score of a query head
is the mean over answer tokens and facts, and a KV head's is the mean of its query heads. A layer that
retrieves scores high; a layer that only looks nearby scores near 0. Only the answer rows of the
score matrix are formed, so the probe costs about one forward pass per row.
"""

from __future__ import annotations

import torch

from ..convert.base import attention_mode, swapped_modules
from ..progress import progress_bar


@torch.no_grad()
def retrieval_probe(model, ids: torch.Tensor, details: dict, max_rows: int = 8) -> dict:
    """``ids`` (n, L) and ``details`` ({row: Row}, from ``build_mix``) -> {"layer": {i: score},
    "head": {i: [score per KV head]}, "facts": number of facts probed}; empty when no row has facts."""
    rows = [r for r in sorted(details) if details[r].facts][:max_rows]
    mods = swapped_modules(model)
    if not rows or not mods:
        return {}
    sums = {m.layer_idx: torch.zeros(m.num_kv_heads) for m in mods}
    state = {"spans": []}

    def hook(m, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        x = m.project(h, kwargs.get("position_embeddings"))
        g = m.num_heads // m.num_kv_heads
        for fact, answer in state["spans"]:
            a, b = answer[0] - 1, answer[1] - 1  # the positions that predict the answer's tokens
            q = x.q[0, a:b].float()  # (A, H, D)
            k = x.k[0, :b].float().repeat_interleave(g, dim=1)  # (S, H, D)
            s = torch.einsum("ahd,shd->has", q, k) * m.scaling
            pos = torch.arange(a, b, device=s.device)[None, :, None]
            s = s.masked_fill(torch.arange(b, device=s.device)[None, None] > pos, float("-inf"))
            mass = s.softmax(-1)[..., fact[0]:fact[1]].sum(-1).mean(-1)  # (H,)
            sums[m.layer_idx] += mass.view(m.num_kv_heads, g).mean(-1).cpu()

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in mods]
    n = 0
    dev = next(model.parameters()).device
    try:
        with attention_mode(model, "teacher"), progress_bar() as bar:
            task = bar.add_task("retrieval probe (teacher attention)", total=len(rows))
            for r in rows:
                state["spans"] = [(f.fact, f.answer) for f in details[r].facts]
                n += len(state["spans"])
                model(input_ids=ids[r : r + 1].to(dev), use_cache=False)
                bar.update(task, advance=1)
    finally:
        for h in handles:
            h.remove()
    heads = {i: (s / n).tolist() for i, s in sums.items()}
    return {"layer": {i: sum(v) / len(v) for i, v in heads.items()}, "head": heads, "facts": n}
