"""Converted models load in lm-evaluation-harness's HFLM and answer loglikelihood requests (no dataset
download: the requests are built here). Skipped when lm-eval is not installed."""

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("lm_eval.models.huggingface")


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    from attnswap.modeling import convert_model
    from attnswap.convert.swap import make_swap
    from attnswap.saving import save_converted
    from tests.conftest import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    m = tiny_model("llama", vocab_size=len(tok))
    convert_model(m, [make_swap("lolcats", [0, 2], {"window": 4}, m.config)], "tiny")
    with torch.no_grad():  # move the feature maps off their start so the converted model differs
        for name, p in m.named_parameters():
            if "feature_map" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    out = tmp_path_factory.mktemp("lmeval") / "conv"
    save_converted(m, tok, out, overwrite=False)
    return out


def _reference(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids).logits[0, len(ctx) - 1 : -1].float().log_softmax(-1)
    target = torch.tensor(cont)
    return logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


@pytest.mark.parametrize("how", ["path", "object"])
def test_hflm_loglikelihood_on_converted_model(converted_dir, how):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import attnswap  # noqa: F401  (registers the converted classes)

    model = AutoModelForCausalLM.from_pretrained(converted_dir).eval()
    tok = AutoTokenizer.from_pretrained(converted_dir)
    assert type(model).__name__.startswith("AttnSwap")
    lm = (HFLM(pretrained=str(converted_dir), device="cpu", batch_size=1, dtype="float32") if how == "path"
          else HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=1))
    assert type(lm.model).__name__.startswith("AttnSwap")  # the converted attention, not a stock Llama
    reqs = [("The quick brown fox", " jumps over the lazy dog."), ("Linear attention keeps", " a running state.")]
    out = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)], disable_tqdm=True)
    assert len(out) == 2
    for (ll, greedy), (ctx, cont) in zip(out, reqs):
        ref_ll, ref_greedy = _reference(model, tok, ctx, cont)
        assert ll == pytest.approx(ref_ll, rel=1e-4, abs=1e-4)
        assert greedy == ref_greedy
