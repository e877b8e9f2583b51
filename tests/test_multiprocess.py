"""Distillation across processes (the path `accelerate launch` takes on several GPUs), on CPU with
torch's launcher and the gloo backend: two processes with one sequence each must end where one
process with both sequences ends, only the main process writes the output, and a two-process run
that is stopped and resumed (checkpoints through accelerate's save_state/load_state) ends where an
uninterrupted one ends."""

import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _run(cmd, ok=True, extra_env=None, **kw):
    import subprocess

    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(extra_env or {})}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, **kw)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _diff(a, b):
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _args(tiny_dir, tiny_text):
    return ["linearize", "--model", str(tiny_dir), "--data", str(tiny_text), "--seq-len", "32", "--eval-tokens", "128",
            "--window", "8", "--steps", "6", "--seed", "3"]


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_dir, tiny_text, tmp_path):
    args = _args(tiny_dir, tiny_text)
    r = _run([*TWO, "-m", "attnswap.cli", *args, "--batch-size", "1",
              "--out", str(tmp_path / "two"), "--json", str(tmp_path / "two.json")], cwd=tmp_path)
    _run([sys.executable, "-m", "attnswap.cli", *args, "--batch-size", "2",
          "--out", str(tmp_path / "one"), "--json", str(tmp_path / "one.json")], cwd=tmp_path)
    _run([sys.executable, "-m", "attnswap.cli", *args, "--batch-size", "1", "--out", str(tmp_path / "alone")], cwd=tmp_path)
    one, two, alone = (load_file(tmp_path / n / "model.safetensors") for n in ("one", "two", "alone"))
    assert _diff(one, two) < 1e-6  # the same steps, up to float rounding
    assert _diff(one, alone) > 1e-4  # control: one process's shard alone trains differently
    assert json.loads((tmp_path / "two.json").read_text())["tokens_seen"] == 6 * 2 * 32
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["alone", "one", "two"]
    assert torch.isfinite(torch.tensor(json.loads((tmp_path / "two.json").read_text())["converted"]["ppl"]))
    assert (r.stdout + r.stderr).count("loading ") == 1  # only the main process speaks


def test_two_processes_stopped_and_resumed_end_where_an_uninterrupted_run_ends(tiny_dir, tiny_text, tmp_path):
    """SIGTERM reaches only the second process after global step 3 (a LoRA step): both processes stop
    after that step and checkpoint together through accelerate's save_state; --resume (load_state,
    every process's RNG states) then ends bit for bit where an uninterrupted two-process run ends."""
    args = [*_args(tiny_dir, tiny_text), "--batch-size", "1", "--save-every", "2"]
    _run([*TWO, "-m", "attnswap.cli", *args, "--out", str(tmp_path / "straight")], cwd=tmp_path)
    out = tmp_path / "resumed"
    stopped = _run([*TWO, str(ROOT / "tests" / "inject.py"), "--signal-after-step", "3", "--signum",
                    str(int(signal.SIGTERM)), "--rank", "1", "--", *args, "--out", str(out)], ok=False, cwd=tmp_path)
    assert stopped.returncode != 0 and not out.exists()
    ckpt = tmp_path / "resumed.ckpt"
    (step,) = [d.name for d in ckpt.iterdir()]
    assert step == "step-00000003", stopped.stderr[-3000:]
    files = sorted(f.name for f in (ckpt / step).iterdir())
    assert files == ["custom_checkpoint_0.pkl", "meta.json", "random_states_0.pkl", "random_states_1.pkl"], files
    assert json.loads((ckpt / step / "meta.json").read_text())["processes"] == 2
    _run([*TWO, "-m", "attnswap.cli", *args, "--out", str(out), "--resume"], cwd=tmp_path)
    assert _diff(load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")) == 0
    assert not ckpt.exists()


def test_a_two_process_checkpoint_needs_two_processes(tiny_dir, tiny_text, tmp_path):
    args = [*_args(tiny_dir, tiny_text), "--batch-size", "1", "--out", str(tmp_path / "m")]
    _run([*TWO, str(ROOT / "tests" / "inject.py"), "--kill-after-checkpoint", "2", "--", *args, "--save-every", "1"],
         ok=False, cwd=tmp_path)
    assert [d.name for d in (tmp_path / "m.ckpt").iterdir()] == ["step-00000002"]
    r = _run([sys.executable, "-m", "attnswap.cli", *args, "--save-every", "1", "--resume"], ok=False, cwd=tmp_path)
    assert r.returncode == 2 and "written by 2 process(es)" in r.stderr, r.stderr[-2000:]


def test_sharded_distillation_ends_where_the_unsharded_one_ends(tmp_path):
    """FSDP2 (fully_shard per decoder layer + root) on CPU with gloo: attention transfer (layer-local
    losses) and LoRA distillation of a tiny linearized Llama give the same merged weights as the
    unsharded two-process run."""
    worker = str(ROOT / "tests" / "fsdp_worker.py")
    _run([*TWO, worker, str(tmp_path / "plain.safetensors")], cwd=tmp_path)
    _run([*TWO, worker, str(tmp_path / "sharded.safetensors"), "--shard"], cwd=tmp_path)
    assert _diff(load_file(tmp_path / "plain.safetensors"), load_file(tmp_path / "sharded.safetensors")) < 1e-6


def test_the_cli_refuses_fsdp_rather_than_running_unsharded(tiny_dir, tiny_text, tmp_path):
    args = [*_args(tiny_dir, tiny_text), "--batch-size", "1", "--out", str(tmp_path / "m")]
    r = _run([*TWO, "-m", "attnswap.cli", *args], ok=False, cwd=tmp_path, extra_env={"ACCELERATE_USE_FSDP": "true"})
    assert r.returncode != 0 and "does not run sharded yet" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "m").exists()
