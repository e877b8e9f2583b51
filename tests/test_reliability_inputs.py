"""Bad inputs: each gets one line and exit code 2, and nothing is written. Converted-config fuzzing,
no pickle anywhere on the loading path, full or read-only disks."""

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import attnswap
from attnswap.cli import app
from attnswap.modeling import convert_model
from attnswap.convert.spec import read_converted_config, validate_attnswap_config
from attnswap.convert.swap import make_swap
from attnswap.errors import AttnSwapError
from attnswap.saving import io_failure, save_converted
from tests.conftest import tiny_model, tiny_tokenizer

runner = CliRunner()
PKG = Path(attnswap.__file__).parent


def _one_error_line(res, needle, code=2):
    lines = res.output.strip().splitlines()
    assert res.exit_code == code, res.output
    assert lines and lines[-1].startswith("error:") and needle in lines[-1], res.output
    assert sum(line.startswith("error:") for line in lines) == 1 and not any("Traceback" in x for x in lines)


def _linearize(model, data, out, *extra):
    return runner.invoke(app, [str(a) for a in ["linearize", "--model", model, "--data", data, "--out", out, "--seq-len",
                                                32, "--batch-size", 2, "--eval-tokens", 64, "--window", 8, "--steps", 2,
                                                *extra]])


def _eval(model, data, tmp_path):
    res = runner.invoke(app, [str(a) for a in ["eval", model, "--data", data, "--seq-len", 32, "--eval-tokens", 64,
                                               "--json", tmp_path / "e.json"]])
    assert not (tmp_path / "e.json").exists()
    return res


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    """A converted (untrained) tiny model saved to disk."""
    tok = tiny_tokenizer()
    m = tiny_model("llama", vocab_size=len(tok))
    convert_model(m, [make_swap("lolcats", [0, 2], {"window": 8}, m.config)], source="tiny")
    return save_converted(m, tok, tmp_path_factory.mktemp("conv") / "conv", overwrite=False)


def _with_config(src: Path, tmp_path: Path, edit) -> Path:
    d = tmp_path / "edited"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


# --- malformed converted configs ------------------------------------------------------------------

BAD_CONFIGS = [
    (lambda c: c.pop("attnswap"), "has no 'attnswap' entry"),
    (lambda c: c["attnswap"].pop("swaps"), "missing key 'swaps'"),
    (lambda c: c["attnswap"].pop("version"), "missing key 'version'"),
    (lambda c: c["attnswap"].update(swaps="lolcats"), "'swaps' must be a list"),
    (lambda c: c["attnswap"]["swaps"][0].update(layers=["0"]), "'layers' must be a list of integers"),
    (lambda c: c["attnswap"]["swaps"][0].update(layers=[0, 7]), "layer 7 is out of range (the model has 3)"),
    (lambda c: c["attnswap"]["swaps"][0]["options"].update(window="64"), "option 'window' of lolcats must be an integer"),
    (lambda c: c["attnswap"]["swaps"][0]["options"].update(window=0), "option 'window' of lolcats must be at least 1"),
    (lambda c: c["attnswap"]["swaps"][0]["options"].update(colour=1), "unknown option 'colour' for method lolcats"),
    (lambda c: c["attnswap"]["swaps"][0].update(method="mamba"), "unknown attention method 'mamba'"),
    (lambda c: c["attnswap"].update(version="99.0.0"), "converted by attnswap 99.0.0, newer than the installed"),
    (lambda c: c["attnswap"].update(version="banana"), "'version' 'banana' is not a version number"),
]


@pytest.mark.parametrize("edit,needle", BAD_CONFIGS, ids=[n for _, n in BAD_CONFIGS])
def test_malformed_converted_config(converted_dir, tiny_text, tmp_path, edit, needle):
    d = _with_config(converted_dir, tmp_path, edit)
    _one_error_line(_eval(d, tiny_text, tmp_path), needle)


def test_malformed_config_also_refused_by_from_pretrained(converted_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    d = _with_config(converted_dir, tmp_path, lambda c: c["attnswap"]["swaps"][0].update(method="mamba"))
    with pytest.raises(AttnSwapError, match="unknown attention method 'mamba'"):
        AutoModelForCausalLM.from_pretrained(d)
    assert read_converted_config(converted_dir / "config.json")["attnswap"]["swaps"][0]["layers"] == [0, 2]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=20)
KEYS = st.sampled_from(["version", "swaps", "method", "layers", "options", "window", "feature_dim", "source_model",
                        "feature_rope", "use_linear", "init_window_logit"])


def _near_valid():
    swap = st.fixed_dictionaries({"method": st.sampled_from(["lolcats", "x"]) | JSON,
                                  "layers": st.lists(st.integers(-2, 5), max_size=4) | JSON,
                                  "options": st.dictionaries(KEYS, JSON | st.integers(-3, 100), max_size=4) | JSON})
    return st.fixed_dictionaries({"version": st.sampled_from(["0.1.0", "0.0.1", "9.9", "x"]) | JSON,
                                  "swaps": st.lists(swap, max_size=3) | JSON})


@settings(max_examples=300, deadline=None)
@given(d=JSON | _near_valid() | st.dictionaries(KEYS, JSON))
def test_fuzz_validator_raises_only_attnswap_error(d):
    try:
        out = validate_attnswap_config(d, 3)
    except AttnSwapError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(out["swaps"], list)  # accepted: well-formed


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode())
       | _near_valid().map(lambda a: json.dumps({"num_hidden_layers": 3, "attnswap": a}).encode()))
def test_fuzz_config_file_raises_only_attnswap_error(tmp_path, blob):
    f = tmp_path / "config.json"
    f.write_bytes(blob)
    try:
        read_converted_config(f)
    except AttnSwapError as e:
        assert "\n" not in str(e)


# --- broken weights, GGUF, tokenizer ----------------------------------------------------------------

@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_safetensors(tiny_dir, tiny_text, tmp_path, how):
    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if how == "truncated" else os.urandom(len(data)))
    out = tmp_path / "o"
    _one_error_line(_linearize(d, tiny_text, out), "could not load model")
    assert not out.exists() and not out.with_name("o.ckpt").exists()


def test_missing_tensor_is_not_silently_reinitialised(tiny_dir, tiny_text, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    sd = load_file(d / "model.safetensors")
    sd.pop("model.layers.1.self_attn.k_proj.weight")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o"
    _one_error_line(_linearize(d, tiny_text, out), f"the weights of '{d}' are incomplete: 1 tensors missing "
                                                   "(e.g. model.layers.1.self_attn.k_proj.weight)")
    assert not out.exists()


def test_truncated_gguf(tiny_text, tmp_path):
    import numpy as np
    import gguf

    f = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(f), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((32, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f.write_bytes(f.read_bytes()[:-300])
    out = tmp_path / "o"
    _one_error_line(_linearize(f, tiny_text, out), "could not read GGUF file")
    assert not out.exists()


def test_a_gguf_file_is_dequantised_once_into_the_cache(tmp_path, monkeypatch):
    """A .gguf --model is converted once into a cached transformers directory named by the file's path,
    size and modification time: the next command loads that directory (no de-quantising), a changed
    file is converted again, and what is loaded is what the GGUF reader gave."""
    import transformers

    from attnswap import loading

    monkeypatch.setenv("ATTNSWAP_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF stand-in")
    reads = []
    model_load, tok_load = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def from_gguf(load, make):
        def fake(path, *a, gguf_file=None, **kw):
            if gguf_file is None:
                return load(path, *a, **kw)
            reads.append((path, gguf_file))
            return make()
        return fake

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_gguf(model_load, lambda: tiny_model("llama")))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_gguf(tok_load, tiny_tokenizer))
    first = loading.resolve(str(f))
    assert reads == [(str(tmp_path), "m.gguf")] * 2 and first.kind == "gguf" and first.gguf_file is None
    assert Path(first.path).parent == tmp_path / "cache" / "models" and (Path(first.path) / "model.safetensors").is_file()
    model, _ = loading.load_model(first, dtype=torch.float32)
    want = tiny_model("llama").state_dict()
    assert all(torch.equal(t, want[k]) for k, t in model.state_dict().items())
    assert loading.resolve(str(f)).path == first.path and len(reads) == 2  # cached: not read again
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert loading.resolve(str(f)).path != first.path and len(reads) == 4  # changed: converted again
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if p.name.startswith(".")]  # no temporaries


def test_tokenizer_that_does_not_match_the_model(tiny_text, tmp_path):
    d = tmp_path / "model"
    tok = tiny_tokenizer()
    tiny_model("llama", vocab_size=100).save_pretrained(d)
    tok.save_pretrained(d)
    out = tmp_path / "o"
    _one_error_line(_linearize(d, tiny_text, out), f"has {len(tok)} tokens but the model's embedding has 100 rows")
    assert not out.exists()


def test_pickled_weights_are_never_unpickled(tiny_dir, tiny_text, tmp_path):
    """A pytorch_model.bin whose unpickling would run code: refused, and the code never runs."""
    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Evil()}, d / "pytorch_model.bin")
    out = tmp_path / "o"
    _one_error_line(_linearize(d, tiny_text, out), "attnswap loads safetensors only")
    assert not marker.exists() and not out.exists()


def test_torch_load_is_weights_only_everywhere():
    """Every torch.load in the package passes weights_only=True; nothing imports pickle."""
    calls = 0
    for f in sorted(PKG.rglob("*.py")):
        src = f.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", src, re.M), f
        for m in re.finditer(r"torch\.load\(", src):
            call = src[m.start(): src.find(")", m.start()) + 1]
            assert "weights_only=True" in call, f"{f}: {call}"
            calls += 1
    assert calls >= 1  # the checkpoint loader


# --- data encodings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding,needle", [("utf-16", "is UTF-16 text; convert it to UTF-8"),
                                             ("utf-32", "is UTF-32 text; convert it to UTF-8"),
                                             ("utf-16-le", "looks binary"),
                                             ("latin-1", "is not valid UTF-8")])
def test_data_in_other_encodings(tiny_dir, tiny_text, tmp_path, encoding, needle):
    f = tmp_path / "data.txt"
    f.write_bytes((tiny_text.read_text()[:3000] + " café").encode(encoding, "replace"))
    out = tmp_path / "o"
    _one_error_line(_linearize(tiny_dir, f, out), needle)
    assert not out.exists()


def test_utf8_bom_is_accepted(tmp_path):
    from attnswap.data import load_documents

    f = tmp_path / "d.txt"
    f.write_bytes(b"\xef\xbb\xbfhello")
    assert load_documents(str(f)) == ["hello"]


# --- disks: read-only, full -------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent(tiny_dir, tiny_text, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _one_error_line(_linearize(tiny_dir, tiny_text, ro / "o", "--save-every", 0), "cannot write to")
    finally:
        ro.chmod(0o700)
    assert list(ro.iterdir()) == []


def test_unwritable_out_location(tiny_dir, tiny_text, tmp_path, monkeypatch):
    """As a read-only file system answers (works as root too): one line, nothing created."""
    real = Path.mkdir

    def mkdir(self, *a, **kw):
        if tmp_path / "ro" in (self, *self.parents):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    out = tmp_path / "ro" / "o"
    _one_error_line(_linearize(tiny_dir, tiny_text, out, "--save-every", 0), "Read-only file system")
    assert not (tmp_path / "ro").exists()


def test_disk_full_keeps_previous_output_and_the_trained_weights(tiny_dir, tiny_text, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("previous output")

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(mu, "safe_save_file", full)
        res = _linearize(tiny_dir, tiny_text, out, "--overwrite")
    _one_error_line(res, f"could not write {out}: the disk is full; nothing was changed there; the trained weights "
                         f"are checkpointed in {out}.ckpt: rerun with --resume")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not list(tmp_path.glob(".o.*"))
    res = _linearize(tiny_dir, tiny_text, out, "--overwrite", "--resume")  # space again: finish without retraining
    assert res.exit_code == 0, res.output
    assert "resuming LoRA distillation at step 1/1" in res.output and (out / "model.safetensors").is_file()


def test_disk_full_while_checkpointing(tiny_dir, tiny_text, tmp_path, monkeypatch):
    from attnswap.distill import checkpoint

    real, calls = checkpoint._write, {"n": 0}

    def write(path, data):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint (params + meta) fits, the second does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data)

    monkeypatch.setattr(checkpoint, "_write", write)
    out = tmp_path / "o"
    _one_error_line(_linearize(tiny_dir, tiny_text, out, "--steps", 6, "--save-every", 1),
                    f"could not write a checkpoint to {out}.ckpt: the disk is full; the previous checkpoint "
                    "(step-00000001) is intact")
    assert [p.name for p in (tmp_path / "o.ckpt").iterdir()] == ["step-00000001"] and not out.exists()


def test_io_failure_reads_library_errors():
    assert io_failure(Exception("Error while serializing: I/O error: No space left on device (os error 28)")) == "the disk is full"
    assert io_failure(Exception("Error while serializing: I/O error: Permission denied (os error 13)")) == "Permission denied"
    assert io_failure(ValueError("shape mismatch")) is None


# --- exit codes --------------------------------------------------------------------------------------

def test_an_unexpected_error_never_exits_1(tiny_dir, tiny_text, tmp_path, monkeypatch):
    """Exit 1 is `convert eval`'s regression verdict; a bug exits 70 with its traceback and one error line."""
    from attnswap.evals import runner as eval_runner

    def broken(*a, **kw):
        raise RuntimeError("a bug")

    monkeypatch.setattr(eval_runner, "heldout_ids", broken)
    res = runner.invoke(app, ["eval", str(tiny_dir), "--data", str(tiny_text), "--seq-len", "32", "--eval-tokens", "64",
                              "--report-dir", str(tmp_path / "r")])
    assert res.exit_code == 70, res.output
    assert "Traceback" in res.output and res.output.strip().splitlines()[-1].startswith("error: internal error (RuntimeError)")
    assert not (tmp_path / "r").exists()


def test_out_of_memory_is_one_line_and_not_called_a_bug(tiny_dir, tiny_text, tmp_path, monkeypatch):
    """torch's OutOfMemoryError (a device too small or shared) is no bug: one line with what to lower,
    exit 71, no traceback, nothing written."""
    import torch

    from attnswap.evals import runner as eval_runner

    def full(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB.")

    monkeypatch.setattr(eval_runner, "heldout_ids", full)
    res = runner.invoke(app, ["eval", str(tiny_dir), "--data", str(tiny_text), "--seq-len", "32", "--eval-tokens", "64",
                              "--report-dir", str(tmp_path / "r")])
    assert res.exit_code == 71, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: out of device memory") and "--batch-size or --seq-len" in last
    assert "Traceback" not in res.output and not (tmp_path / "r").exists()


# --- what is saved is read back by the code that loads it ---------------------------------------------

def test_a_config_that_would_not_load_is_never_renamed_into_place(tmp_path):
    """save_converted reads the written config back with the loader's own checks (validate_attnswap_config,
    RuntimeOptions.from_config) before renaming: a bad entry leaves nothing at --out and no temporary."""
    tok = tiny_tokenizer()
    for edit, needle in [(lambda a: a["swaps"][0]["options"].update(meta_tokens=4), "unknown option 'meta_tokens'"),
                         (lambda a: a.update(runtime={"kernels": "fast"}), "runtime option kernels='fast'")]:
        m = tiny_model("llama", vocab_size=len(tok))
        convert_model(m, [make_swap("lolcats", [0, 2], {"window": 8}, m.config)], source="tiny")
        edit(m.config.attnswap)  # what a bug upstream of saving would produce
        out = tmp_path / "o"
        with pytest.raises(AttnSwapError, match=re.escape(needle)) as err:
            save_converted(m, tok, out, overwrite=False)
        assert "would not load, so it was not kept" in str(err.value)
        assert not out.exists() and list(tmp_path.iterdir()) == []


def test_make_swap_refuses_an_option_the_method_does_not_take():
    cfg = tiny_model("llama").config
    with pytest.raises(AttnSwapError, match="unknown option 'meta_tokens' for method lolcats"):
        make_swap("lolcats", [0], {"meta_tokens": 4}, cfg)
    assert make_swap("lizard", [0], {"meta_tokens": 4}, cfg)["options"]["meta_tokens"] == 4


def test_a_tampered_checkpoint_is_refused_without_unpickling_advice(tmp_path):
    """state.pt holding an object whose unpickling would run code: refused by torch.load(weights_only=True),
    reported as damaged, the code never runs, and the message never suggests weights_only=False."""
    from safetensors.torch import save_file

    from attnswap.distill.checkpoint import Checkpointer, Saved

    step = tmp_path / "ck" / "step-00000001"
    step.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, step / "params.safetensors")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"optimizer": Evil()}, step / "state.pt")
    ck = Checkpointer(tmp_path / "ck")
    ck.resumed = Saved(step, {})
    with pytest.raises(AttnSwapError, match="is damaged") as err:
        ck.load()
    msg = str(err.value)
    assert "holds pickled objects that are not plain tensors" in msg and not marker.exists()
    assert not any(x in msg for x in ("weights_only", "can still be loaded", "\x1b", "\n"))


def test_checkpoint_cleanup_removes_only_checkpoints(tmp_path):
    """After a successful run the checkpoint directory is emptied of checkpoints only, never rmtree'd."""
    from attnswap.distill.checkpoint import Checkpointer

    root = tmp_path / "ck"
    (root / "step-00000003").mkdir(parents=True)
    (root / "step-00000003" / "meta.json").write_text("{}")
    (root / "notes.txt").write_text("mine")
    Checkpointer(root).remove()
    assert [p.name for p in root.iterdir()] == ["notes.txt"]
    (root / "notes.txt").unlink()
    (root / "step-00000004").mkdir()
    Checkpointer(root).remove()
    assert not root.exists()


# --- saved eval reports: nothing but AttnSwapError, whatever the file holds ---------------------------

def _valid_report() -> dict:
    side = {"name": "teacher", "tokenizer": {"sha256": "0" * 64, "size": 300, "eos": "<eos>", "bos": None}, "seconds": 1.0,
            "device": "cpu", "results": {
                "ppl": {"by_length": {"32": {"ppl": 12.0}}, "by_position": {"length": 32, "buckets": [{"from": 1, "to": 32, "ppl": 12.0}]}},
                "passkey": {"accuracy": 0.5, "by_length": {"256": 0.5}, "by_depth": {"0": 1.0, "1": 0.0}},
                "niah": {"accuracy": 0.5, "by_length": {"256": 0.5}, "grid": {"256": {"0": 1.0, "1": 0.0}}},
                "mqar": {"accuracy": 0.25, "by_pairs": {"2": 0.25}},
                "speed": {"device": "cpu", "decode_tokens": 2, "memory_method": "rss", "exact_memory": False,
                          "by_length": {"32": {"prefill_tok_s": 100.0, "decode_tok_s": 10.0, "cache_bytes": 1024,
                                               "peak_memory_bytes": 2048}}}}}
    check = {"check": "max-ppl-increase", "metric": "perplexity @32", "baseline": 10.0, "candidate": 12.0, "change": 20.0,
             "unit": "%", "limit": 5.0, "status": "fail", "note": ""}
    return {"version": 1, "models": {"candidate": side, "baseline": None}, "settings": {"seq_len": 32}, "checks": [check]}


def _paths(d, prefix=()):
    """Every (path, value) of a nested JSON value."""
    yield prefix, d
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _paths(v, (*prefix, i))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_saved_report_raises_only_attnswap_error(tmp_path, data):
    """A valid report with one value replaced (or removed): loading it, its verdict and Markdown, checking
    it as a baseline, running the regression checks against it and the new Markdown raise nothing but
    AttnSwapError."""
    from attnswap.evals import Checks, Report
    from attnswap.evals.checks import evaluate
    from attnswap.evals.report import _Malformed, check_side

    d = _valid_report()
    where, _ = data.draw(st.sampled_from(list(_paths(d))[1:]))
    parent = d
    for k in where[:-1]:
        parent = parent[k]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent[where[-1]] = data.draw(JSON | st.sampled_from([float("nan"), float("inf"), -1, 10**30, "1e3", "x"]))
    f = tmp_path / "report.json"
    f.write_text(json.dumps(d, allow_nan=True))
    try:
        rep = Report.load(f)
        assert rep.verdict() and rep.to_markdown()  # the saved report itself, as read back
        try:
            check_side(rep.candidate, "models.candidate", strict=True)
        except _Malformed:
            return
        checks = Checks(max_ppl_increase=5, max_recall_drop=5, max_speed_drop=5, max_memory_increase=5)
        rep.baseline = rep.candidate
        rep.checks = evaluate(checks, _valid_report()["models"]["candidate"]["results"], rep.baseline["results"])
        assert rep.to_markdown() and rep.to_json()
    except AttnSwapError as e:
        assert "\n" not in str(e)
