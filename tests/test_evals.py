"""Recall tasks, perplexity by length/position, checks and the report (library level, tiny models)."""

import math
import re

import pytest
import torch

from attnswap.errors import AttnSwapError
from attnswap.evals import Checks, Report
from attnswap.evals import mqar, niah, passkey
from attnswap.evals.checks import evaluate
from attnswap.evals.common import HFModel, encode
from tests.conftest import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


class Oracle:
    """Reads the prompt back as text and answers from it: every task must score 100% with it."""

    def __init__(self, tok, window: int | None = None):
        self.tok, self.window = tok, window  # window: remember only the last N key-value lines

    def complete(self, ids, n):
        text = self.tok.decode(ids)
        m = re.search(r"pass key is (\d+)", text) or re.search(r"magic number for \w+ is (\d+)", text)
        return encode(self.tok, " " + (m.group(1) if m else "0") + ".")[:n]

    def predicts(self, ids, spans):
        out = []
        for s, e in spans:
            before = self.tok.decode(ids[:s])
            if passkey.QUESTION in before:  # passkey's key under teacher forcing
                m = re.search(r"pass key is (\d+)", before)
                out.append(m is not None and m.group(1) == self.tok.decode(ids[s:e]).strip())
                continue
            listed, _, asked = before.partition(mqar.MIDDLE)
            pairs = re.findall(r"^(\w+): (\d+)$", listed, re.M)
            if self.window is not None:
                pairs = pairs[-self.window:]
            key = asked.rsplit("\n", 1)[-1].removesuffix(":")
            out.append(dict(pairs).get(key) == self.tok.decode(ids[s:e]).strip())
        return out


class Guesser:
    """Knows nothing: always answers 12345 / says no span is predicted."""

    def __init__(self, tok):
        self.tok = tok

    def complete(self, ids, n):
        return encode(self.tok, " 12345")[:n]

    def predicts(self, ids, spans):
        return [False] * len(spans)


def test_passkey_prompt_length_and_depth(tok):
    starts = []
    for d in (0.0, 0.5, 1.0):
        ids, at = passkey.build_prompt(tok, 400, d, "48213")
        assert 400 - 20 <= len(ids) <= 400
        assert "The pass key is 48213" in tok.decode(ids)
        starts.append(at)
    assert starts[0] < starts[1] < starts[2]
    assert tok.decode(ids).endswith(passkey.QUESTION)
    with pytest.raises(AttnSwapError, match="too short"):
        passkey.build_prompt(tok, 50, 0.5, "48213")


def test_passkey_oracle_passes_guesser_fails(tok):
    kw = dict(lengths=[300, 400], depths=[0, 0.5, 1], samples=2, seed=3)
    good = passkey.run(Oracle(tok), tok, **kw)
    bad = passkey.run(Guesser(tok), tok, **kw)
    assert good["accuracy"] == 1.0 and good["samples"] == 12
    assert bad["accuracy"] == 0.0
    assert good["forced_accuracy"] == 1.0 and good["forced_by_length"] == {"300": 1.0, "400": 1.0}
    assert bad["forced_accuracy"] == 0.0
    assert set(good["grid"]) == {"300", "400"} and set(good["grid"]["300"]) == {"0", "0.5", "1"}
    assert passkey.run(Oracle(tok), tok, **kw) == good  # seeded: the same prompts again


def test_niah_uses_real_text_and_sentence_boundaries(tok):
    text = " ".join(f"Sentence number {i} talks about linear attention." for i in range(400))
    hay = encode(tok, text)
    ids, at = niah.build_prompt(tok, hay, 300, 0.5, "apple", "1234567", 17)
    assert len(ids) <= 300
    decoded = tok.decode(ids)
    assert "special magic number for apple is 1234567" in decoded
    assert tok.decode(ids[:at]).rstrip().endswith(".")  # the needle follows a sentence end
    assert tok.decode(hay[17:17 + 20]) in decoded  # the haystack is the given text, from the offset
    held = torch.tensor(hay)
    kw = dict(lengths=[256, 320], depths=[0, 0.5, 1], samples=1, seed=0)
    assert niah.run(Oracle(tok), tok, held, **kw)["accuracy"] == 1.0
    assert niah.run(Guesser(tok), tok, held, **kw)["accuracy"] == 0.0
    with pytest.raises(AttnSwapError, match="fewer than the NIAH length"):
        niah.run(Oracle(tok), tok, held[:100], **kw)


def test_mqar_accuracy_falls_when_memory_is_short(tok):
    full = mqar.run(Oracle(tok), tok, pairs=[4, 16, 32], samples=2, queries=8)
    assert full["accuracy"] == 1.0 and full["queries"] == 2 * (4 + 8 + 8)
    short = mqar.run(Oracle(tok, window=4), tok, pairs=[4, 16, 32], samples=2, queries=8)
    assert short["by_pairs"]["4"] == 1.0
    assert short["by_pairs"]["32"] < 0.5
    assert mqar.run(Guesser(tok), tok, pairs=[4], samples=1)["accuracy"] == 0.0


def test_hf_adapter_predicts_agrees_with_greedy_completion(tok):
    m = tiny_model("llama", vocab_size=len(tok))
    lm = HFModel(m)
    ids = encode(tok, "The quick brown fox jumps over the lazy dog. Linear attention keeps a running state.")
    greedy = lm.complete(ids[:10], 6)
    seq = ids[:10] + greedy
    assert lm.predicts(seq, [(10, 16), (12, 14)]) == [True, True]
    wrong = seq[:12] + [(seq[12] + 1) % len(tok)] + seq[13:]
    assert lm.predicts(wrong, [(10, 16)]) == [False]
    steps = list(lm.greedy_steps(ids[:10], 6))  # complete's tokens, with the logits each came from
    assert [t for t, _ in steps] == greedy and all(int(lg.argmax()) == t for t, lg in steps)
    assert HFModel(m, eos_token_id=greedy[1]).complete(ids[:10], 6) == greedy[: greedy.index(greedy[1]) + 1]


def test_perplexity_at_lengths_matches_perplexity():
    from attnswap.evals.perplexity import perplexity, perplexity_at_lengths, position_buckets

    m = tiny_model("llama")
    ids = torch.randint(0, 300, (2048,), generator=torch.Generator().manual_seed(0))
    r = perplexity_at_lengths(m, ids, [64, 256], eval_tokens=512, batch_size=2)
    ref = perplexity(m, ids[:512].view(-1, 64))
    assert r["by_length"]["64"]["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)
    assert r["by_length"]["256"]["windows"] == 2
    assert [(b["from"], b["to"]) for b in r["by_position"]["buckets"]] == [(1, 64), (64, 128), (128, 256)]
    assert position_buckets(40) == [(1, 40)]
    with pytest.raises(AttnSwapError, match="fewer than one 4096-token window"):
        perplexity_at_lengths(m, ids, [4096], eval_tokens=512)


def _results(ppl=10.0, acc=1.0, tok_s=100.0):
    return {"ppl": {"by_length": {"256": {"ppl": ppl}, "1024": {"ppl": ppl * 1.1}},
                    "by_position": {"length": 1024, "buckets": [{"from": 1, "to": 64, "ppl": ppl}]}},
            "passkey": {"accuracy": acc, "by_length": {"256": acc}, "by_depth": {"0": acc}},
            "mqar": {"accuracy": acc, "by_pairs": {"4": acc}},
            "speed": {"device": "cpu", "exact_memory": False, "decode_tokens": 4, "memory_method": "x",
                      "by_length": {"256": {"prefill_tok_s": tok_s, "decode_tok_s": tok_s / 10, "cache_bytes": 2**20,
                                            "peak_memory_bytes": 0}}}}


def test_checks_pass_and_fail():
    base = _results()
    ok = evaluate(Checks(max_ppl_increase="5%", max_recall_drop=10), _results(ppl=10.4, acc=0.95), base)
    assert [c.status for c in ok] == ["pass"] * 4
    bad = evaluate(Checks(max_ppl_increase=5, max_recall_drop="10", max_speed_drop="20%", max_memory_increase=5),
                   _results(ppl=11.0, acc=0.5, tok_s=50), base)
    status = {c.metric: c.status for c in bad}
    assert status["perplexity @256"] == "fail" and status["passkey accuracy"] == "fail"
    assert status["prefill tokens/s @256"] == "fail" and status["peak memory"] == "n/a"  # CPU: not measured exactly
    drop = next(c for c in bad if c.metric == "passkey accuracy")
    assert drop.change == pytest.approx(-50.0) and "dropped 50.0 points (limit 10)" in drop.describe()
    with pytest.raises(AttnSwapError, match="must be a number"):
        Checks(max_ppl_increase="five")


def test_checks_toml(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('max-ppl-increase = "5%"\nmax_recall_drop = 10\n')
    c = Checks.from_toml(f)
    assert (c.max_ppl_increase, c.max_recall_drop, c.max_speed_drop) == (5.0, 10.0, None)
    assert c.override(Checks(max_recall_drop=3)).max_recall_drop == 3.0
    f.write_text("max-ppl = 5\n")
    with pytest.raises(AttnSwapError, match="unknown check 'max-ppl'"):
        Checks.from_toml(f)
    f.write_text("max-ppl-increase = [\n")
    with pytest.raises(AttnSwapError, match="not valid TOML"):
        Checks.from_toml(f)


def test_report_markdown_and_json_roundtrip(tmp_path):
    cand = {"name": "cand", "tokenizer": {}, "results": _results(ppl=12.0, acc=0.5), "seconds": 1.0}
    base = {"name": "base", "tokenizer": {}, "results": _results(), "seconds": 1.0}
    rep = Report(cand, base, {"seq_len": 256, "data": "d", "tasks": ["ppl", "passkey", "mqar", "speed"]},
                 environment={"device": "cpu", "notes": ["CPU is the only device"]})
    rep.checks = evaluate(Checks(max_ppl_increase=5, max_recall_drop=10), cand["results"], base["results"])
    assert not rep.passed
    md = rep.to_markdown()
    first = md.splitlines()[2]
    assert first.startswith("**FAIL**") and "perplexity @256 +20.00% (limit +5%)" in first
    assert "| perplexity @256 | 10.000 | 12.000 | +20.00% | **FAIL** (limit +5%) |" in md
    assert "| passkey accuracy | 100.0% | 50.0% | -50.0 pts | **FAIL** (limit -10 pts) |" in md
    out = rep.write(tmp_path / "rep")
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "ppl.png", "speed.png", "recall.png"}
    assert "![" in (out / "report.md").read_text()
    back = Report.load(out)
    assert back.verdict() == rep.verdict() and back.to_dict()["results"]["cand"]["ppl"] == 12.0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(AttnSwapError, match="not an eval report directory"):
        rep.write(tmp_path / "mine")


def test_compare_in_memory_models(tok):
    from attnswap.evals import compare

    a, b = tiny_model("llama", vocab_size=len(tok)), tiny_model("llama", seed=1, vocab_size=len(tok))
    text = "\n\n".join(f"Document {i}. The quick brown fox jumps over the lazy dog {i} times." for i in range(60))
    data = __import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "d.txt"
    data.write_text(text)
    rep = compare((a, tok, "a"), (b, tok, "b"), Checks(max_ppl_increase=1000), tasks="ppl,mqar", data=str(data),
                  seq_len=32, ppl_lengths=[32, 64], eval_tokens=128, mqar_pairs=[2], samples=1)
    assert rep.passed and rep.verdict().startswith("PASS: all 2 checks passed")
    assert set(rep.candidate["results"]) == {"ppl", "mqar"}
    assert math.isfinite(rep.candidate["results"]["ppl"]["by_length"]["64"]["ppl"])


class Decodes:
    """Holds the key (teacher forcing finds it) but decodes filler: the case the forced score separates."""

    def __init__(self, tok):
        self.tok = tok

    def complete(self, ids, n):
        return encode(self.tok, " the sun.")[:n]

    def predicts(self, ids, spans):
        return Oracle(self.tok).predicts(ids, spans)


def test_passkey_forced_score_separates_holding_the_key_from_decoding_it(tok):
    r = passkey.run(Decodes(tok), tok, lengths=[300], depths=[0, 1], samples=2, seed=1)
    assert r["accuracy"] == 0.0 and r["forced_accuracy"] == 1.0


class Answers:
    """Holds the key but would begin with " a": misses each key's first (space) token, predicts the rest."""

    def __init__(self, tok):
        self.tok = tok

    def complete(self, ids, n):
        return encode(self.tok, " a number.")[:n]

    def predicts(self, ids, spans):
        start = min(s for s, _ in spans)  # the key starts at the earliest span
        return [s > start and hit for (s, _), hit in zip(spans, Oracle(self.tok).predicts(ids, spans))]


class _Blanks:
    def decode(self, ids):
        return {0: " ", 1: "\t", 2: "4", 3: " 7"}[ids[0]]


def test_leading_blanks_counts_whitespace_tokens_before_the_digits():
    assert passkey.leading_blanks(_Blanks(), [0, 2, 2]) == 1
    assert passkey.leading_blanks(_Blanks(), [0, 1, 3]) == 2
    assert passkey.leading_blanks(_Blanks(), [3, 2]) == 0
    assert passkey.leading_blanks(_Blanks(), [0]) == 0  # never the whole key


def test_passkey_digits_score_tells_a_choice_of_format_from_a_lost_key(tok):
    """The tiny tokenizer, like SmolLM2's, splits " 48213" into a space and one token a digit (it never saw
    digits). A model that misses only the leading space scores 0 forced and 100% on the digits; the oracle
    scores 100% on both, the guesser 0."""
    key_ids = encode(tok, " 48213")
    assert passkey.leading_blanks(tok, key_ids) == 1 and len(key_ids) == 6
    kw = dict(lengths=[300], depths=[0, 1], samples=2, seed=1)
    r = passkey.run(Answers(tok), tok, **kw)
    assert r["forced_accuracy"] == 0.0 and r["forced_digits_accuracy"] == 1.0
    assert r["forced_digits_by_length"] == {"300": 1.0}
    good = passkey.run(Oracle(tok), tok, **kw)
    assert good["forced_accuracy"] == 1.0 and good["forced_digits_accuracy"] == 1.0
    assert passkey.run(Guesser(tok), tok, **kw)["forced_digits_accuracy"] == 0.0


class Restater(Oracle):
    """Knows the key but says " it is" first: the strict answer (the key's length + 3 tokens) ends
    inside the key, a longer one holds it whole."""

    def complete(self, ids, n):
        m = re.search(r"pass key is (\d+)", self.tok.decode(ids))
        return encode(self.tok, " it is " + m.group(1) + ".")[:n]


def test_passkey_loose_score_reads_a_longer_answer_and_misses_are_kept(tok):
    kw = dict(lengths=[300, 400], depths=[0, 1], samples=2, seed=3)
    late = passkey.run(Restater(tok), tok, **kw)
    assert late["accuracy"] == 0.0 and late["loose_accuracy"] == 1.0
    assert late["loose_by_length"] == {"300": 1.0, "400": 1.0} and late["loose_tokens"] == passkey.LOOSE_TOKENS
    cells = [(m["length"], m["depth"]) for m in late["misses"]]  # one a cell: each cell's first miss
    assert sorted(cells) == [(300, 0), (300, 1), (400, 0), (400, 1)]
    assert all(m["answer"].startswith(" it is " + m["key"]) for m in late["misses"])
    good, bad = passkey.run(Oracle(tok), tok, **kw), passkey.run(Guesser(tok), tok, **kw)
    assert good["accuracy"] == good["loose_accuracy"] == 1.0 and good["misses"] == []
    assert bad["loose_accuracy"] == 0.0 and len(bad["misses"]) == 4


def test_passkey_forced_score_on_a_real_model_scores_the_keys_tokens(tok):
    """HFModel.predicts on the prompt plus the key reads the logits one position before each key token
    (an off-by-one here would score the question's last word or the key's second token instead)."""
    m = tiny_model()
    ids, _ = passkey.build_prompt(tok, 300, 0.5, "48213")
    key_ids = encode(tok, " 48213")
    lm = HFModel(m)
    with torch.no_grad():
        logits = m(torch.tensor([ids + key_ids])).logits[0]
    want = all(int(logits[len(ids) - 1 + i].argmax()) == t for i, t in enumerate(key_ids))
    assert lm.predicts(ids + key_ids, [(len(ids), len(ids) + len(key_ids))]) == [want]
