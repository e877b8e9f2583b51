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


@torch.no_grad()
def token_nll(model, seqs: torch.Tensor, *, batch_size: int = 4, label: str = "perplexity", chunk: int = 1024) -> torch.Tensor:
    """Per-token next-token NLL, shape (N, T-1), fp32 on the CPU. Long windows are scored without
    materialising all (T, vocab) logits: the hidden states go through the output head ``chunk``
    positions at a time."""
    from .common import model_device, split_head

    device = model_device(model)
    model.eval()
    parts = split_head(model)
    out = []
    with progress_bar() as bar:
        task = bar.add_task(label, total=seqs.shape[0])
        for i in range(0, seqs.shape[0], batch_size):
            ids = seqs[i : i + batch_size].to(device)
            if parts is None:
                logits = model(input_ids=ids, use_cache=False).logits.float()
                nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            else:
                trunk, head = parts
                hidden = trunk(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
                nll = torch.cat([F.cross_entropy(head(hidden[:, s : s + chunk]).float().transpose(1, 2),
                                                 ids[:, 1 + s : 1 + s + chunk], reduction="none")
                                 for s in range(0, hidden.shape[1], chunk)], dim=1)
            out.append(nll.float().cpu())
            bar.update(task, advance=ids.shape[0])
    return torch.cat(out)


def position_buckets(seq_len: int, first: int = 64) -> list[tuple[int, int]]:
    """Doubling buckets of predicted-token positions: [1, 64), [64, 128), [128, 256), ... up to seq_len."""
    edges = [1]
    b = first
    while b < seq_len:
        edges.append(b)
        b *= 2
    edges.append(seq_len)
    return [(a, z) for a, z in zip(edges, edges[1:]) if z > a]


def perplexity_at_lengths(model, heldout: torch.Tensor, lengths, *, eval_tokens: int, batch_size: int = 4,
                          name: str = "model") -> dict:
    """Perplexity with windows of each length (``max(1, eval_tokens // length)`` windows from the
    start of the held-out stream), and, from the longest windows, perplexity by token position."""
    from ..errors import AttnSwapError

    res: dict = {"by_length": {}}
    for n in sorted(lengths):
        count = heldout.numel() // n
        if count == 0:
            raise AttnSwapError(f"the held-out split has {heldout.numel():,} tokens, fewer than one {n}-token window; "
                                "give more --data or shorter --ppl-lengths")
        seqs = heldout[: min(count, max(1, eval_tokens // n)) * n].view(-1, n)
        nll = token_nll(model, seqs, batch_size=max(1, min(batch_size, (batch_size * 1024) // n)),
                        label=f"{name} ppl @{n}")
        mean = nll.mean().item()
        res["by_length"][str(n)] = {"ppl": math.exp(mean), "nll": mean, "tokens": nll.numel(), "windows": seqs.shape[0]}
        longest = (n, nll)
    n, nll = longest
    per_pos = nll.mean(0)  # position p predicts token p + 1
    res["by_position"] = {"length": n, "buckets": [
        {"from": a, "to": z, "ppl": math.exp(per_pos[a - 1 : z - 1].mean().item())} for a, z in position_buckets(n)]}
    return res
