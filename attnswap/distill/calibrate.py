"""Calibration: learn, per unit (a layer or one KV head), how much exact attention it needs, then
decide which units become cheap for good.

Every converted module mixes its two outputs (``calibrate`` mode, ``convert/base.py``):

    out = alpha * exact + (1 - alpha) * cheap,     alpha = sigmoid(logit), one logit per unit

The logits are the only trainable parameters: the model's weights stay frozen. The loss is the
distillation KL(teacher || model) on the logits plus ``penalty * mean(alpha)``, which pulls every
alpha towards the cheap side; a unit whose exact attention matters to the output pushes back. The
teacher is the same model with every unit exact (``teacher`` mode, alpha = 1) under no_grad, so no
copy is held. Then ``select`` takes the lowest alphas, up to a budget.

Like the rest of distill/ this knows nothing of the method: what "exact" and "cheap" are is each
module's ``calibration_outputs``, and how many units a layer has its ``calibration_units``. The run's
checkpoints cover calibration as the first stage (``STAGE``); the alphas it found are kept in the
run's record, so a run resumed in a later stage selects the same units.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from ..convert.base import attention_mode, swapped_modules
from .train import Batches, DistillStats, _freeze_all, _loop, adamw
from .logit_loss import LogitLoss

STAGE = "calibration"


@dataclass
class CalibrationConfig:
    steps: int
    batch_size: int = 1
    lr: float = 0.05  # Adam on the logits: each step moves a logit by about this much
    penalty: float = 0.1  # weight of mean(alpha) in the loss
    per_head: bool = False  # one alpha per KV head instead of one per layer
    init: float = 0.5  # every alpha's starting value
    seed: int = 0
    step_offset: int = 0  # global steps run before calibration (by an earlier stage, e.g. attention transfer)
    answers_only: bool = False  # the KL on the answer tokens only (rows encoded by ``mark_answers``)


@dataclass
class Calibration:
    alphas: dict[int, list[float]]  # layer index -> its alphas (one, or one per KV head)
    seconds: float = 0.0
    tokens: int = 0
    loss: float | None = None

    def units(self) -> dict:
        """alpha per unit: keyed by layer index (per-layer), or by (layer, KV head) (per-head)."""
        if all(len(a) == 1 for a in self.alphas.values()):
            return {layer: a[0] for layer, a in self.alphas.items()}
        return {(layer, h): x for layer, a in self.alphas.items() for h, x in enumerate(a)}


ANSWER_BIT = 1 << 40  # added to a token id whose logits' KL counts (``answers_only``); ids stay below it


def mark_answers(ids: torch.Tensor, spans: list[list[tuple[int, int]]]) -> torch.Tensor:
    """``ids`` (N, L) with, in each row, the positions whose next token lies in one of its answer spans
    [start, end) marked (``ANSWER_BIT`` added): the logits there predict an answer token. One tensor
    carries both, so the batches (and a training step replayed as a CUDA graph) see one input."""
    out = ids.clone()
    for r, row_spans in enumerate(spans):
        for a, b in row_spans:
            lo, hi = max(0, a - 1), max(0, b - 1)
            out[r, lo:hi] += ANSWER_BIT
    return out


def split_marked(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids and the float mask of marked positions (``mark_answers``)."""
    marked = ids >= ANSWER_BIT
    return ids - marked.long() * ANSWER_BIT, marked.float()


def select(alphas: dict, budget: int, max_alpha: float | None = None) -> list:
    """The units to make cheap: the ``budget`` ones with the lowest alpha (ties: the lower unit first),
    leaving out any above ``max_alpha`` when given. Returned sorted."""
    order = sorted(alphas, key=lambda u: (alphas[u], u))
    chosen = order[: max(0, min(int(budget), len(order)))]
    if max_alpha is not None:
        chosen = [u for u in chosen if alphas[u] <= max_alpha]
    return sorted(chosen)


def calibrate(model, seqs: torch.Tensor, cfg: CalibrationConfig, accelerator: Accelerator | None = None) -> Calibration:
    """Train the mixing weights of every converted module of ``model`` on ``seqs`` (N, L); return them.
    The modules are left without their calibration parameters, in ``student`` mode."""
    mods = swapped_modules(model)
    if not mods:
        raise ValueError("calibration needs a converted model")
    acc = accelerator or Accelerator(cpu=next(model.parameters()).device.type == "cpu")
    torch.manual_seed(cfg.seed)
    _freeze_all(model)
    dev = next(model.parameters()).device
    logit0 = math.log(cfg.init / (1.0 - cfg.init))
    for m in mods:
        m.calib_logit = nn.Parameter(torch.full((m.calibration_units(cfg.per_head),), logit0, device=dev))
    params = [m.calib_logit for m in mods]
    opt = adamw(params, cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    stats = DistillStats()

    kl_loss = LogitLoss(model)  # a block of rows at a time where the split holds (logit_loss.py)

    def loss_fn(ids):
        weight = norm = None
        if cfg.answers_only:  # the mean KL over the marked positions (a batch without any: zero)
            ids, weight = split_marked(ids)
            weight = weight.reshape(-1)
            norm = weight.sum().clamp_min(1.0)
        with torch.no_grad(), attention_mode(model, "teacher"):
            t_out = kl_loss.teacher(ids)
        with attention_mode(model, "calibrate"):
            s_out = kl_loss.student(ids)
        kl = kl_loss(s_out, t_out, weight=weight, norm=norm)
        return kl + cfg.penalty * torch.sigmoid(torch.cat(params)).mean()

    was_training = model.training
    model.train()
    try:
        record = _loop(STAGE, cfg.steps, Batches(seqs, cfg.batch_size, cfg.seed, acc), acc, stats, opt, sched,
                       params, loss_fn, step_offset=cfg.step_offset, module=model)
    finally:
        model.train(was_training)
        found = {m.layer_idx: torch.sigmoid(m.calib_logit.detach().float()).cpu().tolist() for m in mods}
        for m in mods:
            m.calib_logit = None
            m.mode = "student"
    if "alphas" in record:  # resumed after this stage: what it found then, not the untrained logits
        found = {int(k): v for k, v in record["alphas"].items()}
    else:
        record["alphas"] = {str(k): v for k, v in found.items()}
    return Calibration(found, seconds=stats.seconds, tokens=stats.tokens, loss=stats.losses.get(STAGE))
