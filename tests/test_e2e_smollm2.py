"""End to end on the real embedded SmolLM2: convert with a handful of steps, save, reload in fresh
processes (with and without importing attnswap), generate text."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    script = Path(sys.executable).with_name("convert")  # this environment's console script, not another `convert` on PATH
    if not script.is_file():
        pytest.fail("the `convert` console script is not installed (pip install -e .)")
    d = tmp_path_factory.mktemp("e2e")
    out = d / "smollm2-linear"
    cmd = [str(script), "linearize", "--model", "llama", "--steps", "4", "--seq-len", "128", "--batch-size", "1",
           "--eval-tokens", "512", "--out", str(out), "--json", str(d / "report.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, json.loads((d / "report.json").read_text())


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
