"""``hypergrad="finite_diff"``: LGTM's central differences as the tangent step of the reverse sweep.

At step j, with direction ``a`` and ``ε = 0.01/‖a‖`` (LGTM/DARTS; ``fd_eps`` overrides), the
student's parameters ``θ_j`` (its own parameters at j = 0, else the trajectory's snapshot)
are perturbed IN PLACE to ``θ_j ± εa`` and restored (:func:`fastmeta.functional.central_pair`:
within a couple of ulp of ``max(|θ|, |εa|)``; the two forwards replay the dropout masks of
the trajectory's forward at step j)::

    c_j ≈ (∂KD/∂zt(θ_j + εa) − ∂KD/∂zt(θ_j − εa)) / 2ε        (LGTM's Eq. 10/18, on the teacher logits)
    H a ≈ (∇LS(θ_j + εa) − ∇LS(θ_j − εa)) / 2ε                (j ≥ 1)
    w_i ≈ (ℓ_i(θS + εa) − ℓ_i(θS − εa)) / 2ε                  (per-sample influences, j = 0)

``KD(θ ± εa)`` reaches θT only through ``zt``, so the difference is taken on ``∂KD/∂zt``
and ONE teacher backward applies ``J_Tᵀ`` (the paper's two teacher backward passes give
the same vector; ``J_T`` is linear).  The differences of two nearby losses/gradients
cancel most of their digits: they are evaluated in float64 from the (fp32/bf16) logits
(measured: fp32 per-sample influences went from 4e-3 to 2e-7 relative error against the
float64 run of the same difference).

``fd_mode="logits"`` (``inner_steps = 1``): the central difference of the student's
logits, ``u ≈ (zs₊ − zs₋)/2ε`` (ε from :func:`fastmeta.functional.default_fd_eps` unless
``fd_eps``), then the closed-form cotangent.  Approximate: float32 ~1e-4..1e-3.
"""
from __future__ import annotations

import math

import torch

from .. import losses
from ..batching import align_logits_labels, per_sample_sum
from ..functional import central_pair, functional_logits, jvp_logits
from .precision import grads_or_zeros
from .trajectory import Problem


def lgtm_eps(vectors, eps: float | None) -> float:
    """LGTM/DARTS's step ``ε = 0.01/‖d‖`` (1 when ``d = 0``), unless ``eps`` is given."""
    if eps is None:
        norm = math.sqrt(sum(float(v.double().square().sum()) for v in vectors))
        return 0.01 / norm if norm > 0.0 else 1.0
    return float(eps)


def tangent_step(problem: Problem, *, fd_eps: float | None, fd_mode: str):
    """The finite-difference :data:`~fastmeta.engine.trajectory.TangentStep` of ``problem``."""

    def step(j, snap, direction, need_hvp, need_influence):
        with problem.timer.phase("student_jvp"):
            if fd_mode == "logits":  # inner_steps == 1
                _, u = jvp_logits(problem.student, problem.split_x, direction, method="finite_diff", eps=fd_eps,
                                  rng_state=snap.rng)
                c, influence = problem.cotangent_and_influence(snap.zs, u, need_influence)
                return c, None, influence
            return _lgtm_difference(problem, j, snap, direction, fd_eps, need_hvp, need_influence)

    return step


def _lgtm_difference(problem: Problem, j, snap, direction, eps, need_hvp, need_influence):
    names = list(direction)
    own = j == 0  # step 0 perturbs the student's own parameters, later steps the snapshot θ_j
    params = problem.student_params if own else snap.theta
    tensors = [params[name] for name in names]
    vectors = [direction[name].detach() for name in names]
    eps = lgtm_eps(vectors, eps)
    zt64 = problem.zt.double()

    def evaluate():
        with torch.set_grad_enabled(need_hvp):
            leaves = tensors
            if need_hvp:
                leaves = [t if t.requires_grad else t.requires_grad_(True) for t in tensors]
            raw = functional_logits(problem.student, None if own else dict(zip(names, leaves)), problem.split_x)
            zs, _ = align_logits_labels(raw, problem.split_x.labels, shift_labels=problem.shift_labels, name="student")
            grads = None
            if need_hvp:
                loss = problem.student_loss(zs, problem.zt)
                grads = grads_or_zeros(torch.autograd.grad(loss, leaves, allow_unused=True), tensors)
        zs64 = zs.detach().double()
        grad_zt = _kd_teacher_logit_grad(zs64, zt64, problem)
        sample = _kd_sample_losses(zs64, zt64, problem) if need_influence else None
        return grad_zt, sample, grads

    plus, minus = central_pair(tensors, vectors, eps, evaluate, rng_state=snap.rng)
    cotangent = ((plus[0] - minus[0]) / (2.0 * eps)).to(problem.zt.dtype)
    influence = ((plus[1] - minus[1]) / (2.0 * eps)).to(problem.zt.dtype) if need_influence else None
    hv = None
    if need_hvp:
        hv = {name: (gp - gm) / (2.0 * eps) for name, gp, gm in zip(names, plus[2], minus[2])}
    return cotangent, hv, influence


def _kd_teacher_logit_grad(zs, zt, problem: Problem):
    """``∂KD/∂zt`` (batchmean over the mask) at the given student logits: ``fastmeta.losses``' closed form."""
    return losses.kd_teacher_grad_unchecked(zs, zt, problem.temperature, problem.kd_loss, mask=problem.mask)


def _kd_sample_losses(zs, zt, problem: Problem):
    """Per-sample KD loss ``ℓ_i`` = sum of the row losses over the sample's counted rows."""
    rows = losses.kd_loss_unchecked(zs, zt, problem.temperature, problem.kd_loss, reduction="none", mask=problem.mask,
                                    higher_order=True)
    return per_sample_sum(rows)
