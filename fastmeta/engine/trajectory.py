"""What every hypergradient method shares: the teacher forward, the pilot trajectory, the quiz gradient
and the reverse sweep through the student optimizer's updates.

Forward (``inner_steps = k``; ``θ_0 = θS``, ``state_0`` = the optimizer's state, read only)::

    for j < k:   g_j = ∇θ LS(θ_j, θT)            (teacher logits fixed; RNG state and zs_j kept)
                 (θ_{j+1}, state_{j+1}) = U(θ_j, g_j, state_j)      (the optimizer's update, optimizer.py)
    quiz:        v = ∇θ LQ(θ_k)                  (quiz_point="current": v = ∇θ LQ(θ_0), k = 1)

Reverse (the exact adjoint of that trajectory; ``lr_ref`` = η, the reference learning rate)::

    Aθ = v,  Astate = 0
    for j = k−1 … 0:   (Aθ_direct, Ag, Astate) = vjp of U at (θ_j, g_j, state_j) with (Aθ, Astate)
                       a_j = −Ag/η                       (the step's direction: P ⊙ v for one step)
                       c  += ∂/∂zt ⟨∂KD/∂zs(zs_j, zt), J_S(θ_j)·a_j⟩       (tangent step, below)
                       Aθ  = Aθ_direct − η·H_S(θ_j)·a_j   (j ≥ 1; H_S = ∇²θ LS, teacher logits fixed)
    meta-gradient = −η·w·J_Tᵀ c                            (one teacher backward)

Only the KD term of ``LS`` depends on θT, and only through ``zt``, so the teacher
enters each step through ``∂g_j/∂θT``: ``Σ_j (∂g_j/∂θT)ᵀ Ag_j = w·J_Tᵀ Σ_j c_j(Ag_j)``.
The *tangent step* (``J_S a`` and ``H_S a`` at ``θ_j``) is the method: forward-mode AD
(:mod:`.exact`) or LGTM's central differences (:mod:`.finite_diff`).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .. import batching, losses
from ..batching import align_logits_labels, check_finite, check_logits_pair, cross_entropy, model_logits, row_mask
from ..functional import capture_rng_state, functional_logits, replay_rng
from .optimizer import OptimizerUpdate
from .precision import _unscaled, at_least_fp32, grads_or_zeros, scaled_grad


class Timer:
    """Seconds per named phase (CUDA synchronised on both ends)."""

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.timings: dict[str, float] = {}
        self.device = device

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.sync:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize(self.device)
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


@dataclass
class Problem:
    """One meta-gradient's fixed data (validated by the public entry points; trusted here)."""

    teacher: torch.nn.Module
    student: torch.nn.Module
    split_x: batching.SplitBatch
    split_q: batching.SplitBatch
    device: torch.device
    timer: Timer
    update: OptimizerUpdate
    student_params: dict
    teacher_params: dict
    temperature: float
    kd_weight: float
    kd_loss: str
    shift_labels: bool
    loss_scale: float
    x_attention: Callable = contextlib.nullcontext  # context of the student's forwards on x
    keep_tangent_graph: bool = False  # pilot backward with create_graph: the tangent by double VJP (exact.py)
    teacher_rng: Any = None  # teacher_graph="recompute": the generators' state before the teacher forward
    teacher_buffers: Any = None  # [(buffer, its value before the teacher forward)] (preserved_buffers' snapshot)
    # set by teacher_forward
    teacher_raw: Any = None
    teacher_aligned: Any = None
    zt: Any = None
    labels: Any = None
    mask: Any = None
    # set by pilot_trajectory when keep_tangent_graph: (w, ∇θS LS as a function of w), see kept_tangent
    tangent_graph: Any = None

    @property
    def names(self) -> list:
        return list(self.student_params)

    @property
    def lr_ref(self) -> float:
        return self.update.lr_ref

    def align(self, raw: torch.Tensor) -> torch.Tensor:
        zs, _ = align_logits_labels(raw, self.split_x.labels, shift_labels=self.shift_labels, name="student")
        return zs

    def student_loss(self, zs: torch.Tensor, zt: torch.Tensor, *, higher_order: bool = False) -> torch.Tensor:
        return batching.student_loss(zs, zt, self.labels, temperature=self.temperature, kd_weight=self.kd_weight,
                                     kind=self.kd_loss, higher_order=higher_order)

    def cotangent_and_influence(self, zs, u_raw, with_influence: bool, with_cotangent: bool = True):
        """``c(zs, zt, u)`` on the teacher logits and (optionally) per-sample ``⟨∂ℓ_i/∂zs, u⟩`` for a raw tangent.

        One pass of ``fastmeta.losses``' trusted second-order core (the public functions
        checked the arguments once).
        """
        u = u_raw[:, :-1] if self.shift_labels else u_raw
        return losses.kd_second_order_unchecked(
            zs, self.zt, u, self.temperature, self.kd_loss, mask=self.mask,
            need_cotangent=with_cotangent, need_influence=with_influence, per_sample=True,
        )


def teacher_forward(problem: Problem, need_graph: bool, recompute: bool = False) -> None:
    """Teacher logits on ``x`` (graph kept only when a teacher backward follows and is not ``recompute``d).

    ``recompute``: the forward runs exactly as its replay will (grad mode on, so that every
    kernel choice is the same), and its graph is dropped as soon as the logits are out;
    the generators' state is recorded so that :func:`recomputed_teacher_logits` replays the
    same forward (same dropout masks; buffer values from ``problem.teacher_buffers``) right
    before the teacher backward.
    """
    recompute = recompute and need_graph
    if recompute:
        problem.teacher_rng = capture_rng_state(problem.device)
    with problem.timer.phase("teacher_forward"), torch.set_grad_enabled(need_graph):
        raw = model_logits(problem.teacher, problem.split_x, name="teacher")
    if recompute:
        raw = raw.detach()  # the graph (the teacher's activations) is freed here
    aligned, labels = align_logits_labels(raw, problem.split_x.labels, shift_labels=problem.shift_labels, name="teacher")
    check_finite(aligned.detach(), "teacher logits on batch")
    problem.teacher_raw, problem.teacher_aligned, problem.labels = raw, aligned, labels
    problem.mask = row_mask(labels)
    problem.zt = aligned.detach()


def recomputed_teacher_logits(problem: Problem) -> torch.Tensor:
    """The teacher's aligned logits on ``x`` again, with a graph: the forward of :func:`teacher_forward`
    replayed (same parameters, inputs, buffers and generator state, hence the same dropout masks).

    Checked against the logits of the first forward (those the cotangent was computed
    from): a teacher whose forward does not reproduce them (a random draw outside torch's
    generators, other hidden state) is a ``RuntimeError``, not a wrong gradient.  One
    host sync.
    """
    with torch.no_grad():  # buffers as the first forward found them (e.g. spectral norm's power iteration)
        for buffer, saved in problem.teacher_buffers:
            buffer.copy_(saved)
    with problem.timer.phase("teacher_recompute"), replay_rng(problem.teacher_rng), torch.enable_grad():
        raw = model_logits(problem.teacher, problem.split_x, name="teacher")
    aligned, _ = align_logits_labels(raw, problem.split_x.labels, shift_labels=problem.shift_labels, name="teacher")
    first = problem.zt
    if first.numel():
        # the same computation agrees bitwise; the slack forgives a few ulp of a nondeterministic kernel
        error = torch.sub(aligned.detach(), first).abs_().max()
        slack = min(16 * torch.finfo(first.dtype).eps, 1e-2)
        if not bool(error <= slack * (1.0 + first.abs().max())):
            raise RuntimeError(
                f"teacher_graph='recompute': the teacher's forward on batch did not reproduce its logits "
                f"(max difference {float(error):.3g}); its forward draws randomness outside torch's generators "
                "or keeps other hidden state. Use teacher_graph='keep'"
            )
    return aligned


def own_loss_parts(loss_fn: Callable, zt: torch.Tensor, zs: torch.Tensor,
                   influences: Optional[torch.Tensor]) -> tuple:
    """An algorithm's own loss ``loss_fn(zt, zs, influences)`` (``Options.teacher_loss``; ``zs`` and the
    influences passed detached) as a tuple of 0-dim parts (it returns one loss or a tuple)."""
    value = loss_fn(zt, zs.detach(), None if influences is None else influences.detach())
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def own_loss_cotangent(problem: Problem, student_raw: torch.Tensor, loss_fn: Callable,
                       influences: Optional[torch.Tensor] = None):
    """``(L, [∂L_k/∂zt])`` for an algorithm's own loss ``L = Σ_k L_k``, ``loss_fn(zt, zs, influences)`` returning
    ``L`` or its parts ``(L_1, ...)`` (``zt``: the logits of the engine's teacher forward; ``zs``: the
    student's at θS, detached; ``influences``: the step's ``[B]`` influences, detached, or None).

    Each derivative is taken at a leaf of ``zt``'s dtype, as a backward into the logits
    would meet it (through ``S·L_k`` with ``S = loss_scale``, then divided back in fp32),
    and returned in at least fp32: the teacher backward adds them to the meta-gradient's
    cotangent and runs once for all (fp32/fp64 logits) or once per term (fp16/bf16: parts of
    very different sizes must not be rounded to the logits' dtype together).
    """
    leaf = problem.zt.detach().requires_grad_(True)
    scale = problem.loss_scale
    cotangents = []
    with torch.enable_grad():
        parts = own_loss_parts(loss_fn, leaf, problem.align(student_raw), influences)
        for k, part in enumerate(parts):
            (grad,) = torch.autograd.grad(part * scale if scale != 1.0 else part, leaf, retain_graph=k + 1 < len(parts))
            grad = at_least_fp32(grad)
            cotangents.append(grad if scale == 1.0 else grad * (1.0 / scale))
    return sum(part.detach() for part in parts), cotangents


@dataclass
class Snapshot:
    """Step j of the trajectory: ``θ_j``, ``g_j``, ``state_j`` (per name), the RNG state and ``zs_j``."""

    theta: dict
    grads: dict
    states: dict
    rng: Any
    zs: torch.Tensor


@dataclass
class Trajectory:
    snapshots: list
    theta: dict  # θ_k (detached)
    first_raw: torch.Tensor  # the student's raw logits on x at θS
    first_loss: torch.Tensor  # LS at θS
    first_grads: Optional[dict]  # ∇θS LS (after grad_sync); None once dropped (Options.keep_student_grads)
    extras: dict = field(default_factory=dict)


def pilot_trajectory(problem: Problem, steps: int, grad_sync: Optional[Callable] = None) -> Trajectory:
    """The forward pass above, without graphs between steps (the exact and finite-difference methods)."""
    timer, names, update = problem.timer, problem.names, problem.update
    theta = {name: p.detach() for name, p in problem.student_params.items()}
    states = {name: update.initial_state(name) for name in names}
    snapshots = []
    first = None
    for j in range(steps):
        with timer.phase("student_forward_backward"):
            rng = capture_rng_state(problem.device)
            with torch.enable_grad(), problem.x_attention():
                if j == 0:
                    current = problem.student_params
                    raw = functional_logits(problem.student, None, problem.split_x)
                else:
                    current = {name: t.detach().requires_grad_(True) for name, t in theta.items()}
                    raw = functional_logits(problem.student, current, problem.split_x)
                keep = j == 0 and problem.keep_tangent_graph
                leaf = raw.detach().requires_grad_(True) if keep else raw
                zs = problem.align(leaf)
                if j == 0:
                    check_logits_pair(zs, problem.teacher_aligned)
                ls = problem.student_loss(zs, problem.zt)
                check_finite(ls.detach(), "student loss LS on batch" + (f" (inner step {j})" if j else ""))
                tensors = [current[name] for name in names]
                if keep:
                    grads = _grads_keeping_tangent_graph(problem, raw, leaf, ls, tensors)
                else:
                    grads = grads_or_zeros(scaled_grad(ls, tensors, problem.loss_scale, allow_unused=True), tensors)
        grads = {name: g.detach() for name, g in zip(names, grads)}
        if j == 0:
            if grad_sync is not None:  # in place
                with timer.phase("grad_sync"):
                    grad_sync(list(grads.values()))
            first = (raw.detach(), ls.detach(), grads)
        snapshots.append(Snapshot(theta, grads, states, rng, zs.detach()))
        with timer.phase("pilot_update"), torch.no_grad():  # fused: one op call per param group
            theta, states = update.pilot(theta, grads, states, compute_state=j < steps - 1)
        del raw, zs, ls
    return Trajectory(snapshots, theta, *first)


def _grads_keeping_tangent_graph(problem: Problem, raw, leaf, ls, tensors) -> list:
    """``∇θS LS`` by a backward of ``raw`` with a leaf cotangent ``w = ∂LS/∂raw`` and ``create_graph``.

    The gradient is ``J_Sᵀ w``, linear in ``w``: back-propagating a direction ``a``
    through it to ``w`` gives ``J_S a``, the exact student tangent of the reverse
    sweep's step 0, without the forward pass a JVP repeats (:func:`kept_tangent`).
    ``problem.tangent_graph`` keeps that graph (the pilot forward's activations and
    the backward's saved tensors) until :func:`kept_tangent` releases it.  The loss's
    own backward (``w``) is first order, so any KD kernel works.
    """
    scale = problem.loss_scale
    (w,) = torch.autograd.grad(ls if scale == 1.0 else ls * scale, leaf)
    w = w.detach().requires_grad_(True)
    kept = torch.autograd.grad(raw, tensors, w, create_graph=True, allow_unused=True)
    problem.tangent_graph = (w, kept)
    return grads_or_zeros(_unscaled([None if g is None else g.detach() for g in kept], scale), tensors)


def kept_tangent(problem: Problem, direction: dict) -> torch.Tensor:
    """``u = J_S(θS)·a`` on the raw logits through the kept pilot graph (released here); exact."""
    w, kept = problem.tangent_graph
    problem.tangent_graph = None
    pairs = [(g, direction[name]) for name, g in zip(problem.names, kept) if g is not None and g.requires_grad]
    if not pairs:
        return torch.zeros_like(w)
    (u,) = torch.autograd.grad([g for g, _ in pairs], w, [d.to(g.dtype) for g, d in pairs], allow_unused=True)
    return torch.zeros_like(w) if u is None else u.detach()


def quiz_gradient(problem: Problem, point: Optional[dict], grad_sync: Optional[Callable] = None):
    """``(LQ, v = ∇θ LQ)`` at ``point`` (``{name: tensor}``; None: the student's own parameters, θS)."""
    names = problem.names
    with problem.timer.phase("quiz_forward_backward"), torch.enable_grad():
        if point is None:
            leaves = problem.student_params
            raw = functional_logits(problem.student, None, problem.split_q)
        else:
            leaves = {name: t.detach().requires_grad_(True) for name, t in point.items()}
            raw = functional_logits(problem.student, leaves, problem.split_q)
        logits, labels = align_logits_labels(raw, problem.split_q.labels, shift_labels=problem.shift_labels,
                                             name="student")
        lq = cross_entropy(logits, labels, name="quiz_batch labels")
        where = "at the pilot point" if point is not None else "at the current student"
        check_finite(lq.detach(), f"quiz loss LQ {where}")
        tensors = [leaves[name] for name in names]
        v = grads_or_zeros(scaled_grad(lq, tensors, problem.loss_scale, allow_unused=True), tensors)
        v = {name: g.detach() for name, g in zip(names, v)}
        if grad_sync is not None:
            grad_sync(list(v.values()))
    return lq.detach(), v


TangentStep = Callable[..., tuple]
"""``(j, snapshot, a, need_hvp, need_influence) -> (c_j, H_S(θ_j)·a or None, influences or None)``."""


def reverse_sweep(problem: Problem, trajectory: Trajectory, v: dict, tangent_step: TangentStep,
                  compute_influence: bool):
    """The reverse pass above: ``(Σ_j c_j, influences of step 0 or None)``.

    Consumes ``v`` (the dict is emptied) and ``trajectory.snapshots`` (each entry set to None once its
    step is done), so that every student-sized tensor is freed after its last use, not at the end of
    the meta-gradient: ``v`` and each ``g_j``/``state_j`` after their step's adjoint, ``θ_j`` after its
    tangent (a caller that needs ``v`` or ``g_0`` afterwards keeps its own reference: ``keep_pilot``,
    ``trajectory.first_grads``).
    """
    update, names, lr_ref = problem.update, problem.names, problem.lr_ref
    adj_theta: Optional[dict] = dict(v)
    v.clear()
    adj_state: Optional[dict] = None  # the adjoints of the state handed on (None: the last step)
    cotangent = influences = None
    for j in reversed(range(len(trajectory.snapshots))):
        snap = trajectory.snapshots[j]
        trajectory.snapshots[j] = None
        with problem.timer.phase("pilot_update"), torch.no_grad():  # fused: one op call per param group
            direct, direction, adj_state = update.adjoint(snap.theta, snap.grads, snap.states, adj_theta, adj_state,
                                                          full=j > 0)
        adj_theta = None
        snap.grads = snap.states = None  # their last use (the tangent step reads θ_j, the RNG state and zs_j)
        c, hv, influence = tangent_step(j, snap, direction, j > 0, compute_influence and j == 0)
        cotangent = c if cotangent is None else cotangent + c
        if influence is not None:
            influences = influence
        if j > 0:
            adj_theta = {name: direct[name] - lr_ref * hv[name] for name in names}
    return cotangent, influences
