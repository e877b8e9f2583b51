"""``convert sparsify``: keep exact softmax attention and learn which key blocks each query block
needs (``--method seer``), training only the small gates against the teacher's attention maps."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import AttnSwapError
from .common import (RunConfig, check_convertible, check_positive, check_seq_len, load_for_training,
                     plan_training_outputs, require_text, resume_command, save_output, tokens_hash)

METHODS = ("seer",)


@dataclass
class SparsifyConfig(RunConfig):
    method: str = "seer"
    layers: str = "all"
    block: int = 64
    gate_dim: int = 64
    sparsity: float = 0.9
    threshold: float = 0.0
    token_budget: int = 0
    lr: float = 1e-3
    seq_len: int | None = None  # default: the model's maximum, at most 8192 (sparsity pays off at length)
    batch_size: int = 1


def check(cfg: SparsifyConfig) -> None:
    """Everything that can be refused without loading the model."""
    if cfg.method not in METHODS:
        raise AttnSwapError(f"unknown --method {cfg.method!r}; available: {', '.join(METHODS)}")
    check_positive(steps=cfg.steps, seq_len=cfg.seq_len, batch_size=cfg.batch_size, block=cfg.block, gate_dim=cfg.gate_dim)
    if cfg.gate_dim % 2:
        raise AttnSwapError(f"--gate-dim must be even (got {cfg.gate_dim})")
    if not 0.0 <= cfg.sparsity < 1.0:
        raise AttnSwapError(f"--sparsity must be in [0, 1) (got {cfg.sparsity})")
    if not 0.0 <= cfg.threshold <= 1.0:
        raise AttnSwapError(f"--threshold must be in [0, 1] (got {cfg.threshold})")
    if cfg.token_budget < 0:
        raise AttnSwapError(f"--token-budget must not be negative (got {cfg.token_budget})")
    if cfg.save_every < 0 or cfg.nan_retries < 0:
        raise AttnSwapError("--save-every and --nan-retries must not be negative")


def run(cfg: SparsifyConfig) -> dict | None:
    """Convert, train the gates, evaluate, save. Returns the report (None on non-main processes)."""
    from .. import loading
    from ..convert import parse_layers
    from ..convert.swap import make_swap
    from ..distill.checkpoint import TrainingRun, use_run
    from ..distill.train import DistillConfig, distill
    from ..evals.perplexity import perplexity
    from ..modeling import convert_model

    t0 = time.perf_counter()
    require_text(model=cfg.model, data=cfg.data)
    check(cfg)
    out = cfg.out or cfg.default_out(cfg.method)
    ckpts = plan_training_outputs(cfg, out)

    src = loading.resolve(cfg.model)
    mcfg = loading.load_config(src)
    check_convertible(cfg.model, mcfg)
    seq_len = cfg.seq_len or min(getattr(mcfg, "max_position_embeddings", None) or 8192, 8192)
    check_seq_len(seq_len, mcfg)
    layers = parse_layers(cfg.layers, mcfg.num_hidden_layers)
    options = {"block": cfg.block, "gate_dim": cfg.gate_dim, "sparsity": cfg.sparsity, "threshold": cfg.threshold,
               "token_budget": cfg.token_budget}
    swap = make_swap(cfg.method, layers, options, mcfg)

    loading.check_weight_files(src)  # safetensors only, before the data is read
    ld = load_for_training(cfg.model, src, cfg.device, cfg.dtype, cfg.data, seq_len, cfg.eval_tokens,
                           tokens_needed=cfg.steps * cfg.batch_size * seq_len)
    net = ld.model
    ckpts.bind({"model": cfg.model, "data": cfg.data,
                "train_tokens": tokens_hash(ld.train),
                "swap": swap, "steps": cfg.steps, "seq_len": seq_len, "batch_size": cfg.batch_size, "seed": cfg.seed,
                "dtype": str(ld.dtype), "lr": cfg.lr}, cfg.resume)
    report: dict = {"model": cfg.model, "method": cfg.method, "layers": layers, "options": options, "steps": cfg.steps,
                    "seq_len": seq_len, "batch_size": cfg.batch_size, "data": ld.info}
    if ld.heldout is not None and ld.main:
        report["teacher"] = perplexity(net, ld.heldout, batch_size=1, label="teacher perplexity")
    if ld.ood is not None and ld.main:
        report["out_of_domain"] = {"teacher": perplexity(net, ld.ood, batch_size=1, label="teacher perplexity (out of domain)")}
    import torch

    torch.manual_seed(cfg.seed)  # the gates' initial values: the same in a resumed run
    convert_model(net, [swap], source=cfg.model)
    dcfg = DistillConfig(transfer_steps=cfg.steps, lora_steps=0, batch_size=cfg.batch_size, transfer_lr=cfg.lr,
                         seed=cfg.seed)
    with use_run(TrainingRun(ckpts, max_retries=cfg.nan_retries, resume_hint=resume_command(cfg.command, "sparsify"))):
        net, stats = distill(net, ld.train, dcfg)
    if not ld.main:
        return None
    if ld.heldout is not None:
        mods = _gated(net)
        for m in mods:
            m.reset_density()
        report["converted"] = perplexity(net, ld.heldout, batch_size=1, label="sparse perplexity")
        report["density"] = {str(m.layer_idx): m.mean_density for m in mods}
    if ld.ood is not None:
        report["out_of_domain"]["converted"] = perplexity(net, ld.ood, batch_size=1, label="sparse perplexity (out of domain)")
    save_output(cfg, net, ld.tokenizer, out, ckpts)
    report.update(out=str(out), trained_params=stats.transfer_params, tokens_seen=stats.tokens,
                  train_seconds=stats.seconds, wall_seconds=time.perf_counter() - t0, final_losses=stats.losses,
                  device=str(ld.device))
    return report


def _gated(model):
    from ..convert import swapped_modules

    return [m for m in swapped_modules(model) if hasattr(m, "reset_density")]
