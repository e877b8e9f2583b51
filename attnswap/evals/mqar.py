"""Multi-query associative recall in context: a list of word -> number pairs, then queries.

Prompt for ``pairs`` pairs::

    Remember the number after each word.
    garden: 4821
    ...                      (pairs lines)
    Now recall them.
    violin: 3093             (queries: keys from the list in a new order, each with its true value)
    ...

Every query's value is scored by teacher forcing: it counts as recalled when greedy decoding after
"<key>:" (with the earlier queries answered correctly) would reproduce all of its tokens. One forward
pass per prompt scores all its queries. Accuracy is reported per number of pairs: a model whose
memory of the context is a fixed-size state loses pairs as the list grows past what it can hold.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import AttnSwapError
from ..progress import progress_bar
from .common import LM, accuracy, encode, rng_for

KEYS = ("apple", "river", "garden", "violin", "harbor", "lantern", "meadow", "copper", "falcon", "pepper",
        "island", "canyon", "marble", "thunder", "velvet", "orchid", "glacier", "compass", "saddle", "walnut",
        "candle", "basket", "mirror", "pencil", "jacket", "rocket", "dragon", "forest", "bridge", "castle",
        "engine", "hammer", "ladder", "magnet", "needle", "oyster", "parrot", "quartz", "rabbit", "salmon",
        "tunnel", "umbrella", "valley", "wagon", "yogurt", "zebra", "anchor", "bottle", "cactus", "donkey",
        "feather", "guitar", "helmet", "igloo", "jungle", "kettle", "lemon", "monkey", "napkin", "orange",
        "pillow", "quilt", "ribbon", "spider", "turtle", "violet", "window", "yacht", "acorn", "banjo",
        "cherry", "desert", "eagle", "fabric", "ginger", "honey", "ivory", "jewel", "koala", "lizard",
        "mango", "nickel", "olive", "panda", "radish", "silver", "tomato", "cobalt", "walrus", "badger",
        "cotton", "dolphin", "ember", "fossil", "gravel", "hazel", "indigo", "juniper", "kayak", "lotus",
        "maple", "nutmeg", "onion", "pebble", "raven", "sphinx", "tulip", "urchin", "vortex", "willow",
        "beacon", "cedar", "dune", "falls", "granite", "harp", "iris", "jade", "kiln", "lagoon")
HEADER = "Remember the number after each word.\n"
MIDDLE = "Now recall them.\n"


def build_prompt(tokenizer, pairs: int, queries: int, seed: int, sample: int) -> tuple[list[int], list[tuple[int, int]], list[tuple[str, str]]]:
    """Token ids, the (start, end) span of every queried value, and the pairs."""
    if pairs > len(KEYS):
        raise AttnSwapError(f"mqar supports at most {len(KEYS)} pairs (got {pairs})")
    r = rng_for(seed, "mqar", pairs, sample)
    keys = r.sample(KEYS, pairs)
    kv = [(k, str(r.randint(1000, 9999))) for k in keys]
    asked = r.sample(kv, min(queries, pairs))
    ids = encode(tokenizer, HEADER)
    newline = encode(tokenizer, "\n")

    def line(k: str, v: str) -> tuple[int, int]:
        ids.extend(encode(tokenizer, f"{k}:"))
        start = len(ids)
        ids.extend(encode(tokenizer, f" {v}"))
        end = len(ids)
        ids.extend(newline)
        return start, end

    for k, v in kv:
        line(k, v)
    ids.extend(encode(tokenizer, MIDDLE))
    spans = [line(k, v) for k, v in asked]
    return ids, spans, kv


def prompt_length(tokenizer, pairs: int, queries: int, seed: int = 0) -> int:
    return len(build_prompt(tokenizer, pairs, queries, seed, 0)[0])


def run(lm: LM, tokenizer, *, pairs: Sequence[int], samples: int, queries: int = 16, seed: int = 0,
        label: str = "mqar") -> dict:
    by_pairs: dict[str, float] = {}
    all_hits: list[bool] = []
    with progress_bar() as bar:
        task = bar.add_task(label, total=len(pairs) * samples)
        for p in pairs:
            hits: list[bool] = []
            for s in range(samples):
                ids, spans, _ = build_prompt(tokenizer, p, queries, seed, s)
                hits += lm.predicts(ids, spans)
                bar.update(task, advance=1)
            by_pairs[str(p)] = accuracy(hits)
            all_hits += hits
    # the headline weighs every list size the same (short lists have fewer queries)
    return {"accuracy": sum(by_pairs.values()) / len(by_pairs), "queries": len(all_hits), "by_pairs": by_pairs}
