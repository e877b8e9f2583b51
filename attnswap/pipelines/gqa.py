"""``convert gqa``: merge key/value heads (MHA/GQA -> fewer KV heads) by weight surgery, then distil
against the original model. The output is a stock transformers checkpoint with fewer KV heads."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import AttnSwapError
from .common import (Clock, RunConfig, check_positive, check_share, check_seq_len,
                     load_for_training, plan_training_outputs, refuse_given, require_text, resume_command,
                     retrieval_mix, save_run, sharded_launch, tokens_hash)

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
FULL_TRAIN = {"kv": ("k_proj", "v_proj"), "attn": _ATTN, "all": (*_ATTN, "gate_proj", "up_proj", "down_proj")}
"""--train modes that train whole weight matrices, and the linear layers they train."""

# the settings only a run that trains uses
TRAINING = ("steps", "lr", "lora_rank", "ce_weight", "retrieval_mix", "save_every", "checkpoint_dir", "resume", "keep_checkpoints",
            "nan_retries", "transfer_steps", "transfer_lr", "teacher_text")


@dataclass
class GqaConfig(RunConfig):
    kv_heads: int | None = None  # required
    grouping: str = "similarity"
    merge: str = "subspace"
    value_refit: bool | None = None  # default: on with merge "aligned"
    train: str = "lora"
    lr: float | None = None  # default: 1e-3 for lora, 1e-4 for the full modes
    lora_rank: int = 8
    ce_weight: float = 0.0
    calib_batches: int = 4
    retrieval_mix: float = 0.5  # fraction of training sequences rewritten to carry retrieval (synthetic.py; docs/GQA.md)
    transfer_steps: int | None = None  # attention-block transfer, the first part of steps (None: transfer_default)
    transfer_lr: float = 3e-4
    teacher_text: float = 0.0  # share of the rows read that the teacher writes itself (teacher_text.py)


TRANSFER_SHARE_ALL = 0.2  # of --steps, with --train all (docs/GQA.md: 1000 steps on the H200)


def transfer_default(cfg: GqaConfig) -> int:
    """--transfer-steps as given, else a fifth of --steps with --train all and none otherwise: at 1000
    steps on the H200 (subspace merge) 200 transfer + 800 all beat 1000 all out of domain (1.434x
    against 1.505x at 2k) and on MQAR (82.5% against 55.2%); no other mode has been compared."""
    if cfg.transfer_steps is not None:
        return cfg.transfer_steps
    return int(cfg.steps * TRANSFER_SHARE_ALL) if cfg.train == "all" else 0


def split_steps(steps: int, n: int) -> tuple[int, int]:
    """(attention-block transfer steps, --train steps): --steps is the total of both."""
    if n > steps:
        raise AttnSwapError(f"--transfer-steps {n} is more than --steps {steps} (the total of both stages)")
    return n, steps - n


def check(cfg: GqaConfig) -> None:
    """Everything that can be refused without reading the model."""
    if cfg.kv_heads is None:
        raise AttnSwapError("--kv-heads is required: the number of key/value heads to keep")
    check_positive(steps=cfg.steps, seq_len=cfg.seq_len, batch_size=cfg.batch_size, lora_rank=cfg.lora_rank,
                   calib_batches=cfg.calib_batches)
    if cfg.train not in ("lora", "none", *FULL_TRAIN):
        raise AttnSwapError(f"unknown --train {cfg.train!r}; choose from lora, kv, attn, all, none")
    check_share("--retrieval-mix", cfg.retrieval_mix)
    check_share("--teacher-text", cfg.teacher_text)
    if cfg.transfer_steps is not None and cfg.transfer_steps < 0:
        raise AttnSwapError("--transfer-steps must be at least 0")
    if not cfg.transfer_lr > 0:
        raise AttnSwapError("--transfer-lr must be positive")
    if cfg.train != "none":
        split_steps(cfg.steps, transfer_default(cfg))
    if cfg.merge == "subspace" and cfg.value_refit:
        raise AttnSwapError("--value-refit does not apply to --merge subspace: it fits its own value read-outs")
    if cfg.train == "none":
        refuse_given(cfg, TRAINING, "--train none (nothing is trained)")
    elif cfg.train != "lora":
        refuse_given(cfg, ("lora_rank",), f"--train {cfg.train} (no LoRA)")


def run(cfg: GqaConfig) -> dict | None:
    """Merge, distil, evaluate, save. Returns the report (None on non-main processes)."""
    import copy

    import torch

    from .. import loading
    from ..convert.gqa import calibrate, check_request, kv_bytes_per_token, merge_to_gqa
    from ..distill.checkpoint import TrainingRun, use_run
    from ..distill.train import DistillConfig, distill
    from ..evals.perplexity import perplexity

    clock = Clock()
    perplexity = clock.timed("evaluation", perplexity)
    require_text(model=cfg.model, data=cfg.data)
    check(cfg)
    trains = cfg.train != "none"
    lr = cfg.lr if cfg.lr is not None else (1e-4 if cfg.train in FULL_TRAIN else 1e-3)
    out = cfg.out or cfg.default_out(f"gqa{cfg.kv_heads}")
    ckpts = plan_training_outputs(cfg, out)
    # sharded: the model and its teacher copy, LoRA only (whole matrices trained in float32 are not sharded)
    # the transfer calls the attention blocks outside their layers' forward, where FSDP gathers their weights
    n_transfer, n_train = split_steps(cfg.steps, transfer_default(cfg)) if trains else (0, 0)
    shard = sharded_launch(cfg, f"gqa --train {cfg.train}" + (" with --transfer-steps" if n_transfer else ""),
                           supported=cfg.train == "lora" and not n_transfer)

    src = loading.resolve(cfg.model)
    mcfg = loading.load_config(src)
    geom = check_request(mcfg, cfg.kv_heads, cfg.grouping, cfg.merge)
    check_seq_len(cfg.seq_len, mcfg)
    loading.check_weight_files(src)

    bs, seq_len = cfg.batch_size, cfg.seq_len
    with clock.phase("loading"):
        ld = load_for_training(cfg.model, src, cfg.device, cfg.dtype, cfg.data, seq_len, cfg.eval_tokens,
                               tokens_needed=max(cfg.steps if trains else 0, cfg.calib_batches) * bs * seq_len)
    net, dt, held, ood = ld.model, ld.dtype, ld.heldout, ld.ood
    value_refit = cfg.merge == "aligned" if cfg.value_refit is None else cfg.value_refit
    train_rows, written = ld.train, None
    if trains and cfg.teacher_text:
        from ..teacher_text import mix_teacher_text

        with clock.phase("teacher text"):  # sampled from the model before it is merged: the teacher
            train_rows, written = mix_teacher_text(ld.train, net, ld.tokenizer, cfg.teacher_text, batch_size=bs,
                                                   steps=cfg.steps, seed=cfg.seed, stamp=loading.source_stamp(src),
                                                   world=ld.processes)
    if trains:
        ckpts.bind({"model": cfg.model, "data": cfg.data, "train_tokens": tokens_hash(ld.train),
                    "kv_heads": cfg.kv_heads, "grouping": cfg.grouping, "merge": cfg.merge, "value_refit": value_refit,
                    "train": cfg.train, "steps": cfg.steps, "lr": lr, "lora_rank": cfg.lora_rank,
                    "ce_weight": cfg.ce_weight, "calib_batches": cfg.calib_batches,
                    "retrieval_mix": cfg.retrieval_mix, "seq_len": seq_len, "transfer_steps": n_transfer,
                    "transfer_lr": cfg.transfer_lr,
                    "batch_size": bs, "seed": cfg.seed, "dtype": str(dt)}
                   | ({} if written is None else {"teacher_text": cfg.teacher_text,  # absent: older checkpoints resume
                                                  "teacher_rows": tokens_hash(train_rows[written])}), cfg.resume)
    teacher = copy.deepcopy(net).eval()  # the original model, frozen: the distillation target
    for p in teacher.parameters():
        p.requires_grad_(False)

    report: dict = {"model": cfg.model, "kv_heads": {"before": geom.kv_heads, "after": cfg.kv_heads},
                    "query_heads": geom.heads, "grouping": cfg.grouping, "merge": cfg.merge, "train": cfg.train,
                    "steps": cfg.steps if trains else 0, "seq_len": seq_len, "batch_size": bs,
                    "kv_bytes_per_token": {"before": kv_bytes_per_token(net.config, dt)}, "data": ld.info}
    if shard:
        report["sharded"] = {"method": "FSDP2 fully_shard", "processes": ld.processes}
    if held is not None and ld.main:
        report["teacher"] = perplexity(teacher, held, label="teacher perplexity")
    if ood is not None and ld.main:
        report["out_of_domain"] = {"teacher": perplexity(teacher, ood, label="teacher perplexity (out of domain)")}
    with clock.phase("merging"):
        stats = None
        if cfg.grouping == "similarity" or cfg.merge != "mean" or value_refit:
            pick = torch.randperm(ld.train.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
            pick = pick[: cfg.calib_batches * bs]
            stats = calibrate(net, [ld.train[pick[i : i + bs]] for i in range(0, pick.numel(), bs)])
            report["calibration_tokens"] = pick.numel() * seq_len
        info = merge_to_gqa(net, cfg.kv_heads, grouping=cfg.grouping, merge=cfg.merge, stats=stats, refit=value_refit)
    report.update(value_refit=value_refit, merge_seconds=clock.seconds["merging"], groups=info["groups"],
                  expanded_to_mha=info["expanded"],
                  kv_bytes_per_token=report["kv_bytes_per_token"] | {"after": kv_bytes_per_token(net.config, dt)})
    if held is not None and ld.main:
        report["merged"] = perplexity(net, held, label="merged perplexity")
    if ood is not None and ld.main:
        report["out_of_domain"]["merged"] = perplexity(net, ood, label="merged perplexity (out of domain)")
    trained, tokens, train_s, losses, moved = 0, 0, 0.0, {}, 0
    if trains:
        dcfg = DistillConfig(transfer_steps=n_transfer, lora_steps=n_train, batch_size=bs, lr=lr, lora_rank=cfg.lora_rank,
                             ce_weight=cfg.ce_weight, seed=cfg.seed, full_train=FULL_TRAIN.get(cfg.train, ()),
                             transfer_lr=cfg.transfer_lr, transfer_blocks=_ATTN)
        mixed, report["retrieval_sequences"] = retrieval_mix(train_rows, ld.tokenizer, cfg.retrieval_mix, cfg.seed)
        if written is not None:
            report.update(teacher_text=cfg.teacher_text, teacher_sequences=written.numel(),
                          teacher_text_seconds=clock.seconds["teacher text"])
        report.update(retrieval_mix=cfg.retrieval_mix, training_sequences=ld.train.shape[0],  # training only
                      transfer_steps=n_transfer, train_steps=n_train, transfer_lr=cfg.transfer_lr)
        hint = resume_command(cfg.command, "gqa")
        with use_run(TrainingRun(ckpts, max_retries=cfg.nan_retries, resume_hint=hint)), clock.phase("training"):
            net, dstats = distill(net, mixed, dcfg, teacher=teacher, shard=shard)
        trained, tokens, train_s, losses = dstats.lora_params, dstats.tokens, dstats.seconds, dstats.losses
        moved = dstats.transfer_params
        # sharded, every process takes part in the evaluation's forward passes (the main one reports)
        if (ld.main or shard) and held is not None:
            report["distilled"] = perplexity(net, held, label="distilled perplexity")
        if (ld.main or shard) and ood is not None:
            ppl = perplexity(net, ood, label="distilled perplexity (out of domain)")
            if ld.main:
                report["out_of_domain"]["distilled"] = ppl
    del teacher
    with clock.phase("saving"):
        saved = save_run(cfg, ld, net, out, ckpts, shard)
    if not saved:
        return None
    report.update(out=str(out), trained_params=trained, transfer_params=moved, tokens_seen=tokens, train_seconds=train_s, final_losses=losses,
                  lr=lr if trains else None, wall_seconds=clock.wall(), seconds=clock.report(),
                  startup_seconds=clock.startup, device=str(ld.device),
                  dtype=str(dt).removeprefix("torch."))
    return report
