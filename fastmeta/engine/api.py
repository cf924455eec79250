"""The engine's public functions, the ONE place their arguments are checked, and the internal entry.

:func:`meta_gradient` / :func:`meta_grad` / :func:`influence` check every argument
(:func:`check_arguments`, :func:`check_plan`), then call :func:`run`, which trusts
them.  ``fastmeta.meta_step`` checks its own arguments and calls :func:`check_plan`
and :func:`run` through ``StepContext.engine_meta_gradient``: nothing is checked twice.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .._validation import check_choice, check_number
from .._walks import submodules, walking_once
from ..batching import check_kd_kind, check_kd_weight, check_same_device, check_temperature, split_batch
from ..functional import math_attention, preserved_buffers, trainable_parameters
from . import autograd, exact, finite_diff
from .optimizer import ADAM_JACOBIANS, PILOTS, check_student_optimizer, optimizer_update
from .precision import JVP_PRECISIONS, at_least_fp32, check_loss_scale, tangent_precision, teacher_backward
from .trajectory import (
    Problem,
    Timer,
    own_loss_cotangent,
    own_loss_parts,
    pilot_trajectory,
    quiz_gradient,
    recomputed_teacher_logits,
    reverse_sweep,
    teacher_forward,
)

HYPERGRAD_METHODS = ("exact", "finite_diff", "autograd", "first_order")
FD_MODES = ("lgtm", "logits")
QUIZ_POINTS = ("pilot", "current")
STUDENT_TANGENTS = ("jvp", "double_vjp")
TEACHER_GRAPHS = ("keep", "recompute")


@dataclass
class MetaGradient:
    """Everything one meta-gradient computation produces (all tensors detached).

    teacher_grads   ``{name: ∇θT LQ(θS'(θT))}`` for every teacher parameter that requires grad
                    (``{}`` when ``compute_teacher_grads=False``); plus ``∇θT teacher_loss`` when an
                    algorithm passed one (``Options.teacher_loss``; the meta-gradient then weighted by
                    ``Options.meta_weight``).
    influences      ``[B]`` per-sample influences ``w_i`` of ``batch`` (None unless requested).
    student_loss    ``LS`` on ``batch`` at ``θS`` with the current teacher (0-dim).
    quiz_loss       ``LQ = CE(yq, S(xq; θS'))`` at the pilot point (0-dim; at θS for
                    ``quiz_point="current"``).
    teacher_logits  the teacher's raw logits on ``batch`` (model output shape).
    student_logits  the student's raw logits on ``batch`` at ``θS``.
    student_grads   ``{name: ∇θS LS}`` at ``θS`` (trainable student parameters): the gradient of the
                    pilot step, i.e. the real step's gradient when the teacher does not change (None
                    when an algorithm asked the engine not to keep it: ``Options.keep_student_grads``).
    pilot_params    ``θS'`` (``{name: Tensor}``, trainable parameters) when ``keep_pilot=True``.
    quiz_grads      ``v = ∇LQ`` (at ``θS'``, or θS for ``quiz_point="current"``) when ``keep_pilot=True``
                    (or an algorithm asked for it alone: ``Options.keep_quiz_grads``).
    inner_lr        the reference learning rate η (``inner_lr``, else the largest param-group lr).
    hypergrad       the method used.
    timings         seconds per phase (teacher_forward, student_forward_backward, pilot_update,
                    quiz_forward_backward, student_jvp, teacher_backward, total; autograd:
                    teacher_backward is the double backward).
    tangent_precision  how the student tangent ``u = J_S a`` (or its finite difference) was
                    computed: ``"default"`` (no low-precision autocast was active),
                    ``"fp32 (autocast off)"`` (``jvp_precision="fp32"`` under a bf16/fp16
                    autocast) or ``"autocast <dtype>"`` (``jvp_precision="autocast"``).
    pilot, adam_jacobian, quiz_point   the pilot-step options used.
    teacher_loss    the value of ``Options.teacher_loss`` (0-dim), None without one.
    """

    teacher_grads: dict
    influences: torch.Tensor | None
    student_loss: torch.Tensor
    quiz_loss: torch.Tensor
    teacher_logits: torch.Tensor
    student_logits: torch.Tensor
    student_grads: dict | None
    pilot_params: dict | None = None
    quiz_grads: dict | None = None
    inner_lr: float = 0.0
    hypergrad: str = "exact"
    timings: dict = field(default_factory=dict)
    tangent_precision: str = "default"
    pilot: str = "optimizer"
    adam_jacobian: str = "exact"
    quiz_point: str = "pilot"
    teacher_loss: torch.Tensor | None = None


@dataclass(frozen=True)
class Options:
    """The engine's arguments, checked (:func:`run` trusts them)."""

    inner_lr: Optional[float]
    temperature: float = 1.0
    kd_weight: float = 0.5
    kd_loss: str = "kl"
    hypergrad: str = "exact"
    inner_steps: int = 1
    pilot: str = "optimizer"
    adam_jacobian: str = "exact"
    quiz_point: str = "pilot"
    compute_influence: bool = False
    shift_labels: bool = False
    compute_teacher_grads: bool = True
    keep_pilot: bool = False
    # False: the pilot gradient ∇θS LS is freed as soon as the reverse sweep has used it (before the tangent
    # pass; MetaGradient.student_grads is then None): what an algorithm that recomputes the real step's
    # gradient asks for.  Not a public argument: meta_gradient always returns it.
    keep_student_grads: bool = True
    # True: return v (MetaGradient.quiz_grads) without θS' (LGTM's official objectives need v only); keep_pilot
    # returns both.  Not a public argument.
    keep_quiz_grads: bool = False
    fd_eps: Optional[float] = None
    fd_mode: str = "lgtm"
    grad_sync: Optional[Callable] = None
    jvp_precision: str = "fp32"
    loss_scale: float = 1.0
    student_tangent: str = "jvp"
    teacher_graph: str = "keep"
    # An algorithm's own loss on the teacher's logits, added to the teacher's gradient by the SAME teacher
    # backward (LGTM's auxiliary loss): called as ``teacher_loss(zt, zs, influences)`` with the teacher's
    # aligned logits on x (from the engine's one teacher forward), the student's at θS (the pilot forward's,
    # detached) and the step's influences (``[B]``, detached; None unless compute_influence: LGTM's
    # "weighted" objective is built from them); returns a 0-dim loss, or a tuple of 0-dim parts whose sum is
    # the loss (parts of very different sizes: in fp16/bf16 each takes a teacher backward of its own).
    # teacher_grads is then ``m·∇θT LQ + ∇θT teacher_loss`` (m = meta_weight: IKD's γ; 0: the own loss's
    # gradient alone, and no meta term is computed) and MetaGradient.teacher_loss its value.  Not public
    # arguments.
    teacher_loss: Optional[Callable] = None
    meta_weight: float = 1.0

    @property
    def takes_tangent(self) -> bool:
        """Whether the reverse sweep takes a student tangent: it feeds the teacher's meta-gradient (through the
        KD term: none without it, with ``compute_teacher_grads=False`` or with ``meta_weight=0``) and the
        influences."""
        return (self.kd_weight != 0.0 and self.compute_teacher_grads and self.meta_weight != 0.0) \
            or self.compute_influence


# --------------------------------------------------------------------------- checks
def check_count(value, name: str) -> int:
    """A count argument: an ``int`` >= 1 (``bool``/``float`` are a ``TypeError`` naming it)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")
    return value


def check_pilot_options(pilot, adam_jacobian) -> None:
    """``pilot`` in :data:`PILOTS`, ``adam_jacobian`` in :data:`ADAM_JACOBIANS` (``ValueError`` naming them)."""
    check_choice("pilot", pilot, PILOTS)
    check_choice("adam_jacobian", adam_jacobian, ADAM_JACOBIANS)


def check_plan(student: torch.nn.Module, student_optimizer, options: Options) -> None:
    """What no single argument says: the combinations, the student and its optimizer."""
    if options.grad_sync is not None and (
        not callable(options.grad_sync) or options.hypergrad == "autograd" or options.inner_steps != 1
    ):
        raise NotImplementedError(
            "grad_sync must be a callable and is supported with inner_steps=1 and hypergrad 'exact' or "
            f"'finite_diff' (got hypergrad={options.hypergrad!r}, inner_steps={options.inner_steps!r})"
        )
    if options.inner_steps > 1:
        if options.hypergrad == "finite_diff" and options.fd_mode != "lgtm":
            raise NotImplementedError("inner_steps > 1 with hypergrad='finite_diff' supports fd_mode='lgtm' only")
        if options.compute_influence:
            raise ValueError("compute_influence needs inner_steps=1 (LGTM's influence is defined for one pilot step)")
        if options.quiz_point == "current":
            raise ValueError("quiz_point='current' needs inner_steps=1 (the quiz gradient at the current student)")
    if options.student_tangent != "jvp" and options.hypergrad != "exact":
        raise ValueError(f"student_tangent={options.student_tangent!r} applies to hypergrad='exact' "
                         f"(got hypergrad={options.hypergrad!r})")
    if options.teacher_graph != "keep" and options.hypergrad == "autograd":
        raise ValueError(f"teacher_graph={options.teacher_graph!r} applies to hypergrad 'exact' and 'finite_diff' "
                         "(hypergrad='autograd' differentiates through the teacher's graph in its double backward)")
    params = trainable_parameters(student)
    if not params:
        raise ValueError("student has no parameter with requires_grad=True: there is no pilot step to differentiate")
    if any(getattr(m, "gradient_checkpointing", False) is True and m.training for m in submodules(student)):
        raise ValueError(
            "student has gradient checkpointing enabled (e.g. student.gradient_checkpointing_enable()): the engine "
            "runs the student at the pilot point θS' with torch.func.functional_call, and a checkpointed "
            "segment's backward recomputes with the module's own parameters θS, not θS': a silently wrong "
            "quiz gradient (and forward mode gets no tangent through torch.utils.checkpoint). Disable it on the "
            "student (student.gradient_checkpointing_disable()); the teacher may keep it"
        )
    forward_mode = options.hypergrad == "exact" and options.takes_tangent and (options.student_tangent == "jvp"
                                                                             or options.inner_steps > 1)
    if forward_mode and _has_input_require_grads_hook(student):
        raise ValueError(
            "student has HuggingFace's input-require-grads hook (enable_input_require_grads(): installed by PEFT "
            "and by gradient_checkpointing_enable(), and left in place by gradient_checkpointing_disable()); it "
            "calls requires_grad_() inside the forward, which the exact step's forward mode (torch.func.jvp) cannot "
            "run. Call student.disable_input_require_grads(), or use student_tangent='double_vjp' (inner_steps=1)"
        )
    check_student_optimizer(params, student_optimizer, inner_lr=options.inner_lr, pilot=options.pilot)


def _has_input_require_grads_hook(model: torch.nn.Module) -> bool:
    """Whether a HuggingFace ``enable_input_require_grads()`` forward hook is still registered in ``model``
    (transformers 5 keeps the handles in ``_require_grads_hooks``, 4.x one in ``_require_grads_hook``)."""
    for module in submodules(model):
        handles = list(getattr(module, "_require_grads_hooks", None) or ())
        handles.append(getattr(module, "_require_grads_hook", None))
        for handle in handles:
            hooks = handle.hooks_dict_ref() if callable(getattr(handle, "hooks_dict_ref", None)) else None
            if hooks is not None and getattr(handle, "id", None) in hooks:
                return True
    return False


def check_arguments(**kwargs) -> Options:
    """The public functions' argument check: an :class:`Options` of the normalised values."""
    hypergrad = kwargs["hypergrad"]
    check_choice("hypergrad", hypergrad, HYPERGRAD_METHODS)
    if hypergrad == "first_order":
        raise ValueError(
            "hypergrad='first_order' has no MetaDistil/LGTM meta-gradient: the teacher enters the quiz loss only "
            "through the second-order term, so the first-order term is identically zero. Use 'exact', "
            "'finite_diff' or 'autograd' (ReptileDistil/IKD first-order feedback: algorithm='reptile'/'ikd')"
        )
    check_choice("fd_mode", kwargs["fd_mode"], FD_MODES)
    check_choice("jvp_precision", kwargs["jvp_precision"], JVP_PRECISIONS)
    check_choice("quiz_point", kwargs["quiz_point"], QUIZ_POINTS)
    check_choice("student_tangent", kwargs["student_tangent"], STUDENT_TANGENTS)
    check_choice("teacher_graph", kwargs["teacher_graph"], TEACHER_GRAPHS)
    check_pilot_options(kwargs["pilot"], kwargs["adam_jacobian"])
    check_count(kwargs["inner_steps"], "inner_steps")
    kwargs["loss_scale"] = check_loss_scale(kwargs["loss_scale"])
    kwargs["temperature"] = check_temperature(kwargs["temperature"])
    kwargs["kd_weight"] = check_kd_weight(kwargs["kd_weight"])
    check_kd_kind(kwargs["kd_loss"])
    for name in ("inner_lr", "fd_eps"):  # None: the optimizer's lr / LGTM's default step
        if kwargs[name] is not None:
            kwargs[name] = check_number(name, kwargs[name], low=0.0, low_open=True)
    for flag in ("compute_influence", "shift_labels", "compute_teacher_grads", "keep_pilot"):
        kwargs[flag] = bool(kwargs[flag])
    return Options(**kwargs)


def _double_vjp_tangent(student_tangent: str, precision: str) -> bool:
    """Whether the exact tangent of step 0 is taken through the pilot's kept graph (else by forward mode:
    :func:`fastmeta.functional.student_jvp`).

    The kept graph ran in the pilot's precision: under a bf16/fp16 autocast with
    ``jvp_precision="fp32"`` (a tangent with autocast off) only the JVP can honour it.
    Raised here, before anything runs: the autocast state is the caller's at call time.
    """
    if student_tangent == "double_vjp" and precision.startswith("fp32"):
        raise ValueError(
            "student_tangent='double_vjp' differentiates the pilot's own (autocast) graph again; under a "
            "bf16/fp16 autocast it needs jvp_precision='autocast' (got jvp_precision='fp32'), or use "
            "student_tangent='jvp'"
        )
    return student_tangent == "double_vjp"


def _kept(options: Options, theta: dict, v: dict):
    """``(pilot_params, quiz_grads)`` to return: ``θS'`` with ``keep_pilot``, ``v`` with ``keep_pilot`` or
    ``keep_quiz_grads`` (new dicts: the engine's own are consumed), else None."""
    return (dict(theta) if options.keep_pilot else None,
            dict(v) if options.keep_pilot or options.keep_quiz_grads else None)


def _teacher_grads(problem: Problem, teacher_params: dict, meta, own: list, loss_scale: float) -> dict:
    """``J_Tᵀ(meta + Σ own)``: the meta-gradient's cotangent on the teacher's logits (None: none) plus the
    gradients of the algorithm's own loss parts on them, by ONE teacher backward (it is linear in its
    cotangent).  With fp16/bf16 logits, one backward per term through the same graph instead: the meta term
    is about η times smaller than an own loss's, and the sum, rounded to the logits' dtype, would lose it
    (measured: 80-100% of the meta-gradient gone under bf16/fp16 autocast at η = 1e-2..1e-4); the same holds
    between own loss parts of different sizes (LGTM's weighted term beside L_aux).
    """
    logits = problem.teacher_aligned
    terms = ([] if meta is None else [meta]) + list(own)
    if logits.dtype not in (torch.float16, torch.bfloat16) or len(terms) == 1:
        return teacher_backward(logits, teacher_params, sum(terms[1:], terms[0]), loss_scale)
    grads = None
    for k, term in enumerate(terms):
        part = teacher_backward(logits, teacher_params, term, loss_scale, retain_graph=k + 1 < len(terms))
        grads = part if grads is None else {name: grads[name] + part[name] for name in grads}
    return grads


# --------------------------------------------------------------------------- the internal entry
def run(teacher, student, split_x, split_q, device: torch.device, student_optimizer, options: Options) -> MetaGradient:
    """The meta-gradient with checked arguments (batches split, devices checked): trusts everything."""
    start = time.perf_counter()
    timer = Timer(device)
    student_params = trainable_parameters(student)
    teacher_params = trainable_parameters(teacher) if options.compute_teacher_grads else {}
    update = optimizer_update(student_params, student_optimizer, inner_lr=options.inner_lr, pilot=options.pilot,
                              adam_jacobian=options.adam_jacobian)
    method = options.hypergrad
    context, precision = tangent_precision(device, options.jvp_precision)
    keep_graph = method == "exact" and options.takes_tangent and \
        _double_vjp_tangent(options.student_tangent, precision)
    # with dropout active, the student's forwards on x must draw their masks as the JVP's math-attention
    # forward does: run them under math attention too (and always when the pilot's graph is differentiated
    # again: the fused SDPA kernels have no double-backward formula)
    x_attention = math_attention if (method == "exact" and (student.training or keep_graph)) else contextlib.nullcontext
    problem = Problem(
        teacher=teacher, student=student, split_x=split_x, split_q=split_q, device=device, timer=timer,
        update=update, student_params=student_params, teacher_params=teacher_params,
        temperature=options.temperature, kd_weight=options.kd_weight, kd_loss=options.kd_loss,
        shift_labels=options.shift_labels, loss_scale=options.loss_scale, x_attention=x_attention,
        keep_tangent_graph=keep_graph,
    )
    own_loss = options.teacher_loss
    need_teacher = bool(teacher_params) and (options.kd_weight != 0.0 or own_loss is not None)
    outer = math_attention() if method == "autograd" else contextlib.nullcontext()
    teacher_grads: dict = {}
    influences = teacher_loss = None
    recompute = options.teacher_graph == "recompute"
    with preserved_buffers(teacher) as teacher_buffers, preserved_buffers(student), outer:
        problem.teacher_buffers = teacher_buffers  # the values the replay of a recomputed forward starts from
        teacher_forward(problem, need_teacher, recompute=recompute)
        if method == "autograd":
            teacher_grads, lq, v, trajectory, influences, teacher_loss = autograd.autograd_meta_gradient(
                problem, options.inner_steps, options.quiz_point, options.compute_influence, need_teacher, context,
                own_loss, options.meta_weight,
            )
            pilot_params, quiz_grads = _kept(options, trajectory.theta, v)
        else:
            trajectory = pilot_trajectory(problem, options.inner_steps, options.grad_sync)
            point = trajectory.theta if options.quiz_point == "pilot" else None
            lq, v = quiz_gradient(problem, point, options.grad_sync)
            # what is no longer needed is freed before the tangent pass (where the exact step peaks at small
            # batches): θS' after the quiz pass, v and ∇θS LS once the reverse sweep has used them
            pilot_params, quiz_grads = _kept(options, trajectory.theta, v)
            trajectory.theta = point = None
            if not options.keep_student_grads:
                trajectory.first_grads = None
            cotangent = None
            if options.takes_tangent:
                if method == "exact":
                    step = exact.tangent_step(problem)
                else:
                    step = finite_diff.tangent_step(problem, fd_eps=options.fd_eps, fd_mode=options.fd_mode)
                with context:  # the student tangent in fp32 under a low-precision autocast
                    # (reverse_sweep consumes v and the trajectory's snapshots: each freed after its last use)
                    cotangent, influences = reverse_sweep(problem, trajectory, v, step, options.compute_influence)
            if options.compute_influence and influences is None:  # (defensive: the sweep returns them when asked)
                influences = torch.zeros(split_x.size, dtype=problem.zt.dtype, device=device)
            if need_teacher:
                if recompute:  # under the caller's autocast, as the first forward ran
                    problem.teacher_aligned = recomputed_teacher_logits(problem)
                with timer.phase("teacher_backward"):
                    scaled = None
                    if options.kd_weight != 0.0 and options.meta_weight != 0.0:
                        factor = -update.lr_ref * options.kd_weight * options.meta_weight
                        scaled = factor * at_least_fp32(cotangent)
                    own = []
                    if own_loss is not None:
                        teacher_loss, own = own_loss_cotangent(problem, trajectory.first_raw, own_loss, influences)
                    if scaled is not None or own:  # else zeros, below (meta_weight 0, no own loss)
                        teacher_grads = _teacher_grads(problem, teacher_params, scaled, own, options.loss_scale)
        if own_loss is not None and teacher_loss is None:  # no teacher backward ran (no trainable teacher
            # parameter): the own loss's value alone
            with torch.no_grad():
                zs = problem.align(trajectory.first_raw)
                teacher_loss = sum(own_loss_parts(own_loss, problem.zt, zs, influences))
        if options.compute_teacher_grads and teacher_params and not teacher_grads:
            teacher_grads = {n: torch.zeros_like(p) for n, p in teacher_params.items()}
    timer.timings["total"] = time.perf_counter() - start
    return MetaGradient(
        teacher_grads=teacher_grads,
        influences=None if influences is None else influences.detach(),
        student_loss=trajectory.first_loss,
        quiz_loss=lq,
        teacher_logits=problem.teacher_raw.detach(),
        student_logits=trajectory.first_raw,
        student_grads=trajectory.first_grads,
        pilot_params=pilot_params,
        quiz_grads=quiz_grads,
        inner_lr=update.lr_ref,
        hypergrad=method,
        timings=timer.timings,
        tangent_precision=precision,
        pilot=options.pilot,
        adam_jacobian=options.adam_jacobian,
        quiz_point=options.quiz_point,
        teacher_loss=teacher_loss,
    )


# --------------------------------------------------------------------------- public API
@walking_once  # each model's parameters, buffers and submodules are walked once per call (fastmeta._walks)
def meta_gradient(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    batch: Any,
    quiz_batch: Any,
    *,
    inner_lr: float | None,
    temperature: float = 1.0,
    kd_weight: float = 0.5,
    kd_loss: str = "kl",
    hypergrad: str = "exact",
    inner_steps: int = 1,
    student_optimizer: torch.optim.Optimizer | None = None,
    compute_influence: bool = False,
    shift_labels: bool = False,
    compute_teacher_grads: bool = True,
    keep_pilot: bool = False,
    fd_eps: float | None = None,
    fd_mode: str = "lgtm",
    grad_sync: Callable[[list[torch.Tensor]], None] | None = None,
    jvp_precision: str = "fp32",
    loss_scale: float | None = None,
    pilot: str = "optimizer",
    adam_jacobian: str = "exact",
    quiz_point: str = "pilot",
    student_tangent: str = "jvp",
    teacher_graph: str = "keep",
) -> MetaGradient:
    """Compute the teacher's meta-gradient ``∇θT CE(yq, S(xq; θS'(θT)))`` (:mod:`fastmeta.engine` for the math).

    Arguments after ``inner_steps`` are extras of the engine:

    student_optimizer       the student's optimizer, read only: the pilot step is ITS next update
                            (SGD with momentum/dampening/nesterov/weight decay/maximize, Adam, AdamW,
                            amsgrad), and the meta-gradient is the exact derivative through it.  None:
                            SGD at ``inner_lr``.  Others: ``TypeError`` (use ``pilot="sgd"``).
    pilot                   ``"optimizer"`` (default): the optimizer's update; ``"sgd"``: MetaDistil's
                            official look-ahead ``θS' = θS − η·∇LS`` whatever the optimizer.
    adam_jacobian           ``"exact"`` (default) or ``"frozen_second_moment"``: Adam's second moment
                            held constant in the Jacobian (an approximation, see docs/meta-gradient.md
                            for its measured error); the pilot point itself is the real step.
    quiz_point              ``"pilot"`` (default): ``v = ∇LQ(θS')``; ``"current"``: ``v = ∇LQ(θS)``, the
                            exam gradient at the current student (IKD's Eq. 14), direction still through
                            the pilot step's Jacobian; ``inner_steps=1``.
    compute_influence       also return the per-sample influences ``w_i`` of ``batch`` (inner_steps=1).
    shift_labels            causal-LM alignment for both batches (``logits[:, :-1]`` vs ``labels[:, 1:]``).
    compute_teacher_grads   False: skip the teacher backward (influences only; no teacher graph kept).
    keep_pilot              also return ``θS'`` and ``v``.
    fd_eps, fd_mode         ``hypergrad="finite_diff"`` options (:mod:`fastmeta.engine.finite_diff`).
    grad_sync               data parallelism: a callable that replaces, in place, each tensor of a
                            list by its mean over the processes (e.g. an ``all_reduce`` / world size).
                            It is applied to the pilot gradient ``∇θS LS`` before the pilot step and to
                            the quiz gradient ``v`` before the JVP, so every process takes the pilot
                            step and the JVP direction of the GLOBAL batch; the teacher gradient stays
                            this process's shard term (average it like any DDP gradient). With equal
                            shards and batch-mean losses this equals one process on the concatenated
                            batches.  Only ``inner_steps=1`` and ``hypergrad`` "exact"/"finite_diff".
    jvp_precision           under a bf16/fp16 ``torch.autocast`` (the caller's): ``"fp32"`` (default)
                            computes the student tangent with autocast switched off; ``"autocast"``
                            leaves it under the caller's autocast (:mod:`fastmeta.engine.precision`).
    student_tangent         how ``hypergrad="exact"`` takes the student tangent ``u = J_S a`` of the
                            pilot step; both are exact.  ``"jvp"`` (default): forward-mode AD, one
                            more student forward carrying tangents, nothing kept.  ``"double_vjp"``:
                            ``a`` back-propagated through the pilot backward's own graph, kept (with
                            ``create_graph``) until the quiz gradient is known: no forward repeated,
                            but the student's activations and its backward's saved tensors stay
                            alive through the quiz pass (measured on CPU, MiniLM 2-layer student,
                            bs 32, seq 128: tangent alone 0.8 s against 1.3-1.6 s, ~850 MiB more kept;
                            bench/results/meta_step_cpu.*).  The pilot forward then runs under math
                            attention.  Under a bf16/fp16 autocast it needs ``jvp_precision="autocast"``.
    teacher_graph           ``"keep"`` (default): the teacher forward's graph (its saved activations)
                            stays alive from the first forward to the teacher backward, i.e. through the
                            pilot, the quiz pass and the tangent.  ``"recompute"``: the first teacher
                            forward keeps no graph, and the teacher backward is preceded by the same
                            forward again (generator state replayed: the same dropout masks; checked
                            to reproduce the logits), as activation checkpointing does for one
                            segment: one more teacher forward, the teacher's activations never alive
                            together with the student's.  Same result; ``hypergrad`` "exact" or
                            "finite_diff"; no effect where no teacher backward runs
                            (``compute_teacher_grads=False``, ``kd_weight=0``).
    loss_scale              float16 loss scaling: every backward runs on ``S·loss`` (the teacher's on
                            ``S·c``) and its gradients are divided by ``S`` (:func:`scaled_grad`);
                            None = 1.  A power of two changes nothing but fp16 underflow.

    Raises ``ValueError``/``TypeError`` naming the argument for bad input (missing labels,
    empty batch, logits shape mismatch, temperature <= 0, models on different devices,
    ``inner_steps`` not an int >= 1, an unsupported ``student_optimizer``, ...) and
    ``FloatingPointError`` for a non-finite loss; nothing is modified in either case.
    """
    options = check_arguments(
        inner_lr=inner_lr, temperature=temperature, kd_weight=kd_weight, kd_loss=kd_loss, hypergrad=hypergrad,
        inner_steps=inner_steps, pilot=pilot, adam_jacobian=adam_jacobian, quiz_point=quiz_point,
        compute_influence=compute_influence, shift_labels=shift_labels, compute_teacher_grads=compute_teacher_grads,
        keep_pilot=keep_pilot, fd_eps=fd_eps, fd_mode=fd_mode, grad_sync=grad_sync, jvp_precision=jvp_precision,
        loss_scale=loss_scale, student_tangent=student_tangent, teacher_graph=teacher_graph,
    )
    check_plan(student, student_optimizer, options)
    split_x = split_batch(batch, name="batch")
    split_q = split_batch(quiz_batch, name="quiz_batch")
    device = check_same_device(teacher, student, ("batch", split_x), ("quiz_batch", split_q))
    return run(teacher, student, split_x, split_q, device, student_optimizer, options)


def meta_grad(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    batch: Any,
    quiz_batch: Any,
    *,
    inner_lr: float | None,
    temperature: float = 1.0,
    kd_weight: float = 0.5,
    kd_loss: str = "kl",
    hypergrad: str = "exact",
    inner_steps: int = 1,
    shift_labels: bool = False,
    student_optimizer: torch.optim.Optimizer | None = None,
    fd_eps: float | None = None,
    pilot: str = "optimizer",
    adam_jacobian: str = "exact",
) -> dict[str, torch.Tensor]:
    """``∇θT CE(yq, S(xq; θS'(θT)))`` for every teacher parameter that requires grad.

    ``θS'`` is ``inner_steps`` updates of ``student_optimizer`` (None: SGD at ``inner_lr``;
    ``pilot="sgd"``: SGD whatever the optimizer) on
    ``LS = (1 − kd_weight)·CE(y, S(x)) + kd_weight·kd_loss(S(x), T(x), τ)``.  ``hypergrad``:
    ``"exact"`` (student JVP + closed-form cotangent + one teacher backward; the exact
    derivative through the optimizer's real update), ``"finite_diff"`` (LGTM's in-place
    central difference), ``"autograd"`` (double backward through a transcription of the
    optimizer's update, the reference).  Keys as in ``teacher.named_parameters()``.
    Changes no parameter (finite_diff: within a couple of ulp), ``.grad``, mode, buffer or
    optimizer state.
    """
    return meta_gradient(
        teacher, student, batch, quiz_batch, inner_lr=inner_lr, temperature=temperature, kd_weight=kd_weight,
        kd_loss=kd_loss, hypergrad=hypergrad, inner_steps=inner_steps, shift_labels=shift_labels,
        student_optimizer=student_optimizer, fd_eps=fd_eps, pilot=pilot, adam_jacobian=adam_jacobian,
    ).teacher_grads


def influence(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    batch: Any,
    val_batch: Any,
    *,
    inner_lr: float | None,
    temperature: float = 1.0,
    kd_weight: float = 0.5,
    kd_loss: str = "kl",
    shift_labels: bool = False,
    student_optimizer: torch.optim.Optimizer | None = None,
    pilot: str = "optimizer",
    adam_jacobian: str = "exact",
) -> torch.Tensor:
    """LGTM's per-sample distillation influence, exactly: ``[B]`` tensor of
    ``w_i = ⟨∇θS ℓ_i, a⟩`` with ``a = −(∂θS'/∂g)ᵀ ∇CE(y_val, S(x_val; θS'))/η`` (plain SGD:
    ``a = ∇θS' Lval``, LGTM's definition, with ``θS' = θS − inner_lr·∇θS LS``) and ``ℓ_i``
    sample i's KD loss (``τ²·KL(pt_i ‖ ps_i)`` for kl; summed over the sample's unmasked
    tokens for token-level outputs).  One student JVP; no per-sample gradients.
    """
    return meta_gradient(
        teacher, student, batch, val_batch, inner_lr=inner_lr, temperature=temperature, kd_weight=kd_weight,
        kd_loss=kd_loss, hypergrad="exact", compute_influence=True, compute_teacher_grads=False,
        shift_labels=shift_labels, student_optimizer=student_optimizer, pilot=pilot, adam_jacobian=adam_jacobian,
    ).influences
