"""Plain-PyTorch reference of the KD second-order kernel (``kernels/kd_second_order.py``).

Given student logits ``zs``, teacher logits ``zt`` and a student-logit tangent
``u`` (rows ``[N, V]``; ``u = J_S v`` in docs/meta-gradient.md), per row:

* the teacher-logit cotangent  ``c = ∂/∂zt ⟨∂ℓ/∂zs, u⟩``  (mixed second derivative
  of the row loss applied to ``u``), and
* the influence dot            ``w = ⟨∂ℓ/∂zs, u⟩``.

Notation as in ``kd_loss_reference``: ``s = zs/τ``, ``t = zt/τ``, ``ps``, ``pt``
their softmaxes, ``a = τ²`` (scaling on) or 1.  Closed forms (derived by hand
and checked against ``torch.autograd.grad`` twice in float64)::

    kl:          c = −(a/τ²) (pt ⊙ u − pt ⟨pt, u⟩)
                 w =  (a/τ)  ⟨ps − pt, u⟩
    reverse_kl:  c = −(a/τ²) (ps ⊙ u − ps ⟨ps, u⟩)
                 w =  (a/τ)  (⟨ps ⊙ g, u⟩ − RKL ⟨ps, u⟩),   g = log ps − log pt, RKL = ⟨ps, g⟩
    softmax_mse: r = ps ⊙ (u − ⟨ps, u⟩)         (= J_softmax(s) · u)
                 c = −(2a/(τ²V)) (pt ⊙ r − pt ⟨pt, r⟩)
                 w =  (2a/(τV))  ⟨d, r⟩,   d = ps − pt
    logit_mse:   c = −(2a/(τ²V)) u
                 w =  (2a/(τ²V)) ⟨zs − zt, u⟩

With the default ``a = τ²`` the temperature cancels from ``c`` for kl and
reverse_kl (docs/meta-gradient.md's ``c = −(pt ⊙ u − pt ⟨pt, u⟩)``).  These are per
row, before any reduction; ``fastmeta.kd_teacher_cotangent`` multiplies by the
reduction's row scale (1/n_counted for batchmean).
"""
from __future__ import annotations

import torch

from .kd_loss_reference import compute_dtype, loss_scale


def kd_second_order_rows_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_tangent: torch.Tensor,
    temperature: float = 1.0,
    kind: str = "kl",
    scale_by_temperature_squared: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(c [N, V], w [N])`` in ``compute_dtype`` (see module docstring).

    Any leading shape works (``[..., V]`` -> ``c [..., V]``, ``w [...]``); ``kind`` is
    trusted (``fastmeta.losses`` checks it once, at its public functions).
    """
    cdt = compute_dtype(student_logits.dtype)
    tau = float(temperature)
    a = loss_scale(tau, scale_by_temperature_squared)
    zs = student_logits.to(cdt)
    zt = teacher_logits.to(cdt)
    u = student_tangent.to(cdt)
    v = zs.shape[-1]
    if kind == "logit_mse":
        k = 2.0 * a / (tau * tau * v)
        return -k * u, k * ((zs - zt) * u).sum(-1)
    log_ps = torch.log_softmax(zs / tau, dim=-1)
    log_pt = torch.log_softmax(zt / tau, dim=-1)
    ps = log_ps.exp()
    pt = log_pt.exp()
    ps_u = (ps * u).sum(-1, keepdim=True)
    if kind == "kl":
        pt_u = (pt * u).sum(-1, keepdim=True)
        c = -(a / tau**2) * (pt * u - pt * pt_u)
        w = (a / tau) * (ps_u - pt_u).squeeze(-1)
        return c, w
    if kind == "reverse_kl":
        g = log_ps - log_pt
        rkl = (ps * g).sum(-1)
        c = -(a / tau**2) * (ps * u - ps * ps_u)
        w = (a / tau) * ((ps * g * u).sum(-1) - rkl * ps_u.squeeze(-1))
        return c, w
    # softmax_mse
    r = ps * (u - ps_u)
    d = ps - pt
    c = -(2.0 * a / (tau * tau * v)) * (pt * r - pt * (pt * r).sum(-1, keepdim=True))
    w = (2.0 * a / (tau * v)) * (d * r).sum(-1)
    return c, w
