"""Plain-PyTorch reference of the fused KD loss kernel (``kernels/kd_loss.py``).

Everything here works on 2-D row tensors ``[N, V]`` (one row per sample or per
token).  Inputs in fp16/bf16/fp32 are computed in float32, float64 stays
float64 (``compute_dtype``).  This module is the CPU path of
``fastmeta.kd_loss`` and the twin the Triton kernel is tested against.

Notation, per row, with temperature ``τ > 0``::

    s = zs / τ,   t = zt / τ,   ps = softmax(s),   pt = softmax(t)
    a = τ²  if scale_by_temperature_squared else 1          (Hinton et al.)

Per-row losses ``ℓ`` and their closed-form gradients (every formula checked
against float64 autograd in ``tests/test_kd_loss.py``):

``kl``          ``ℓ = a · KL(pt ‖ ps) = a · Σ_j pt_j (log pt_j − log ps_j)``
                ``∂ℓ/∂zs = (a/τ) (ps − pt)``
                ``∂ℓ/∂zt = (a/τ) pt ⊙ (log pt − log ps − KL)``
``reverse_kl``  ``ℓ = a · KL(ps ‖ pt) = a · Σ_j ps_j (log ps_j − log pt_j)``
                ``∂ℓ/∂zs = (a/τ) ps ⊙ (log ps − log pt − RKL)``
                ``∂ℓ/∂zt = (a/τ) (pt − ps)``
``softmax_mse`` ``ℓ = (a/V) Σ_j (ps_j − pt_j)²``,  ``d = ps − pt``
                ``∂ℓ/∂zs =  (2a/(τV)) (ps ⊙ d − ps ⟨ps, d⟩)``
                ``∂ℓ/∂zt = −(2a/(τV)) (pt ⊙ d − pt ⟨pt, d⟩)``
                (batchmean of this is MetaDistil's ``F.mse_loss(ps, pt) · τ²``)
``logit_mse``   ``ℓ = (a/V) Σ_j ((zs_j − zt_j)/τ)²``  (= mean_j (zs − zt)² when scaled)
                ``∂ℓ/∂zs = (2a/(τ²V)) (zs − zt) = −∂ℓ/∂zt``

With a = τ² the KL gradient is the familiar ``τ (ps − pt)``.

Per-row statistics (``stats[:, 0:4]``, what the Triton forward saves for its
backward)::

    stats[:, 0] = lse_s = logsumexp(s)      stats[:, 1] = lse_t = logsumexp(t)
    kl:          stats[:, 2] = KL(pt ‖ ps)  (unscaled)
    reverse_kl:  stats[:, 2] = KL(ps ‖ pt)  (unscaled)
    softmax_mse: stats[:, 2] = ⟨ps, d⟩,  stats[:, 3] = ⟨pt, d⟩
    (unused entries are 0; logit_mse uses none of them)
"""
from __future__ import annotations

import torch

KINDS = ("kl", "reverse_kl", "softmax_mse", "logit_mse")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def loss_scale(temperature: float, scale_by_temperature_squared: bool) -> float:
    """``a = τ²`` (Hinton scaling) or 1."""
    return float(temperature) ** 2 if scale_by_temperature_squared else 1.0


def kd_rows_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    kind: str = "kl",
    scale_by_temperature_squared: bool = True,
) -> torch.Tensor:
    """Per-row KD losses ``ℓ`` of ``[..., V]`` logits: shape ``[...]``, in ``compute_dtype``.

    The losses of :func:`kd_loss_rows_reference` without its statistics: purely
    functional (no in-place writes), so it is differentiable any number of times,
    in forward mode and under ``torch.func`` transforms (the ``higher_order`` path
    of ``fastmeta.losses``).  Arguments are trusted (``fastmeta.losses`` checks them).
    """
    cdt = compute_dtype(student_logits.dtype)
    tau = float(temperature)
    a = loss_scale(tau, scale_by_temperature_squared)
    zs = student_logits.to(cdt)
    zt = teacher_logits.to(cdt)
    v = zs.shape[-1]
    if kind == "logit_mse":
        return (a / (tau * tau * v)) * (zs - zt).square().sum(-1)
    log_ps = torch.log_softmax(zs / tau, dim=-1)
    log_pt = torch.log_softmax(zt / tau, dim=-1)
    if kind == "kl":
        return a * (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if kind == "reverse_kl":
        return a * (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    return (a / v) * (log_ps.exp() - log_pt.exp()).square().sum(-1)


def kd_loss_rows_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    kind: str = "kl",
    scale_by_temperature_squared: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KD losses ``ℓ_i`` of ``[N, V]`` logits and the per-row stats.

    Returns ``(loss_rows [N], stats [N, 4])`` in ``compute_dtype``.  Pure torch
    ops: differentiable by autograd (the tests use that as the fp64 oracle).
    ``kind`` is trusted (``fastmeta.losses`` checks it once, at its public functions).
    """
    cdt = compute_dtype(student_logits.dtype)
    tau = float(temperature)
    a = loss_scale(tau, scale_by_temperature_squared)
    zs = student_logits.to(cdt)
    zt = teacher_logits.to(cdt)
    n, v = zs.shape
    stats = zs.new_zeros(n, 4)
    if kind == "logit_mse":
        loss = (a / (tau * tau * v)) * (zs - zt).square().sum(-1)
        return loss, stats
    s = zs / tau
    t = zt / tau
    log_ps = torch.log_softmax(s, dim=-1)
    log_pt = torch.log_softmax(t, dim=-1)
    stats = torch.stack(
        [torch.logsumexp(s, -1), torch.logsumexp(t, -1), zs.new_zeros(n), zs.new_zeros(n)], -1
    ).detach()
    if kind == "kl":
        pt = log_pt.exp()
        div = (pt * (log_pt - log_ps)).sum(-1)
        stats[:, 2] = div.detach()
        return a * div, stats
    if kind == "reverse_kl":
        ps = log_ps.exp()
        div = (ps * (log_ps - log_pt)).sum(-1)
        stats[:, 2] = div.detach()
        return a * div, stats
    # softmax_mse
    ps = log_ps.exp()
    pt = log_pt.exp()
    d = ps - pt
    stats[:, 2] = (ps * d).sum(-1).detach()
    stats[:, 3] = (pt * d).sum(-1).detach()
    return (a / v) * d.square().sum(-1), stats


def kd_loss_grads_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    kind: str = "kl",
    scale_by_temperature_squared: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ``(∂ℓ_i/∂zs_i, ∂ℓ_i/∂zt_i)`` for every row (module docstring).

    Returns two ``[N, V]`` tensors in ``compute_dtype`` (unreduced, unmasked:
    row i is the gradient of row i's own loss).  Any leading shape works (``[..., V]``);
    ``kind`` is trusted.
    """
    cdt = compute_dtype(student_logits.dtype)
    tau = float(temperature)
    a = loss_scale(tau, scale_by_temperature_squared)
    zs = student_logits.to(cdt)
    zt = teacher_logits.to(cdt)
    v = zs.shape[-1]
    if kind == "logit_mse":
        g = (2.0 * a / (tau * tau * v)) * (zs - zt)
        return g, -g
    log_ps = torch.log_softmax(zs / tau, dim=-1)
    log_pt = torch.log_softmax(zt / tau, dim=-1)
    ps = log_ps.exp()
    pt = log_pt.exp()
    if kind == "kl":
        f = log_pt - log_ps
        div = (pt * f).sum(-1, keepdim=True)
        return (a / tau) * (ps - pt), (a / tau) * pt * (f - div)
    if kind == "reverse_kl":
        g = log_ps - log_pt
        div = (ps * g).sum(-1, keepdim=True)
        return (a / tau) * ps * (g - div), (a / tau) * (pt - ps)
    d = ps - pt
    c = 2.0 * a / (tau * v)
    grad_s = c * (ps * d - ps * (ps * d).sum(-1, keepdim=True))
    grad_t = -c * (pt * d - pt * (pt * d).sum(-1, keepdim=True))
    return grad_s, grad_t
