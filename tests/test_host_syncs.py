"""A converted model's forward must not wait for the device once per layer (issue 17).

A host-device synchronisation (``.item()``, ``bool(t)``, ``nonzero``...) in a layer's forward stops
the host from queueing the next kernels while the GPU works; thirty of them per forward made the
converted SmolLM2's prefill host-bound. They are visible on CPU as ATen calls, so these tests count
them (``attnswap.profiling``) on models of 2 and 4 layers: in the common case (no padding) the count
must not grow with the layers, and stay within what the unconverted model (transformers' own mask code)
does once per forward.
A left-padded batch reads its mask on the host, once per forward, not once per layer.
"""

import pytest
import torch
from transformers import DynamicCache

from attnswap.convert.swap import make_swap
from attnswap.hf_compat import cache_kwargs
from attnswap.modeling import convert_model
from attnswap.profiling import count_host_ops
from tests.conftest import tiny_model

T = 40


def _converted(method, layers):
    m = tiny_model("llama", num_hidden_layers=layers)
    if method == "teacher":
        return m
    opts = {"lolcats": {"window": 8, "sinks": 2}, "lizard": {"window": 8, "meta_tokens": 2},
            "seer": {"block": 8}, "loza": {"block": 4, "sink_blocks": 1, "local_blocks": 2}}[method]
    convert_model(m, [make_swap(method, list(range(layers)), opts, m.config)], "tiny")
    return m


def _syncs(m, mask, cache, grad=False):
    ids = torch.randint(0, 300, (2, T), generator=torch.Generator().manual_seed(0))

    def fwd():
        kw = {**cache_kwargs(DynamicCache()), "use_cache": True} if cache else {"use_cache": False}
        out = m(ids, attention_mask=mask, **kw)
        if grad:
            out.logits.float().square().mean().backward()

    with torch.set_grad_enabled(grad):
        fwd()  # first call: lazy set-up stays out of the count
        return count_host_ops(fwd, stacks=True)[1]


def _masks():
    pad = torch.ones(2, T, dtype=torch.long)
    pad[1, :7] = 0
    return {"none": None, "ones": torch.ones(2, T, dtype=torch.long), "left_padded": pad}


CASES = [(meth, cache) for meth in ("lolcats", "lizard", "seer", "loza") for cache in (False, True)]


@pytest.mark.parametrize("method,cache", CASES)
@pytest.mark.parametrize("mask", ["none", "ones", "left_padded"])
def test_no_host_sync_per_layer(method, cache, mask):
    counts = {}
    for layers in (2, 4):
        r = _syncs(_converted(method, layers), _masks()[mask], cache)
        counts[layers] = (r.syncs, r.where)
    assert counts[4][0] == counts[2][0], f"syncs grow with the layers: {counts}"
    teacher = _syncs(_converted("teacher", 2), _masks()[mask], cache).syncs  # transformers' own, per forward
    bound = teacher + (mask == "left_padded")  # a padded batch: its mask read once more, by attnswap
    assert counts[4][0] <= bound, counts[4][1]


@pytest.mark.parametrize("method", ["lolcats", "lizard"])
def test_no_host_sync_per_layer_in_a_training_step(method):
    counts = [_syncs(_converted(method, n).train(), None, False, grad=True) for n in (2, 4)]
    teacher = _syncs(_converted("teacher", 2).train(), None, False, grad=True).syncs
    assert counts[0].syncs == counts[1].syncs <= teacher, counts[1].where


def test_the_padding_plan_is_read_once_per_mask_and_again_when_it_changes():
    from attnswap.hf_compat import padding_plan

    mask = torch.zeros(2, 1, 5, 5)
    mask[1, ..., :2] = torch.finfo(torch.float32).min
    (plan, first), (again, second) = count_host_ops(padding_plan, mask, 5), count_host_ops(padding_plan, mask, 5)
    assert plan == again == [0, 2] and first.syncs == 1 and second.syncs == 0
    mask[1] = 0  # changed in place: read again
    assert padding_plan(mask, 5) is None
    assert padding_plan(torch.zeros(2, 1, 5, 5), 5) is None and padding_plan(None, 5) is None


def test_loza_drops_the_same_keys_decided_on_the_host():
    """``needed_ranges`` (host) marks the same keys as ``still_needed`` (device), and ``keep_ranges``
    leaves a streaming cache as ``keep`` with that mask does, over random calls and paddings."""
    from attnswap.hf_compat import StreamingLayer

    m = _converted("loza", 1)
    attn = m.model.layers[0].self_attn
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        host, dev = StreamingLayer(), StreamingLayer()
        starts = None if trial % 2 else torch.randint(0, 6, (3,), generator=g).tolist()
        for _ in range(6):
            T = int(torch.randint(1, 9, (1,), generator=g))
            kv = torch.randn(3, 2, T, 4, generator=g)
            for layer in (host, dev):
                layer.update(kv, kv + 1)
            st = None if starts is None else torch.tensor(starts)
            dev.keep(attn.still_needed(dev.positions, dev.seen, st))
            (_, r) = count_host_ops(host.keep_ranges, attn.needed_ranges(host.seen, starts))
            assert r.syncs == 0
            assert torch.equal(host.positions, dev.positions) and torch.equal(host.keys, dev.keys)
            assert torch.equal(host.values, dev.values) and host.dropped == dev.dropped
            assert host.spans == dev.spans
