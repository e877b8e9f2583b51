"""``convert sparsify``: keep exact softmax attention where it is needed, skip the rest.

- ``--method seer``: learn which key blocks each query block needs, training only small gates
  against the teacher's attention maps.
- ``--method loza``: turn a ``--fraction`` of the layers into streaming attention (sink blocks plus
  recent blocks). Which layers is calibrated from data (``distill/calibrate.py``): every layer mixes
  exact and streaming outputs with a learned alpha, on text where a share of the rows carries facts
  asked for far later (``synthetic.mix_retrieval``); the lowest alphas stream. A short LoRA recovery
  against the teacher's logits follows. ``--steps`` covers both: ``CALIB_SHARE`` (30%) calibrates,
  the rest is LoRA, unless ``--calib-steps`` / ``--lora-steps`` say otherwise."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import AttnSwapError
from .common import (Clock, RunConfig, check_convertible, check_positive, check_share, check_seq_len,
                     load_for_training, plan_training_outputs, require_text, resume_command,
                     save_run, sharded_launch, tokens_hash)

METHODS = ("seer", "loza")
CALIB_SHARE = 0.3  # loza: share of --steps that calibrates (the rest is LoRA recovery)
KV_REPORT_LENGTH = 8192  # loza: the KV cache is reported for a sequence this long


@dataclass
class SparsifyConfig(RunConfig):
    method: str = "seer"
    layers: str = "all"
    block: int | None = None  # default: 64 for seer, 128 for loza
    gate_dim: int = 64
    sparsity: float = 0.9
    threshold: float = 0.0
    token_budget: int = 0
    lr: float = 1e-3
    seq_len: int | None = None  # default: the model's maximum, at most 8192 (sparsity pays off at length)
    batch_size: int = 1
    # loza
    fraction: float = 0.5  # of the layers (of --layers) that become streaming
    sink_blocks: int = 1
    local_blocks: int = 7
    calib_steps: int | None = None  # default: CALIB_SHARE of --steps
    lora_steps: int | None = None  # default: the rest
    calib_lr: float = 0.05
    penalty: float = 0.1  # calibration: weight of mean(alpha)
    retrieval_mix: float = 0.5  # loza's calibration and LoRA data: share of rows carrying facts asked for later
    lora_rank: int = 8

    @property
    def block_size(self) -> int:
        return self.block if self.block is not None else (128 if self.method == "loza" else 64)


def split_steps(steps: int, calib_steps: int | None, lora_steps: int | None) -> tuple[int, int]:
    """loza's --steps: CALIB_SHARE calibrates (at least one step), the rest is LoRA; either stage's
    own flag wins, and the other takes what is left of --steps."""
    if calib_steps is None and lora_steps is None:
        calib_steps = max(1, round(steps * CALIB_SHARE))
        return calib_steps, max(0, steps - calib_steps)
    if calib_steps is None:
        return max(1, steps - lora_steps), lora_steps
    return calib_steps, max(0, steps - calib_steps) if lora_steps is None else lora_steps


def check(cfg: SparsifyConfig) -> None:
    """Everything that can be refused without loading the model."""
    if cfg.method not in METHODS:
        raise AttnSwapError(f"unknown --method {cfg.method!r}; available: {', '.join(METHODS)}")
    check_positive(steps=cfg.steps, seq_len=cfg.seq_len, batch_size=cfg.batch_size, block=cfg.block, gate_dim=cfg.gate_dim,
                   local_blocks=cfg.local_blocks, calib_steps=cfg.calib_steps, lora_rank=cfg.lora_rank)
    if not 0.0 <= cfg.fraction <= 1.0:
        raise AttnSwapError(f"--fraction must be in [0, 1] (got {cfg.fraction})")
    check_share("--retrieval-mix", cfg.retrieval_mix)
    if cfg.sink_blocks < 0 or (cfg.lora_steps is not None and cfg.lora_steps < 0) or cfg.penalty < 0:
        raise AttnSwapError("--sink-blocks, --lora-steps and --penalty must not be negative")
    if not (cfg.lr > 0 and cfg.calib_lr > 0):
        raise AttnSwapError("--lr and --calib-lr must be positive")
    if cfg.gate_dim % 2:
        raise AttnSwapError(f"--gate-dim must be even (got {cfg.gate_dim})")
    if not 0.0 <= cfg.sparsity < 1.0:
        raise AttnSwapError(f"--sparsity must be in [0, 1) (got {cfg.sparsity})")
    if not 0.0 <= cfg.threshold <= 1.0:
        raise AttnSwapError(f"--threshold must be in [0, 1] (got {cfg.threshold})")
    if cfg.token_budget < 0:
        raise AttnSwapError(f"--token-budget must not be negative (got {cfg.token_budget})")


def run(cfg: SparsifyConfig) -> dict | None:
    """Convert, train (seer: the gates; loza: calibration, then LoRA), evaluate, save. Returns the
    report (None on non-main processes)."""
    from .. import loading
    from ..convert import parse_layers
    from ..convert.swap import make_swap
    from ..distill.checkpoint import TrainingRun, use_run
    from ..evals.perplexity import perplexity

    clock = Clock()
    perplexity = clock.timed("evaluation", perplexity)
    require_text(model=cfg.model, data=cfg.data)
    check(cfg)
    out = cfg.out or cfg.default_out(cfg.method)
    ckpts = plan_training_outputs(cfg, out)
    shard = sharded_launch(cfg, "sparsify")

    src = loading.resolve(cfg.model)
    mcfg = loading.load_config(src)
    check_convertible(cfg.model, mcfg)
    seq_len = cfg.seq_len or min(getattr(mcfg, "max_position_embeddings", None) or 8192, 8192)
    check_seq_len(seq_len, mcfg)
    layers = parse_layers(cfg.layers, mcfg.num_hidden_layers)
    if cfg.method == "loza":
        options = {"block": cfg.block_size, "sink_blocks": cfg.sink_blocks, "local_blocks": cfg.local_blocks}
        stages = dict(zip(("calib_steps", "lora_steps"), split_steps(cfg.steps, cfg.calib_steps, cfg.lora_steps)))
        extra = {**stages, "fraction": cfg.fraction, "calib_lr": cfg.calib_lr, "penalty": cfg.penalty,
                 "retrieval_mix": cfg.retrieval_mix, "lora_rank": cfg.lora_rank}
    else:
        options = {"block": cfg.block_size, "gate_dim": cfg.gate_dim, "sparsity": cfg.sparsity,
                   "threshold": cfg.threshold, "token_budget": cfg.token_budget}
        extra = {}
    swap = make_swap(cfg.method, layers, options, mcfg)
    total_steps = sum(extra[k] for k in ("calib_steps", "lora_steps")) if extra else cfg.steps

    loading.check_weight_files(src)  # safetensors only, before the data is read
    with clock.phase("loading"):
        ld = load_for_training(cfg.model, src, cfg.device, cfg.dtype, cfg.data, seq_len, cfg.eval_tokens,
                               tokens_needed=total_steps * cfg.batch_size * seq_len)
    net = ld.model
    ckpts.bind({"model": cfg.model, "data": cfg.data,
                "train_tokens": tokens_hash(ld.train),
                "swap": swap, "steps": cfg.steps, "seq_len": seq_len, "batch_size": cfg.batch_size, "seed": cfg.seed,
                "dtype": str(ld.dtype), "lr": cfg.lr, **extra}, cfg.resume)
    report: dict = {"model": cfg.model, "method": cfg.method, "layers": layers, "options": options, "steps": cfg.steps,
                    "seq_len": seq_len, "batch_size": cfg.batch_size, "data": ld.info, **extra}
    if shard:
        report["sharded"] = {"method": "FSDP2 fully_shard", "processes": ld.processes}
    if ld.heldout is not None and ld.main:
        report["teacher"] = perplexity(net, ld.heldout, batch_size=1, label="teacher perplexity")
    if ld.ood is not None and ld.main:
        report["out_of_domain"] = {"teacher": perplexity(net, ld.ood, batch_size=1, label="teacher perplexity (out of domain)")}

    train = _train_loza if cfg.method == "loza" else _train_seer
    with use_run(TrainingRun(ckpts, max_retries=cfg.nan_retries, resume_hint=resume_command(cfg.command, "sparsify"))), \
            clock.phase("training"):
        net, stats = train(net, ld, cfg, swap, report, shard)
    if not ld.main and not shard:
        return None
    # sharded, every process takes part in the evaluation's forward passes (the main one reports)
    label = "streaming" if cfg.method == "loza" else "sparse"
    if ld.heldout is not None:
        mods = _gated(net)
        for m in mods:
            m.reset_density()
        report["converted"] = perplexity(net, ld.heldout, batch_size=1, label=f"{label} perplexity")
        if cfg.method == "seer":
            report["density"] = {str(m.layer_idx): m.mean_density for m in mods}
    if ld.ood is not None:
        ppl = perplexity(net, ld.ood, batch_size=1, label=f"{label} perplexity (out of domain)")
        if ld.main:
            report["out_of_domain"]["converted"] = ppl
    with clock.phase("saving"):
        saved = save_run(cfg, ld, net, out, ckpts, shard)
    if not saved:
        return None
    report.update(out=str(out), trained_params=stats.transfer_params + stats.lora_params, tokens_seen=stats.tokens,
                  train_seconds=stats.seconds, wall_seconds=clock.wall(), seconds=clock.report(),
                  startup_seconds=clock.startup, final_losses=stats.losses,
                  device=str(ld.device))
    return report


def _train_seer(net, ld, cfg: SparsifyConfig, swap: dict, report: dict, shard: bool = False):
    """Only the gates train (stage 1 against the teacher's attention maps); the weights stay."""
    import torch

    from ..distill.train import DistillConfig, distill
    from ..modeling import convert_model

    torch.manual_seed(cfg.seed)  # the gates' initial values: the same in a resumed run
    convert_model(net, [swap], source=cfg.model)
    dcfg = DistillConfig(transfer_steps=cfg.steps, lora_steps=0, batch_size=cfg.batch_size, transfer_lr=cfg.lr,
                         seed=cfg.seed)
    return distill(net, ld.train, dcfg, shard=shard)


def _train_loza(net, ld, cfg: SparsifyConfig, swap: dict, report: dict, shard: bool = False):
    """Every layer of the swap a streaming candidate; calibrate their alphas on retrieval-bearing
    text; the ``fraction`` with the lowest alpha stream, the others go back to exact attention; LoRA
    recovery against the teacher's logits on the same text."""
    from ..convert import apply_swaps
    from ..distill.calibrate import CalibrationConfig, calibrate, select
    from ..distill.train import DistillConfig, distill
    from ..evals.probe import retrieval_probe
    from ..modeling import convert_model
    from ..synthetic import build_mix

    mix = build_mix(ld.train, ld.tokenizer, fraction=cfg.retrieval_mix, seed=cfg.seed)  # = mix_retrieval(...), with spans
    seqs = mix.ids
    report.update(retrieval_sequences=len(mix.rows), training_sequences=int(seqs.shape[0]))
    convert_model(net, [swap], source=cfg.model)
    if ld.main:  # which layers retrieve, by the teacher's attention (for the report and its plot)
        report["retrieval_probe"] = retrieval_probe(net, seqs, mix.details)
    calib = calibrate(net, seqs, CalibrationConfig(steps=report["calib_steps"], batch_size=cfg.batch_size,
                                                   lr=cfg.calib_lr, penalty=cfg.penalty, seed=cfg.seed))
    alphas = calib.units()
    streaming = select(alphas, round(cfg.fraction * len(swap["layers"])))
    swaps = loza_swaps(swap, streaming)
    apply_swaps(net, swaps)  # rebuilt over the same projections: loza layers own no weights
    report.update(alpha={str(k): v for k, v in alphas.items()}, streaming_layers=streaming,
                  dense_layers=[i for i in swap["layers"] if i not in streaming], calibration_seconds=calib.seconds,
                  calibration_loss=calib.loss, calibration_tokens=calib.tokens,
                  kv_cache=kv_cache_bytes(net.config, swaps, KV_REPORT_LENGTH, ld.dtype))
    net.config.attnswap = {**net.config.attnswap, "swaps": swaps,
                           "calibration": {"unit": "layer", "alpha": report["alpha"], "steps": report["calib_steps"],
                                           "penalty": cfg.penalty, "retrieval_mix": cfg.retrieval_mix}}
    dcfg = DistillConfig(transfer_steps=0, lora_steps=report["lora_steps"], batch_size=cfg.batch_size, lr=cfg.lr,
                         lora_rank=cfg.lora_rank, lora_alpha=2.0 * cfg.lora_rank, seed=cfg.seed,
                         step_offset=report["calib_steps"])
    net, stats = distill(net, seqs, dcfg, shard=shard)  # sharded after calibration, which runs unsharded
    stats.tokens += calib.tokens
    stats.seconds += calib.seconds
    stats.losses["calibration"] = calib.loss
    stats.transfer_params = sum(len(a) for a in calib.alphas.values())  # the alphas
    return net, stats


def loza_swaps(swap: dict, streaming: list[int]) -> list[dict]:
    """The candidate swap split in two: its streaming layers and its dense ones (empty parts dropped)."""
    dense = [i for i in swap["layers"] if i not in streaming]
    parts = [(sorted(streaming), True), (dense, False)]
    return [{**swap, "layers": layers, "options": {**swap["options"], "streaming": on}} for layers, on in parts if layers]


def kv_cache_bytes(config, swaps: list[dict], length: int, dtype) -> dict:
    """KV cache bytes of the whole model for a sequence of ``length`` tokens, before (every layer keeps
    every key) and after (streaming layers keep at most their sink and window)."""
    import torch

    heads = config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * heads * dim * torch.empty((), dtype=dtype).element_size()  # keys and values, one layer
    n = config.num_hidden_layers
    kept = [length] * n
    for s in swaps:
        if s["options"].get("streaming"):
            o = s["options"]
            for i in s["layers"]:
                kept[i] = min(length, (o["sink_blocks"] + o["local_blocks"]) * o["block"])
    before, after = n * length * per_token, sum(kept) * per_token
    return {"length": length, "before": before, "after": after, "ratio": after / before,
            "per_token_before": before // length, "per_token_after": after / length}


def _gated(model):
    from ..convert import swapped_modules

    return [m for m in swapped_modules(model) if hasattr(m, "reset_density")]
