"""End to end on the real embedded SmolLM2: convert with a handful of steps, save, reload in fresh
processes (with and without importing attnswap), generate text."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import built_once

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A 4-step linearize of SmolLM2, made once per test run (``built_once``: every worker reads it)."""
    script = Path(sys.executable).with_name("convert")  # this environment's console script, not another `convert` on PATH
    if not script.is_file():
        pytest.fail("the `convert` console script is not installed (pip install -e .)")

    def build(d):
        cmd = [str(script), "linearize", "--model", "llama", "--steps", "4", "--seq-len", "128", "--batch-size", "1",
               "--window", "64", "--eval-tokens", "512", "--out", str(d / "smollm2-linear"), "--json", str(d / "report.json")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    d = built_once(tmp_path_factory, "e2e-linearize", build)
    return d / "smollm2-linear", json.loads((d / "report.json").read_text())


def test_report(converted):
    _, rep = converted
    assert rep["layers"] == list(range(30))
    assert rep["teacher"]["ppl"] < rep["converted"]["ppl"] < 1e4  # 4 steps cannot recover it all


@pytest.mark.parametrize("how", ["import", "remote"])
def test_reload_and_generate_in_fresh_process(converted, how):
    out, _ = converted
    head = "import attnswap\nkw = {}\n" if how == "import" else "kw = {'trust_remote_code': True}\n"
    code = head + f"""
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, **kw)
assert type(m).__name__ == 'AttnSwapLlamaForCausalLM'
tok = AutoTokenizer.from_pretrained({str(out)!r})
ids = tok('The Python programming language', return_tensors='pt')
gen = m.generate(**ids, max_new_tokens=8, do_sample=False)
text = tok.decode(gen[0][ids['input_ids'].shape[1]:], skip_special_tokens=True)
assert gen.shape[1] > ids['input_ids'].shape[1] and text.strip(), text
print('GENERATED:', text)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=out.parent)
    assert r.returncode == 0 and "GENERATED:" in r.stdout, r.stderr[-3000:]


def test_sparsify_loza_four_steps_on_smollm2(tmp_path):
    """`sparsify --method loza` on the real model: calibration (1 step) -> selection -> LoRA (3 steps) ->
    save -> load -> generate, at a short length with a small window so that layers really stream."""
    script = Path(sys.executable).with_name("convert")
    out = tmp_path / "smollm2-loza"
    cmd = [str(script), "sparsify", "--method", "loza", "--model", "llama", "--steps", "4", "--seq-len", "256",
           "--block", "16", "--local-blocks", "3", "--eval-tokens", "512", "--out", str(out),
           "--json", str(tmp_path / "report.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert len(rep["alpha"]) == 30 and len(rep["streaming_layers"]) == 15
    assert rep["kv_cache"]["ratio"] < 0.55 and rep["converted"]["ppl"] < 1e4
    code = f"""
import attnswap
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained({str(out)!r})
tok = AutoTokenizer.from_pretrained({str(out)!r})
ids = tok('The Python programming language', return_tensors='pt')
gen = m.generate(**ids, max_new_tokens=8, do_sample=False)
print('GENERATED:', tok.decode(gen[0][ids['input_ids'].shape[1]:], skip_special_tokens=True))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "GENERATED:" in r.stdout, r.stderr[-3000:]
