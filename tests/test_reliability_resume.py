"""Crashes and Ctrl-C during distillation: checkpoints, --resume, and bit-identical results on CPU.

The kill and the Ctrl-C happen at known steps through test hooks (attnswap/distill/faults.py):
ATTNSWAP_TEST_KILL_AFTER_CHECKPOINT=N makes the process SIGKILL itself right after the checkpoint of
global step N is written; ATTNSWAP_TEST_SIGINT_AFTER_STEP=N makes it send itself SIGINT after step N.
"""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from attnswap.cli import app

runner = CliRunner()
# 4 attention-transfer steps (global 1-4), then 6 LoRA steps (global 5-10); checkpoints at 3, 4, 7, 10
STEPS = ["--steps", 10, "--save-every", 3]


def _args(tiny_dir, tiny_text, out, *extra):
    return [str(a) for a in ["linearize", "--model", tiny_dir, "--data", tiny_text, "--out", out, "--seq-len", 32,
                             "--batch-size", 2, "--eval-tokens", 64, "--window", 8, *STEPS, *extra]]


def _cli(*args):
    return runner.invoke(app, list(args))


def _subprocess(args, env_extra, cwd):
    env = {**os.environ, **env_extra, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "attnswap.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _weights(out):
    return (out / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(tiny_dir, tiny_text, tmp_path_factory):
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "ref"
    res = _cli(*_args(tiny_dir, tiny_text, out))
    assert res.exit_code == 0, res.output
    assert not out.with_name("ref.ckpt").exists()  # removed after success
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(reference, tiny_dir, tiny_text, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    assert _cli(*_args(tiny_dir, tiny_text, again)).exit_code == 0
    assert _weights(again) == _weights(reference)
    assert _cli(*_args(tiny_dir, tiny_text, other, "--seed", 1)).exit_code == 0
    assert _weights(other) != _weights(reference)


def test_sigkill_mid_lora_then_resume_is_bit_identical(reference, tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "run"
    res = _subprocess(_args(tiny_dir, tiny_text, out), {"ATTNSWAP_TEST_KILL_AFTER_CHECKPOINT": "7"}, tmp_path)
    assert res.returncode == -9, res.stderr
    assert not out.exists() and not list(tmp_path.glob(".run.tmp-*"))
    assert sorted(p.name for p in (tmp_path / "run.ckpt").iterdir()) == ["step-00000007"]
    res = _cli(*_args(tiny_dir, tiny_text, out, "--resume"))
    assert res.exit_code == 0, res.output
    assert "resuming LoRA distillation at step 3/6" in res.output
    assert _weights(out) == _weights(reference)
    assert not (tmp_path / "run.ckpt").exists()


def test_sigint_mid_transfer_checkpoints_and_resumes(reference, tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "run"
    res = _subprocess(_args(tiny_dir, tiny_text, out), {"ATTNSWAP_TEST_SIGINT_AFTER_STEP": "2"}, tmp_path)
    assert res.returncode == 130, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "interrupted during attention transfer at step 2/4" in errors[0], res.stderr
    assert errors[0].endswith("--resume") and "convert linearize --model" in errors[0]
    assert not out.exists() and not list(tmp_path.glob(".run.tmp-*"))
    assert sorted(p.name for p in (tmp_path / "run.ckpt").iterdir()) == ["step-00000002"]
    res = _cli(*_args(tiny_dir, tiny_text, out, "--resume", "--keep-checkpoints"))
    assert res.exit_code == 0, res.output
    assert "resuming attention transfer at step 2/4" in res.output
    assert _weights(out) == _weights(reference)
    # kept on request; tensors in safetensors, the rest loads with weights_only=True
    (last,) = (tmp_path / "run.ckpt").iterdir()
    assert last.name == "step-00000010"
    assert any("lora_A" in k for k in load_file(last / "params.safetensors"))
    state = torch.load(last / "state.pt", weights_only=True)
    assert set(state) == {"optimizer", "scheduler", "rng"}


def test_resume_refusals(tiny_dir, tiny_text, tmp_path, monkeypatch):
    out = tmp_path / "run"
    res = _cli(*_args(tiny_dir, tiny_text, out, "--resume"))
    assert res.exit_code == 2 and res.output.strip() == f"error: --resume: there is no checkpoint in {out}.ckpt to resume from"
    with monkeypatch.context() as m:  # the Ctrl-C hook works in-process too: leave a checkpoint after step 3
        m.setenv("ATTNSWAP_TEST_SIGINT_AFTER_STEP", "3")
        res = _cli(*_args(tiny_dir, tiny_text, out))
    assert res.exit_code == 130 and (tmp_path / "run.ckpt" / "step-00000003").is_dir()
    res = _cli(*_args(tiny_dir, tiny_text, out))
    assert res.exit_code == 2 and res.output.strip() == (
        f"error: {out}.ckpt holds a checkpoint of an earlier run (step-00000003); pass --resume to continue it, "
        "or delete that directory to start over")
    res = _cli(*_args(tiny_dir, tiny_text, out, "--resume", "--lr", 0.01))
    assert res.exit_code == 2 and res.output.strip().splitlines()[-1] == (
        f"error: the checkpoint in {out}.ckpt was made with different settings (lr); rerun with the original ones, "
        f"or delete {out}.ckpt to start over")
    other = tmp_path / "corpus.txt"
    other.write_text(tiny_text.read_text()[:-2000])
    res = _cli(*_args(tiny_dir, other, out, "--resume"))
    assert res.exit_code == 2 and "different settings (data, train_tokens)" in res.output
    assert not out.exists()
