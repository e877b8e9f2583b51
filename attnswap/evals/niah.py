"""Needle in a haystack over real text: the haystack is a stretch of the held-out evaluation split.

For each (length, depth, sample): a window of held-out tokens (a seeded offset, so samples read
different text) gets a needle sentence, "The special magic number for <word> is <7 digits>.",
inserted at ``depth`` of the window (moved back to the nearest sentence or line end, so it does not
split a word), followed by the question "What is the special magic number for <word>? The special
magic number for <word> is". Greedy decoding; correct when the first number produced is the one
hidden. The whole prompt is at most ``length`` tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import AttnSwapError
from ..progress import progress_bar
from .common import LM, accuracy, encode, rng_for
from .passkey import first_number

WORDS = ("apple", "river", "garden", "violin", "harbor", "lantern", "meadow", "copper", "falcon", "pepper",
         "island", "canyon", "marble", "thunder", "velvet", "orchid", "glacier", "compass", "saddle", "walnut")
NEEDLE = " The special magic number for {word} is {number}. "
QUESTION = "\nWhat is the special magic number for {word}? The special magic number for {word} is"
SNAP = 64  # how far back the needle may move to land on a sentence boundary


class _Boundaries:
    """Whether a token ends a sentence or a line, cached per token id."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, t: int) -> bool:
        if t not in self.cache:
            s = self.tok.decode([t], clean_up_tokenization_spaces=False)
            self.cache[t] = s.rstrip(" ").endswith((".", "!", "?", "\n")) or t == self.tok.eos_token_id
        return self.cache[t]


def build_prompt(tokenizer, haystack: Sequence[int], length: int, depth: float, word: str, number: str,
                 offset: int, ends=None) -> tuple[list[int], int]:
    needle, question = encode(tokenizer, NEEDLE.format(word=word, number=number)), encode(tokenizer, QUESTION.format(word=word))
    room = length - len(needle) - len(question)
    if room < 1:
        raise AttnSwapError(f"niah length {length} is too short: the needle and question alone take {length - room} tokens")
    text = list(haystack[offset : offset + room])
    at = round(depth * len(text))
    ends = ends or _Boundaries(tokenizer)
    if 0 < at < len(text):
        for j in range(at, max(0, at - SNAP), -1):
            if ends(text[j - 1]):
                at = j
                break
    return text[:at] + needle + text[at:] + question, at


def run(lm: LM, tokenizer, heldout: torch.Tensor, *, lengths: Sequence[int], depths: Sequence[float], samples: int,
        seed: int = 0, label: str = "niah") -> dict:
    hay = heldout.tolist()
    need = max(lengths)
    if len(hay) < need:
        raise AttnSwapError(f"the held-out split has {len(hay):,} tokens, fewer than the NIAH length {need}; "
                            "give more --data or shorter --lengths")
    ends = _Boundaries(tokenizer)
    grid: dict[str, dict[str, float]] = {}
    all_hits: list[bool] = []
    with progress_bar() as bar:
        task = bar.add_task(label, total=len(lengths) * len(depths) * samples)
        for n in lengths:
            row = {}
            for d in depths:
                hits = []
                for s in range(samples):
                    r = rng_for(seed, "niah", n, d, s)
                    word, number = r.choice(WORDS), str(r.randint(1_000_000, 9_999_999))
                    ids, _ = build_prompt(tokenizer, hay, n, d, word, number, r.randrange(0, len(hay) - n + 1), ends)
                    new = lm.complete(ids, len(encode(tokenizer, " " + number)) + 3)
                    hits.append(first_number(tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)) == number)
                    bar.update(task, advance=1)
                row[f"{d:g}"] = accuracy(hits)
                all_hits += hits
            grid[str(n)] = row
    return {"accuracy": accuracy(all_hits), "samples": len(all_hits),
            "by_length": {n: sum(r.values()) / len(r) for n, r in grid.items()}, "grid": grid,
            "lengths": list(lengths), "depths": list(depths)}
