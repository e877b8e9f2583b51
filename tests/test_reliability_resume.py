"""Crashes, Ctrl-C and SIGTERM during distillation: checkpoints, --resume, and bit-identical results on
CPU, for `convert linearize` and `convert gqa`.

The faults happen at known steps through tests/inject.py, which wraps the loop's methods from the
outside (no test hooks in the package): a real SIGKILL right after the checkpoint of global step N is
written, or a real SIGINT/SIGTERM sent to the process right after global step N.
"""

import json
import signal

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from attnswap.cli import app
from tests.conftest import tiny_model, tiny_tokenizer
from tests.inject import faults, run_cli

runner = CliRunner()
# 4 attention-transfer steps (global 1-4), then 6 LoRA steps (global 5-10); checkpoints at 3, 4, 7, 10
STEPS = ["--steps", 10, "--save-every", 3]


def _args(tiny_dir, tiny_text, out, *extra):
    return [str(a) for a in ["linearize", "--model", tiny_dir, "--data", tiny_text, "--out", out, "--seq-len", 32,
                             "--batch-size", 2, "--eval-tokens", 64, "--window", 8, *STEPS, *extra]]


def _cli(*args):
    return runner.invoke(app, list(args))


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
    res = run_cli(_args(tiny_dir, tiny_text, out), cwd=tmp_path, kill_after_checkpoint=7)
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
    res = run_cli(_args(tiny_dir, tiny_text, out), cwd=tmp_path, signal_after_step=2)
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


def test_resume_refusals(tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "run"
    res = _cli(*_args(tiny_dir, tiny_text, out, "--resume"))
    assert res.exit_code == 2 and res.output.strip() == f"error: --resume: there is no checkpoint in {out}.ckpt to resume from"
    with faults(signal_after_step=3):  # a Ctrl-C in this process: leaves a checkpoint after step 3
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


def test_sigterm_mid_lora_checkpoints_and_resumes(reference, tiny_dir, tiny_text, tmp_path):
    """SIGTERM (what `timeout` and schedulers send) is treated as Ctrl-C: checkpoint, resume hint, exit 143."""
    out = tmp_path / "run"
    res = run_cli(_args(tiny_dir, tiny_text, out), cwd=tmp_path, signal_after_step=6, signum=signal.SIGTERM)
    assert res.returncode == 143, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stopped by SIGTERM during LoRA distillation at step 2/6" in errors[0], res.stderr
    assert errors[0].endswith("--resume") and "convert linearize --model" in errors[0]
    assert "Traceback" not in res.stderr
    assert not out.exists() and not list(tmp_path.glob(".run.*"))
    assert sorted(p.name for p in (tmp_path / "run.ckpt").iterdir()) == ["step-00000006"]
    res = _cli(*_args(tiny_dir, tiny_text, out, "--resume"))
    assert res.exit_code == 0, res.output
    assert "resuming LoRA distillation at step 2/6" in res.output
    assert _weights(out) == _weights(reference)


# --- convert gqa: the same checkpoints and --resume ------------------------------------------------

def _gqa_args(tiny_dir, tiny_text, out, *extra):
    return [str(a) for a in ["gqa", "--model", tiny_dir, "--data", tiny_text, "--out", out, "--kv-heads", 1, "--seq-len",
                             32, "--batch-size", 2, "--eval-tokens", 0, "--calib-batches", 1, "--steps", 6,
                             "--save-every", 4, *extra]]


@pytest.fixture(scope="module")
def gqa_reference(tiny_dir, tiny_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("gqa-ref") / "ref"
    res = _cli(*_gqa_args(tiny_dir, tiny_text, out))
    assert res.exit_code == 0, res.output
    assert not out.with_name("ref.ckpt").exists()
    return out


def test_gqa_sigterm_then_resume_is_bit_identical(gqa_reference, tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "run"
    res = run_cli(_gqa_args(tiny_dir, tiny_text, out), cwd=tmp_path, signal_after_step=3, signum=signal.SIGTERM)
    assert res.returncode == 143, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stopped by SIGTERM during LoRA distillation at step 3/6" in errors[0], res.stderr
    assert "convert gqa --model" in errors[0] and errors[0].endswith("--resume")
    assert not out.exists() and sorted(p.name for p in (tmp_path / "run.ckpt").iterdir()) == ["step-00000003"]
    res = _cli(*_gqa_args(tiny_dir, tiny_text, out, "--resume", "--lr", 0.01))
    assert res.exit_code == 2 and "made with different settings (lr)" in res.output
    res = _cli(*_gqa_args(tiny_dir, tiny_text, out, "--resume"))
    assert res.exit_code == 0, res.output
    assert "resuming LoRA distillation at step 3/6" in res.output
    assert _weights(out) == _weights(gqa_reference)
    assert not (tmp_path / "run.ckpt").exists()


def test_gqa_resumed_after_the_block_transfer_keeps_its_weights(gqa_reference, tiny_dir, tiny_text, tmp_path):
    """--transfer-steps 2 then LoRA: the transfer's weights are frozen under LoRA, yet a checkpoint
    written during LoRA holds them (TrainingRun.carry), so the resumed run, which skips the finished
    transfer, ends byte-identical to an uninterrupted one."""
    ref = tmp_path / "ref"
    assert _cli(*_gqa_args(tiny_dir, tiny_text, ref, "--transfer-steps", 2)).exit_code == 0
    assert _weights(ref) != _weights(gqa_reference)
    out = tmp_path / "run"
    res = run_cli(_gqa_args(tiny_dir, tiny_text, out, "--transfer-steps", 2), cwd=tmp_path, signal_after_step=3,
                  signum=signal.SIGTERM)
    assert res.returncode == 143 and "during LoRA distillation at step 1/4" in res.stderr, res.stderr
    res = _cli(*_gqa_args(tiny_dir, tiny_text, out, "--transfer-steps", 2, "--resume"))
    assert res.exit_code == 0, res.output
    assert "resuming LoRA distillation at step 1/4" in res.output
    assert _weights(out) == _weights(ref)


@pytest.mark.parametrize("format1", [False, True])
def test_gqa_full_training_resumes_from_ctrl_c(tmp_path, format1):
    """gqa --train kv trains float32 copies of k_proj/v_proj (no LoRA): those are checkpointed and a
    resumed run ends byte-identical (the loop as `convert gqa` drives it, without the CLI's loading).
    ``format1``: the checkpoint as format 1 wrote it, when the stage was still called "LoRA distillation"."""
    import contextlib

    from attnswap.convert.gqa import merge_to_gqa
    from attnswap.distill.checkpoint import Checkpointer, TrainingRun, use_run
    from attnswap.distill.faults import Interrupted
    from attnswap.distill.train import DistillConfig, distill

    seqs = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(0))
    cfg = DistillConfig(transfer_steps=0, lora_steps=6, batch_size=2, lr=1e-3, seed=0, full_train=("k_proj", "v_proj"))

    def run(root, resume=False, stop_after=None):
        teacher, student = tiny_model("llama"), tiny_model("llama")
        merge_to_gqa(student, 1, grouping="adjacent", merge="mean")
        ck = Checkpointer(root, save_every=0)
        ck.check_start(resume)
        ck.bind({"test": "gqa kv"}, resume)
        stop = faults(signal_after_step=stop_after) if stop_after else contextlib.nullcontext()
        with use_run(TrainingRun(ck)), stop:
            net, _ = distill(student, seqs, cfg, teacher=teacher)
        return net.state_dict()

    ref = run(tmp_path / "ref")
    with pytest.raises(Interrupted, match="interrupted during full-weight distillation at step 4/6"):
        run(tmp_path / "ck", stop_after=4)
    saved = load_file(tmp_path / "ck" / "step-00000004" / "params.safetensors")
    if format1:
        meta_path = tmp_path / "ck" / "step-00000004" / "meta.json"
        meta = json.loads(meta_path.read_text())
        assert meta["stage"] == "full-weight distillation"
        meta_path.write_text(json.dumps({**meta, "format": 1, "stage": "LoRA distillation"}))
    assert saved and all("k_proj" in k or "v_proj" in k for k in saved) and all(v.dtype == torch.float32 for v in saved.values())
    resumed = run(tmp_path / "ck", resume=True)
    assert ref.keys() == resumed.keys() and all(torch.equal(ref[k], resumed[k]) for k in ref)


def _unhandled(signum, frame):
    raise AssertionError("SIGTERM reached the test's own handler: the command did not handle it")


def test_sigterm_while_saving_leaves_nothing_half_written(tiny_dir, tiny_text, tmp_path, monkeypatch):
    """Outside the training loop SIGTERM unwinds like Ctrl-C: the temporary output is removed, one line,
    exit 143, and the checkpoint of the finished training is kept for --resume."""
    import os

    from attnswap import saving

    def verify_then_sigterm(tmp, out):
        assert any(tmp.iterdir())  # the model is fully written to the temporary directory at this point
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(saving, "verify_saved", verify_then_sigterm)
    out = tmp_path / "run"
    previous = signal.signal(signal.SIGTERM, _unhandled)  # without the fix: this handler, not the test process's death
    try:
        res = _cli(*_args(tiny_dir, tiny_text, out, "--steps", 2))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert res.exit_code == 143, res.output
    assert res.output.strip().splitlines()[-1] == (
        f"error: stopped by SIGTERM while saving {out}; nothing was written there; the trained weights are "
        f"checkpointed in {out}.ckpt: rerun with --resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]



def test_a_checkpoint_of_an_unknown_format_is_refused(tmp_path):
    from attnswap.distill.checkpoint import FORMAT, Checkpointer
    from attnswap.errors import AttnSwapError

    step = tmp_path / "ck" / "step-00000004"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"format": FORMAT + 1, "stage": "LoRA distillation", "global_step": 4}))
    ck = Checkpointer(tmp_path / "ck")
    ck.check_start(True)
    with pytest.raises(AttnSwapError, match=f"has format {FORMAT + 1}, this attnswap reads 1 and {FORMAT}; delete .* to start over"):
        ck.bind({"any": 1}, True)
