"""Several dozen hostile or mistaken inputs across `convert linearize`, `convert gqa`, `convert sparsify` and `convert eval`.

Each case asserts the exit code (2: bad input), that the whole output is exactly one line starting
`error:` (no traceback), and that nothing was created, changed or removed in or beside any output
location: every directory the case touches is snapshotted before and after the run. All of these are
refused before any model weights are loaded, so the whole set runs in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnswap.cli import app
from tests.conftest import tiny_model, tiny_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def conv_dir(tmp_path_factory) -> Path:
    """A converted (untrained) tiny model with the tiny tokenizer."""
    from attnswap.convert.swap import make_swap
    from attnswap.modeling import convert_model
    from attnswap.saving import save_converted

    tok = tiny_tokenizer()
    m = tiny_model("llama", vocab_size=len(tok))
    convert_model(m, [make_swap("lolcats", [0, 2], {"window": 8}, m.config)], "tiny")
    return save_converted(m, tok, tmp_path_factory.mktemp("hostile-conv") / "conv", overwrite=False)


class World:
    """Builds a case's inputs inside its own directory (``self.tmp``); the shared fixtures stay read-only."""

    def __init__(self, tmp: Path, tiny: Path, text: Path, conv: Path):
        self.tmp, self.tiny, self.text, self.conv = tmp, tiny, text, conv
        self.cwd = tmp / "cwd"
        self.cwd.mkdir()

    def p(self, name: str) -> Path:
        return self.tmp / name

    def file(self, name: str, text: str = "x") -> Path:
        f = self.tmp / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
        return f

    def dir(self, name: str) -> Path:
        d = self.tmp / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def fifo(self, name: str = "fifo") -> Path:
        os.mkfifo(self.tmp / name)
        return self.tmp / name

    def loop(self, name: str = "loop") -> Path:
        os.symlink(name, self.tmp / name)
        return self.tmp / name

    def link(self, name: str, target: Path) -> Path:
        os.symlink(target, self.tmp / name)
        return self.tmp / name

    def model(self, name: str = "model", src: Path | None = None) -> Path:
        d = self.tmp / name
        shutil.copytree(src or self.tiny, d)
        return d

    def pickle_index_model(self, shard: str = "pytorch_model.bin") -> Path:
        """Weights that are not all safetensors: an index pointing elsewhere, beside an empty *.safetensors."""
        d = self.model("evil")
        (d / "model.safetensors").unlink()
        (d / "empty.safetensors").write_bytes(b"")
        (d / "pytorch_model.bin").write_bytes(b"not unpickled")
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
        return d

    def report(self, edit) -> Path:
        """A saved report.json (what `convert eval --report-dir` writes), edited."""
        d = {"version": 1, "models": {"candidate": {
            "name": "teacher", "tokenizer": {"sha256": "0" * 64, "size": 300, "eos": "<eos>", "bos": None},
            "results": {"ppl": {"by_length": {"32": {"ppl": 12.0}},
                                "by_position": {"length": 32, "buckets": [{"from": 1, "to": 32, "ppl": 12.0}]}}}},
            "baseline": None}, "settings": {"data": str(self.text), "eval_tokens": 64}, "checks": []}
        edit(d)
        return self.file("base/report.json", json.dumps(d))

    # argument lists
    def lin(self, *extra, out="o"):
        return ["linearize", "--model", self.tiny, "--data", self.text, "--out", self.p(out) if isinstance(out, str) else out,
                "--seq-len", 32, "--batch-size", 2, "--eval-tokens", 64, "--window", 8, "--steps", 2, *extra]

    def gqa(self, *extra, out="o", steps=True):
        return ["gqa", "--model", self.tiny, "--data", self.text, "--out", self.p(out) if isinstance(out, str) else out,
                "--kv-heads", 1, "--seq-len", 32, "--batch-size", 2, "--eval-tokens", 64, *(["--steps", 2] if steps else []),
                *extra]

    def sp(self, *extra, out="o"):
        return ["sparsify", "--model", self.tiny, "--data", self.text, "--out", self.p(out) if isinstance(out, str) else out,
                "--seq-len", 32, "--block", 8, "--gate-dim", 8, "--eval-tokens", 64, "--steps", 2, *extra]

    def ev(self, *extra, model=None, report_dir="rep"):
        rd = ["--report-dir", self.p(report_dir)] if report_dir else []
        return ["eval", self.conv if model is None else model, "--data", self.text, "--seq-len", 32, "--eval-tokens", 64,
                *rd, *extra]


def _swap(args, flag, value):
    """``args`` with the value after ``flag`` replaced."""
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


CASES = {
    # --- sparsify: the same output and input rules as linearize
    "sp json into missing dir": (lambda w: w.sp("--json", w.p("nodir/r.json")), "does not exist"),
    "sp out is the model": (lambda w: _swap(w.sp("--overwrite", out=w.model()), "--model", w.p("model")),
                            "is the --model input"),
    "sp out is cwd": (lambda w: w.sp("--overwrite", out=Path(".")), "is the current directory"),
    "sp checkpoint dir is a file": (lambda w: w.sp("--checkpoint-dir", w.file("ck")), "is a file, not a directory"),
    "sp reversed layer range": (lambda w: w.sp("--layers", "0,2-1"), "runs backwards"),
    "sp sparsity of one": (lambda w: w.sp("--sparsity", 1), "--sparsity must be in [0, 1)"),
    "sp unknown method": (lambda w: w.sp("--method", "nope"), "unknown --method 'nope'"),
    "sp empty model": (lambda w: _swap(w.sp(), "--model", ""), "--model is empty"),
    # --- linearize: options that do not apply, output locations, inputs that are not what they seem
    "lin meta-tokens with lolcats": (lambda w: w.lin("--meta-tokens", 4), "--meta-tokens does not apply to --attention lolcats"),
    "lin sinks with lizard": (lambda w: w.lin("--attention", "lizard", "--sinks", 2), "--sinks does not apply to --attention lizard"),
    "lin feature-rope with lizard": (lambda w: w.lin("--attention", "lizard", "--no-feature-rope"), "--feature-rope does not apply"),
    "lin unknown attention": (lambda w: w.lin("--attention", "mamba"), "unknown attention method 'mamba'"),
    "lin json into missing dir": (lambda w: w.lin("--json", w.p("nodir/r.json")), "does not exist"),
    "lin json is a directory": (lambda w: w.lin("--json", w.dir("jd")), "is a directory; give a file name"),
    "lin json under a device": (lambda w: w.lin("--json", "/dev/null/r.json"), "/dev/null is a character device, not a directory"),
    "lin json is the data": (lambda w: w.lin("--json", w.text), "is the --data input"),
    "lin json over a model file": (lambda w: _swap(w.lin("--json", w.model() / "config.json"), "--model", w.p("model")),
                                   "would overwrite a file of the --model input"),
    "lin json inside checkpoint dir": (lambda w: w.lin("--json", w.p("o.ckpt/r.json")), "is inside the checkpoint directory"),
    "lin json is the out dir": (lambda w: w.lin("--json", w.p("o")), "is --out"),
    "lin out is cwd": (lambda w: w.lin("--overwrite", out=Path(".")), "is the current directory"),
    "lin out is root": (lambda w: w.lin("--overwrite", out=Path("/")), "is the root directory"),
    "lin out contains cwd": (lambda w: w.lin("--overwrite", out=Path("..")), "contains the current directory"),
    "lin out is the model": (lambda w: _swap(w.lin("--overwrite", out=w.model()), "--model", w.p("model")),
                             "is the --model input"),
    "lin out links to the model": (lambda w: _swap(w.lin("--overwrite", out=w.link("ln", w.model())), "--model", w.p("model")),
                                   "is the --model input"),
    "lin out is the model, relative": (lambda w: _swap(w.lin("--overwrite", out=Path("../model/../model")), "--model",
                                                       w.model()), "is the --model input"),
    "lin out contains the model": (lambda w: _swap(w.lin("--overwrite", out=w.dir("outer")), "--model", w.model("outer/m")),
                                   "contains the --model input"),
    "lin out is a file": (lambda w: w.lin("--overwrite", out=w.file("f")), "exists and is a file, not a directory"),
    "lin out exists": (lambda w: w.lin(out=w.dir("o")), "already exists; pass --overwrite"),
    "lin checkpoint dir is a file": (lambda w: w.lin("--checkpoint-dir", w.file("ck")), "is a file, not a directory"),
    "lin checkpoint dir holds other files": (lambda w: w.lin("--checkpoint-dir", w.model()), "holds files other than checkpoints"),
    "lin checkpoint dir is out": (lambda w: w.lin("--checkpoint-dir", w.p("o")), "overlaps --out"),
    "lin checkpoint dir inside out": (lambda w: w.lin("--checkpoint-dir", w.p("o/ck")), "overlaps --out"),
    "lin checkpoint dir is cwd": (lambda w: w.lin("--checkpoint-dir", "."), "is the current directory"),
    "lin reversed layer range": (lambda w: w.lin("--layers", "0,2-1"), "layer range '2-1' in '0,2-1' runs backwards"),
    "lin reversed keep-softmax range": (lambda w: w.lin("--keep-softmax", "2-0"), "runs backwards"),
    "lin empty model": (lambda w: _swap(w.lin(), "--model", ""), "--model is empty"),
    "lin blank model": (lambda w: _swap(w.lin(), "--model", "  "), "--model is empty"),
    "lin empty data": (lambda w: _swap(w.lin(), "--data", ""), "--data is empty"),
    "lin data is a fifo": (lambda w: _swap(w.lin(), "--data", w.fifo()), "is a FIFO (named pipe)"),
    "lin data is /dev/zero": (lambda w: _swap(w.lin(), "--data", "/dev/zero"), "is a character device"),
    "lin data is a symlink loop": (lambda w: _swap(w.lin(), "--data", w.loop()), "is a symlink loop"),
    "lin model is a symlink loop": (lambda w: _swap(w.lin(), "--model", w.loop()), "is a symlink loop"),
    "lin model gguf is a fifo": (lambda w: _swap(w.lin(), "--model", w.fifo("m.gguf")), "is a FIFO (named pipe), not a .gguf"),
    "lin index points at a pickle": (lambda w: _swap(w.lin(), "--model", w.pickle_index_model()),
                                     "points at 'pytorch_model.bin', which is not a .safetensors file"),
    "lin index points outside": (lambda w: _swap(w.lin(), "--model", w.pickle_index_model("../x.safetensors")),
                                 "not a .safetensors file of that directory"),
    "lin empty safetensors": (lambda w: _swap(w.lin(), "--model", _emptied(w.model())), "is not a valid safetensors file"),
    "lin peft adapter dir": (lambda w: _swap(w.lin(), "--model", _adapter(w.model())), "holds a PEFT adapter"),
    "lin only pickled weights": (lambda w: _swap(w.lin(), "--model", _pickled_only(w.model())), "holds no model.safetensors"),
    "lin resume without checkpoint": (lambda w: w.lin("--resume"), "there is no checkpoint"),
    "lin negative meta tokens": (lambda w: w.lin("--attention", "lizard", "--meta-tokens", -1), "--meta-tokens must not be negative"),
    # --- gqa
    "gqa out is cwd": (lambda w: w.gqa("--overwrite", out=Path(".")), "is the current directory"),
    "gqa out is the model": (lambda w: _swap(w.gqa("--overwrite", out=w.model()), "--model", w.p("model")), "is the --model input"),
    "gqa json into missing dir": (lambda w: w.gqa("--json", w.p("nodir/r.json")), "does not exist"),
    "gqa checkpoint dir is a file": (lambda w: w.gqa("--checkpoint-dir", w.file("ck")), "is a file, not a directory"),
    "gqa steps with train none": (lambda w: w.gqa("--train", "none"), "--steps does not apply to --train none"),
    "gqa resume with train none": (lambda w: w.gqa("--train", "none", "--resume", steps=False),
                                   "--resume does not apply to --train none"),
    "gqa lora rank with full training": (lambda w: w.gqa("--train", "kv", "--lora-rank", 4), "--lora-rank does not apply to --train kv"),
    "gqa index points at a pickle": (lambda w: _swap(w.gqa(), "--model", w.pickle_index_model()), "not a .safetensors file"),
    "gqa data is a fifo": (lambda w: _swap(w.gqa(), "--data", w.fifo()), "is a FIFO (named pipe)"),
    "gqa empty model": (lambda w: _swap(w.gqa(), "--model", ""), "--model is empty"),
    # --- eval
    "eval report shaped wrong": (lambda w: w.ev("--baseline-report", w.file("r.json", '{"models": []}')),
                                 "models must be an object (got a list)"),
    "eval report without tokenizer": (lambda w: w.ev("--baseline-report", w.report(lambda d: d["models"]["candidate"].pop("tokenizer"))),
                                      "models.candidate has no 'tokenizer'"),
    "eval report with a string number": (lambda w: w.ev("--baseline-report", w.report(
        lambda d: d["models"]["candidate"]["results"]["ppl"]["by_length"]["32"].update(ppl="12"))), "ppl must be a number (got a string)"),
    "eval report with a bad length key": (lambda w: w.ev("--baseline-report", w.report(
        lambda d: d["models"]["candidate"]["results"]["ppl"].update(by_length={"long": {"ppl": 1.0}}))), "which is not an integer"),
    "eval report not json": (lambda w: w.ev("--baseline-report", w.file("r.json", "{nope")), "not valid JSON"),
    "eval report is a fifo": (lambda w: w.ev("--baseline-report", w.fifo("r.json")), "is a FIFO (named pipe)"),
    "eval report missing": (lambda w: w.ev("--baseline-report", w.p("none.json")), "baseline report not found"),
    "eval json into missing dir": (lambda w: w.ev("--json", w.p("nodir/e.json")), "does not exist"),
    "eval report dir is a file": (lambda w: w.ev(report_dir=None) + ["--report-dir", w.file("rd")], "exists and is a file"),
    "eval report dir is not a report": (lambda w: w.ev(report_dir=None) + ["--report-dir", w.model()], "not an eval report directory"),
    "eval report dir is the baseline report": (lambda w: w.ev("--baseline-report", w.report(lambda d: None).parent, report_dir="base"),
                                               "is the --baseline-report input"),
    "eval report dir is cwd": (lambda w: w.ev(report_dir=None) + ["--report-dir", "."], "is the current directory"),
    "eval bad value in checks file": (lambda w: w.ev("--baseline", w.tiny, "--checks", w.file("c.toml", 'max-ppl-increase = "lots"')),
                                      "c.toml: max-ppl-increase must be a number"),
    "eval checks file is a fifo": (lambda w: w.ev("--checks", w.fifo("c.toml")), "is a FIFO (named pipe), not a TOML file"),
    "eval empty model": (lambda w: w.ev(model=""), "the MODEL argument is empty"),
    "eval empty baseline": (lambda w: w.ev("--baseline", ""), "--baseline is empty"),
    "eval data is a fifo": (lambda w: _swap(w.ev(), "--data", w.fifo()), "is a FIFO (named pipe)"),
    "eval index points at a pickle": (lambda w: w.ev(model=_index_to_pickle(w.model("c", w.conv))), "not a .safetensors file"),
}


def _emptied(d: Path) -> Path:
    (d / "model.safetensors").write_bytes(b"")
    return d


def _adapter(d: Path) -> Path:
    (d / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x", "peft_type": "LORA"}))
    return d


def _pickled_only(d: Path) -> Path:
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    return d


def _index_to_pickle(d: Path) -> Path:
    (d / "model.safetensors").rename(d / "weights.bin")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "weights.bin"}}))
    return d


def _snapshot(*roots: Path) -> dict:
    """Every entry under ``roots`` (symlinks not followed): type, size and modification time."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                seen[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return seen


@pytest.mark.parametrize("build,needle", list(CASES.values()), ids=list(CASES))
def test_hostile_input_is_refused_cleanly(build, needle, tiny_dir, tiny_text, conv_dir, tmp_path, monkeypatch):
    w = World(tmp_path, tiny_dir, tiny_text, conv_dir)
    monkeypatch.chdir(w.cwd)
    args = [str(a) for a in build(w)]
    roots = (tmp_path, tiny_dir, tiny_text.parent, conv_dir.parent)
    before = _snapshot(*roots)
    res = runner.invoke(app, args)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.output
    assert _snapshot(*roots) == before  # nothing created, changed or removed in or beside any output location
