"""`convert sparsify`: a tiny run end to end (save, load both ways, load-time sparsity), resume to the
same gates, and bad input refused in one line before any work."""

import json

import pytest
import torch
from typer.testing import CliRunner

from attnswap.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _args(tiny_dir, tiny_text, out, *extra):
    return ["sparsify", "--model", tiny_dir, "--data", tiny_text, "--out", out, "--seq-len", 64, "--block", 16,
            "--gate-dim", 8, "--eval-tokens", 128, "--sparsity", 0.5, *extra]


def test_sparsify_end_to_end(tiny_dir, tiny_text, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sparse"
    res = _run(*_args(tiny_dir, tiny_text, out, "--steps", 3, "--json", tmp_path / "r.json"))
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["method"] == "seer" and rep["layers"] == [0, 1, 2] and set(rep["density"]) == {"0", "1", "2"}
    assert {"loading", "evaluation", "training", "saving", "other"} == set(rep["seconds"]) and "time by phase" in res.output
    assert not (tmp_path / "sparse.ckpt").exists()
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.attnswap["swaps"][0]["options"]["sparsity"] == 0.5
    dense = AutoModelForCausalLM.from_pretrained(out, sparsity=0.0)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ids = torch.randint(0, 200, (1, 48))
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)
    assert m.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 52)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(remote).__name__ == "AttnSwapLlamaForCausalLM"


def test_interrupted_sparsify_resumes_to_the_same_gates(tiny_dir, tiny_text, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    full = tmp_path / "full"
    assert _run(*_args(tiny_dir, tiny_text, full, "--steps", 4, "--eval-tokens", 64)).exit_code == 0
    part = tmp_path / "part"
    import attnswap.distill.checkpoint as ck

    calls = {"n": 0}
    orig = ck.StageRun.step_done

    def stop_after_two(self, done):
        orig(self, done)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ck.StageRun, "step_done", stop_after_two)
    res = _run(*_args(tiny_dir, tiny_text, part, "--steps", 4, "--eval-tokens", 64, "--save-every", 1))
    assert res.exit_code != 0 and not part.exists()
    monkeypatch.setattr(ck.StageRun, "step_done", orig)
    res = _run(*_args(tiny_dir, tiny_text, part, "--steps", 4, "--eval-tokens", 64, "--save-every", 1, "--resume"))
    assert res.exit_code == 0, res.output
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flag,value,needle", [
    ("--sparsity", 1.0, "--sparsity must be in [0, 1)"), ("--sparsity", -0.1, "--sparsity must be in [0, 1)"),
    ("--threshold", 2, "--threshold must be in [0, 1]"), ("--token-budget", -1, "--token-budget must not be negative"),
    ("--block", 0, "--block must be at least 1"), ("--gate-dim", 7, "--gate-dim must be even"),
    ("--method", "nope", "unknown --method 'nope'"), ("--steps", 0, "--steps must be at least 1"),
    ("--seq-len", 100000, "beyond the model's maximum")])
def test_bad_input_is_refused_in_one_line(tiny_dir, tiny_text, tmp_path, flag, value, needle):
    out = tmp_path / "o"
    res = _run(*_args(tiny_dir, tiny_text, out, flag, value))
    text = res.output.strip()
    assert res.exit_code == 2 and needle in text and len(text.splitlines()) == 1, text
    assert not out.exists()
