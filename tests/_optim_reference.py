"""Test-side references shared by the engine tests; they import nothing from fastmeta.

* :func:`ref_update`: an out-of-place, autograd-friendly transcription of ``torch.optim``'s
  single-tensor SGD / Adam / AdamW update, written from torch's source (``torch/optim/sgd.py``,
  ``adam.py``: ``lerp`` for the first moment, ``sqrt(v)/sqrt(bc2) + eps``), checked against
  ``optimizer.step()`` in ``tests/test_engine_optimizer.py``.
* :func:`unrolled_meta_grad`: ``∇θT LQ(θ_k(θT))`` by a double backward through ``k`` steps of
  :func:`ref_update` (``functional_call``, ``create_graph=True``): the papers' definition.
* tiny float64 MLP teacher/student and batches.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.func import functional_call


# --------------------------------------------------------------------------- the optimizer, transcribed
def hypers_of(optimizer, param):
    """(kind, hyper-parameters) of ``param``'s group (``lr`` may be overridden by the caller)."""
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    if isinstance(optimizer, torch.optim.SGD):
        keys = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")
        return "sgd", {k: group[k] for k in keys}
    h = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")}
    h["decoupled"] = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
    return "adam", h


def state_of(optimizer, param):
    """The optimizer's state of ``param`` as the reference's state dict (tensors cloned)."""
    st = optimizer.state.get(param, {})
    out = {}
    for key in ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if st.get(key) is not None:
            out[key] = st[key].detach().clone()
    if "step" in st:
        out["step"] = int(float(st["step"]))
    return out


def ref_update(kind, h, theta, grad, state, *, frozen_second_moment=False):
    """``(θ', state')`` of one torch.optim update (out of place).  ``frozen_second_moment``: Adam's second
    moment computed from ``grad.detach()`` (the linearisation that holds it constant)."""
    lr = float(h["lr"])
    g = -grad if h["maximize"] else grad
    if kind == "sgd":
        if h["weight_decay"] != 0:
            g = g + h["weight_decay"] * theta
        if h["momentum"] == 0:
            return theta - lr * g, state
        buf = state.get("momentum_buffer")
        buf = g if buf is None else h["momentum"] * buf + (1 - h["dampening"]) * g
        step = g + h["momentum"] * buf if h["nesterov"] else buf
        return theta - lr * step, {"momentum_buffer": buf}
    b1, b2 = h["betas"]
    t = state.get("step", 0) + 1
    g_s = g
    if h["weight_decay"] != 0:
        if h["decoupled"]:
            theta = theta * (1 - lr * h["weight_decay"])
        else:
            g = g + h["weight_decay"] * theta
            g_s = g
    if frozen_second_moment:
        g_s = g.detach()
    m = state.get("exp_avg", torch.zeros_like(theta))
    v = state.get("exp_avg_sq", torch.zeros_like(theta))
    m = torch.lerp(m, g, 1 - b1)
    v = v * b2 + (1 - b2) * g_s * g_s
    new = {"step": t, "exp_avg": m, "exp_avg_sq": v}
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    second = v
    if h["amsgrad"]:
        second = torch.maximum(state.get("max_exp_avg_sq", torch.zeros_like(theta)), v)
        new["max_exp_avg_sq"] = second
    # a coordinate whose gradient was always 0 (an embedding row no batch touched) has v = 0, where sqrt's
    # derivative is inf (inf·0 = nan in autograd); the update is differentiable there (its limit along g:
    # the v-path term vanishes), so take sqrt's derivative as 0 where v = 0
    positive = second > 0
    root = torch.where(positive, torch.where(positive, second, torch.ones_like(second)).sqrt(), torch.zeros_like(second))
    denom = root / math.sqrt(bc2) + h["eps"]
    return theta - (lr / bc1) * m / denom, new


# --------------------------------------------------------------------------- losses (hand-written)
def ce(z, y):
    return -torch.log_softmax(z, -1).gather(1, y[:, None])[:, 0].mean()


def kl(zs, zt, tau):
    log_ps, log_pt = torch.log_softmax(zs / tau, -1), torch.log_softmax(zt / tau, -1)
    return tau * tau * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()


def kl_rows(zs, zt, tau):
    log_ps, log_pt = torch.log_softmax(zs / tau, -1), torch.log_softmax(zt / tau, -1)
    return tau * tau * (log_pt.exp() * (log_pt - log_ps)).sum(-1)


# --------------------------------------------------------------------------- models and data
def mlp(sizes, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def setup(seed=0, classes=4):
    """(teacher, student, batch, quiz) in float64: tiny MLPs, tuple batches ``(x, y)``."""
    teacher = mlp([5, 9, classes], seed + 1)
    student = mlp([5, 6, classes], seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    batch = (torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, classes, (8,), generator=g))
    quiz = (torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, classes, (6,), generator=g))
    return teacher, student, batch, quiz


def warm(student, optimizer, batch, steps):
    """``steps`` ordinary optimizer steps on the student's CE (non-trivial optimizer state)."""
    x, y = batch
    for _ in range(steps):
        optimizer.zero_grad()
        ce(student(x), y).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- the reference meta-gradient
def unrolled_meta_grad(teacher, student, batch, quiz, optimizer, *, tau, w, steps=1, inner_lr=None,
                       frozen_second_moment=False, sgd_pilot_lr=None, quiz_at_current=False):
    """``∇θT CE(yq, S(xq; θ_k))``, double backward through ``steps`` reference updates.

    ``optimizer``: the student's (hyper-parameters and initial state are read; None: SGD at
    ``inner_lr``).  ``sgd_pilot_lr``: ``{name: η}`` for a plain SGD pilot whatever the optimizer.
    ``quiz_at_current``: ``∇θT ⟨θ_1(θT), ∇LQ(θS)⟩`` (the quiz gradient at the current student).
    """
    x, y = batch
    xq, yq = quiz
    tparams = [p for p in teacher.parameters() if p.requires_grad]
    named = {n: p for n, p in student.named_parameters() if p.requires_grad}
    zt = teacher(x)
    theta = dict(named)
    spec, states = {}, {}
    for n, p in named.items():
        if sgd_pilot_lr is not None:
            spec[n] = ("sgd", dict(lr=sgd_pilot_lr[n], momentum=0, dampening=0, nesterov=False, weight_decay=0,
                                   maximize=False))
            states[n] = {}
        elif optimizer is None:
            spec[n] = ("sgd", dict(lr=inner_lr, momentum=0, dampening=0, nesterov=False, weight_decay=0, maximize=False))
            states[n] = {}
        else:
            kind, h = hypers_of(optimizer, p)
            if inner_lr is not None:
                h = {**h, "lr": inner_lr}
            spec[n] = (kind, h)
            states[n] = state_of(optimizer, p)
    for _ in range(steps):
        zs = functional_call(student, theta, (x,))
        ls = (1 - w) * ce(zs, y) + w * kl(zs, zt, tau)
        grads = torch.autograd.grad(ls, list(theta.values()), create_graph=True)
        new = {n: ref_update(*spec[n], theta[n], g, states[n], frozen_second_moment=frozen_second_moment)
               for (n, _), g in zip(theta.items(), grads)}
        theta = {n: out[0] for n, out in new.items()}
        states = {n: out[1] for n, out in new.items()}
    if quiz_at_current:
        lq = ce(student(xq), yq)
        v = torch.autograd.grad(lq, list(named.values()))
        objective = sum((theta[n] * g).sum() for n, g in zip(named, v))
    else:
        objective = ce(functional_call(student, theta, (xq,)), yq)
    grads = torch.autograd.grad(objective, tparams)
    return dict(zip([n for n, p in teacher.named_parameters() if p.requires_grad], grads))


def rel_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a) ** 0.5
    den = sum(float(b[k].double().square().sum()) for k in b) ** 0.5
    assert den > 0.0
    return num / den
