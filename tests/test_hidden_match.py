"""The layer-matching term of the distillation stage (distill/hidden_match.py, DistillConfig.hidden_weight):
its value against a naive computation, what its hooks record and when, and that it trains."""

import copy

import pytest
import torch

from attnswap.distill.hidden_match import HiddenMatch, relative_error
from tests.conftest import tiny_model


def _naive(hs, ht):
    total = 0.0
    for s, t in zip(hs, ht):
        s, t = s.double().reshape(-1, s.shape[-1]), t.double().reshape(-1, t.shape[-1])
        total += sum(float(((s[i] - t[i]) ** 2).sum() / (t[i] ** 2).sum()) for i in range(s.shape[0])) / s.shape[0]
    return total / len(hs)


def test_relative_error_against_a_naive_sum():
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    ht = [torch.randn(2, 5, 8, generator=g) * (i + 1) for i in range(3)]
    got = relative_error(hs, ht).item()
    assert abs(got - _naive(hs, ht)) <= 1e-5 * _naive(hs, ht)
    assert relative_error(ht, ht).item() == 0.0
    with pytest.raises(RuntimeError, match="2 student and 3 teacher"):
        relative_error(hs[:2], ht)


def _ids(seed=1):
    return torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(seed))


def _match_loss(match, student, teacher, ids):
    with torch.no_grad(), match.recording("teacher"):
        teacher(input_ids=ids)
    with match.recording("student"):
        student(input_ids=ids)
    return match.loss()


def test_the_term_is_zero_for_the_teacher_itself_and_grows_with_a_changed_layer():
    teacher = tiny_model("llama", seed=0)
    student = copy.deepcopy(teacher)
    match = HiddenMatch(student, teacher)
    ids = _ids()
    assert _match_loss(match, student, teacher, ids).item() == 0.0
    n = len(student.model.layers)
    with torch.no_grad():
        student.model.layers[n - 1].mlp.down_proj.weight.mul_(1.5)  # the last layer only
    assert _match_loss(match, student, teacher, ids).item() > 0
    # only the changed layer differs, so the term is that layer's error over the layer count
    with torch.no_grad(), match.recording("teacher"):
        teacher(input_ids=ids)
    t_last = match.kept["teacher"][-1]
    with torch.no_grad(), match.recording("student"):
        student(input_ids=ids)
    s_last = match.kept["student"][-1]
    one = relative_error([s_last], [t_last]).item()
    assert match.loss().item() == pytest.approx(one / n, rel=1e-5)
    match.close()
    assert not any(m._forward_hooks for m in [*student.modules(), *teacher.modules()])


def test_nothing_is_recorded_outside_a_recording_and_one_model_serves_both_sides():
    model = tiny_model("llama", seed=0)
    match = HiddenMatch(model)  # the teacher's pass is the same model (linearize: adapters off)
    ids = _ids()
    with torch.no_grad():
        model(input_ids=ids)
    assert match.kept == {"student": [], "teacher": []}
    assert _match_loss(match, model, model, ids).item() == 0.0
    assert match.kept == {"student": [], "teacher": []}  # loss() forgets what it compared
    with pytest.raises(ValueError, match="side must be"):
        with match.recording("other"):
            pass
    match.close()


def test_the_gradient_reaches_the_student_only_and_training_lowers_the_term():
    teacher = tiny_model("llama", seed=0)
    student = tiny_model("llama", seed=5)  # other weights: far from the teacher
    for p in teacher.parameters():
        p.requires_grad_(False)
    match = HiddenMatch(student, teacher)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    ids = _ids(2)
    first = None
    for _ in range(15):
        opt.zero_grad()
        loss = _match_loss(match, student, teacher, ids)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert all(p.grad is None for p in teacher.parameters())
    assert _match_loss(match, student, teacher, ids).item() < 0.5 * first
    match.close()
