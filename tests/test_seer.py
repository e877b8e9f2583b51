"""SeerAttention-style sparse attention (convert/seer.py): the gate's pieces against plain definitions,
selection rules, exactness at sparsity 0, generation through the KV cache, and gate training."""

import math

import pytest
import torch
import torch.nn.functional as F

from attnswap.convert import attention_mode
from attnswap.convert.seer import block_attention_map, pool_keys, pool_queries, select_blocks
from attnswap.convert.swap import make_swap
from attnswap.modeling import convert_model
from tests.conftest import tiny_model


def _dense_block_map(q, k, scale, block):
    """The definition: full causal softmax map, max over (block x block) tiles, rows normalised."""
    B, T, H, D = q.shape
    kh = k.repeat_interleave(H // k.shape[2], 2)
    p = (torch.einsum("bthd,bshd->bhts", q, kh) * scale)
    p = p.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    n = -(-T // block)
    p = F.pad(p, (0, n * block - T, 0, n * block - T)).view(B, H, n, block, n, block).amax((3, 5))
    return p / p.sum(-1, keepdim=True)


@pytest.mark.parametrize("T,block,rows", [(37, 8, 8), (64, 16, 32), (50, 64, 256)])
def test_block_attention_map_equals_the_dense_definition(T, block, rows):
    g = torch.Generator().manual_seed(T)
    q, k = torch.randn(2, T, 4, 16, generator=g), torch.randn(2, T, 2, 16, generator=g)
    got = block_attention_map(q, k, 0.25, block, rows=rows)
    torch.testing.assert_close(got, _dense_block_map(q, k, 0.25, block), rtol=1e-5, atol=1e-6)


def test_pooling_matches_per_block_statistics():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 21, 2, 4, generator=g)
    pooled = pool_keys(k, 8)
    for j, (a, b) in enumerate([(0, 8), (8, 16), (16, 21)]):
        blk = k[:, a:b]
        torch.testing.assert_close(pooled[:, j], torch.cat([blk.amax(1), blk.amin(1), blk.mean(1)], -1))
    q = torch.randn(1, 11, 3, 4, generator=g)  # positions 13..23: blocks 1 (13-15) and 2 (16-23)
    pq, pos = pool_queries(q, 13, 8)
    assert pos.tolist() == [1, 2]
    torch.testing.assert_close(pq[:, 0], q[:, :3].mean(1))
    torch.testing.assert_close(pq[:, 1], q[:, 3:].mean(1))


def test_selection_rules_keep_sink_and_diagonal_and_respect_their_budget():
    g = torch.Generator().manual_seed(1)
    nQ = 10
    qpos = torch.arange(nQ)
    probs = torch.rand(1, 2, nQ, nQ, generator=g).tril()
    keep = select_blocks(probs, qpos, sparsity=0.75, threshold=0.0, token_budget=0, block=4)
    assert keep[..., 0].all() and keep.diagonal(dim1=-2, dim2=-1).all()
    assert not keep.triu(1).any()  # never a future block
    for i in range(nQ):
        top = math.ceil(0.25 * (i + 1))
        assert top <= int(keep[0, 0, i].sum()) <= top + 2
    keep = select_blocks(probs, qpos, sparsity=0.0, threshold=0.0, token_budget=0, block=4)
    assert torch.equal(keep[0, 0], torch.ones(nQ, nQ, dtype=torch.bool).tril())
    keep = select_blocks(probs, qpos, sparsity=0.9, threshold=0.0, token_budget=8, block=4)  # budget wins: 2 blocks
    assert int(keep[0, 0, 9].sum()) <= 4
    keep = select_blocks(probs, qpos, sparsity=0.9, threshold=0.5, token_budget=0, block=4)
    assert torch.equal(keep[0, 0, 9, 1:9], probs[0, 0, 9, 1:9] >= 0.5)


def _seer(fam="llama", **opts):
    m = tiny_model(fam)
    convert_model(m, [make_swap("seer", [0, 1, 2], {"block": 8, **opts}, m.config)], "tiny")
    return m


@pytest.mark.parametrize("fam", ["llama", "qwen3"])
def test_sparsity_zero_gives_the_teachers_logits_and_generation(fam):
    teacher = tiny_model(fam)
    m = _seer(fam, sparsity=0.0)
    ids = torch.randint(0, 300, (2, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(m.generate(ids[:1, :30], **kw), teacher.generate(ids[:1, :30], **kw))


def test_sparse_layers_attend_only_selected_blocks_and_report_density():
    m = _seer(sparsity=0.75)
    ids = torch.randint(0, 300, (1, 128), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense = tiny_model()(ids).logits
        sparse = m(ids).logits
    densities = [layer.self_attn.last_density for layer in m.model.layers]
    assert all(0.2 < d < 0.6 for d in densities), densities  # 16 query blocks: ~25% + sinks/diagonals
    assert not torch.allclose(sparse, dense, atol=1e-3)  # it is sparse, not the teacher
    out = m.generate(ids[:, :60], max_new_tokens=5, min_new_tokens=5, do_sample=False)  # through the KV cache
    assert out.shape == (1, 65)


def test_gate_training_lowers_the_kl_to_the_teachers_block_map():
    from attnswap.distill.train import DistillConfig, distill

    m = _seer(sparsity=0.5)
    seqs = torch.randint(0, 300, (16, 64), generator=torch.Generator().manual_seed(4))

    def kl():
        with torch.no_grad(), attention_mode(m, "transfer") as mods:
            m.model(input_ids=seqs[:4], use_cache=False)
            return sum(float(x.transfer_loss) for x in mods)

    before = kl()
    weights = {n: p.clone() for n, p in m.named_parameters() if "gate_" not in n}
    m, _ = distill(m, seqs, DistillConfig(transfer_steps=30, lora_steps=0, batch_size=4, transfer_lr=3e-2))
    assert kl() < 0.7 * before
    for n, p in m.named_parameters():  # only the gates train: the model's weights are untouched
        if n in weights:
            assert torch.equal(p, weights[n]), n


def test_load_time_sparsity_override(tmp_path):
    from transformers import AutoModelForCausalLM

    m = _seer(sparsity=0.9)
    m.save_pretrained(tmp_path)
    ids = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(5))
    r = AutoModelForCausalLM.from_pretrained(tmp_path, sparsity=0.0)
    with torch.no_grad():
        torch.testing.assert_close(r(ids).logits, tiny_model()(ids).logits, rtol=1e-5, atol=1e-5)
    assert r.config.attnswap["swaps"][0]["options"]["sparsity"] == 0.0
    r = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert r.model.layers[0].self_attn.options["sparsity"] == 0.9


@pytest.mark.parametrize("T,Tk", [(70, 70), (1, 53), (20, 83)])
def test_the_kernel_paths_agree_with_the_reference_masking(T, Tk):
    """The block-sparse operators (kernels/block_sparse, via dispatch) and this file's dense masked
    reference read the same block conventions: prefill, continuation after history, and decode."""
    from attnswap.convert.seer import block_sparse_attention, select_blocks
    from attnswap.kernels import block_sparse_attn, block_sparse_decode, decode_index
    from attnswap.kernels.block_sparse.masks import block_layout

    g = torch.Generator().manual_seed(T + Tk)
    q, k, v = torch.randn(2, T, 4, 16, generator=g), torch.randn(2, Tk, 2, 16, generator=g), torch.randn(2, Tk, 2, 16, generator=g)
    q0, nQ, nK = block_layout(T, Tk, 8)
    keep = select_blocks(torch.rand(2, 2, nQ, nK, generator=g), torch.arange(q0, q0 + nQ), sparsity=0.5,
                         threshold=0.0, token_budget=0, block=8)
    rows = torch.arange(Tk - T, Tk) // 8 - q0
    want = block_sparse_attention(q, k, v, keep, rows, 8, 0.25)
    if T == 1:
        got = block_sparse_decode(q[:, 0], k, v, *decode_index(keep[:, :, 0]), block=8, scale=0.25)[:, None]
    else:
        got = block_sparse_attn(q, k, v, keep, block=8, scale=0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_convert_eval_loads_at_another_sparsity_and_reports_density(tmp_path):
    from attnswap.evals import compare
    from tests.conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    m = tiny_model(vocab_size=len(tok))
    convert_model(m, [make_swap("seer", [0, 1, 2], {"block": 8, "sparsity": 0.9}, m.config)], "tiny")
    m.save_pretrained(tmp_path / "sparse")
    tok.save_pretrained(tmp_path / "sparse")
    data = tmp_path / "text.txt"
    data.write_text(" ".join(["The quick brown fox jumps over the lazy dog."] * 400))
    kw = dict(tasks=["ppl"], data=str(data), seq_len=64, eval_tokens=256, ppl_lengths=[64], device="cpu")
    dense = compare(str(tmp_path / "sparse"), None, sparsity=0.0, **kw)
    sparse = compare(str(tmp_path / "sparse"), None, **kw)
    assert all(v == 1.0 for v in dense.candidate["results"]["density"].values())
    assert all(v < 0.9 for v in sparse.candidate["results"]["density"].values())
    assert "attended key blocks" in sparse.to_markdown()


# --- decoding with the gate keys kept in the cache --------------------------------------------------------
def _reuse(m, on: bool):
    for layer in m.model.layers:
        layer.self_attn.reuse_gate_keys = on


def _record_selections(m, monkeypatch):
    """Every selection each layer makes, in order: (layer, keep mask)."""
    from attnswap.convert.seer import SeerAttention

    seen = []
    orig = SeerAttention.select

    def spy(self, q, k, gate_keys=None):
        keep, qpos = orig(self, q, k, gate_keys)
        seen.append((self.layer_idx, keep.clone()))
        return keep, qpos

    monkeypatch.setattr(SeerAttention, "select", spy)
    return seen


def _decode_both_ways(m, monkeypatch, ids, steps, **fwd):
    """Prefill ids, then `steps` greedy one-token steps, once with the gate keys kept in the cache and once
    re-pooling every block at every step (the reference). Returns the logits and selections of each."""
    seen = _record_selections(m, monkeypatch)
    runs = []
    for on in (True, False):
        _reuse(m, on)
        seen.clear()
        with torch.no_grad():
            out = m(ids, use_cache=True, **fwd)
            cache, logits = out.past_key_values, [out.logits[:, -1]]
            for _ in range(steps):
                out = m(logits[-1].argmax(-1, keepdim=True), past_key_values=cache, use_cache=True)
                logits.append(out.logits[:, -1])
        runs.append((torch.stack(logits, 1), list(seen), cache))
    _reuse(m, True)
    return runs


@pytest.mark.parametrize("opts", [dict(sparsity=0.7), dict(threshold=0.15, sparsity=0.0), dict(token_budget=16)])
def test_decoding_with_kept_gate_keys_equals_repooling_every_block(monkeypatch, opts):
    """The incremental gate (completed blocks' gate keys kept in the cache, only the partial block pooled
    per step) selects the same blocks and gives the same logits as re-pooling the whole cache, over a
    generation that crosses several block boundaries (block 8: 19 + 30 tokens)."""
    from attnswap.hf_compat import BlockSummaryLayer

    m = _seer(**opts)
    ids = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(6))
    (got, sel, cache), (want, ref_sel, _) = _decode_both_ways(m, monkeypatch, ids, 30)
    assert len(sel) == len(ref_sel) == 3 * 31
    for (la, a), (lb, b) in zip(sel, ref_sel):
        assert la == lb and torch.equal(a, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(isinstance(layer, BlockSummaryLayer) for layer in cache.layers)
    assert [layer.n_blocks for layer in cache.layers] == [49 // 8] * 3


def test_a_decoding_step_pools_at_most_one_block(monkeypatch):
    from attnswap.convert import seer

    m = _seer(sparsity=0.7)
    ids = torch.randint(0, 300, (1, 37), generator=torch.Generator().manual_seed(7))
    sizes = []
    orig = seer.pool_keys
    monkeypatch.setattr(seer, "pool_keys", lambda k, block: (sizes.append(k.shape[1]), orig(k, block))[1])
    with torch.no_grad():
        out = m(ids, use_cache=True)
        assert sizes == [32, 5] * 3  # prefill: the 4 complete blocks (then stored), the partial one
        sizes.clear()
        cache = out.past_key_values
        for t in range(12):  # positions 37..48: block 4 completes at 39, block 5 at 47
            out = m(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    assert max(sizes) <= 8
    assert sizes.count(8) == 2 * 3  # each completed block pooled once, when it completes


def test_greedy_generate_equals_prefill_then_one_step_from_scratch():
    """generate() keeps the gate keys across steps; recomputing each step from scratch (a fresh cache
    prefilled with everything before the last token, then one decoding step) gives the same tokens."""
    m = _seer(sparsity=0.7)
    ids = torch.randint(0, 300, (1, 13), generator=torch.Generator().manual_seed(8))
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    got = m.generate(ids, **kw)
    assert torch.equal(m.generate(ids, prefill_chunk_size=5, **kw), got)
    _reuse(m, False)
    assert torch.equal(m.generate(ids, **kw), got)  # the re-pooling reference
    _reuse(m, True)
    with torch.no_grad():
        for n in range(ids.shape[1] + 1, got.shape[1]):
            out = m(got[:, : n - 1], use_cache=True)
            step = m(got[:, n - 1 : n], past_key_values=out.past_key_values, use_cache=True)
            assert int(step.logits[0, -1].argmax()) == int(got[0, n]), n


def test_beam_search_and_left_padding_with_kept_gate_keys_equal_the_reference():
    m = _seer(sparsity=0.7)
    m.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(1, 300, (1, 11), generator=g)
    beam = dict(max_new_tokens=20, min_new_tokens=20, num_beams=3, do_sample=False)
    a, b = torch.randint(1, 300, (1, 14), generator=g), torch.randint(1, 300, (1, 6), generator=g)
    padded = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], 1)])
    mask = (padded != 0).long()
    greedy = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, attention_mask=mask)
    got = m.generate(ids, **beam), m.generate(padded, **greedy)
    _reuse(m, False)
    want = m.generate(ids, **beam), m.generate(padded, **greedy)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_cropping_reordering_and_changed_gate_weights_never_leave_stale_gate_keys(monkeypatch):
    """A cache cropped back over a block boundary (as assisted or async-stopped generation does), its
    sequences reordered (beam search), and gate weights changed in place after the prefill: the next
    steps still equal the reference."""
    m = _seer(sparsity=0.7, block=4)
    g = torch.Generator().manual_seed(10)
    ids, other = torch.randint(0, 300, (3, 30), generator=g), torch.randint(0, 300, (3, 9), generator=g)
    seen = _record_selections(m, monkeypatch)

    def run(on):
        _reuse(m, on)
        seen.clear()
        with torch.no_grad():
            cache = m(ids, use_cache=True).past_key_values
            cache.crop(-7)  # 30 -> 23 keys: blocks 5 (20..23) no longer complete; other tokens follow
            cache.reorder_cache(torch.tensor([2, 0, 0]))
            m.model.layers[1].self_attn.gate_k.mul_(1.5)
            logits = [m(other[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(9)]
            m.model.layers[1].self_attn.gate_k.div_(1.5)
        return torch.cat(logits, 1), [k for _, k in seen]

    (got, sel), (want, ref) = run(True), run(False)
    assert all(torch.equal(x, y) for x, y in zip(sel, ref))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
