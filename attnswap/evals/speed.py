"""Prefill and decode throughput, cache size and peak memory at several context lengths.

For each length L (batch 1, random token ids from a seeded generator):
- prefill: one forward pass over L tokens that fills the cache (only the last position's logits);
  tokens/s = L / seconds;
- decode: ``decode_tokens`` greedy steps of one token each from that cache; tokens/s = steps / seconds;
- cache: bytes held by the cache after decoding (keys/values of softmax layers, the fixed-size state
  of converted layers), counted exactly from its tensors on any device;
- peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during prefill + decode (weights
  included). On the CPU there is no allocator counter: the process's resident set size is sampled
  every 2 ms and its growth over the value before the measurement is reported; it is approximate
  (freed memory the allocator keeps is not counted again) and marked so in the report.
The best of ``repeats`` runs is kept; one untimed warm-up runs first.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

import torch

from ..progress import progress_bar
from .common import model_device


class _RssPeak:
    """Peak resident set size growth while the block runs (CPU; sampled)."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc, self.interval = psutil.Process(), interval

    def __enter__(self):
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start


def cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        state = getattr(layer, "state", None)
        if isinstance(state, dict):
            total += sum(t.numel() * t.element_size() for t in state.values())
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def _once(model, ids: torch.Tensor, decode_tokens: int) -> dict:
    from ..hf_compat import cache_kwargs, new_cache, output_cache

    dev = ids.device
    _sync(dev)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(new_cache()))
    nxt = out.logits[:, -1:].argmax(-1)
    _sync(dev)
    t1 = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(input_ids=nxt, use_cache=True, **cache_kwargs(output_cache(out)))
        nxt = out.logits[:, -1:].argmax(-1)
    _sync(dev)
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "cache_bytes": cache_bytes(output_cache(out))}


def measure(model, lengths: Sequence[int], *, decode_tokens: int = 32, repeats: int = 1, seed: int = 0,
            vocab: int | None = None, name: str = "model") -> dict:
    dev = model_device(model)
    model.eval()
    vocab = vocab or model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(seed)
    _once(model, torch.randint(0, vocab, (1, min(64, min(lengths))), generator=g).to(dev), 2)  # warm-up
    rows = {}
    with progress_bar() as bar:
        task = bar.add_task(f"{name} speed", total=len(lengths) * repeats)
        for n in lengths:
            ids = torch.randint(0, vocab, (1, n), generator=g).to(dev)
            best = None
            for _ in range(repeats):
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(dev)
                    r = _once(model, ids, decode_tokens)
                    r["peak_memory_bytes"] = torch.cuda.max_memory_allocated(dev)
                else:
                    with _RssPeak() as mem:
                        r = _once(model, ids, decode_tokens)
                    r["peak_memory_bytes"] = mem.growth
                best = r if best is None else {k: min(best[k], r[k]) if k.endswith("_s") else max(best[k], r[k]) for k in r}
                bar.update(task, advance=1)
            rows[str(n)] = {"prefill_tok_s": n / best["prefill_s"],
                            "decode_tok_s": decode_tokens / best["decode_s"] if decode_tokens else None,
                            **best}
    memory = ("torch.cuda.max_memory_allocated (weights included)" if dev.type == "cuda"
              else "CPU: growth of the process RSS during the run, sampled every 2 ms (approximate)")
    return {"device": str(dev), "decode_tokens": decode_tokens, "repeats": repeats, "memory_method": memory,
            "exact_memory": dev.type == "cuda", "by_length": rows}
