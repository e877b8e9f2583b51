"""Retrieval-bearing training sequences: real text with facts stated early and asked for later.

``mix_retrieval(seqs, tokenizer, fraction=..., seed=...)`` takes (n, L) token ids of real text and
rewrites a seeded ``fraction`` of the rows. A rewritten row is its own text, cut short to make room,
with insertions at random depths:

- ``passkey``: one to three facts such as " Amara's locker code is 40712." stated in the first half of
  the text, and for each, further on, a question followed by its answer
  (" Question: what is Amara's locker code? Answer: 40712.").
- ``kv``: a small table of key -> value lines (" Index of shelf numbers:\\nLisbon -> 3391\\n...")
  stated early, and further on a block that queries several of its keys again, each followed by its
  value ("Lisbon -> 3391").

Teacher-forced distillation on those answer tokens needs the fact, which lies a quarter of the row
or more behind (the distance is drawn anew per insertion, from that minimum up to the whole row):
in the default 1,024-token rows, at or beyond the default 256-token sliding window. Insertions land on sentence or line ends of the text
where one is near. Rows keep exactly L tokens; rows too short to hold the smallest insertion
(it may take at most a third of the row) are left as they are, and ``build_mix`` says which rows
were rewritten. Everything depends only on the inputs and ``seed``: the rows chosen, their kinds,
keys, values and depths.

Different from the evaluations on purpose. ``attnswap/evals/`` asks for "the pass key" in
grass-and-sky filler (passkey.py), for "the special magic number for <word>" (niah.py), and for
"word: number" lines after "Remember the number after each word." (mqar.py), with common nouns
("apple", "river", "garden", ...) as keys. Here the subjects are codes, references and numbers
(locker code, booking reference, ...), the owners and keys are given names and city names that
appear in none of the evaluation word lists, the pairs use "->", "=" or "=>" rather than ":", and every
kind has several phrasings. An evaluation that improves after training on this mix measures
transferred retrieval, not a memorised template (``tests/test_synthetic.py`` checks that the
vocabularies and key phrases do not overlap).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

KINDS = ("passkey", "kv")

OWNERS = ("Amara", "Bjorn", "Chiara", "Dmitri", "Esme", "Farid", "Greta", "Hiroshi", "Ines", "Jonas", "Kofi",
          "Leila", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tamsin", "Ugo", "Vera",
          "Wendell", "Ximena", "Yusuf", "Zofia", "Anselm", "Beatrix", "Cyrus", "Dagny", "Elif", "Florin")
CITIES = ("Lisbon", "Oslo", "Nairobi", "Quito", "Hanoi", "Tbilisi", "Porto", "Dakar", "Lima", "Riga", "Osaka",
          "Tunis", "Bergen", "Cusco", "Zagreb", "Perth", "Malmo", "Accra", "Kyoto", "Sofia", "Tallinn", "Havana",
          "Bogota", "Cairo", "Dublin", "Gdansk", "Harare", "Izmir", "Jaipur", "Kazan", "Leeds", "Minsk", "Nantes",
          "Odessa", "Poznan", "Recife", "Seville", "Turin", "Utrecht", "Valencia", "Warsaw", "Yerevan", "Zurich")
SUBJECTS = ("locker code", "vault combination", "badge number", "archive access code", "parcel tracking number",
            "booking reference", "room code", "account PIN", "ticket number", "serial number", "membership ID",
            "gate code")
# passkey facts and their questions; the question's answer (" <value>") follows the text, then ENDS
FACTS = (" {owner}'s {subject} is {value}.",
         " For the record, the {subject} of {owner} is {value}.",
         " ({owner} wrote down the {subject}, {value}, on a card.)",
         " Note: {owner} was given {subject} {value}.")
QUESTIONS = (" Question: what is {owner}'s {subject}? Answer:",
             " Earlier the text gave {owner}'s {subject}; it was",
             " Recall the {subject} of {owner}:",
             " So the {subject} that {owner} has is")
# key -> value tables and their queries
TABLES = ("depot codes", "extension numbers", "shelf numbers", "route numbers", "batch numbers", "postal codes")
HEADERS = ("\nIndex of {what}:\n", "\nReference table ({what}):\n", "\nLookup list, {what}:\n")
QUERIES = ("\nLooking entries up again:\n", "\nFrom the table above:\n", "\nChecking the {what} listed earlier:\n")
SEPARATORS = (" ->", " =", " =>")
SNAP = 48  # how far an insertion may move to land on a sentence or line end


@dataclass
class Fact:
    """One retrievable fact in a rewritten row: token spans [start, end) in the output row."""

    kind: str
    key: str
    value: str
    fact: tuple[int, int]  # where it is stated
    question: tuple[int, int]  # the question or query line, its answer included
    answer: tuple[int, int]  # the answer's tokens (inside ``question``)


@dataclass
class Row:
    kind: str
    facts: list[Fact] = field(default_factory=list)
    inserted: list[tuple[int, int]] = field(default_factory=list)  # every inserted span, in order
    text_tokens: int = 0  # how many tokens of the row's own text were kept (its first ones)


@dataclass
class Mix:
    ids: torch.Tensor  # (n, L), the mixed sequences
    rows: list[int]  # the rewritten rows, ascending
    details: dict[int, Row]  # what was inserted where, per rewritten row


class _Encoder:
    def __init__(self, tokenizer):
        self.tok, self.cache, self.ends_cache = tokenizer, {}, {}

    def __call__(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = list(self.tok(text, add_special_tokens=False)["input_ids"])
        return self.cache[text]

    def ends(self, t: int) -> bool:
        """Whether token ``t`` ends a sentence or a line (or a document)."""
        if t not in self.ends_cache:
            s = self.tok.decode([t], clean_up_tokenization_spaces=False)
            self.ends_cache[t] = s.rstrip(" ").endswith((".", "!", "?", "\n")) or t == self.tok.eos_token_id
        return self.ends_cache[t]


class _Segment:
    """Token ids of one insertion, built from text pieces; remembers the spans of tagged pieces."""

    def __init__(self):
        self.ids: list[int] = []
        self.spans: dict[str, tuple[int, int]] = {}

    def add(self, enc: _Encoder, text: str, tag: str | None = None) -> None:
        start = len(self.ids)
        self.ids += enc(text)
        if tag is not None:
            self.spans[tag] = (start, len(self.ids))


def _value(r: random.Random, digits: tuple[int, int], codes: float = 0.0) -> str:
    if r.random() < codes:  # a letters-and-digits code, e.g. RX4417
        return "".join(r.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(2)) + str(r.randint(100, 9999))
    n = r.randint(*digits)
    return str(r.randint(10 ** (n - 1), 10**n - 1))


def _passkey_plan(r: random.Random, enc: _Encoder, budget: int):
    """[(fact segment, question segment, key, value)] of one to three facts fitting in ``budget``."""
    pairs = r.sample([(o, s) for o in OWNERS for s in SUBJECTS], 3)
    items = []
    for owner, subject in pairs:
        value = _value(r, (4, 8), codes=0.3)
        fact, q = _Segment(), _Segment()
        fact.add(enc, r.choice(FACTS).format(owner=owner, subject=subject, value=value), "fact")
        q.add(enc, r.choice(QUESTIONS).format(owner=owner, subject=subject))
        q.add(enc, f" {value}", "answer")
        q.add(enc, ".")
        items.append((fact, q, f"{owner}'s {subject}", value))
    n = r.randint(1, 3)
    while n > 0 and sum(len(f.ids) + len(q.ids) for f, q, _, _ in items[:n]) > budget:
        n -= 1
    return items[:n]


def _kv_plan(r: random.Random, enc: _Encoder, budget: int):
    """(table segment, query segment, [(key, value)], queried keys) fitting in ``budget``, or None."""
    what, sep = r.choice(TABLES), r.choice(SEPARATORS)
    header, query = r.choice(HEADERS).format(what=what), r.choice(QUERIES).format(what=what)
    digits = r.randint(3, 6)
    keys = r.sample(OWNERS + CITIES if r.random() < 0.3 else CITIES, 16)
    pairs = [(k, _value(r, (digits, digits))) for k in keys]
    m = r.randint(4, 16)
    while m >= 2:
        asked = r.sample(range(m), r.randint(2, min(m, 6)))
        table, q = _Segment(), _Segment()
        table.add(enc, header)
        for i, (k, v) in enumerate(pairs[:m]):
            table.add(enc, f"{k}{sep} {v}\n", f"pair{i}")
        q.add(enc, query)
        for i in asked:
            q.add(enc, f"{pairs[i][0]}{sep}", f"line{i}")
            q.add(enc, f" {pairs[i][1]}", f"answer{i}")
            q.add(enc, "\n", f"end{i}")
        if len(table.ids) + len(q.ids) <= budget:
            return table, q, pairs[:m], asked
        m -= 1
    return None


def _snap(text: list[int], at: int, enc: _Encoder, forward: bool) -> int:
    """Move ``at`` (an insertion point in ``text``) to the nearest sentence/line end within SNAP tokens."""
    if at <= 0 or at >= len(text):
        return at
    steps = range(at, min(len(text), at + SNAP) + 1) if forward else range(at, max(0, at - SNAP), -1)
    for j in steps:
        if j == len(text) or enc.ends(text[j - 1]):
            return j
    return at


def _rewrite(row: list[int], kind: str, r: random.Random, enc: _Encoder) -> tuple[list[int], Row] | None:
    L = len(row)
    budget = L // 3
    # (fact segment, question segment, facts to record) per group; a group is one fact and its question
    # for passkey, the whole table and its query block for kv
    groups = []
    if kind == "passkey":
        for fact, q, key, value in _passkey_plan(r, enc, budget):
            groups.append((fact, q, [("fact", "answer", key, value, (0, len(q.ids)))]))
    else:
        plan = _kv_plan(r, enc, budget)
        if plan is not None:
            table, q, pairs, asked = plan
            recs = []
            for i in asked:
                line = (q.spans[f"line{i}"][0], q.spans[f"end{i}"][1])
                recs.append((f"pair{i}", f"answer{i}", pairs[i][0], pairs[i][1], line))
            groups.append((table, q, recs))
    if not groups:
        return None
    used = sum(len(a.ids) + len(b.ids) for a, b, _ in groups)
    text = row[: L - used]
    T = len(text)
    gap = max(1, T // 4)
    # insertion points in the kept text: facts in its first half, each question at least ``gap`` later
    placed = []  # (position in text, order, segment, group index, is question)
    for g, (fact, q, _) in enumerate(groups):
        a = _snap(text, r.randint(0, T // 2), enc, forward=False)
        b = _snap(text, r.randint(min(T, a + gap), T), enc, forward=True)
        placed += [(a, 2 * g, fact, g, False), (b, 2 * g + 1, q, g, True)]
    placed.sort(key=lambda p: (p[0], p[1]))
    out: list[int] = []
    info = Row(kind=kind, text_tokens=T)
    starts: dict[tuple[int, bool], int] = {}
    prev = 0
    for at, _, seg, g, is_q in placed:
        out += text[prev:at]
        prev = at
        starts[(g, is_q)] = len(out)
        info.inserted.append((len(out), len(out) + len(seg.ids)))
        out += seg.ids
    out += text[prev:]
    assert len(out) == L
    for g, (fact, q, recs) in enumerate(groups):
        f0, q0 = starts[(g, False)], starts[(g, True)]
        for fact_tag, answer_tag, key, value, qspan in recs:
            fs, fe = fact.spans[fact_tag]
            an_s, an_e = q.spans[answer_tag]
            info.facts.append(Fact(kind, key, value, (f0 + fs, f0 + fe), (q0 + qspan[0], q0 + qspan[1]),
                                   (q0 + an_s, q0 + an_e)))
    info.facts.sort(key=lambda f: f.question)
    return out, info


def build_mix(seqs: torch.Tensor, tokenizer, *, fraction: float, seed: int, kinds=KINDS) -> Mix:
    """``mix_retrieval`` with its record: which rows were rewritten, and where every fact, question and
    answer is."""
    if seqs.dim() != 2:
        raise ValueError(f"expected (n, L) token ids, got shape {tuple(seqs.shape)}")
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1] (got {fraction})")
    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty selection of {KINDS} (got {kinds})")
    n = seqs.shape[0]
    chosen = random.Random(f"attnswap.synthetic/{seed}/rows/{n}").sample(range(n), round(fraction * n))
    out = seqs.clone()
    details: dict[int, Row] = {}
    if not chosen:
        return Mix(out, [], details)
    enc = _Encoder(tokenizer)
    for j, i in enumerate(chosen):
        kind = kinds[j % len(kinds)]
        done = _rewrite(seqs[i].tolist(), kind, random.Random(f"attnswap.synthetic/{seed}/row/{i}/{kind}"), enc)
        if done is not None:
            out[i] = torch.tensor(done[0], dtype=seqs.dtype)
            details[i] = done[1]
    return Mix(out, sorted(details), details)


def mix_retrieval(seqs: torch.Tensor, tokenizer, *, fraction: float, seed: int, kinds=KINDS) -> torch.Tensor:
    """A copy of ``seqs`` ((n, L) token ids of real text) whose seeded ``fraction`` of rows carry
    passkey facts and key -> value tables stated early and asked for later, answers included (see the
    module's docstring). Same inputs and seed, same output; fraction 0 returns the rows unchanged."""
    return build_mix(seqs, tokenizer, fraction=fraction, seed=seed, kinds=kinds).ids
