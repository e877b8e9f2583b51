"""The CLI: every bad input gets one line, exit 2, and nothing under --out; a tiny run end to end."""

import json

import pytest
from typer.testing import CliRunner

from attnswap.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _assert_refused(res, out, needle):
    text = res.output.strip()
    assert res.exit_code == 2, text
    assert needle in text, text
    assert len(text.splitlines()) == 1, text
    assert not out.exists()


def _tiny_args(tiny_dir, tiny_text, out):
    return ["linearize", "--model", tiny_dir, "--data", tiny_text, "--out", out, "--seq-len", 32,
            "--batch-size", 2, "--eval-tokens", 128, "--window", 8]


def test_missing_model_path(tmp_path):
    out = tmp_path / "o"
    _assert_refused(_run("linearize", "--model", tmp_path / "nope", "--out", out), out, "model path not found")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "o"
    _assert_refused(_run("linearize", "--model", tmp_path / "gpt2", "--out", out), out, "unsupported architecture 'gpt2'")


@pytest.mark.parametrize("flag,value,needle", [("--steps", 0, "--steps must be at least 1"),
                                              ("--window", 0, "--window must be at least 1"),
                                              ("--steps", -3, "--steps must be at least 1")])
def test_bad_numbers(tiny_dir, tiny_text, tmp_path, flag, value, needle):
    out = tmp_path / "o"
    _assert_refused(_run(*_tiny_args(tiny_dir, tiny_text, out), flag, value), out, needle)


def test_seq_len_beyond_model_maximum(tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "o"
    _assert_refused(_run(*_tiny_args(tiny_dir, tiny_text, out), "--seq-len", 4096), out, "beyond the model's maximum of 512")


def test_empty_data_file(tiny_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    out = tmp_path / "o"
    _assert_refused(_run(*_tiny_args(tiny_dir, tmp_path / "empty.txt", out)), out, "holds no text")


def test_binary_data_file(tiny_dir, tmp_path):
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 10)
    out = tmp_path / "o"
    _assert_refused(_run(*_tiny_args(tiny_dir, tmp_path / "blob.txt", out)), out, "looks binary")


def test_existing_out_needs_overwrite(tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = _run(*_tiny_args(tiny_dir, tiny_text, out), "--steps", 2)
    assert res.exit_code == 2 and "already exists; pass --overwrite" in res.output
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_linearize_then_eval_tiny(tiny_dir, tiny_text, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "conv"
    res = _run(*_tiny_args(tiny_dir, tiny_text, out), "--steps", 4, "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["steps"] == {"transfer": 2, "lora": 2} and rep["tokens_seen"] == 4 * 2 * 32
    assert rep["retrieval_mix"] == 0.0 and rep["retrieval_sequences"] == 0  # the default without --exact-heads
    assert rep["teacher"]["ppl"] > 1 and rep["converted"]["ppl"] > 1
    assert "converted ppl" in res.output and "change" in res.output
    ph = rep["seconds"]  # where the wall time went, adding up to it
    assert set(ph) == {"loading", "evaluation", "training", "saving", "other"} and min(ph.values()) >= 0
    assert ph["training"] >= rep["train_seconds"] * 0.99 and ph["evaluation"] > 0 and ph["saving"] > 0
    assert sum(ph.values()) == pytest.approx(rep["wall_seconds"], abs=0.05)
    assert "time by phase" in res.output
    # start-up: this process's age when the clock started (pytest's, here), shown beside the phases
    assert rep["startup_seconds"] > 0 and "start-up" in res.output
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.attnswap["swaps"][0]["options"]["window"] == 8
    assert not any("lora" in k for k in m.state_dict())  # LoRA merged before saving
    assert not list(tmp_path.glob(".conv.tmp-*"))
    res = _run("eval", out, "--baseline", tiny_dir, "--data", tiny_text, "--seq-len", 32, "--eval-tokens", 128,
               "--json", tmp_path / "e.json")
    assert res.exit_code == 0, res.output
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["results"][str(out)]["ppl"] == pytest.approx(rep["converted"]["ppl"], rel=1e-4)
    assert ev["results"][str(tiny_dir)]["ppl"] == pytest.approx(rep["teacher"]["ppl"], rel=1e-4)


def test_linearize_lizard_tiny(tiny_dir, tiny_text, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "liz"
    res = _run(*_tiny_args(tiny_dir, tiny_text, out), "--attention", "lizard", "--meta-tokens", 2, "--steps", 3,
               "--layers", "0,2", "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    swap = AutoModelForCausalLM.from_pretrained(out).config.attnswap["swaps"][0]
    assert swap["method"] == "lizard" and swap["layers"] == [0, 2]
    assert swap["options"]["meta_tokens"] == 2 and swap["options"]["window"] == 8
    assert "covers every" not in res.output  # a window under the rows: no warning
    assert "sinks" not in swap["options"]  # lolcats-only flags do not leak into other methods


def test_window_over_the_training_rows_warns(tiny_dir, tiny_text, tmp_path):
    """A window as long as the training rows leaves the linear part without a training signal: the run
    goes on and says so. The later of two --window flags wins (as scripts/run.sh relies on)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "wide"
    res = _run(*_tiny_args(tiny_dir, tiny_text, out), "--window", 40, "--steps", 1)
    assert res.exit_code == 0, res.output
    assert "40-token window covers every 32-token training row" in " ".join(res.output.split())
    assert AutoModelForCausalLM.from_pretrained(out).config.attnswap["swaps"][0]["options"]["window"] == 40


def test_default_training_rows_by_method():
    """lolcats trains on rows of 4,096 by default, other methods on rows of 1,024; the batch fills 8,192
    tokens a step for any length; the model's maximum caps a default length, never a given one."""
    from attnswap.pipelines.linearize import default_rows

    assert default_rows("lolcats", None, None, 8192) == (4096, 2)
    assert default_rows("lizard", None, None, 8192) == (1024, 8)
    assert default_rows("lolcats", 2048, None, 8192) == (2048, 4)
    assert default_rows("lolcats", None, 3, 8192) == (4096, 3)
    assert default_rows("lolcats", None, None, 512) == (512, 16)
    assert default_rows("lolcats", 16384, None, None) == (16384, 1)


def test_default_rows_reach_the_run(tiny_dir, tiny_text, tmp_path):
    """Without --seq-len the run trains and reports the method's default rows (here capped by the tiny
    model's 512 positions) and fills the step from --batch-size's default."""
    import json

    args = ["linearize", "--model", tiny_dir, "--data", tiny_text, "--eval-tokens", 128, "--window", 8, "--steps", 1]
    res = _run(*args, "--out", tmp_path / "a", "--json", tmp_path / "a.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "a.json").read_text())
    assert (rep["seq_len"], rep["batch_size"]) == (512, 16)
    assert "16 x 512 tokens a step" in " ".join(res.output.split())  # the summary names the rows


def test_unknown_attention_method(tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "o"
    _assert_refused(_run(*_tiny_args(tiny_dir, tiny_text, out), "--attention", "mamba"), out,
                    "unknown attention method 'mamba'; available: lizard, lolcats")


def test_process_age_counts_from_the_process_start():
    """The start-up time a summary reports (pipelines/common.process_age) is the process's age: a child
    that sleeps 1.5 s before asking reads at least that, and not minutes."""
    import subprocess
    import sys

    code = "import time; time.sleep(1.5); from attnswap.pipelines.common import process_age; print(process_age())"
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 1.5 <= age < 30
