"""Distillation across processes (the path `accelerate launch` takes on several GPUs), on CPU with
torch's launcher and the gloo backend: two processes with one sequence each must end where one
process with both sequences ends, and only the main process writes the output."""

import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file


def _run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, **kw)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_dir, tiny_text, tmp_path):
    args = ["linearize", "--model", str(tiny_dir), "--data", str(tiny_text), "--seq-len", "32", "--eval-tokens", "128",
            "--window", "8", "--steps", "6", "--seed", "3"]
    torchrun = shutil.which("torchrun") or "torchrun"
    _run([torchrun, "--nproc_per_node", "2", "-m", "attnswap.cli", *args, "--batch-size", "1",
          "--out", str(tmp_path / "two"), "--json", str(tmp_path / "two.json")], cwd=tmp_path)
    _run([sys.executable, "-m", "attnswap.cli", *args, "--batch-size", "2",
          "--out", str(tmp_path / "one"), "--json", str(tmp_path / "one.json")], cwd=tmp_path)
    _run([sys.executable, "-m", "attnswap.cli", *args, "--batch-size", "1", "--out", str(tmp_path / "alone")], cwd=tmp_path)
    one, two, alone = (load_file(tmp_path / n / "model.safetensors") for n in ("one", "two", "alone"))
    diff = lambda a, b: max((a[k].float() - b[k].float()).abs().max().item() for k in a)  # noqa: E731
    assert diff(one, two) < 1e-6  # the same steps, up to float rounding
    assert diff(one, alone) > 1e-4  # control: one process's shard alone trains differently
    assert json.loads((tmp_path / "two.json").read_text())["tokens_seen"] == 6 * 2 * 32
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["alone", "one", "two"]
    assert torch.isfinite(torch.tensor(json.loads((tmp_path / "two.json").read_text())["converted"]["ppl"]))
