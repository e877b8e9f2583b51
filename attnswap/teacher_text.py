"""Training rows the teacher writes itself (``--teacher-text FRACTION``).

A distilled student matches its teacher on the training rows and drifts everywhere else. The packaged
corpus (``--data general``) has no narrative prose, so GQA merges trained on it in full lose most on
stories and scripture (docs/GQA.md). Text sampled from the teacher covers what the teacher itself
puts probability on, whatever the domain, with no data beyond the model.

- **Sampling.** Nucleus sampling (``SAMPLING``: top-p 0.9, temperature 1, no top-k; on the CPU it beat
  plain ancestral sampling out of domain, docs/GQA.md), each document started
  from the tokenizer's BOS token (EOS where there is none), up to ``doc_len`` new tokens, cut at the
  first EOS. Documents are packed like the corpus: tokens, then EOS, into rows of exactly L tokens.
- **Which rows.** Only rows that training reads are replaced, so generation costs only what is used:
  ``rows_read`` lists the rows the run's batches draw (``distill.train.Batches``), and a seeded
  ``fraction`` of those is overwritten. ``--retrieval-mix`` is applied after, to any row.
- **Cache.** The packed stream is written once to ``$ATTNSWAP_CACHE/teacher-text/<key>.safetensors``
  (atomically), the key naming the model's weight files (``loading.source_stamp``), the tokens asked,
  the document length, the seed, the sampling, the dtype, the device type and the transformers release. A resumed
  run reads the same rows; the checkpoint binds their hash too.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .errors import AttnSwapError

SAMPLING = {"temperature": 1.0, "top_p": 0.9}  # nucleus: beat plain sampling out of domain (docs/GQA.md)


def rows_read(n: int, batch_size: int, seed: int, steps: int, world: int = 1) -> torch.Tensor:
    """The distinct row indices (sorted) that ``steps`` of ``Batches(n rows, batch_size, seed)`` draw,
    over all ``world`` processes."""
    from .distill.train import Batches

    idx = torch.cat([Batches.indices(n, batch_size, seed, world, s) for s in range(steps)]) if steps else torch.empty(0, dtype=torch.long)
    return torch.unique(idx)


def pick_rows(read: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A seeded ``fraction`` of the rows read (sorted)."""
    k = round(fraction * read.numel())
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    return torch.sort(read[torch.randperm(read.numel(), generator=g)[:k]]).values


def pack(docs: list[torch.Tensor], eos: int, n_rows: int, seq_len: int) -> torch.Tensor:
    """Documents (1-d token ids, without EOS) as (n_rows, seq_len): each document's tokens then EOS,
    concatenated and cut into rows. Raises if they are too few."""
    stream = torch.cat([torch.cat([d.long(), torch.tensor([eos])]) for d in docs]) if docs else torch.empty(0, dtype=torch.long)
    need = n_rows * seq_len
    if stream.numel() < need:
        raise AttnSwapError(f"teacher text: {stream.numel()} tokens sampled, {need} needed")
    return stream[:need].view(n_rows, seq_len)


def _start_token(tokenizer) -> int:
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise AttnSwapError("--teacher-text needs a tokenizer with a BOS or EOS token to start documents from")
    return int(tid)


def sample_documents(model, tokenizer, tokens: int, doc_len: int, seed: int, batch_size: int, label: str = "teacher text"):
    """Documents sampled from ``model`` until they hold at least ``tokens`` tokens with their EOS;
    deterministic for a seed on one device type (the global RNG is left as it was)."""
    from transformers import GenerationConfig

    from .progress import progress_bar

    eos = tokenizer.eos_token_id
    if eos is None:
        raise AttnSwapError("--teacher-text needs a tokenizer with an EOS token to end documents")
    start = _start_token(tokenizer)
    dev = next(model.parameters()).device
    gen = GenerationConfig(do_sample=True, top_k=0, **SAMPLING, max_new_tokens=doc_len,
                           min_new_tokens=1, eos_token_id=eos, pad_token_id=eos)
    docs: list[torch.Tensor] = []
    have, i = 0, 0
    was_training = model.training
    model.eval()
    with progress_bar() as bar, torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.no_grad():
        task = bar.add_task(label, total=tokens)
        while have < tokens:
            torch.manual_seed(seed * 1_000_003 + i)
            ids = torch.full((batch_size, 1), start, dtype=torch.long, device=dev)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)[:, 1:].cpu()
            for row in out:
                ends = (row == eos).nonzero()
                d = row[: int(ends[0])] if ends.numel() else row
                if d.numel() == 0:
                    continue
                docs.append(d.clone())
                have += d.numel() + 1
                if have >= tokens:
                    break
            bar.update(task, completed=min(have, tokens))
            i += 1
    model.train(was_training)
    return docs


def default_batch(model, doc_len: int) -> int:
    """Documents sampled at once: 32 on the CPU; on CUDA as many as a quarter of the free memory holds
    in KV cache (at most 512: SmolLM2 takes ~24 MB a 1,024-token row), at least 1."""
    p = next(model.parameters())
    if p.device.type != "cuda":
        return 32
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    row = 2 * c.num_hidden_layers * kv * head_dim * p.element_size() * (doc_len + 1)
    free, _ = torch.cuda.mem_get_info(p.device)
    return max(1, min(512, int(free // 4 // row)))


def cache_path(key: dict) -> Path:
    from .loading import cache_root

    digest = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:20]
    return cache_root() / "teacher-text" / f"{digest}.safetensors"


def teacher_rows(model, tokenizer, n_rows: int, seq_len: int, seed: int, stamp: str, batch_size: int | None = None):
    """(n_rows, seq_len) rows of teacher-written text, from the cache or sampled and cached."""
    import transformers
    from safetensors.torch import load_file, save_file

    if n_rows == 0:
        return torch.empty(0, seq_len, dtype=torch.long)
    p = next(model.parameters())
    doc_len = min(seq_len, 1024)
    key = {"model": stamp, "rows": n_rows, "seq_len": seq_len, "doc_len": doc_len, "seed": seed,
           "dtype": str(p.dtype), "device": p.device.type, "transformers": transformers.__version__, "sampling": repr(sorted(SAMPLING.items())), "v": 1}
    path = cache_path(key)
    if path.is_file():
        return load_file(str(path))["rows"].long()
    if batch_size is None:
        batch_size = default_batch(model, doc_len)
    docs = sample_documents(model, tokenizer, n_rows * seq_len, doc_len, seed, batch_size)
    rows = pack(docs, tokenizer.eos_token_id, n_rows, seq_len)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"rows": rows.to(torch.int32).contiguous()}, str(tmp))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # nothing half-written stays in the cache
        raise AttnSwapError(f"could not cache the teacher's text in {path.parent} ({e.strerror or e}); set ATTNSWAP_CACHE") from None
    return rows


def mix_teacher_text(train: torch.Tensor, model, tokenizer, fraction: float, *, batch_size: int, steps: int,
                     seed: int, stamp: str, world: int = 1):
    """``train`` with a seeded ``fraction`` of the rows the run reads replaced by teacher-written rows
    (a new tensor; ``train`` is untouched), and the indices replaced."""
    if fraction == 0:
        return train, torch.empty(0, dtype=torch.long)
    chosen = pick_rows(rows_read(train.shape[0], batch_size, seed, steps, world), fraction, seed)
    rows = teacher_rows(model, tokenizer, chosen.numel(), train.shape[1], seed, stamp)
    out = train.clone()
    out[chosen] = rows.to(out.dtype)
    return out, chosen
