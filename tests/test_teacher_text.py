"""--teacher-text: rows the teacher samples itself replace a share of the rows training reads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tests.conftest import tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from attnswap import teacher_text as tt
from attnswap.cli import app
from attnswap.distill.train import Batches


@pytest.mark.parametrize("n,bs,world,steps", [(40, 4, 1, 6), (10, 4, 1, 7), (24, 2, 2, 5)])
def test_rows_read_are_the_rows_the_batches_hand_out(n, bs, world, steps):
    seqs = torch.arange(n).unsqueeze(1)
    seen = set()
    for rank in range(world):
        acc = SimpleNamespace(num_processes=world, process_index=rank, device="cpu")
        b = Batches(seqs, bs, 3, acc)
        for s in range(steps):
            seen |= set(b(s).flatten().tolist())
    assert tt.rows_read(n, bs, 3, steps, world).tolist() == sorted(seen)


def test_pick_rows_takes_the_asked_share_seeded():
    read = torch.arange(0, 200, 2)
    a, b, c = tt.pick_rows(read, 0.3, 1), tt.pick_rows(read, 0.3, 1), tt.pick_rows(read, 0.3, 2)
    assert a.numel() == 30 and torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.tolist()) <= set(read.tolist())


def test_pack_ends_every_document_with_eos_and_cuts_exact_rows():
    docs = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10, 11, 12])]
    rows = tt.pack(docs, 0, 2, 5)
    assert rows.tolist() == [[5, 6, 7, 0, 8], [0, 9, 10, 11, 12]]
    with pytest.raises(Exception, match="needed"):
        tt.pack(docs, 0, 3, 5)


def _forced(token: int):
    """A tiny model whose every next token is ``token`` (its logit dwarfs the rest)."""
    tok = tiny_tokenizer()
    m = tiny_model("llama", vocab_size=len(tok))
    push = torch.zeros(len(tok))
    push[token] = 1e4
    m.lm_head.register_forward_hook(lambda mod, inp, out: out + push)
    return m, tok


def test_teacher_rows_are_sampled_from_the_model_seeded_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSWAP_CACHE", str(tmp_path))
    tok = tiny_tokenizer()
    m = tiny_model("llama", vocab_size=len(tok))
    a = tt.teacher_rows(m, tok, 3, 16, seed=1, stamp="x", batch_size=2)
    assert a.shape == (3, 16) and int(a.min()) >= 0 and int(a.max()) < len(tok)
    assert len(list((tmp_path / "teacher-text").glob("*.safetensors"))) == 1

    def no_sampling(*a, **k):
        raise AssertionError("sampled again instead of reading the cache")

    monkeypatch.setattr(tt, "sample_documents", no_sampling)
    assert torch.equal(tt.teacher_rows(m, tok, 3, 16, seed=1, stamp="x", batch_size=2), a)
    monkeypatch.undo()
    monkeypatch.setenv("ATTNSWAP_CACHE", str(tmp_path / "fresh"))
    assert torch.equal(tt.teacher_rows(m, tok, 3, 16, seed=1, stamp="x", batch_size=2), a)  # deterministic
    assert not torch.equal(tt.teacher_rows(m, tok, 3, 16, seed=2, stamp="x", batch_size=2), a)

    forced, _ = _forced(7)
    rows = tt.teacher_rows(forced, tok, 2, 16, seed=1, stamp="y", batch_size=2)
    assert set(rows.flatten().tolist()) == {7, tok.eos_token_id}  # documents of 7s, each ended by EOS
    assert rows.flatten().tolist()[:17] == [7] * 16 + [tok.eos_token_id]


def test_mix_replaces_only_rows_that_training_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSWAP_CACHE", str(tmp_path))
    forced, tok = _forced(9)
    train = torch.full((50, 12), 3)
    out, chosen = tt.mix_teacher_text(train, forced, tok, 0.5, batch_size=2, steps=5, seed=0, stamp="z")
    read = tt.rows_read(50, 2, 0, 5)
    assert chosen.numel() == round(0.5 * read.numel()) and set(chosen.tolist()) <= set(read.tolist())
    changed = (out != train).any(1).nonzero().flatten()
    assert torch.equal(changed, chosen) and (train == 3).all()
    assert tt.mix_teacher_text(train, forced, tok, 0.0, batch_size=2, steps=5, seed=0, stamp="z")[0] is train


def test_gqa_reports_the_teacher_rows_and_refuses_a_bad_share(tmp_path, monkeypatch):
    from tests.test_gqa import MHA

    monkeypatch.setenv("ATTNSWAP_CACHE", str(tmp_path / "cache"))
    tok = tiny_tokenizer()
    d = tmp_path / "m"
    tiny_model("llama", vocab_size=len(tok), **MHA).save_pretrained(d)
    tok.save_pretrained(d)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"The quick brown fox {i} jumps over the lazy dog." for i in range(400)))
    base = ["gqa", "--model", d, "--data", text, "--seq-len", 32, "--batch-size", 2, "--eval-tokens", 128,
            "--calib-batches", 2, "--kv-heads", 2, "--steps", 3, "--train", "all"]
    run = CliRunner().invoke
    res = run(app, [str(a) for a in base + ["--out", tmp_path / "o", "--teacher-text", 0.5, "--json", tmp_path / "r.json"]])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["teacher_text"] == 0.5 and rep["teacher_sequences"] == 3  # 3 steps x 2 rows, all distinct here
    assert "teacher-written sequences" in res.output
    bad = run(app, [str(a) for a in base + ["--out", tmp_path / "p", "--teacher-text", 1]])
    assert bad.exit_code == 2 and "--teacher-text must be at least 0 and below 1" in bad.output
    assert not (tmp_path / "p").exists()
