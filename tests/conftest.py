"""Shared fixtures: tiny random models of each supported family, with a tiny offline tokenizer."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=3, max_position_embeddings=512, vocab_size=300)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """On a CUDA machine a test that trains on the CPU after one that trained on the GPU would meet accelerate's
    process-wide state made for the GPU (``Accelerator(cpu=True)`` then refuses); each test starts from none."""
    yield
    if torch.cuda.is_available():
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def tiny_config(model_type: str = "llama", **over):
    from transformers import AutoConfig

    kw = {**TINY, **over}
    if model_type in ("qwen2", "qwen3", "mistral"):
        kw.setdefault("sliding_window", None)
    if model_type == "qwen3":
        kw.setdefault("head_dim", 16)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str = "llama", seed: int = 0, **over):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **over)).eval()


def tiny_tokenizer():
    """A byte-level BPE trained on a few sentences: offline, deterministic, vocab <= 300."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The quick brown fox jumps over the lazy dog.", "Linear attention keeps a running state."] * 20
    tk.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


def built_once(tmp_path_factory, name: str, build) -> Path:
    """Directory ``name``, filled by ``build(directory)`` once per test run and shared by every xdist
    worker (a worker that needs it while another builds it waits on a lock; a failed build is tried
    again by the next test that asks). For what costs tens of seconds (a conversion of SmolLM2,
    launches of several processes) and several tests only read."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' base temps sit in one directory of this run
    d, done = root / name, root / f"{name}.complete"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            build(d)
            done.touch()
    return d


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama with tokenizer, usable as ``--model``."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    """A small English text file for --data."""
    f = tmp_path_factory.mktemp("data") / "corpus.txt"
    from pydoc_data.topics import topics

    f.write_text("\n\n".join(topics[k] for k in sorted(topics)[:30]))
    return f


def python() -> str:
    return sys.executable
