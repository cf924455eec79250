"""The meta-gradient engine: the teacher's gradient through the student's pilot update.

Notation (``docs/meta-gradient.md``): teacher ``T(x; θT)`` with logits ``zt``, student
``S(x; θS)`` with logits ``zs``, training batch ``(x, y)``, quiz batch ``(xq, yq)``,
temperature ``τ``, KD weight ``w``::

    LS(θS, θT) = (1 − w)·CE(y, zs) + w·KD(zs, zt)              (batchmean over counted rows)
    θS'        = U(θS, ∇θS LS)                                  (the student optimizer's update)
    LQ(θS')    = CE(yq, S(xq; θS'))
    meta-gradient  ∇θT LQ(θS'(θT)) = −η·w·J_Tᵀ c,   c = ∂/∂zt ⟨∂KD/∂zs, u⟩,   u = J_S(θS)·a,
                   a = −(∂θS'/∂g)ᵀ v / η,   v = ∇θS' LQ

``J_S``/``J_T`` are the Jacobians of the logits on ``x`` with respect to the parameters.
Only the KD term of ``LS`` depends on θT, and KD depends on θS only through ``zs`` and on
θT only through ``zt``: the mixed second derivative factorises through the logits.  Cost:
one student JVP and one ordinary teacher backward; no double backward, no
``create_graph``.  For plain SGD ``a = v``; in general ``a`` is the exact vector-Jacobian
product of the optimizer's update (diagonal: a few elementwise operations).
Per-sample influence (LGTM), from the same JVP: ``w_i = ⟨∇θS ℓ_i, a⟩ = Σ_r ⟨∂ℓ_r/∂zs_r, u_r⟩``.

What is exact (agrees with an independent double backward through ``torch.optim``'s real
update to float64 rounding, ``tests/test_engine_exact.py``; and with the peer libraries
higher and TorchOpt, ``tests/test_engine_peers.py``): ``hypergrad="exact"`` and
``"autograd"`` for SGD (momentum, dampening, nesterov, weight decay, maximize), Adam,
AdamW and amsgrad (L2 or decoupled weight decay), per-parameter-group learning rates and
``inner_steps >= 1`` (the reverse sweep through every update, optimizer state included).
What is approximate: ``adam_jacobian="frozen_second_moment"`` (Adam's second moment held
constant in the Jacobian: the usual first-order treatment, measured error in
``docs/meta-gradient.md``) and ``hypergrad="finite_diff"`` (LGTM's central differences).

Modules: :mod:`.api` (public functions, the one argument check, :class:`MetaGradient`),
:mod:`.trajectory` (teacher forward, pilot trajectory, quiz gradient, reverse sweep),
:mod:`.exact`, :mod:`.finite_diff`, :mod:`.autograd` (one per hypergradient method),
:mod:`.optimizer` (the optimizer's update and its exact Jacobian), :mod:`.precision`
(autocast, the student tangent's precision, loss scaling, the teacher backward).

Side effects: none.  Parameters (bitwise, except ``finite_diff``: within a couple of
ulp), ``.grad``, train/eval mode, buffers (BatchNorm running statistics are restored)
and the optimizer state are as they were.  Random generators advance as the forwards draw
(dropout); forwards that must pair (the primal and its JVP, the two finite-difference
forwards) replay one generator state (:mod:`fastmeta.functional`).  With the student in
training mode the student's forwards on ``x`` run under math attention (a fused
attention kernel draws its dropout differently from the math path the JVP needs).
"""
from __future__ import annotations

from .api import (
    FD_MODES,
    HYPERGRAD_METHODS,
    QUIZ_POINTS,
    STUDENT_TANGENTS,
    TEACHER_GRAPHS,
    MetaGradient,
    check_count,
    check_pilot_options,
    influence,
    meta_grad,
    meta_gradient,
)
from .optimizer import ADAM_JACOBIANS, PILOTS
from .precision import JVP_PRECISIONS, check_loss_scale, low_precision_autocast, scaled_grad

__all__ = [
    "MetaGradient",
    "meta_gradient",
    "meta_grad",
    "influence",
    "HYPERGRAD_METHODS",
    "JVP_PRECISIONS",
    "STUDENT_TANGENTS",
    "TEACHER_GRAPHS",
    "PILOTS",
    "ADAM_JACOBIANS",
    "QUIZ_POINTS",
    "FD_MODES",
    "scaled_grad",
    "check_loss_scale",
    "low_precision_autocast",
    "check_count",
    "check_pilot_options",
]
