"""``hypergrad="exact"``: the tangent step of the reverse sweep by forward-mode AD.

At step j of :func:`~fastmeta.engine.trajectory.reverse_sweep`, with direction ``a``:

* ``j = 0``: ``u = J_S(θS)·a``, one forward-mode JVP of the student's logits
  (:func:`fastmeta.functional.student_jvp`: dual tensors, math attention, dropout masks replayed);
* ``j ≥ 1``: ``(J_S(θ_j)·a, H_S(θ_j)·a)`` from ONE forward-over-reverse pass
  (:func:`fastmeta.hessian.forward_over_reverse` with the logits as auxiliary output).

then the closed-form cotangent ``c = ∂/∂zt ⟨∂KD/∂zs, u⟩`` on the teacher's logits and,
at step 0, LGTM's per-sample influences ``⟨∂ℓ_i/∂zs, u⟩``.  No double backward and no
``create_graph``.  Exact: agrees with a double backward through the optimizer's real
update to float64 rounding (``tests/test_engine_exact.py``).
"""
from __future__ import annotations

from ..functional import functional_logits, replay_rng, student_jvp, transform_buffers
from ..hessian import forward_over_reverse
from .trajectory import Problem, kept_tangent


def tangent_step(problem: Problem):
    """The exact :data:`~fastmeta.engine.trajectory.TangentStep` of ``problem``."""

    def step(j, snap, direction, need_hvp, need_influence):
        with problem.timer.phase("student_jvp"):
            if need_hvp:
                u, hv = _logits_jvp_and_hvp(problem, snap, direction)
            elif j == 0 and problem.tangent_graph is not None:
                u, hv = kept_tangent(problem, direction), None
            else:
                params = None if j == 0 else snap.theta
                _, u = student_jvp(problem.student, problem.split_x, direction, params=params, rng_state=snap.rng)
                hv = None
            c, influence = problem.cotangent_and_influence(snap.zs, u, need_influence)
        return c, hv, influence

    return step


def _logits_jvp_and_hvp(problem: Problem, snap, direction):
    """Forward-over-reverse at ``θ_j``: ``(J_S a, H_S a)`` with ``H_S = ∇²θ LS`` (teacher logits fixed)."""
    names = list(direction)
    student = problem.student

    def loss_and_logits(params):
        raw = functional_logits(student, {**transform_buffers(student), **params}, problem.split_x)
        loss = problem.student_loss(problem.align(raw), problem.zt, higher_order=True)
        return loss, raw

    primals = {name: snap.theta[name].detach() for name in names}
    tangents = {name: direction[name].detach() for name in names}
    with replay_rng(snap.rng):
        hv, u = forward_over_reverse(loss_and_logits, primals, tangents, has_aux=True)
    return u, hv
