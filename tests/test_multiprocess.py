"""Distillation across processes (the path `accelerate launch` takes on several GPUs), on CPU with
torch's launcher and the gloo backend: two processes with one sequence each must end where one
process with both sequences ends, only the main process writes the output, and a two-process run
that is stopped and resumed (checkpoints through accelerate's save_state/load_state) ends where an
uninterrupted one ends; under FSDP (ACCELERATE_USE_FSDP=true, what `accelerate launch` sets for an
FSDP config) linearize, gqa and sparsify save what one process with the same global batch saves, and a
sharded run stopped and resumed ends where an uninterrupted one ends."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import built_once

ROOT = Path(__file__).resolve().parents[1]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _run(cmd, ok=True, extra_env=None, **kw):
    import subprocess

    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # PYTHONFAULTHANDLER: a process that aborts (a C++ terminate, exit -6) prints every thread's Python stack
    # first, so a failure here says where it was (CI once saw one abort with no trace of its own)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "PYTHONFAULTHANDLER": "1", **(extra_env or {})}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, **kw)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-10000:]
    return r


def _diff(a, b):
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _args(tiny_dir, tiny_text):
    return ["linearize", "--model", str(tiny_dir), "--data", str(tiny_text), "--seq-len", "32", "--eval-tokens", "128",
            "--window", "8", "--steps", "6", "--seed", "3"]


FSDP = {"ACCELERATE_USE_FSDP": "true"}  # what `accelerate launch` with an FSDP config sets


class Shared:
    """The uninterrupted linearize runs several tests compare against, each made once per test run for
    every worker (``built_once``) on first use, in a directory of its own (``out``: the model,
    ``report.json``, ``log.txt``: what its processes printed): ``two`` (2 processes, --batch-size 1),
    ``one`` (1 process, --batch-size 2: the same global batch) and ``fsdp`` (``two``, sharded)."""

    def __init__(self, factory, args: list[str]):
        self.factory, self.args = factory, args

    def __call__(self, name: str) -> Path:
        launcher, bs, env = {"two": (TWO, "1", None), "one": ([sys.executable], "2", None), "fsdp": (TWO, "1", FSDP)}[name]

        def build(d):
            r = _run([*launcher, "-m", "attnswap.cli", *self.args, "--batch-size", bs, "--out", str(d / "out"),
                      "--json", str(d / "report.json")], cwd=d, extra_env=env)
            (d / "log.txt").write_text(r.stdout + r.stderr)

        return built_once(self.factory, f"multiprocess-{name}", build)

    def model(self, name: str):
        return load_file(self(name) / "out" / "model.safetensors")

    def report(self, name: str) -> dict:
        return json.loads((self(name) / "report.json").read_text())


@pytest.fixture(scope="module")
def shared(tiny_dir, tiny_text, tmp_path_factory):
    return Shared(tmp_path_factory, _args(tiny_dir, tiny_text))


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_dir, tiny_text, tmp_path, shared):
    args = _args(tiny_dir, tiny_text)
    _run([sys.executable, "-m", "attnswap.cli", *args, "--batch-size", "1", "--out", str(tmp_path / "alone")], cwd=tmp_path)
    one, two, alone = shared.model("one"), shared.model("two"), load_file(tmp_path / "alone" / "model.safetensors")
    assert _diff(one, two) < 1e-6  # the same steps, up to float rounding
    assert _diff(one, alone) > 1e-4  # control: one process's shard alone trains differently
    rep = shared.report("two")
    assert rep["tokens_seen"] == 6 * 2 * 32
    assert sorted(p.name for p in shared("two").iterdir()) == ["log.txt", "out", "report.json"]  # nothing else written
    assert torch.isfinite(torch.tensor(rep["converted"]["ppl"]))
    log = (shared("two") / "log.txt").read_text().splitlines()
    assert sum(line.startswith("loading ") for line in log) == 1  # only the main process speaks


def test_two_processes_stopped_and_resumed_end_where_an_uninterrupted_run_ends(tiny_dir, tiny_text, tmp_path, shared):
    """SIGTERM reaches only the second process after global step 3 (a LoRA step): both processes stop
    after that step and checkpoint together through accelerate's save_state; --resume (load_state,
    every process's RNG states) then ends bit for bit where an uninterrupted two-process run (which
    wrote no checkpoints) ends."""
    args = [*_args(tiny_dir, tiny_text), "--batch-size", "1", "--save-every", "2"]
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
    assert _diff(shared.model("two"), load_file(out / "model.safetensors")) == 0
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


def _same_as_one_process(args, tmp_path):
    """``args`` run sharded on 2 processes with --batch-size 1 and on 1 process with --batch-size 2:
    the two outputs (max weight difference) and reports."""
    _run([*TWO, "-m", "attnswap.cli", *args, "--batch-size", "1", "--out", str(tmp_path / "fsdp"),
          "--json", str(tmp_path / "fsdp.json")], cwd=tmp_path, extra_env=FSDP)
    _run([sys.executable, "-m", "attnswap.cli", *args, "--batch-size", "2", "--out", str(tmp_path / "one"),
          "--json", str(tmp_path / "one.json")], cwd=tmp_path)
    diff = _diff(*(load_file(tmp_path / n / "model.safetensors") for n in ("one", "fsdp")))
    return diff, *(json.loads((tmp_path / f"{n}.json").read_text()) for n in ("fsdp", "one"))


def test_linearize_under_fsdp_saves_what_one_process_with_the_same_global_batch_saves(shared):
    """The command line sharded (FSDP2, 2 processes, --batch-size 1): it trains, evaluates on every
    process, gathers the whole model to the main one, which writes an output that loads and equals
    the output of one unsharded process with --batch-size 2."""
    from transformers import AutoModelForCausalLM

    fsdp = shared.model("fsdp")
    rep, ref = shared.report("fsdp"), shared.report("one")
    assert _diff(shared.model("one"), fsdp) < 1e-6 and rep["sharded"]["processes"] == 2 and "sharded" not in ref
    assert abs(rep["converted"]["ppl"] - ref["converted"]["ppl"]) < 1e-4 * ref["converted"]["ppl"]
    loaded = AutoModelForCausalLM.from_pretrained(shared("fsdp") / "out", trust_remote_code=True).state_dict()
    assert _diff({k: loaded[k] for k in fsdp}, fsdp) == 0
    assert sorted(p.name for p in shared("fsdp").iterdir()) == ["log.txt", "out", "report.json"]  # checkpoints removed


def test_gqa_under_fsdp_shards_its_teacher_copy_too(tiny_dir, tiny_text, tmp_path):
    """gqa's separate teacher copy is sharded like the student (LoRA; adjacent/mean merging, which
    needs no calibration batches, whose size would differ between the two runs)."""
    args = ["gqa", "--model", str(tiny_dir), "--data", str(tiny_text), "--seq-len", "32", "--eval-tokens", "128",
            "--kv-heads", "1", "--grouping", "adjacent", "--merge", "mean", "--steps", "4", "--seed", "3"]
    diff, rep, ref = _same_as_one_process(args, tmp_path)
    assert diff < 1e-6 and rep["sharded"]["processes"] == 2
    assert abs(rep["distilled"]["ppl"] - ref["distilled"]["ppl"]) < 1e-4 * ref["distilled"]["ppl"]


def test_sparsify_seer_under_fsdp(tiny_dir, tiny_text, tmp_path):
    args = ["sparsify", "--model", str(tiny_dir), "--data", str(tiny_text), "--seq-len", "64", "--block", "16",
            "--gate-dim", "8", "--eval-tokens", "128", "--sparsity", "0.5", "--steps", "3", "--seed", "3"]
    diff, rep, ref = _same_as_one_process(args, tmp_path)
    assert diff < 1e-6 and rep["sharded"]["processes"] == 2
    assert rep["density"] == ref["density"]  # measured on every process's sharded forward, reported by the main one


def test_a_sharded_run_stopped_and_resumed_ends_where_an_uninterrupted_one_ends(tiny_dir, tiny_text, tmp_path, shared):
    """Checkpoints of a sharded run: SIGTERM to process 1 only after global step 3 (a LoRA step, with
    sharded feature maps and replicated LoRA weights training); the checkpoint holds the gathered
    whole tensors and their Adam moments, and --resume scatters them back: bit for bit the same
    output as an uninterrupted sharded run (which wrote no checkpoints)."""
    args = [*_args(tiny_dir, tiny_text), "--batch-size", "1", "--save-every", "2"]
    out = tmp_path / "resumed"
    stopped = _run([*TWO, str(ROOT / "tests" / "inject.py"), "--signal-after-step", "3", "--signum",
                    str(int(signal.SIGTERM)), "--rank", "1", "--", *args, "--out", str(out)], ok=False, cwd=tmp_path,
                   extra_env=FSDP)
    assert stopped.returncode != 0 and not out.exists()
    assert [d.name for d in (tmp_path / "resumed.ckpt").iterdir()] == ["step-00000003"], stopped.stderr[-3000:]
    r = _run([*TWO, "-m", "attnswap.cli", *args, "--out", str(out), "--resume"], cwd=tmp_path, extra_env=FSDP)
    assert "resuming LoRA distillation at step 1/4" in r.stdout + r.stderr
    assert _diff(shared.model("fsdp"), load_file(out / "model.safetensors")) == 0


def test_gqa_full_training_is_refused_under_fsdp(tiny_dir, tiny_text, tmp_path):
    gqa = ["gqa", "--model", str(tiny_dir), "--data", str(tiny_text), "--kv-heads", "1", "--train", "kv", "--out",
           str(tmp_path / "m")]
    r = _run([*TWO, "-m", "attnswap.cli", *gqa], ok=False, cwd=tmp_path, extra_env=FSDP)
    assert r.returncode != 0 and "gqa --train kv does not run sharded (FSDP) yet" in r.stderr, r.stderr[-2000:]
    assert "loading " not in r.stdout + r.stderr  # refused before anything is loaded
    gqa[gqa.index("kv")] = "lora"
    r = _run([*TWO, "-m", "attnswap.cli", *gqa, "--transfer-steps", "2"], ok=False, cwd=tmp_path, extra_env=FSDP)
    assert r.returncode != 0 and "gqa --train lora with --transfer-steps does not run sharded" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "m").exists()
