"""attnswap/synthetic.py: retrieval-bearing rows are deterministic, keep their length and their own text,
state every fact before its question and far from it, and do not reuse the evaluations' templates."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tests.conftest import tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from attnswap import synthetic
from attnswap.cli import app
from attnswap.evals import mqar, niah, passkey


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def seqs(tok):
    """(n, 1024) token ids of real English text (the Python docs' topics)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics)[:40])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = min(40, len(ids) // 1024)
    assert n >= 20
    return torch.tensor(ids[: n * 1024]).view(n, 1024)


def test_same_seed_same_output_other_seed_other_output(seqs, tok):
    a = synthetic.mix_retrieval(seqs, tok, fraction=0.5, seed=3)
    b = synthetic.mix_retrieval(seqs, tok, fraction=0.5, seed=3)
    c = synthetic.mix_retrieval(seqs, tok, fraction=0.5, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == seqs.shape and a.dtype == seqs.dtype
    assert a.data_ptr() != seqs.data_ptr()


def test_fraction_zero_is_the_input(seqs, tok):
    before = seqs.clone()
    mix = synthetic.build_mix(seqs, tok, fraction=0.0, seed=0)
    assert torch.equal(mix.ids, seqs) and mix.rows == [] and torch.equal(seqs, before)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_the_fraction_of_rows_and_only_those_change(seqs, tok, fraction):
    mix = synthetic.build_mix(seqs, tok, fraction=fraction, seed=1)
    n = seqs.shape[0]
    assert len(mix.rows) == round(fraction * n) and mix.rows == sorted(set(mix.rows))
    changed = [i for i in range(n) if not torch.equal(mix.ids[i], seqs[i])]
    assert changed == mix.rows
    kinds = [mix.details[i].kind for i in mix.rows]
    assert abs(kinds.count("passkey") - kinds.count("kv")) <= 1  # both kinds, in turn


@pytest.mark.parametrize("kind", ["passkey", "kv"])
def test_answers_follow_their_facts_far_away(seqs, tok, kind):
    mix = synthetic.build_mix(seqs, tok, fraction=1.0, seed=2, kinds=(kind,))
    assert mix.rows == list(range(seqs.shape[0]))
    distances = []
    for i in mix.rows:
        d = mix.details[i]
        assert d.kind == kind and d.facts
        for f in d.facts:
            ids = mix.ids[i]
            stated = tok.decode(ids[f.fact[0] : f.fact[1]])
            assert f.value in stated and f.key.split("'")[0] in stated
            assert tok.decode(ids[f.answer[0] : f.answer[1]]).strip() == f.value
            assert f.question[0] <= f.answer[0] < f.answer[1] <= f.question[1]
            assert f.fact[1] <= f.question[0]  # stated before it is asked
            distances.append(f.question[0] - f.fact[1])
    assert min(distances) > 128  # a quarter of these rows or more: beyond a 128-token window
    assert max(distances) > 512  # and spread over the row
    if kind == "kv":  # several keys are queried per table
        assert max(len(mix.details[i].facts) for i in mix.rows) >= 3


def test_text_outside_the_insertions_is_the_rows_own(seqs, tok):
    mix = synthetic.build_mix(seqs, tok, fraction=1.0, seed=5)
    for i in mix.rows:
        d, row = mix.details[i], mix.ids[i].tolist()
        kept, prev = [], 0
        for a, b in d.inserted:
            assert prev <= a < b
            kept += row[prev:a]
            prev = b
        kept += row[prev:]
        assert len(kept) == d.text_tokens and kept == seqs[i, : d.text_tokens].tolist()
        assert sum(b - a for a, b in d.inserted) <= seqs.shape[1] // 3


def test_rows_too_short_for_an_insertion_stay_as_they_are(seqs, tok):
    short = seqs[:, :16].contiguous()
    mix = synthetic.build_mix(short, tok, fraction=1.0, seed=0)
    assert mix.rows == [] and torch.equal(mix.ids, short)


def test_bad_arguments(seqs, tok):
    for kw in ({"fraction": 1.5}, {"fraction": -0.1}, {"kinds": ()}, {"kinds": ("niah",)}):
        with pytest.raises(ValueError):
            synthetic.build_mix(seqs, tok, **{"fraction": 0.5, "seed": 0, **kw})
    with pytest.raises(ValueError):
        synthetic.build_mix(seqs[0], tok, fraction=0.5, seed=0)


def test_vocabularies_and_phrasings_differ_from_the_evaluations():
    ours = {w.lower() for w in synthetic.OWNERS + synthetic.CITIES}
    theirs = {w.lower() for w in niah.WORDS + mqar.KEYS}
    assert not ours & theirs
    templates = " ".join(synthetic.FACTS + synthetic.QUESTIONS + synthetic.HEADERS + synthetic.QUERIES).lower()
    for phrase in ("pass key", "magic number", "remember the number", "recall them", "remember it", "memorize"):
        assert phrase not in templates
    subjects = " ".join(synthetic.SUBJECTS).lower()
    assert not set(re.findall(r"[a-z]+", subjects)) & theirs
    assert "pass key" in (passkey.NEEDLE + passkey.QUESTION).lower()  # the phrase checked above is the eval's
    assert ":" not in "".join(synthetic.SEPARATORS)  # mqar's lines are "word: number"


# --- the command ---------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture(scope="module")
def mha_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("tiny-mha")
    tiny_model("llama", vocab_size=len(tok), num_attention_heads=8, num_key_value_heads=8).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _gqa(model, data, out, *extra):
    args = ["gqa", "--model", model, "--data", data, "--out", out, "--batch-size", 2, "--eval-tokens", 0,
            "--calib-batches", 1, "--kv-heads", 2, *extra]
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("extra,needle", [
    (["--retrieval-mix", 1.5], "--retrieval-mix must be at least 0 and below 1 (got 1.5)"),
    (["--retrieval-mix", 1], "--retrieval-mix must be at least 0 and below 1 (got 1)"),
    (["--retrieval-mix", -0.1], "--retrieval-mix must be at least 0 and below 1 (got -0.1)"),
    (["--retrieval-mix", 0.5, "--train", "none"], "--retrieval-mix does not apply to --train none"),
])
def test_gqa_refuses_bad_retrieval_mix(mha_dir, tiny_text, tmp_path, extra, needle):
    out = tmp_path / "o"
    res = _gqa(mha_dir, tiny_text, out, *extra)
    text = res.output.strip()
    assert res.exit_code == 2 and needle in text and len(text.splitlines()) == 1, text
    assert not out.exists()


def test_linearize_refuses_bad_retrieval_mix(tiny_dir, tiny_text, tmp_path):
    res = runner.invoke(app, ["linearize", "--model", str(tiny_dir), "--data", str(tiny_text), "--out", str(tmp_path / "o"),
                              "--retrieval-mix", "1.5"])
    text = res.output.strip()
    assert res.exit_code == 2 and "--retrieval-mix must be at least 0 and below 1" in text and len(text.splitlines()) == 1


def test_gqa_trains_on_the_mix_and_records_it(mha_dir, tiny_text, tmp_path):
    rep = tmp_path / "r.json"
    res = _gqa(mha_dir, tiny_text, tmp_path / "m", "--seq-len", 512, "--steps", 1, "--retrieval-mix", 0.5, "--json", rep,
               "--keep-checkpoints", "--save-every", 1)
    assert res.exit_code == 0, res.output
    r = json.loads(rep.read_text())
    assert r["retrieval_mix"] == 0.5 and r["retrieval_sequences"] == round(0.5 * r["training_sequences"]) > 0
    assert "retrieval sequences (--retrieval-mix)" in res.output
    # the checkpoint is bound to the mix: resuming with another one is refused
    res = _gqa(mha_dir, tiny_text, tmp_path / "m", "--seq-len", 512, "--steps", 1, "--retrieval-mix", 0.25, "--resume",
               "--checkpoint-dir", tmp_path / "m.ckpt", "--overwrite")
    assert res.exit_code == 2 and "different settings (retrieval_mix)" in res.output, res.output
