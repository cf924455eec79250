"""fastmeta's exact MetaDistil meta-gradient against two peer libraries, in float64 on tiny MLPs.

* higher (``innerloop_ctx`` with the differentiable version of the student's torch optimizer),
* TorchOpt (functional ``torchopt.sgd`` / ``adam`` / ``adamw`` with ``apply_updates``, differentiated
  by autograd).

Both are optional (``pip install fastmeta[peers]``); without them these tests are skipped.

Two configuration points, both about the PEERS, measured here before choosing them:

* step counters: torch's optimizer keeps ``step`` as a float32 tensor and TorchOpt as an int64
  one, so ``1 − β^t`` is computed in float32 when a peer raises a float to that tensor (higher
  copies torch's state, TorchOpt makes its own): the peers' Adam meta-gradients were 1e-5 off in
  float64 for that reason alone.  The tests give higher float64 step counters and run TorchOpt
  with float64 as the default dtype.
* higher's ``DifferentiableAdam`` adds ``eps`` before the bias correction (torch < 1.3's Adam:
  effectively ``eps·sqrt(1 − β2^t)``), a different optimizer from today's torch.optim.Adam (97%
  apart at the first step with eps = 1e-8): higher's Adam is compared at ``eps = 0``, where the
  two coincide.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.func import functional_call

from _optim_reference import ce, kl, rel_err, setup, warm
from fastmeta.engine import meta_gradient

higher = pytest.importorskip("higher", reason="optional peer library higher (pip install fastmeta[peers])")
torchopt = pytest.importorskip("torchopt", reason="optional peer library TorchOpt (pip install fastmeta[peers])")

TAU, W = 2.0, 0.7


def _fastmeta(teacher, student, batch, quiz, opt, steps):
    return meta_gradient(teacher, student, batch, quiz, inner_lr=None, temperature=TAU, kd_weight=W,
                         student_optimizer=opt, inner_steps=steps).teacher_grads


def _teacher_grads(teacher, objective):
    names = [n for n, p in teacher.named_parameters() if p.requires_grad]
    return dict(zip(names, torch.autograd.grad(objective, [p for p in teacher.parameters() if p.requires_grad])))


def _higher(teacher, student, batch, quiz, opt, steps):
    (x, y), (xq, yq) = batch, quiz
    zt = teacher(x)
    with higher.innerloop_ctx(student, opt, copy_initial_weights=False, track_higher_grads=True) as (fmodel, diffopt):
        for _ in range(steps):
            zs = fmodel(x)
            diffopt.step((1 - W) * ce(zs, y) + W * kl(zs, zt, TAU))
        return _teacher_grads(teacher, ce(fmodel(xq), yq))


@contextlib.contextmanager
def _default_float64():
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _torchopt(teacher, student, batch, quiz, tx, steps):
    (x, y), (xq, yq) = batch, quiz
    zt = teacher(x)
    params = dict(student.named_parameters())
    with _default_float64():
        state = tx.init(params)
        for _ in range(steps):
            zs = functional_call(student, params, (x,))
            loss = (1 - W) * ce(zs, y) + W * kl(zs, zt, TAU)
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=True)))
            updates, state = tx.update(grads, state, params=params, inplace=False)
            params = torchopt.apply_updates(params, updates, inplace=False)
    return _teacher_grads(teacher, ce(functional_call(student, params, (xq,)), yq))


def _float64_step_counters(opt):
    for state in opt.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].to(torch.float64)


HIGHER_CASES = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.3), 0),
    "sgd_momentum_dampening": (lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, dampening=0.2), 2),
    "sgd_nesterov_wd": (lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, nesterov=True, weight_decay=0.01), 2),
    "adam_l2_eps0": (lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01, eps=0.0), 3),
    "adam_amsgrad_eps0": (lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True, eps=0.0), 3),
}


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", sorted(HIGHER_CASES))
def test_matches_higher(name, steps):
    teacher, student, batch, quiz = setup(0)
    make, warm_steps = HIGHER_CASES[name]
    opt = make(student.parameters())
    warm(student, opt, quiz, warm_steps)
    _float64_step_counters(opt)
    ours = _fastmeta(teacher, student, batch, quiz, opt, steps)
    assert rel_err(ours, _higher(teacher, student, batch, quiz, opt, steps)) <= 1e-10


TORCHOPT_CASES = {
    "sgd_nesterov": (lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, nesterov=True),
                     lambda: torchopt.sgd(lr=0.2, momentum=0.9, nesterov=True)),
    "adam": (lambda p: torch.optim.Adam(p, lr=0.01), lambda: torchopt.adam(lr=0.01)),
    "adam_l2": (lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1), lambda: torchopt.adam(lr=0.01, weight_decay=0.1)),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), lambda: torchopt.adamw(lr=0.01, weight_decay=0.1)),
}


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", sorted(TORCHOPT_CASES))
def test_matches_torchopt(name, steps):
    """From a fresh optimizer (TorchOpt starts its own state): Adam's first steps included."""
    teacher, student, batch, quiz = setup(0)
    make, make_tx = TORCHOPT_CASES[name]
    ours = _fastmeta(teacher, student, batch, quiz, make(student.parameters()), steps)
    assert rel_err(ours, _torchopt(teacher, student, batch, quiz, make_tx(), steps)) <= 1e-10
