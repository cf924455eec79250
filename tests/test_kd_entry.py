"""KD has one home, ``fastmeta.losses``: public functions check once, the trusted core re-checks nothing.

* ``fastmeta.batching``'s KD names are ``fastmeta.losses``' functions (no second implementation);
* the trusted functions (``kd_loss_unchecked``, ``kd_second_order_unchecked``,
  ``kd_teacher_grad_unchecked``, ``kd_rows``) agree with the public ones and with autograd,
  on the PyTorch twin and on the Triton kernels (``TRITON_INTERPRET=1`` on CPU);
* one ``meta_step`` checks ``temperature``/``kd_weight``/``kd_loss`` once and never goes through
  the public (checking) KD functions; the argument errors keep their messages.
"""
from __future__ import annotations

import collections
import importlib.util
import os

import pytest
import torch

import fastmeta
from fastmeta import batching, losses

KINDS = losses.KINDS


def _logits(seed=0, shape=(2, 3, 7), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zs, zt, u = (torch.randn(*shape, generator=g, dtype=dtype) for _ in range(3))
    mask = torch.tensor([[True, True, False], [True, False, True]])
    return zs, zt, u, mask


def test_batching_kd_names_are_the_losses_functions():
    assert batching.kd_loss is losses.kd_loss
    assert batching.kd_teacher_cotangent is losses.kd_teacher_cotangent
    assert batching.kd_influence is losses.kd_influence
    assert batching.kd_rows is losses.kd_rows
    assert batching.check_temperature is losses.check_temperature
    assert batching.KD_KINDS == losses.KINDS


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_unchecked_core_matches_the_public_functions(kind, reduction, masked):
    zs, zt, u, mask = _logits()
    mask = mask if masked else None
    public = losses.kd_loss(zs, zt, 2.0, kind=kind, reduction=reduction, mask=mask)
    torch.testing.assert_close(losses.kd_loss_unchecked(zs, zt, 2.0, kind, reduction=reduction, mask=mask), public,
                               rtol=1e-14, atol=0)
    torch.testing.assert_close(
        losses.kd_loss_unchecked(zs, zt, 2.0, kind, reduction=reduction, mask=mask, higher_order=True), public,
        rtol=1e-14, atol=0)
    c, w = losses.kd_second_order_unchecked(zs, zt, u, 2.0, kind, reduction=reduction, mask=mask, per_sample=True)
    torch.testing.assert_close(
        c, losses.kd_teacher_cotangent(zs, zt, u, 2.0, kind=kind, reduction=reduction, mask=mask), rtol=1e-14, atol=0)
    torch.testing.assert_close(w, losses.kd_influence(zs, zt, u, 2.0, kind=kind, mask=mask, per_sample=True),
                               rtol=1e-14, atol=0)
    zt_leaf = zt.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(losses.kd_loss(zs, zt_leaf, 2.0, kind=kind, reduction=reduction, mask=mask).sum(),
                                  zt_leaf)
    torch.testing.assert_close(losses.kd_teacher_grad_unchecked(zs, zt, 2.0, kind, reduction=reduction, mask=mask),
                               grad, rtol=1e-12, atol=1e-15)
    rows = losses.kd_rows(zs, zt, 2.0, kind)
    if reduction == "none":
        torch.testing.assert_close(rows if mask is None else torch.where(mask, rows, 0.0), public, rtol=1e-14, atol=0)


def test_kd_rows_is_differentiable_in_forward_mode_and_twice():
    zs, zt, u, _ = _logits()
    for kind in KINDS:
        _, dots = torch.func.jvp(lambda z: losses.kd_rows(z, zt, 2.0, kind), (zs,), (u,))
        ref = losses.kd_influence(zs, zt, u, 2.0, kind=kind)
        torch.testing.assert_close(dots, ref, rtol=1e-12, atol=1e-14)
        zs_ = zs.clone().requires_grad_(True)
        zt_ = zt.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(losses.kd_rows(zs_, zt_, 2.0, kind).sum() / 6, zs_, create_graph=True)
        (c,) = torch.autograd.grad((g * u).sum(), zt_)
        torch.testing.assert_close(c, losses.kd_teacher_cotangent(zs, zt, u, 2.0, kind=kind), rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernels on CPU need triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind", KINDS)
def test_unchecked_core_on_the_triton_kernels(kind, monkeypatch):
    zs, zt, u, mask = _logits(dtype=torch.float32)
    expected = {}
    for reduction in ("batchmean", "sum"):
        expected[reduction] = (
            losses.kd_loss_unchecked(zs, zt, 2.0, kind, reduction=reduction, mask=mask),
            losses.kd_second_order_unchecked(zs, zt, u, 2.0, kind, reduction=reduction, mask=mask, per_sample=True),
            losses.kd_teacher_grad_unchecked(zs, zt, 2.0, kind, reduction=reduction, mask=mask),
        )
    monkeypatch.setattr(losses, "_auto_backend", lambda x: "triton")
    for reduction, (loss, (c, w), grad) in expected.items():
        tol = dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(losses.kd_loss_unchecked(zs, zt, 2.0, kind, reduction=reduction, mask=mask), loss,
                                   **tol)
        c_k, w_k = losses.kd_second_order_unchecked(zs, zt, u, 2.0, kind, reduction=reduction, mask=mask,
                                                    per_sample=True)
        torch.testing.assert_close(c_k, c, **tol)
        torch.testing.assert_close(w_k, w, **tol)
        torch.testing.assert_close(losses.kd_teacher_grad_unchecked(zs, zt, 2.0, kind, reduction=reduction, mask=mask),
                                   grad, **tol)


def test_argument_checks():
    for bad in (True, "2.0", None):
        with pytest.raises(TypeError, match="temperature"):
            losses.check_temperature(bad)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            losses.check_temperature(bad)
    assert losses.check_temperature(torch.tensor(2.0)) == 2.0
    with pytest.raises(ValueError, match="kind must be one of"):
        losses.check_kind("js")
    with pytest.raises(ValueError, match="kd_loss must be one of"):
        batching.check_kd_kind("js")
    with pytest.raises(TypeError, match="kd_weight"):
        batching.check_kd_weight("0.5")
    with pytest.raises(ValueError, match="kd_weight"):
        batching.check_kd_weight(1.5)


class _Net(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(torch.tanh(x))


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)


@pytest.mark.parametrize("algorithm,hypergrad,options", [
    ("kd", "exact", {}),
    ("metadistil", "exact", {}),
    ("metadistil", "finite_diff", {}),
    ("metadistil", "autograd", {}),
    ("metadistil", "exact", {"inner_steps": 2}),
    ("lgtm", "exact", {}),
    ("lgtm", "exact", {"influence_objective": "official_exact"}),
    ("lgtm", "exact", {"influence_objective": "weighted"}),
    ("reptile", "first_order", {}),
    ("ikd", "exact", {}),
    ("ikd", "first_order", {}),
])
def test_meta_step_checks_each_argument_once(algorithm, hypergrad, options, monkeypatch):
    calls = collections.Counter()

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    # every route to a check: the one helper each, and the public (checking) KD functions
    monkeypatch.setattr(losses, "check_temperature", counting("temperature", losses.check_temperature))
    monkeypatch.setattr(batching, "check_temperature", losses.check_temperature)
    monkeypatch.setattr(batching, "check_kd_weight", counting("kd_weight", batching.check_kd_weight))
    monkeypatch.setattr(losses, "check_kind", counting("kind", losses.check_kind))
    monkeypatch.setattr(losses, "check_logits", counting("kd logits", losses.check_logits))
    monkeypatch.setattr(losses, "_check_arguments", counting("public KD function", losses._check_arguments))
    teacher, student = _Net(1).double(), _Net(2).double()
    opt_t = torch.optim.Adam(teacher.parameters(), lr=0.01)
    opt_s = torch.optim.SGD(student.parameters(), lr=0.1)
    fastmeta.meta_step(teacher, student, _batch(1), _batch(2), opt_t, opt_s, algorithm=algorithm,
                       hypergrad=hypergrad, temperature=2.0, **options)
    assert calls == {"temperature": 1, "kd_weight": 1, "kind": 1}, calls


def test_engine_public_entry_checks_once(monkeypatch):
    calls = collections.Counter()
    original = losses.check_temperature

    def counting(value):
        calls["temperature"] += 1
        return original(value)

    monkeypatch.setattr(losses, "_check_arguments", lambda *a, **k: pytest.fail("public KD check on an internal path"))
    monkeypatch.setattr(batching, "check_temperature", counting)
    from fastmeta.engine import api

    monkeypatch.setattr(api, "check_temperature", counting)
    teacher, student = _Net(1).double(), _Net(2).double()
    fastmeta.engine.meta_gradient(teacher, student, _batch(1), _batch(2), inner_lr=0.1, temperature=2.0,
                                  compute_influence=True)
    assert calls["temperature"] == 1


def test_inner_lr_none_group_check_once_and_messages(monkeypatch):
    """inner_lr=None: the student's group lrs are checked once (the engine's check_plan for engine algorithms)."""
    from fastmeta.engine import optimizer as engine_optimizer

    calls = collections.Counter()
    original = engine_optimizer.check_student_optimizer

    def counting(*args, **kwargs):
        calls["check_student_optimizer"] += 1
        return original(*args, **kwargs)

    from fastmeta.engine import api

    monkeypatch.setattr(api, "check_student_optimizer", counting)
    for algorithm in ("metadistil", "kd"):
        teacher, student = _Net(1).double(), _Net(2).double()
        opt_t = torch.optim.SGD(teacher.parameters(), lr=0.1)
        opt_s = torch.optim.SGD(student.parameters(), lr=0.0)
        before = {k: v.clone() for k, v in student.state_dict().items()}
        with pytest.raises(ValueError, match="inner_lr"):
            fastmeta.meta_step(teacher, student, _batch(1), _batch(2), opt_t, opt_s, algorithm=algorithm)
        assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert calls["check_student_optimizer"] == 1  # metadistil's; kd is checked by meta_step itself
