"""Passkey retrieval: a five-digit number hidden in repetitive filler; the model has to repeat it.
(The needle states the key once: a needle ending in "... is the pass key." right before the question
at depth 1 invites copying those words instead of the number.)

A prompt of (about) ``length`` tokens is: an instruction, filler sentences, and, at ``depth``
(0 = right after the instruction, 1 = right before the question) a needle sentence naming the key;
then the question "What is the pass key? The pass key is". The model decodes a few tokens greedily;
the sample counts as correct when the first number in them is the key. Beside it, ``forced``: the
same prompt followed by the key, scored by teacher forcing (correct when the model's top token at every
position of the key is the key's): whether the model holds the key at all, apart from what greedy
decoding makes of it; and ``forced_digits``: the key's tokens after its leading whitespace (SmolLM2's
space before the digits) given that whitespace, which a model that would begin its answer with " a" or
" the" (a choice of format, not a lost key) still passes; and ``loose``: the same greedy answer read
to ``LOOSE_TOKENS`` tokens, correct when its first number is the key (an answer that restates the
question first, " the pass key is 48213", passes here and fails the strict score, whose few tokens end
before the key). The headline ``accuracy`` is the strict one. ``misses`` keeps, for each (length,
depth) cell, the first answer that failed the strict score, to show what a model says instead. Prompts are built from token pieces
(no re-tokenisation at the seams), so lengths are exact to within one filler sentence.
"""

from __future__ import annotations

import re
from typing import Sequence

from ..errors import AttnSwapError
from ..progress import progress_bar
from .common import LM, accuracy, encode, rng_for

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.")
FILLER = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.", " There and back again.")
NEEDLE = " The pass key is {key}. Remember it."
QUESTION = " What is the pass key? The pass key is"
LOOSE_TOKENS = 16  # the loose score's answer length, in tokens (the strict one reads the key's length + 3)


def build_prompt(tokenizer, length: int, depth: float, key: str) -> tuple[list[int], int]:
    """Token ids of one prompt of at most ``length`` tokens, and where the needle starts."""
    intro, needle, question = encode(tokenizer, INTRO), encode(tokenizer, NEEDLE.format(key=key)), encode(tokenizer, QUESTION)
    units = [encode(tokenizer, s) for s in FILLER]
    budget = length - len(intro) - len(needle) - len(question)
    if budget < 0:
        raise AttnSwapError(f"passkey length {length} is too short: the prompt needs at least "
                            f"{length - budget} tokens without filler")
    filler: list[list[int]] = []
    used, i = 0, 0
    while used + len(units[i % len(units)]) <= budget:
        filler.append(units[i % len(units)])
        used += len(filler[-1])
        i += 1
    cut = round(depth * len(filler))
    before = [t for u in filler[:cut] for t in u]
    after = [t for u in filler[cut:] for t in u]
    ids = intro + before + needle + after + question
    return ids, len(intro) + len(before)


def leading_blanks(tokenizer, key_ids: Sequence[int]) -> int:
    """How many of the key's first tokens decode to whitespace only (never all of them)."""
    n = 0
    while n < len(key_ids) - 1 and not tokenizer.decode([key_ids[n]]).strip():
        n += 1
    return n


def key_forced(lm: LM, ids: Sequence[int], key_ids: Sequence[int], skip: int) -> list[bool]:
    """[every key token top-1 after the prompt ``ids``, the same for the key's tokens after its first
    ``skip``], by teacher forcing, in one scoring pass over the prompt and the key."""
    end = len(ids) + len(key_ids)
    return lm.predicts(list(ids) + list(key_ids), [(len(ids), end), (len(ids) + skip, end)])


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def run(lm: LM, tokenizer, *, lengths: Sequence[int], depths: Sequence[float], samples: int, seed: int = 0,
        label: str = "passkey") -> dict:
    """Accuracy per (length, depth) cell, per length, per depth and overall (fractions in [0, 1]);
    ``forced_accuracy`` / ``forced_by_length``: the key scored by teacher forcing."""
    grid: dict[str, dict[str, float]] = {}
    all_hits: list[bool] = []
    forced: dict[str, list[bool]] = {str(n): [] for n in lengths}
    digits: dict[str, list[bool]] = {str(n): [] for n in lengths}
    by_depth: dict[str, list[bool]] = {f"{d:g}": [] for d in depths}
    examples, misses = [], []
    loose: dict[str, list[bool]] = {str(n): [] for n in lengths}
    with progress_bar() as bar:
        task = bar.add_task(label, total=len(lengths) * len(depths) * samples)
        for n in lengths:
            row = {}
            for d in depths:
                hits = []
                for s in range(samples):
                    key = str(rng_for(seed, "passkey", n, d, s).randint(10000, 99999))
                    ids, _ = build_prompt(tokenizer, n, d, key)
                    key_ids = encode(tokenizer, " " + key)
                    strict_n = len(key_ids) + 3
                    new = lm.complete(ids, max(strict_n, LOOSE_TOKENS))  # greedy: its head is the strict answer
                    whole, after_blanks = key_forced(lm, ids, key_ids, leading_blanks(tokenizer, key_ids))
                    forced[str(n)].append(whole)
                    digits[str(n)].append(after_blanks)
                    answer, longer = (tokenizer.decode(t, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                                      for t in (new[:strict_n], new))
                    hits.append(first_number(answer) == key)
                    loose[str(n)].append(first_number(longer) == key)
                    if len(examples) < 3 and s == 0:
                        examples.append({"length": n, "depth": d, "key": key, "answer": answer.strip()[:40]})
                    if not hits[-1] and hits.count(False) == 1:  # the cell's first miss
                        misses.append({"length": n, "depth": d, "key": key, "answer": longer[:60]})
                    bar.update(task, advance=1)
                row[f"{d:g}"] = accuracy(hits)
                by_depth[f"{d:g}"] += hits
                all_hits += hits
            grid[str(n)] = row
    return {"accuracy": accuracy(all_hits), "samples": len(all_hits),
            "by_length": {n: sum(r.values()) / len(r) for n, r in grid.items()},
            "by_depth": {d: accuracy(h) for d, h in by_depth.items()}, "grid": grid, "examples": examples,
            "misses": misses, "loose_tokens": LOOSE_TOKENS,
            "loose_accuracy": accuracy([h for hs in loose.values() for h in hs]),
            "loose_by_length": {n: accuracy(h) for n, h in loose.items()},
            "forced_accuracy": accuracy([h for hs in forced.values() for h in hs]),
            "forced_by_length": {n: accuracy(h) for n, h in forced.items()},
            "forced_digits_accuracy": accuracy([h for hs in digits.values() for h in hs]),
            "forced_digits_by_length": {n: accuracy(h) for n, h in digits.items()}}
