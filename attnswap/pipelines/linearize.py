"""``convert linearize``: swap softmax attention for learnable linear + sliding-window attention
(lolcats, lizard), then distil in two stages (attention transfer, then LoRA against the teacher's logits)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import AttnSwapError
from .common import (RunConfig, check_convertible, check_positive, check_retrieval_mix, check_seq_len,
                     load_for_training, plan_training_outputs, require_text, resume_command, retrieval_mix,
                     save_output, tokens_hash)

# the attention options' flags, for the refusal of one the method does not take
METHOD_FLAGS = {"window": "--window", "feature_dim": "--feature-dim", "meta_tokens": "--meta-tokens",
                "sinks": "--sinks", "feature_rope": "--feature-rope"}


@dataclass
class LinearizeConfig(RunConfig):
    attention: str = "lolcats"
    window: int | None = None  # default: the method's (64 for lolcats, 128 for lizard)
    meta_tokens: int | None = None
    feature_dim: int | None = None
    layers: str = "all"
    keep_softmax: str = ""
    transfer_steps: int | None = None  # default: 40% of steps
    lora_steps: int | None = None  # default: the rest of steps
    lr: float = 1e-3
    transfer_lr: float = 1e-2
    lora_rank: int = 8
    ce_weight: float = 0.0
    lora_feature_maps: bool = True
    retrieval_mix: float = 0.0  # fraction of training sequences rewritten to carry retrieval (synthetic.py)
    sinks: int | None = None
    feature_rope: bool | None = None


def method_options(method: str, **given) -> dict:
    """The attention options given (None: not given); one that ``method`` does not take is refused
    (it would be saved into a config that no loader accepts)."""
    from ..convert import METHODS
    from ..convert.spec import option_names

    if method not in METHODS:
        raise AttnSwapError(f"unknown attention method {method!r}; available: {', '.join(sorted(METHODS))}")
    options = {k: v for k, v in given.items() if v is not None}
    takes = option_names(method)
    for k in options:
        if takes is not None and k not in takes:
            users = sorted(m for m in METHODS if k in (option_names(m) or ()))
            only = f" (it is a {', '.join(users)} option)" if users else ""
            raise AttnSwapError(f"{METHOD_FLAGS.get(k, k)} does not apply to --attention {method}{only}")
    return options


def run(cfg: LinearizeConfig) -> dict | None:
    """Convert, distil, evaluate, save. Returns the report (None on non-main processes)."""
    from .. import loading
    from ..convert import parse_layers
    from ..convert.swap import make_swap
    from ..distill.checkpoint import TrainingRun, use_run
    from ..distill.train import DistillConfig, distill, split_steps
    from ..evals.perplexity import perplexity
    from ..modeling import convert_model

    t0 = time.perf_counter()
    require_text(model=cfg.model, data=cfg.data)
    check_positive(steps=cfg.steps, window=cfg.window, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                   feature_dim=cfg.feature_dim, lora_rank=cfg.lora_rank)
    if any(v is not None and v < 0 for v in (cfg.transfer_steps, cfg.lora_steps)):
        raise AttnSwapError("--transfer-steps and --lora-steps must not be negative")
    n_transfer, n_lora = split_steps(cfg.steps, cfg.transfer_steps, cfg.lora_steps)
    check_retrieval_mix(cfg.retrieval_mix)
    for flag, v in (("--sinks", cfg.sinks), ("--meta-tokens", cfg.meta_tokens)):
        if v is not None and v < 0:
            raise AttnSwapError(f"{flag} must not be negative (got {v})")
    options = method_options(cfg.attention, window=cfg.window, feature_dim=cfg.feature_dim,
                             meta_tokens=cfg.meta_tokens, sinks=cfg.sinks, feature_rope=cfg.feature_rope)
    out = cfg.out or cfg.default_out(cfg.attention)
    ckpts = plan_training_outputs(cfg, out)

    src = loading.resolve(cfg.model)
    mcfg = loading.load_config(src)
    check_convertible(cfg.model, mcfg)
    check_seq_len(cfg.seq_len, mcfg)
    n_layers = mcfg.num_hidden_layers
    chosen = parse_layers(cfg.layers, n_layers)  # before --keep-softmax: its errors come first
    kept = set(parse_layers(cfg.keep_softmax, n_layers) if cfg.keep_softmax else [])
    chosen = [i for i in chosen if i not in kept]
    if not chosen:
        raise AttnSwapError("no layers left to convert (check --layers and --keep-softmax)")
    swap = make_swap(cfg.attention, chosen, options, mcfg)
    loading.check_weight_files(src)  # safetensors only: refused before the data is read, and again before loading

    ld = load_for_training(cfg.model, src, cfg.device, cfg.dtype, cfg.data, cfg.seq_len, cfg.eval_tokens,
                           tokens_needed=(n_transfer + n_lora) * cfg.batch_size * cfg.seq_len)
    net = ld.model
    ckpts.bind({"model": cfg.model, "data": cfg.data, "train_tokens": tokens_hash(ld.train), "swap": swap,
                "transfer_steps": n_transfer, "lora_steps": n_lora, "seq_len": cfg.seq_len,
                "batch_size": cfg.batch_size, "seed": cfg.seed, "dtype": str(ld.dtype), "transfer_lr": cfg.transfer_lr,
                "lr": cfg.lr, "lora_rank": cfg.lora_rank, "ce_weight": cfg.ce_weight,
                "lora_feature_maps": cfg.lora_feature_maps, "retrieval_mix": cfg.retrieval_mix}, cfg.resume)

    report: dict = {"model": cfg.model, "attention": cfg.attention, "layers": chosen,
                    "window": swap["options"]["window"], "steps": {"transfer": n_transfer, "lora": n_lora},
                    "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "data": ld.info}
    if ld.heldout is not None and ld.main:
        report["teacher"] = perplexity(net, ld.heldout, label="teacher perplexity")
    if ld.ood is not None and ld.main:
        report["out_of_domain"] = {"teacher": perplexity(net, ld.ood, label="teacher perplexity (out of domain)")}
    convert_model(net, [swap], source=cfg.model)
    dcfg = DistillConfig(transfer_steps=n_transfer, lora_steps=n_lora, batch_size=cfg.batch_size,
                         transfer_lr=cfg.transfer_lr, lr=cfg.lr, lora_rank=cfg.lora_rank, ce_weight=cfg.ce_weight,
                         seed=cfg.seed, lora_trains_features=cfg.lora_feature_maps)
    mixed, report["retrieval_sequences"] = retrieval_mix(ld.train, ld.tokenizer, cfg.retrieval_mix, cfg.seed)
    report.update(retrieval_mix=cfg.retrieval_mix, training_sequences=ld.train.shape[0])  # training only
    hint = resume_command(cfg.command, "linearize")
    with use_run(TrainingRun(ckpts, max_retries=cfg.nan_retries, resume_hint=hint)):
        net, stats = distill(net, mixed, dcfg)
    if not ld.main:  # the other processes helped train; the main one evaluates and saves
        return None
    if ld.heldout is not None:
        report["converted"] = perplexity(net, ld.heldout, label="converted perplexity")
    if ld.ood is not None:
        report["out_of_domain"]["converted"] = perplexity(net, ld.ood, label="converted perplexity (out of domain)")
    save_output(cfg, net, ld.tokenizer, out, ckpts)
    report.update(out=str(out), trained_params={"transfer": stats.transfer_params, "lora": stats.lora_params},
                  tokens_seen=stats.tokens, train_seconds=stats.seconds, wall_seconds=time.perf_counter() - t0,
                  final_losses=stats.losses, device=str(ld.device))
    return report
