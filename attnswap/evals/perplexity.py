"""Held-out perplexity: mean next-token NLL over non-overlapping ``seq_len`` windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..progress import progress_bar


@torch.no_grad()
def perplexity(model, seqs: torch.Tensor, *, batch_size: int = 4, label: str = "perplexity") -> dict:
    device = next(model.parameters()).device
    model.eval()
    total_nll, total_tok = 0.0, 0
    with progress_bar() as bar:
        task = bar.add_task(label, total=seqs.shape[0])
        for i in range(0, seqs.shape[0], batch_size):
            ids = seqs[i : i + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            total_nll += nll.item()
            total_tok += ids[:, 1:].numel()
            bar.update(task, advance=ids.shape[0])
    nll = total_nll / max(1, total_tok)
    return {"ppl": math.exp(nll), "nll": nll, "tokens": total_tok}
