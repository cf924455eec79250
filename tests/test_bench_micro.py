"""pytest-benchmark micro-benchmarks: fastmeta.meta_grad exact vs autograd, influence, at tiny size.

The default test run passes ``--benchmark-disable`` (pyproject addopts): each case then
runs once, untimed, as a correctness check.  Time them with::

    python -m pytest tests/test_bench_micro.py --benchmark-enable -q

References (written here, none of fastmeta's code), in float64 on double copies of the models:

* meta-gradient: ``∇θT CE(yq, S(xq; θS'))`` with the SGD pilot step
  ``θS' = θS − η ∇θS LS``, ``LS = (1 − w)·CE(y, zs) + w·τ²·KL(pt ‖ ps)`` (batchmean,
  ``F.kl_div``), by a plain double backward (``create_graph=True`` through the pilot
  step, the quiz loss through ``torch.func.functional_call``);
* influences: ``w_i = ⟨∇θS ℓ_i, ∇θS' CE(yq, S(xq; θS'))⟩`` with ``ℓ_i = τ²·KL(pt_i ‖ ps_i)``,
  one backward per sample.

The benchmarked (timed) calls run in float32; the same calls in float64 are checked at
float64 tolerances.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastmeta
from bench.meta_step import build_models, random_batch

KWARGS = dict(inner_lr=1e-2, temperature=2.0, kd_weight=0.5)


@pytest.fixture(scope="module")
def tiny_setup():
    torch.manual_seed(0)
    teacher, student = build_models("tiny", seed=0, attn="eager", dropout=0.0)
    gen = torch.Generator().manual_seed(1)
    batch = random_batch(1000, 4, 16, generator=gen, device="cpu")
    quiz = random_batch(1000, 4, 16, generator=gen, device="cpu")
    return teacher, student, batch, quiz


def _split(batch):
    return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]


def _kl_rows(zs, zt, tau):
    """τ²·KL(softmax(zt/τ) ‖ softmax(zs/τ)) per row."""
    return tau**2 * F.kl_div(F.log_softmax(zs / tau, -1), F.log_softmax(zt / tau, -1), reduction="none",
                             log_target=True).sum(-1)


def _pilot(teacher, student, batch, *, inner_lr, temperature, kd_weight):
    """θS' = θS − η ∇θS LS as a differentiable function of θT (create_graph=True)."""
    x, y = _split(batch)
    zt, zs = teacher(**x).logits, student(**x).logits
    loss = (1 - kd_weight) * F.cross_entropy(zs, y) + kd_weight * _kl_rows(zs, zt, temperature).mean()
    names, params = zip(*student.named_parameters())
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return {n: p if g is None else p - inner_lr * g for n, p, g in zip(names, params, grads)}


def _quiz_loss(student, theta, quiz):
    xq, yq = _split(quiz)
    return F.cross_entropy(torch.func.functional_call(student, theta, (), xq).logits, yq)


def _reference_meta_grad(teacher, student, batch, quiz, **kwargs):
    names, params = zip(*teacher.named_parameters())
    quiz_loss = _quiz_loss(student, _pilot(teacher, student, batch, **kwargs), quiz)
    grads = torch.autograd.grad(quiz_loss, params, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)}


def _reference_influence(teacher, student, batch, quiz, **kwargs):
    theta = {n: t.detach().requires_grad_(True) for n, t in _pilot(teacher, student, batch, **kwargs).items()}
    v = torch.autograd.grad(_quiz_loss(student, theta, quiz), list(theta.values()), allow_unused=True)
    x, _ = _split(batch)
    with torch.no_grad():
        zt = teacher(**x).logits
    rows = _kl_rows(student(**x).logits, zt, kwargs["temperature"])
    influences = []
    for i in range(rows.shape[0]):  # one backward per sample
        g = torch.autograd.grad(rows[i], list(student.parameters()), retain_graph=True, allow_unused=True)
        influences.append(sum((gi * vi).sum() for gi, vi in zip(g, v) if gi is not None and vi is not None))
    return torch.stack(influences).detach()


def _rel(got, ref):
    assert set(got) == set(ref)
    assert all(torch.isfinite(got[k]).all() for k in got)
    num = sum(float((got[k].double() - ref[k].double()).pow(2).sum()) for k in ref) ** 0.5
    den = sum(float(ref[k].double().pow(2).sum()) for k in ref) ** 0.5
    assert den > 0
    return num / den


def _rel_rows(got, ref):
    assert got.shape == ref.shape and torch.isfinite(got).all()
    assert (ref.abs() > 0).all()
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.fixture(scope="module")
def references(tiny_setup):
    """float64 copies of the models and the independent references on them, and the
    influence reference evaluated in float32 (the same-dtype yardstick)."""
    teacher, student, batch, quiz = tiny_setup
    teacher64, student64 = copy.deepcopy(teacher).double(), copy.deepcopy(student).double()
    meta = _reference_meta_grad(teacher64, student64, batch, quiz, **KWARGS)
    assert all(bool(g.abs().sum() > 0) for g in meta.values())  # every teacher tensor gets a signal
    influences = _reference_influence(teacher64, student64, batch, quiz, **KWARGS)
    influences32 = _reference_influence(teacher, student, batch, quiz, **KWARGS)
    return teacher64, student64, meta, influences, influences32


@pytest.mark.parametrize("hypergrad", ["exact", "autograd", "finite_diff"])
def test_meta_grad_micro(benchmark, tiny_setup, references, hypergrad):
    teacher, student, batch, quiz = tiny_setup
    teacher64, student64, reference, _, _ = references
    benchmark.group = "meta_grad tiny BERT (2L/32 -> 1L), bs 4, seq 16"
    grads = benchmark.pedantic(
        lambda: fastmeta.meta_grad(teacher, student, batch, quiz, hypergrad=hypergrad, **KWARGS),
        rounds=3, iterations=1, warmup_rounds=1,
    )
    assert all(g.dtype == torch.float32 for g in grads.values())
    grads64 = fastmeta.meta_grad(teacher64, student64, batch, quiz, hypergrad=hypergrad, **KWARGS)
    if hypergrad == "finite_diff":
        # LGTM's central difference: O(ε²) truncation, measured 2.0e-4 in float64 and in float32
        assert _rel(grads64, reference) <= 1e-3
        assert _rel(grads, reference) <= 1e-3
    else:
        assert _rel(grads64, reference) <= 1e-10
        assert _rel(grads, reference) <= 1e-5  # float32 (measured ~1e-7)


def test_influence_micro(benchmark, tiny_setup, references):
    teacher, student, batch, quiz = tiny_setup
    teacher64, student64, _, reference, reference32 = references
    benchmark.group = "influence tiny BERT, bs 4, seq 16"
    w = benchmark.pedantic(
        lambda: fastmeta.influence(teacher, student, batch, quiz, inner_lr=1e-2, temperature=2.0),
        rounds=3, iterations=1, warmup_rounds=1,
    )
    assert w.shape == (4,) and w.dtype == torch.float32
    w64 = fastmeta.influence(teacher64, student64, batch, quiz, inner_lr=1e-2, temperature=2.0)
    # ∂ℓ_i/∂zs = τ(ps − pt) with ps − pt ~ 1e-5 here (the student is the teacher's first
    # layer): float64 keeps ~11 digits (measured 5e-12), float32 ~3; for float32 the
    # flash-attention rule against the same per-sample loop run in float32 (measured 1.1e-3)
    assert _rel_rows(w64, reference) <= 1e-10
    assert _rel_rows(w, reference) <= 2 * _rel_rows(reference32, reference) + 1e-5
