"""The distillation loss on the logits, computed a block of rows at a time.

``KL(teacher || student)`` (and, optionally, next-token cross-entropy) over the whole vocabulary needs
the (rows, vocab) logits of both models. Built at once, in fp32, for a step of 8,192 tokens and
SmolLM2's 49,152 tokens that is 1.6 GB a tensor, and the loss and its backward keep about ten of
them: 16 GB, which on a 24 GB CPU machine kills ``convert linearize`` with the default rows.

``chunked_logit_loss`` takes the final hidden states instead. For each block of rows it makes both
models' logits (the same bf16 / fp32 products as the models' heads), the block's share of the loss,
and at once its gradients: d loss / d logits is ``(q_student - p_teacher) / n`` for the KL (and
``(q_student - onehot(target)) / m`` for the cross-entropy), so the gradient of the hidden states is
that times the head's weight, and the weight's (when it trains) the hidden states times it. Only a
block's logits exist at any time; the backward multiplies the stored gradients by the incoming one.

``logit_loss`` is the simple reference: the models' logits, ``log_softmax`` and ``F.kl_div``, as the
distillation has always computed it. ``tests/test_logit_loss.py`` compares the two.

``LogitLoss`` is what the distillation and the calibration call: it picks one of the two for a student
and its teacher. Where the trunk-and-head split would not reproduce a model's logits (a soft cap, a
logit scale, a bias, a sharded head), ``Logits.chunked`` is False and it uses the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMS = 1 << 26  # logits of one block of rows: 64 M fp32 values (256 MB), whatever the vocabulary
ENV = "ATTNSWAP_CHUNKED_LOSS"  # "0": the reference path (whole logits at once)


def logit_loss(s_logits, t_logits, *, weight=None, norm=None, targets=None, ce_weight: float = 0.0):
    """The reference: ``sum_rows w_r KL_r(teacher || student) / norm`` (``weight`` None: every row counts
    1 and ``norm`` is the number of rows, i.e. ``F.kl_div``'s batchmean), plus ``ce_weight`` times the
    mean cross-entropy over the rows whose ``targets`` are not -100. Logits (N, V), any float dtype."""
    t_logp = F.log_softmax(t_logits.float(), -1)
    s_logp = F.log_softmax(s_logits.float(), -1)
    if weight is None:
        loss = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
    else:
        loss = (F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1) * weight).sum() / norm
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(s_logits.float(), targets, ignore_index=-100)
    return loss


class _ChunkedLogitLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, ht, wt, weight, norm, targets, ce_weight, rows):
        n = hs.shape[0]
        grad_h = torch.empty_like(hs)
        grad_w = torch.zeros(ws.shape, device=ws.device, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = hs.new_zeros((), dtype=torch.float32)
        ce_rows = None
        if ce_weight:
            ce_rows = (targets != -100).sum().clamp_min(1).float()
        inv = 1.0 / norm if weight is not None else 1.0 / n
        for a in range(0, n, rows):
            b = min(n, a + rows)
            s = torch.matmul(hs[a:b], ws.t()).float()  # what the head computes, in its dtype, then fp32 (as .logits.float())
            t = torch.matmul(ht[a:b], wt.t()).float()
            ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
            del s, t
            pt = lt.exp()
            w = inv if weight is None else (weight[a:b] * inv)[:, None]  # the rows' weights in the loss
            total = total + ((pt * (lt - ls)).sum(-1, keepdim=True) * w).sum()
            del lt
            pt *= w
            coef = w  # d KL / d logits = w (q - p_teacher); the cross-entropy adds c (q - onehot)
            if ce_weight:
                y = targets[a:b]
                live = y != -100
                yi = torch.where(live, y, 0)
                total = total - ce_weight * (ls.gather(1, yi[:, None])[:, 0] * live).sum() / ce_rows
                c = ((ce_weight / ce_rows) * live.float())[:, None]
                coef = coef + c
            g = ls.exp()  # q_student
            del ls
            g *= coef
            g -= pt
            del pt
            if ce_weight:
                g.scatter_add_(1, yi[:, None], -c)
            g = g.to(ws.dtype)
            grad_h[a:b] = torch.matmul(g, ws)
            if grad_w is not None:
                grad_w += torch.matmul(g.t(), hs[a:b]).float()
            del g
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else hs.new_empty(0))
        ctx.w_dtype = ws.dtype if grad_w is not None else None
        return total

    @staticmethod
    def backward(ctx, go):
        grad_h, grad_w = ctx.saved_tensors
        dw = (grad_w * go).to(ctx.w_dtype) if ctx.w_dtype is not None else None
        return grad_h * go.to(grad_h.dtype), dw, None, None, None, None, None, None, None


def chunked_logit_loss(hs, ws, ht, wt, *, weight=None, norm=None, targets=None, ce_weight: float = 0.0,
                       rows: int | None = None):
    """``logit_loss`` of the logits ``hs @ ws.T`` (student) and ``ht @ wt.T`` (teacher, no gradient),
    never holding more than ``rows`` rows of logits. ``hs``/``ht``: (N, d) hidden states; ``ws``/``wt``:
    (V, d) head weights. Gradients flow to ``hs`` and, when it requires them, ``ws``."""
    if rows is None:
        rows = max(1, CHUNK_ELEMS // ws.shape[0])
    if weight is not None and norm is None:
        raise ValueError("chunked_logit_loss: a row weight needs its norm")
    if ce_weight and targets is None:
        raise ValueError("chunked_logit_loss: the cross-entropy needs targets")
    return _ChunkedLogitLoss.apply(hs, ws, ht.detach(), wt.detach(), weight, norm, targets, float(ce_weight), int(rows))


class Logits:
    """How a loss gets a causal LM's logits: ``hidden(ids)`` the final hidden states (N rows) and
    ``weight`` its head, when ``chunked`` (the split checked to reproduce the model's own logits), else
    ``full(ids)`` the model's (N, V) logits. ``model`` may be wrapped by peft."""

    def __init__(self, model):
        self.model = model
        self.chunked = False
        self.why = "turned off" if not wanted() else None
        if self.why is None:
            self._split()

    def _split(self):
        from ..evals.common import split_head
        from . import sharding

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        parts = split_head(base)
        if parts is None:
            self.why = "the model has no trunk-and-head shape"
            return
        trunk, head = parts
        if not isinstance(head, torch.nn.Linear) or head.bias is not None or sharding.is_sharded(head.weight):
            self.why = "the head is not a plain linear map"
            return
        if head._forward_hooks or head._forward_pre_hooks or getattr(base.config, "logit_scale", None):
            self.why = "the head's output is changed after its product"
            return
        self.trunk, self.head = trunk, head
        # the model's own forward may do more than the head's product (a cap, a scale): 16 random tokens
        # through both ways must agree, or the whole logits are used
        ids = torch.randint(0, head.weight.shape[0], (1, 16), generator=torch.Generator().manual_seed(0))
        ids = ids.to(head.weight.device)
        with torch.no_grad():
            want = self.full(ids).float()
            got = torch.matmul(self.hidden(ids), head.weight.t()).float().view_as(want)
        # (a model that already gives NaN here is the fault handler's to report, at its first step)
        size = float(torch.nan_to_num(want, nan=0.0, posinf=0.0, neginf=0.0).abs().max())
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * size, equal_nan=True):
            self.why = "the trunk and head do not reproduce the model's logits"
            return
        self.chunked = True

    @property
    def weight(self):
        return self.head.weight

    def hidden(self, ids) -> torch.Tensor:
        h = self.trunk(input_ids=ids, use_cache=False).last_hidden_state
        return h.reshape(-1, h.shape[-1])

    def full(self, ids) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


class LogitLoss:
    """The distillation loss between ``student`` and ``teacher`` (None: the student's own model, run by the
    caller in teacher mode): ``student(ids)`` and ``teacher(ids)`` give what the loss takes, the final
    hidden states where both models' splits hold (``chunked``) or else their flattened logits, and
    calling it gives ``chunked_logit_loss`` or the reference ``logit_loss`` of the two."""

    def __init__(self, student, teacher=None):
        self.s = Logits(student)
        self.t = Logits(teacher) if teacher is not None else self.s
        self.chunked = self.s.chunked and self.t.chunked

    def _out(self, src: Logits, ids) -> torch.Tensor:
        return src.hidden(ids) if self.chunked else src.full(ids).flatten(0, 1)

    def student(self, ids) -> torch.Tensor:
        return self._out(self.s, ids)

    def teacher(self, ids) -> torch.Tensor:
        return self._out(self.t, ids)

    def __call__(self, s_out, t_out, **kw):
        if self.chunked:
            return chunked_logit_loss(s_out, self.s.weight, t_out, self.t.weight, **kw)
        return logit_loss(s_out, t_out, **kw)


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B * T,) targets: each position's next token, -100 (ignored) at each row's last."""
    t = torch.full_like(ids, -100)
    t[:, :-1] = ids[:, 1:]
    return t.reshape(-1)


def wanted() -> bool:
    """``ATTNSWAP_CHUNKED_LOSS``: unset or 1, blocks of rows; 0, the whole logits. On the H100 the graphed
    LoRA step took the same time either way and peaked 7.7 GiB lower in blocks (docs/BENCHMARKS.md)."""
    from ..errors import env_switch

    return env_switch(ENV, True, "whole logits", "a block of rows at a time")
