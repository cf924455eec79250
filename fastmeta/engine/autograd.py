"""``hypergrad="autograd"``: the reference, a double backward through the optimizer's real update.

The pilot trajectory is built with ``create_graph=True`` through
:meth:`OptimizerUpdate.step <fastmeta.engine.optimizer.OptimizerUpdate.step>` (a
transcription of ``torch.optim``'s own update, the same values as ``optimizer.step()``)
with the teacher's logits in the graph, and ``∇θT LQ(θ_k)`` is ONE ``autograd.grad``
of the quiz loss.  It shares none of the exact method's linear algebra: no closed-form
adjoint (``OptimizerUpdate.vjp``), no reverse sweep, no JVP, no closed-form cotangent;
autograd differentiates the update, the student's backward and the KD loss itself.
Costly (it keeps the student's backward graph of every step alive): for tests and
benchmarks, in float64.  At Adam's first step autograd's derivative is the difference of
two terms ~``1/|g|`` whose true difference is ``eps/(|g|+eps)²``: in float64 it still
agrees with the exact method to ~1e-12 (tiny MLP; the cancellation costs ~4 digits), in
float32 it keeps none (measured 60% off under bf16 autocast); :mod:`.optimizer`'s ``vjp`` has no such cancellation.  Runs under math attention (the fused SDPA kernels have no double backward).

``quiz_point="current"``: ``v = ∇θ LQ(θS)`` is a constant and the meta-gradient is
``∇θT ⟨θS'(θT), v⟩``.  Influences (``compute_influence``): the step's direction
``a = −∂⟨θS'(g), v⟩/∂g / η`` by autograd through the update, then ``u = J_S a`` by the
double-vjp trick (reverse mode twice).
"""
from __future__ import annotations

import contextlib

import torch

from .. import batching
from ..batching import check_finite, check_logits_pair, cross_entropy
from ..functional import capture_rng_state, functional_logits, math_attention, replay_rng
from .precision import grads_or_zeros, scaled_grad
from .trajectory import Problem, Trajectory, own_loss_parts


def autograd_meta_gradient(problem: Problem, steps: int, quiz_point: str, compute_influence: bool, need_teacher: bool,
                           tangent_context=None, own_loss=None, meta_weight: float = 1.0):
    """``(teacher_grads, LQ, v, trajectory (first step and θ_k), influences or None, own loss or None)``.

    ``tangent_context``: the precision context of the student tangent (influences only).
    ``own_loss``: an algorithm's loss ``own_loss(zt, zs, influences)`` on the teacher's logits (with their
    graph), the student's at θS (detached) and the influences (None unless ``compute_influence``): the
    teacher's gradient is then ``meta_weight·∇θT LQ + ∇θT own_loss``, the second by a backward of its own
    through the kept teacher graph, after the influences (``Options.teacher_loss``).
    """
    timer, names, update = problem.timer, problem.names, problem.update
    zt = problem.teacher_aligned
    theta = dict(problem.student_params)
    states = {name: update.initial_state(name) for name in names}
    first = None
    for j in range(steps):
        with timer.phase("student_forward_backward"):
            rng = capture_rng_state(problem.device)
            with torch.enable_grad():
                raw = functional_logits(problem.student, theta, problem.split_x)
                zs = problem.align(raw)
                if j == 0:
                    check_logits_pair(zs, zt)
                ls = problem.student_loss(zs, zt, higher_order=True)
                check_finite(ls.detach(), "student loss LS on batch" + (f" (inner step {j})" if j else ""))
                tensors = [theta[name] for name in names]
                grads = grads_or_zeros(
                    scaled_grad(ls, tensors, problem.loss_scale, create_graph=True, allow_unused=True), tensors
                )
        if j == 0:
            first = (raw.detach(), ls.detach(), {name: g.detach() for name, g in zip(names, grads)}, rng, zs.detach())
        with timer.phase("pilot_update"), torch.enable_grad():
            stepped = {name: update.step(name, theta[name], g, states[name]) for name, g in zip(names, grads)}
        theta = {name: out[0] for name, out in stepped.items()}
        states = {name: out[1] for name, out in stepped.items()}
    wanted = list(problem.teacher_params.values()) if need_teacher else []
    keep = own_loss is not None and bool(wanted)  # the teacher's graph serves the own loss's backward afterwards
    with timer.phase("quiz_forward_backward"), torch.enable_grad():
        current = quiz_point == "current"
        point = problem.student_params if current else theta
        raw_q = functional_logits(problem.student, point, problem.split_q)
        logits, labels = batching.align_logits_labels(raw_q, problem.split_q.labels, shift_labels=problem.shift_labels,
                                                      name="student")
        lq = cross_entropy(logits, labels, name="quiz_batch labels")
        check_finite(lq.detach(), "quiz loss LQ " + ("at the current student" if current else "at the pilot point"))
        point_tensors = [point[name] for name in names]
        if current:
            v = grads_or_zeros(scaled_grad(lq, point_tensors, problem.loss_scale, allow_unused=True), point_tensors)
            v = [g.detach() for g in v]
            objective = sum((theta[name] * g).sum() for name, g in zip(names, v))
            teacher = grads_or_zeros(scaled_grad(objective, wanted, problem.loss_scale, allow_unused=True,
                                                 retain_graph=keep), wanted) if wanted else []
        else:
            outs = scaled_grad(lq, wanted + point_tensors, problem.loss_scale, allow_unused=True, retain_graph=keep)
            teacher = grads_or_zeros(outs[: len(wanted)], wanted)
            v = [g.detach() for g in grads_or_zeros(outs[len(wanted):], point_tensors)]
    v = dict(zip(names, v))
    raw0, ls0, grads0, rng0, zs0 = first
    trajectory = Trajectory([], {name: t.detach() for name, t in theta.items()}, raw0, ls0, grads0)
    influences = None
    if compute_influence:
        with timer.phase("student_jvp"), (tangent_context or contextlib.nullcontext()):
            direction = _step_direction(problem, grads0, v)
            u = _double_vjp_tangent(problem, direction, rng0)
            _, influences = problem.cotangent_and_influence(zs0, u, True, with_cotangent=False)
    own = None
    if meta_weight != 1.0:  # (0: no meta term at all, as in the exact path; not 0·∇, which keeps a NaN)
        teacher = [torch.zeros_like(t) if meta_weight == 0.0 else meta_weight * t for t in teacher]
    if own_loss is not None:  # after the influences (an own loss may be built from them); its backward is
        # timed with the quiz pass's, as before
        with timer.phase("quiz_forward_backward"), torch.enable_grad():
            own = sum(own_loss_parts(own_loss, zt, zs0, influences))
            if keep:
                extra = grads_or_zeros(scaled_grad(own, wanted, problem.loss_scale, allow_unused=True), wanted)
                teacher = [t + e for t, e in zip(teacher, extra)]
    teacher_grads = {name: g.detach() for name, g in zip(problem.teacher_params, teacher)}
    return teacher_grads, lq.detach(), v, trajectory, influences, None if own is None else own.detach()


def _step_direction(problem: Problem, grads: dict, v: dict) -> dict:
    """``a = −∂⟨U(θS, g, state)_θ, v⟩/∂g / η`` by autograd through the update (``P ⊙ v`` for SGD/Adam)."""
    update = problem.update
    with torch.enable_grad():
        leaves = {name: g.detach().requires_grad_(True) for name, g in grads.items()}
        total = 0.0
        for name, leaf in leaves.items():
            new_theta, _ = update.step(name, problem.student_params[name].detach(), leaf, update.initial_state(name))
            total = total + (new_theta * v[name]).sum()
        adj = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    return {name: -g / problem.lr_ref for name, g in zip(leaves, grads_or_zeros(adj, list(leaves.values())))}


def _double_vjp_tangent(problem: Problem, direction: dict, rng_state) -> torch.Tensor:
    """``J_S d`` by the double-vjp trick (reverse mode twice)."""
    names = list(direction)
    with torch.enable_grad(), math_attention(), replay_rng(rng_state):
        raw = functional_logits(problem.student, None, problem.split_x)
        dummy = torch.zeros_like(raw, requires_grad=True)
        tensors = [problem.student_params[name] for name in names]
        grads = torch.autograd.grad(raw, tensors, grad_outputs=dummy, create_graph=True, allow_unused=True)
        pairs = [(g, direction[n]) for g, n in zip(grads, names) if g is not None]
        (u,) = torch.autograd.grad([g for g, _ in pairs], dummy, grad_outputs=[d for _, d in pairs])
    return u.detach()
