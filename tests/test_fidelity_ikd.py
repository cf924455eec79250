"""IKD against its paper (arXiv:2109.04641; no official code exists), float64, test-side references only.

* ``hypergrad="first_order"`` is Eq. 14: the exam gradient at the CURRENT student,
  ``G_meta = (∂φ_{t+1}/∂θT)ᵀ v`` with ``v = ∇φ CE(exam; φ_t)`` (SGD: ``−η·w·∇θT⟨∇θS KD, v⟩``),
  the course step the real student step with the current teacher, both from (φ_t, θ_t).
* ``"exact"`` is Eq. 13: ``∇θT LQ(φ_{t+1}(θT))`` at the committed student.
* ``gamma`` is Eq. 10: ``γ·G_meta + (1 − γ)·∇θT CE(y, T(x))``.
* With dropout, first_order draws ONE set of masks: the reference replays the masks the
  models recorded and agrees to rounding (the earlier first-order rule subtracted two
  student forwards with independent masks).

References use double backward through hand-written SGD/Adam updates; nothing comes from fastmeta.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastmeta

TOL = 1e-10
TAU, W = 2.0, 0.6


class RecordingDropout(torch.nn.Module):
    """Dropout from the global generator (as ``nn.Dropout``) that logs its masks; ``replay``: fixed masks by shape."""

    def __init__(self, p):
        super().__init__()
        self.p, self.log, self.replay = p, [], None

    def forward(self, h):
        if not self.training or self.p == 0.0:
            return h
        if self.replay is not None:
            return h * self.replay[tuple(h.shape)]
        mask = (torch.rand(h.shape, dtype=h.dtype, device=h.device) > self.p).to(h.dtype) / (1 - self.p)
        self.log.append(mask)
        return h * mask


class Net(torch.nn.Module):
    def __init__(self, width, seed, p=0.0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = torch.nn.Linear(5, width)
        self.drop = RecordingDropout(p)
        self.fc2 = torch.nn.Linear(width, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def batch_of(seed, size):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (size,), generator=g)


def ls_of(zs, zt, y):
    log_ps, log_pt = torch.log_softmax(zs / TAU, -1), torch.log_softmax(zt / TAU, -1)
    kd = TAU**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    return (1 - W) * F.cross_entropy(zs, y) + W * kd


def adam_update(theta, g, state, group, adamw):
    """torch.optim.Adam/AdamW's single-tensor update, written out (differentiable in g)."""
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    step = int(state["step"]) + 1 if state else 1
    m = state["exp_avg"] if state else torch.zeros_like(theta)
    s = state["exp_avg_sq"] if state else torch.zeros_like(theta)
    if wd and not adamw:
        g = g + wd * theta
    if wd and adamw:
        theta = theta * (1 - lr * wd)
    m = beta1 * m + (1 - beta1) * g
    s = beta2 * s + (1 - beta2) * g * g
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    return theta - (lr / bc1) * m / (s.sqrt() / bc2**0.5 + eps)


def pilot_of(S, optS, grads):
    """φ_{t+1} as a function of the (graph-carrying) course gradient: the student optimizer's update."""
    params = list(S.parameters())
    if isinstance(optS, torch.optim.Adam) or isinstance(optS, torch.optim.AdamW):
        group = optS.param_groups[0]
        adamw = isinstance(optS, torch.optim.AdamW)
        return [adam_update(p, g, optS.state.get(p, {}), group, adamw) for p, g in zip(params, grads)]
    lr = optS.param_groups[0]["lr"]
    return [p - lr * g for p, g in zip(params, grads)]


def reference_step(T, S, optT, optS, batch, quiz, *, eq, gamma=1.0, masks=None):
    """One IKD step: Eq. 14 (eq=14, exam at φ_t) or Eq. 13 (eq=13, exam at φ_{t+1}); joint commit."""
    if masks is not None:
        T.drop.replay, S.drop.replay = masks
    x, y = batch
    names = [n for n, _ in S.named_parameters()]
    zt, zs = T(x), S(x)
    grads = torch.autograd.grad(ls_of(zs, zt, y), list(S.parameters()), create_graph=True)
    new = pilot_of(S, optS, grads)  # depends on θT through the course gradient
    if eq == 14:
        v = torch.autograd.grad(F.cross_entropy(S(quiz[0]), quiz[1]), list(S.parameters()))
        meta = torch.autograd.grad(sum((n * vi).sum() for n, vi in zip(new, v)), list(T.parameters()))
    else:
        lq = F.cross_entropy(torch.func.functional_call(S, dict(zip(names, new)), (quiz[0],)), quiz[1])
        meta = torch.autograd.grad(lq, list(T.parameters()))
    teacher_grads = [gamma * m for m in meta]
    if gamma != 1.0:
        ce = torch.autograd.grad(F.cross_entropy(T(x), y), list(T.parameters()))
        teacher_grads = [a + (1 - gamma) * c for a, c in zip(teacher_grads, ce)]
    for opt, model, gs in ((optS, S, grads), (optT, T, teacher_grads)):
        opt.zero_grad(set_to_none=True)
        for p, g in zip(model.parameters(), gs):
            p.grad = g.detach().clone()
        opt.step()
    if masks is not None:
        T.drop.replay = S.drop.replay = None


def make_opt(kind, model, lr):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.01)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)


def max_rel_diff(a, b):
    return max(float((x - y).abs().max()) / max(1.0, float(y.abs().max()))
               for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize(
    "hypergrad,student_opt,gamma",
    [("first_order", "sgd", 1.0), ("first_order", "sgd", 0.3), ("first_order", "adam", 1.0),
     ("exact", "adamw", 1.0), ("exact", "sgd", 0.5), ("exact", "adamw", 0.0), ("autograd", "adam", 1.0),
     ("autograd", "adam", 0.4)],
)
def test_ikd_matches_the_papers_equations(hypergrad, student_opt, gamma):
    teacher, student = Net(6, seed=1).double(), Net(4, seed=2).double()
    T_ref, S_ref = copy.deepcopy(teacher), copy.deepcopy(student)
    lr_s = 0.3 if student_opt == "sgd" else 0.02
    optT, optS = make_opt("sgd", teacher, 0.5), make_opt(student_opt, student, lr_s)
    optT_ref, optS_ref = make_opt("sgd", T_ref, 0.5), make_opt(student_opt, S_ref, lr_s)
    for step in range(3):
        batch, quiz = batch_of(10 + step, 8), batch_of(20 + step, 5)
        out = fastmeta.meta_step(teacher, student, batch, quiz, optT, optS, algorithm="ikd", hypergrad=hypergrad,
                                 temperature=TAU, kd_weight=W, gamma=gamma)
        reference_step(T_ref, S_ref, optT_ref, optS_ref, batch, quiz, eq=14 if hypergrad == "first_order" else 13,
                       gamma=gamma)
        assert out.teacher_loss is not None and out.quiz_loss is not None
    assert max_rel_diff(student, S_ref) <= TOL
    assert max_rel_diff(teacher, T_ref) <= TOL
    assert max_rel_diff(teacher, Net(6, seed=1).double()) > 1e-4


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_first_order_with_dropout_uses_one_set_of_masks(gamma):
    """Train mode, dropout 0.3 in both models: the update is Eq. 14 (Eq. 10 with ``gamma``) at the masks the
    forwards drew; the teacher's own CE rides on its one forward."""
    teacher, student = Net(6, seed=1, p=0.3).double(), Net(4, seed=2, p=0.3).double()
    T_ref, S_ref = copy.deepcopy(teacher), copy.deepcopy(student)
    optT, optS = make_opt("sgd", teacher, 0.5), make_opt("sgd", student, 0.3)
    optT_ref, optS_ref = make_opt("sgd", T_ref, 0.5), make_opt("sgd", S_ref, 0.3)
    for step in range(3):
        batch, quiz = batch_of(10 + step, 8), batch_of(20 + step, 5)
        teacher.drop.log.clear(), student.drop.log.clear()
        fastmeta.meta_step(teacher, student, batch, quiz, optT, optS, algorithm="ikd", hypergrad="first_order",
                           temperature=TAU, kd_weight=W, gamma=gamma)
        # one teacher forward; student: x, exam, and the JVP's replay of x (same mask)
        assert [m.shape[0] for m in teacher.drop.log] == [8]
        x_masks = [m for m in student.drop.log if m.shape[0] == 8]
        exam_masks = [m for m in student.drop.log if m.shape[0] == 5]
        assert len(exam_masks) == 1 and len(x_masks) >= 1 and all(torch.equal(m, x_masks[0]) for m in x_masks)
        masks = ({(8, 6): teacher.drop.log[0]}, {(8, 4): x_masks[0], (5, 4): exam_masks[0]})
        reference_step(T_ref, S_ref, optT_ref, optS_ref, batch, quiz, eq=14, gamma=gamma, masks=masks)
    assert max_rel_diff(student, S_ref) <= TOL
    assert max_rel_diff(teacher, T_ref) <= TOL


def test_first_order_is_deterministic_given_the_seed():
    results = []
    for _ in range(2):
        teacher, student = Net(6, seed=1, p=0.3).double(), Net(4, seed=2, p=0.3).double()
        optT, optS = make_opt("sgd", teacher, 0.5), make_opt("sgd", student, 0.3)
        torch.manual_seed(1234)
        fastmeta.meta_step(teacher, student, batch_of(1, 8), batch_of(2, 5), optT, optS, algorithm="ikd",
                           hypergrad="first_order")
        results.append(torch.cat([p.detach().reshape(-1) for p in teacher.parameters()]))
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("student_opt", ["momentum", "adamw"])
def test_exact_commits_the_engines_quiz_student(student_opt):
    from fastmeta.engine import meta_gradient

    teacher, student = Net(6, seed=1).double(), Net(4, seed=2).double()
    optT = make_opt("sgd", teacher, 0.5)
    if student_opt == "momentum":
        optS = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    else:
        optS = make_opt("adamw", student, 0.02)
    for step in range(3):
        batch, quiz = batch_of(10 + step, 8), batch_of(20 + step, 5)
        pilot = meta_gradient(teacher, student, batch, quiz, inner_lr=None, temperature=TAU, kd_weight=W,
                              student_optimizer=optS, keep_pilot=True, compute_teacher_grads=False).pilot_params
        fastmeta.meta_step(teacher, student, batch, quiz, optT, optS, algorithm="ikd", temperature=TAU, kd_weight=W)
        for name, p in student.named_parameters():
            torch.testing.assert_close(p.detach(), pilot[name], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"inner_steps": 2}, "inner_steps"),
        ({"inner_lr": 0.05}, "inner_lr"),
        ({"pilot": "sgd"}, "pilot"),
        ({"max_grad_norm": 1.0}, "max_grad_norm"),
        ({"gamma": 1.5}, "gamma"),
    ],
)
def test_exact_refuses_a_quiz_student_that_is_not_committed(options, match):
    teacher, student = Net(6, seed=1).double(), Net(4, seed=2).double()
    optT, optS = make_opt("sgd", teacher, 0.5), make_opt("adam", student, 0.02)
    fastmeta.meta_step(teacher, student, batch_of(1, 8), batch_of(2, 5), optT, optS, algorithm="ikd")
    before = [copy.deepcopy(o.state_dict()) for o in (teacher, student, optT, optS)]
    with pytest.raises(ValueError, match=match):
        fastmeta.meta_step(teacher, student, batch_of(3, 8), batch_of(4, 5), optT, optS, algorithm="ikd", **options)
    after = [o.state_dict() for o in (teacher, student, optT, optS)]
    torch.testing.assert_close(after[:2], before[:2], rtol=0, atol=0)
    assert str(after[2:]) == str(before[2:])


def test_exact_accepts_settings_that_keep_the_quiz_student():
    teacher, student = Net(6, seed=1).double(), Net(4, seed=2).double()
    optT, optS = make_opt("sgd", teacher, 0.5), make_opt("sgd", student, 0.3)
    fastmeta.meta_step(teacher, student, batch_of(1, 8), batch_of(2, 5), optT, optS, algorithm="ikd",
                       inner_lr=0.3, pilot="sgd")  # plain SGD at its own lr: the same student
    # first_order evaluates no quiz student: clipping and another lr are the caller's choice
    fastmeta.meta_step(teacher, student, batch_of(1, 8), batch_of(2, 5), optT, optS, algorithm="ikd",
                       hypergrad="first_order", max_grad_norm=0.5)


def test_gamma_with_a_teacher_without_trainable_parameters_steps_the_student():
    teacher, student = Net(6, seed=1).double(), Net(4, seed=2).double()
    for p in teacher.parameters():
        p.requires_grad_(False)
    optT, optS = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.5), make_opt("sgd", student, 0.3)
    S0 = copy.deepcopy(student)
    batch, quiz = batch_of(1, 8), batch_of(2, 5)
    out = fastmeta.meta_step(teacher, student, batch, quiz, optT, optS, algorithm="ikd", hypergrad="exact",
                             temperature=TAU, kd_weight=W, gamma=0.5)
    assert max_rel_diff(student, S0) > 1e-6
    expected = 0.5 * out.quiz_loss + 0.5 * F.cross_entropy(teacher(batch[0]), batch[1])
    torch.testing.assert_close(out.teacher_loss, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("gamma,takes_tangent", [(0.0, False), (0.5, True)])
def test_gamma_zero_takes_no_student_tangent(gamma, takes_tangent):
    """``gamma = 0`` weights the meta-gradient by 0 (Eq. 10: the teacher's CE alone): the step skips the
    student tangent that would only feed it (the values are test_ikd_matches_the_papers_equations')."""
    teacher, student = Net(6, seed=1).double(), Net(4, seed=2).double()
    optT, optS = make_opt("sgd", teacher, 0.5), make_opt("adamw", student, 0.02)
    out = fastmeta.meta_step(teacher, student, batch_of(10, 8), batch_of(20, 5), optT, optS, algorithm="ikd",
                             temperature=TAU, kd_weight=W, gamma=gamma)
    assert ("meta_gradient.student_jvp" in out.timings) == takes_tangent, sorted(out.timings)
