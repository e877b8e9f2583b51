"""Layer-by-layer matching for the distillation stage (``DistillConfig.hidden_weight``): besides the KL
on the logits, every decoder layer's output of the student is pulled towards the teacher's output of
the same layer on the same rows. The term is the mean over layers and tokens of

    ||h_student - h_teacher||^2 / ||h_teacher||^2

(each token's error relative to its own size, so the few tokens whose hidden states are far larger
than the rest do not drown the others). The logits alone let a student reach the teacher's outputs on
the training text by any inner route; this keeps the route close to the teacher's (docs/GQA.md has the
measurements).

The outputs are taken by forward hooks on the decoder layers, recorded only inside ``recording``, so
evaluation passes and other stages record nothing. The student and the teacher may be one model (the
teacher's pass run with the adapters off): what a layer returns goes to the side being recorded."""

from __future__ import annotations

import contextlib

import torch

from ..convert.swap import decoder_layers


def _layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(decoder_layers(base))


def _hidden(out) -> torch.Tensor:
    """A decoder layer's hidden states, whether it returns them alone or first in a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def relative_error(hs: list[torch.Tensor], ht: list[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """Mean over layers and tokens of ||hs - ht||^2 / ||ht||^2 (fp32), the layers' outputs ``hs`` and
    ``ht`` (each (..., D)) of the student and the teacher in the same order."""
    if len(hs) != len(ht) or not hs:
        raise RuntimeError(f"layer matching recorded {len(hs)} student and {len(ht)} teacher layer outputs; "
                           "both passes must run every decoder layer once")
    terms = []
    for s, t in zip(hs, ht):
        s, t = s.float(), t.float()
        terms.append(((s - t).square().sum(-1) / t.square().sum(-1).clamp_min(eps)).mean())
    return torch.stack(terms).mean()


class HiddenMatch:
    """Records the decoder layers' outputs of ``student`` and ``teacher`` (None or the same model: one
    set of hooks) inside ``recording("student")`` / ``recording("teacher")``; ``loss()`` compares the
    last recordings (``relative_error``) and forgets them. ``close()`` removes the hooks."""

    def __init__(self, student, teacher=None):
        self.kept: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
        self.side: str | None = None
        models = [student] if teacher is None or teacher is student else [student, teacher]
        self.hooks = [layer.register_forward_hook(self._keep) for m in models for layer in _layers(m)]

    def _keep(self, _module, _args, out):
        if self.side is not None:
            self.kept[self.side].append(_hidden(out))

    @contextlib.contextmanager
    def recording(self, side: str):
        if side not in self.kept:
            raise ValueError(f"side must be 'student' or 'teacher', not {side!r}")
        self.kept[side] = []
        self.side = side
        try:
            yield
        finally:
            self.side = None

    def loss(self) -> torch.Tensor:
        try:
            return relative_error(self.kept["student"], self.kept["teacher"])
        finally:
            self.kept = {"student": [], "teacher": []}

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.kept = {"student": [], "teacher": []}
