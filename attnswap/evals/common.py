"""What the recall tasks need from a model, and the adapter that provides it for a transformers model.

The tasks (passkey, niah, mqar) talk to an ``LM``: anything with

- ``complete(ids, max_new_tokens) -> list[int]``: greedy continuation of a prompt;
- ``predicts(ids, spans) -> list[bool]``: for each ``(start, end)`` span of ``ids``, whether greedy
  decoding from ``ids[:start]`` would produce exactly ``ids[start:end]`` (teacher forcing: one
  forward pass scores every span).

``HFModel`` wraps a transformers causal LM. Tests wrap an oracle or a know-nothing stand-in instead,
which is how a task is checked to pass and to fail.
"""

from __future__ import annotations

import random
from typing import Protocol, Sequence

import torch

from ..errors import AttnSwapError


class LM(Protocol):
    def complete(self, ids: Sequence[int], max_new_tokens: int) -> list[int]: ...

    @torch.no_grad()
    def predicts(self, ids: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[bool]: ...


def split_head(model):
    """(trunk, head) so that ``head(trunk(input_ids=...).last_hidden_state)`` are the logits; lets
    long sequences be scored without materialising (T, vocab) logits at once. None if the model
    does not have that shape."""
    trunk = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if trunk is None or trunk is model or head is None:
        return None
    if getattr(model.config, "final_logit_softcapping", None):
        return None
    return trunk, head


def model_device(model) -> torch.device:
    return next(model.parameters()).device


class HFModel:
    """The ``LM`` interface over a transformers causal LM (a converted one decodes from its
    constant-size recurrent state, the original from its key/value cache)."""

    def __init__(self, model, eos_token_id: int | None = None):
        self.model = model
        self.eos = eos_token_id

    def complete(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        return [t for t, _ in self.greedy_steps(ids, max_new_tokens)]

    @torch.no_grad()
    def greedy_steps(self, ids: Sequence[int], max_new_tokens: int):
        """``complete``'s decoding a step at a time: (token, the logits (V,) it was picked from). The
        prompt goes through one cached forward keeping the last position's logits, then one forward a
        token; it stops after ``max_new_tokens`` or at ``eos``."""
        from ..hf_compat import cache_kwargs, new_cache, output_cache

        dev = model_device(self.model)
        x = torch.tensor([list(ids)], device=dev)
        out = self.model(input_ids=x, use_cache=True, logits_to_keep=1, **cache_kwargs(new_cache()))
        for i in range(max_new_tokens):
            logits = out.logits[0, -1]
            nxt = int(logits.argmax())
            yield nxt, logits
            if nxt == self.eos or i + 1 == max_new_tokens:
                return
            out = self.model(input_ids=torch.tensor([[nxt]], device=dev), use_cache=True,
                             **cache_kwargs(output_cache(out)))

    def logits_at(self, ids: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """(len(positions), vocab) logits at ``positions`` of one forward over ``ids``, without the
        (T, vocab) logits of every position where the model splits into trunk and head. Under the
        caller's grad mode (a gradient through it is ``streaming_probe.attribute``'s)."""
        dev = model_device(self.model)
        x = torch.tensor([list(ids)], device=dev)
        where = torch.tensor(list(positions), device=dev, dtype=torch.long)
        parts = split_head(self.model)
        if parts is None:
            return self.model(input_ids=x, use_cache=False).logits[0, where]
        trunk, head = parts
        return head(trunk(input_ids=x, use_cache=False).last_hidden_state[0, where])

    @torch.no_grad()
    def predicts(self, ids: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[bool]:
        if not spans:
            return []
        end = max(e for _, e in spans)
        where = [p for s, e in spans for p in range(s - 1, e - 1)]
        logits = self.logits_at(ids[:end], where)
        nxt = torch.tensor([ids[p + 1] for p in where], device=logits.device)
        hit = (logits.argmax(-1) == nxt).tolist()
        out, i = [], 0
        for s, e in spans:
            out.append(all(hit[i : i + e - s]))
            i += e - s
        return out


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def rng_for(seed: int, *parts) -> random.Random:
    """A generator that depends only on the seed and the cell (task, length, depth, sample)."""
    return random.Random("/".join(str(p) for p in (seed, *parts)))


def check_lengths(what: str, lengths: Sequence[int], max_len: int | None, *, extra: int = 0) -> None:
    for n in lengths:
        if n < 1:
            raise AttnSwapError(f"{what} must be positive (got {n})")
        if max_len is not None and n + extra > max_len:
            more = f" plus {extra} generated tokens" if extra else ""
            raise AttnSwapError(f"{what} {n}{more} is beyond the model's maximum of {max_len} positions")


def accuracy(hits: Sequence[bool]) -> float:
    return sum(bool(h) for h in hits) / len(hits) if hits else float("nan")
