"""`convert eval` as a regression gate: exit 0 (pass), 1 (regression), 2 (bad input); report files."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnswap.cli import app
from tests.conftest import tiny_model, tiny_tokenizer

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def conv_dir(tiny_dir, tmp_path_factory) -> Path:
    """A converted (untrained) tiny model with the same tokenizer as tiny_dir."""
    from attnswap.modeling import convert_model
    from attnswap.convert.swap import make_swap
    from attnswap.saving import save_converted

    tok = tiny_tokenizer()
    m = tiny_model("llama", vocab_size=len(tok))
    convert_model(m, [make_swap("lolcats", [0, 1, 2], {"window": 8}, m.config)], "tiny")
    out = tmp_path_factory.mktemp("conv") / "conv"
    save_converted(m, tok, out, overwrite=False)
    return out


FAST = ["--seq-len", 32, "--eval-tokens", 128, "--ppl-lengths", "32,64"]


def _refused(res, needle):
    text = res.output.strip()
    assert res.exit_code == 2, text
    assert needle in text, text
    assert len(text.splitlines()) == 1, text


def test_all_tasks_report_and_pass(conv_dir, tiny_dir, tiny_text, tmp_path):
    rd = tmp_path / "rep"
    res = _run("eval", conv_dir, "--baseline", tiny_dir, "--data", tiny_text, *FAST,
               "--tasks", "ppl,passkey,niah,mqar,speed", "--lengths", 256, "--depths", "0,1", "--samples", 1,
               "--mqar-pairs", "2,4", "--speed-lengths", "16,32", "--decode-tokens", 2, "--speed-repeats", 1,
               "--max-ppl-increase", "1000%", "--max-recall-drop", 100, "--report-dir", rd, "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert "PASS: all" in res.output
    files = {p.name for p in rd.iterdir()}
    assert files == {"report.json", "report.md", "ppl.png", "speed.png", "niah.png", "recall.png"}
    rep = json.loads((rd / "report.json").read_text())
    assert rep == json.loads((tmp_path / "r.json").read_text())
    assert set(rep["models"]["candidate"]["results"]) == {"ppl", "passkey", "niah", "mqar", "speed"}
    assert rep["models"]["candidate"]["results"]["niah"]["grid"]["256"].keys() == {"0", "1"}
    sp = rep["models"]["baseline"]["results"]["speed"]["by_length"]["32"]
    assert sp["prefill_tok_s"] > 0 and sp["cache_bytes"] > 0
    # the converted model's cache is a fixed-size state; the softmax baseline's grows with the context
    cs = rep["models"]["candidate"]["results"]["speed"]["by_length"]
    bs = rep["models"]["baseline"]["results"]["speed"]["by_length"]
    assert cs["16"]["cache_bytes"] == cs["32"]["cache_bytes"] and bs["16"]["cache_bytes"] < bs["32"]["cache_bytes"]
    md = (rd / "report.md").read_text()
    assert md.splitlines()[2].startswith("**PASS**") and "![" in md and "CPU is the only device" in md
    pk = rep["models"]["candidate"]["results"]["passkey"]
    assert set(pk["forced_by_length"]) == set(pk["forced_digits_by_length"]) == {"256"}
    assert "the key scored by teacher forcing" in md and "the key's digits by teacher forcing" in md


def test_regression_exits_1_against_saved_report(conv_dir, tiny_dir, tiny_text, tmp_path):
    rd = tmp_path / "teacher"
    res = _run("eval", tiny_dir, "--data", tiny_text, *FAST, "--tasks", "ppl,mqar", "--mqar-pairs", 2,
               "--samples", 1, "--report-dir", rd)
    assert res.exit_code == 0, res.output
    saved = json.loads((rd / "report.json").read_text())
    # pretend the teacher was much better than it is: the candidate now regresses on both checks
    cand = saved["models"]["candidate"]["results"]
    for v in cand["ppl"]["by_length"].values():
        v["ppl"] /= 2
    cand["mqar"]["accuracy"] = 1.0
    doctored = tmp_path / "base.json"
    doctored.write_text(json.dumps(saved))
    checks = tmp_path / "checks.toml"
    checks.write_text('max-ppl-increase = "5%"\nmax-recall-drop = 10\n')
    res = _run("eval", conv_dir, "--baseline-report", doctored, "--data", tiny_text, *FAST, "--tasks", "ppl,mqar",
               "--mqar-pairs", 2, "--samples", 1, "--checks", checks, "--report-dir", tmp_path / "out")
    assert res.exit_code == 1, res.output
    md = (tmp_path / "out" / "report.md").read_text()
    verdict = md.splitlines()[2]
    assert verdict.startswith("**FAIL**") and "perplexity @32 +" in verdict and "mqar accuracy dropped" in verdict
    assert "(limit +5%)" in verdict and "(limit 10)" in verdict
    # the flag overrides the file: a loose enough limit passes
    res = _run("eval", conv_dir, "--baseline-report", rd, "--data", tiny_text, *FAST, "--tasks", "ppl",
               "--max-ppl-increase", "1000", "--report-dir", tmp_path / "out2")
    assert res.exit_code == 0, res.output
    # settings that make the numbers incomparable are refused
    res = _run("eval", conv_dir, "--baseline-report", rd, "--data", tiny_text, "--seq-len", 32, "--eval-tokens", 64,
               "--ppl-lengths", "32,64", "--report-dir", tmp_path / "out3")
    _refused(res, "--eval-tokens is 64 here but 128 there")


def test_missing_model(tmp_path, tiny_dir):
    _refused(_run("eval", tmp_path / "nope", "--baseline", tiny_dir), "model path not found")


def test_tokenizer_mismatch_is_refused(tiny_dir, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["Completely different text for another vocabulary."] * 10,
                           trainers.BpeTrainer(vocab_size=280, special_tokens=["</s>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>")
    other = tmp_path / "other"
    tiny_model("llama", vocab_size=300).save_pretrained(other)
    tok.save_pretrained(other)
    _refused(_run("eval", other, "--baseline", tiny_dir, "--report-dir", tmp_path / "r"), "different tokenizers (vocabulary size")
    assert not (tmp_path / "r").exists()


def test_length_beyond_model_maximum(conv_dir, tiny_dir, tiny_text, tmp_path):
    _refused(_run("eval", conv_dir, "--baseline", tiny_dir, "--data", tiny_text, "--tasks", "passkey",
                  "--lengths", "256,4096", "--report-dir", tmp_path / "r"), "--lengths 4096 is beyond the maximum")
    _refused(_run("eval", conv_dir, "--data", tiny_text, "--ppl-lengths", "1024", "--seq-len", 32,
                  "--report-dir", tmp_path / "r"), "--ppl-lengths 1024 is beyond the maximum")


def test_empty_corpus(conv_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    _refused(_run("eval", conv_dir, "--data", tmp_path / "empty.txt", *FAST, "--report-dir", tmp_path / "r"), "holds no text")


@pytest.mark.parametrize("args,needle", [(["--tasks", "ppl,bogus"], "unknown task 'bogus'"),
                                         (["--max-recall-drop", "lots"], "must be a number"),
                                         (["--lengths", "1k"], "--lengths takes comma-separated integers"),
                                         (["--max-ppl-increase", "5"], "regression checks need something to compare with")])
def test_bad_options(conv_dir, tmp_path, args, needle):
    _refused(_run("eval", conv_dir, *args, "--report-dir", tmp_path / "r"), needle)
