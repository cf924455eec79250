"""``fastmeta.meta_step``: one full training step of a learning-to-teach distillation algorithm.

Drop it into an existing loop::

    for batch, quiz_batch in zip(train_loader, quiz_loader):
        out = fastmeta.meta_step(teacher, student, batch, quiz_batch,
                                 teacher_optimizer, student_optimizer,
                                 algorithm="metadistil", temperature=2.0, kd_weight=0.5)
        print(out.student_loss.item(), out.quiz_loss.item())

Notation (as in ``docs/meta-gradient.md``)::

    LS(x; θS, θT) = (1 − w)·CE(y, S(x; θS)) + w·KD(S(x; θS), T(x; θT))   (w = kd_weight)
    θS' = U(θS, ∇θS LS)                                                 (pilot / course step)
    LQ  = CE(yq, S(xq; θS'))                                             (quiz loss)

``U`` is the student optimizer's update (SGD, momentum, Adam, AdamW, amsgrad; its exact
Jacobian in ``fastmeta.engine.optimizer``; ``pilot="sgd"``: ``θS − η·∇θS LS``) and
``η`` is ``inner_lr`` (None: each parameter's student param-group learning rate).

Algorithms (``algorithm=``; one module each in ``fastmeta.algorithms``):

``"kd"``          plain distillation: the student takes one optimizer step on LS with
                  the teacher's logits; the teacher is not updated (``teacher_ce=True``:
                  it also takes one step on its own ``CE(y, T(x))`` from the same
                  forward, simultaneously). ``fastmeta.algorithms.kd``.
``"metadistil"``  MetaDistil (Zhou et al., ACL 2022), Algorithm 1 with the pilot
                  update: θT ← teacher_optimizer step with ``∇θT LQ(θS'(θT))``, then the
                  real student step on the SAME batch with the UPDATED teacher.
``"lgtm"``        LGTM (Ren et al., ACL 2023), Algorithm 1, teacher first: the teacher
                  gradient is the distillation-influence term plus
                  ``∇θT[α·CE(y, T(x)) + (1 − α)·KD_T]``, then the student step.
``"reptile"``     ReptileDistil: pilot step, the teacher moved toward the updated
                  student layer by layer (gradient ``θT − θS'`` through the teacher
                  optimizer), then the student step.
``"ikd"``         IKD (Liu et al., 2021): course step (the real student step with the
                  current teacher) and exam step (teacher updated from the student's
                  quiz feedback), both from the same point, committed together.

Each module follows its paper; every default that differs from the paper or the
official code is a row of ``docs/deviations.md`` with the option reproducing it.

``hypergrad`` (how the teacher's meta-gradient is computed):
``"exact"`` (JVP + closed-form cotangent + one teacher backward), ``"finite_diff"``,
``"autograd"`` (double backward; the reference) for metadistil/lgtm/ikd;
``"first_order"`` only for reptile (where ``"exact"`` means the same: Reptile is
first order by construction) and ikd (the paper's Eq. 14: the exam gradient at the
current student).  ``kd``
computes no meta-gradient: it accepts exact/finite_diff/autograd and ignores them.

Atomicity: ``meta_step`` computes every gradient with ``torch.autograd.grad``
(writing no ``.grad``), checks the losses and gradients, and only then steps an
optimizer.  Where an algorithm needs the updated teacher before it can finish
(metadistil, lgtm, reptile: the real student step uses the updated teacher's
logits; ikd: the two updates of one step), the first update is applied
after saving what it overwrites, and any error later in the call (a non-finite
loss, a bad shape, an exception from a model) restores both models and both
optimizers bitwise before re-raising (``atomic=False`` skips the snapshot and its
memory: one copy of the first-updated model's stepped parameters and of its
optimizer state; the last update of a step needs no snapshot).
Schedulers are stepped last, after every check.  On success each stepped
parameter's ``.grad`` holds the gradient its optimizer used; trainable parameters
that got no gradient have ``.grad = None``.  Those gradients stay alive until
something replaces them -- through the whole next ``meta_step``, its peak included
(one tensor like each trainable parameter of each model) -- so a loop that does not
read them frees them with ``optimizer.zero_grad()`` after the call, as
``fastmeta.train`` and ``MetaDistilTrainer`` do.  ``requires_grad=False`` parameters
are never touched.  Buffers (BatchNorm running statistics) change only through
the forwards of the step the algorithm actually trains with (the real student
step's teacher and student forwards; kd's; ikd's course step) -- the engine's and
the auxiliary forwards preserve them -- and a failing call restores them too.
Train/eval modes are left as the caller set them (lgtm's ``"official"``
objectives switch both models to eval for their difference and restore every
submodule's mode).

Multi-process training: ``meta_step`` has no collective of its own; average the
gradients the optimizers step with (optimizer step pre-hooks, as
``fastmeta.train`` does) and pass ``grad_sync=`` (a callable averaging a list of
tensors over the processes) so that the engine's pilot step and JVP direction are
those of the global batch (``fastmeta.engine.meta_gradient``); without it each
process computes the pilot step and the meta-gradient on its own shard.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Optional

import torch

from fastmeta import batching
from fastmeta._walks import named_buffers, walking_once
from fastmeta.algorithms import ALGORITHMS, HYPERGRADS, check_hypergrad
from fastmeta.algorithms._common import StepContext, Transaction, check_flag, check_max_grad_norm, check_number
from fastmeta.algorithms.output import StepOutput
from fastmeta._validation import check_choice
from fastmeta.engine import JVP_PRECISIONS, STUDENT_TANGENTS, TEACHER_GRAPHS, check_count, check_loss_scale, check_pilot_options

__all__ = ["meta_step", "StepOutput"]


def _resolve_inner_lr(inner_lr: Any, student_optimizer: torch.optim.Optimizer, engine_checks_it: bool) -> Optional[float]:
    """``inner_lr``: None stays None (each parameter's param-group ``lr``), else a finite number > 0.

    With None, the param-group learning rates must be finite and > 0.  The engine's
    ``check_plan`` (``fastmeta.engine.optimizer.check_student_optimizer``) checks them for
    the algorithms that call the engine (``engine_checks_it``); here for the others, so
    each meta_step checks them once.  Where ``inner_lr=None`` is RESOLVED to per-parameter
    rates: ``fastmeta.engine.optimizer.resolve_lrs`` (the engine) and the optimizer itself
    (reptile's pilot takes the optimizer's own step).
    """
    if inner_lr is not None:
        return check_number("inner_lr", inner_lr, low=0.0, low_open=True)
    if not engine_checks_it:
        for group in student_optimizer.param_groups:
            lr = float(group["lr"])
            if not (lr > 0.0) or lr == float("inf"):
                raise ValueError(f"inner_lr=None takes the student optimizer's lr, which is {lr}: pass inner_lr > 0")
    return None


@walking_once  # each model's parameters, buffers and submodules are walked once per call (fastmeta._walks)
def meta_step(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    batch: Any,
    quiz_batch: Any,
    teacher_optimizer: Optional[torch.optim.Optimizer],
    student_optimizer: torch.optim.Optimizer,
    *,
    algorithm: str = "metadistil",
    hypergrad: str = "exact",
    temperature: float = 1.0,
    kd_weight: float = 0.5,
    kd_loss: str = "kl",
    inner_lr: Optional[float] = None,
    **algorithm_options: Any,
) -> StepOutput:
    """One full training step of ``algorithm``: both models updated through their own optimizers.

    Args:
        teacher, student: any ``nn.Module``s returning logits (or ``.logits``).
        batch: the training batch (Mapping with ``"labels"`` + model kwargs, or
            ``(inputs, labels)``).
        quiz_batch: the quiz (held-out) batch for the meta-objective ``LQ``; may be
            None for ``"kd"``.
        teacher_optimizer: the teacher's optimizer (None allowed only for ``"kd"``
            without ``teacher_ce``).
        student_optimizer: the student's optimizer.
        algorithm: ``"kd" | "metadistil" | "lgtm" | "reptile" | "ikd"``.
        hypergrad: ``"exact" | "finite_diff" | "autograd" | "first_order"`` (see the
            module docstring for which algorithm accepts which).
        temperature, kd_weight, kd_loss: of ``LS`` (kd_loss kinds ``"kl"``,
            ``"reverse_kl"``, ``"softmax_mse"``, ``"logit_mse"``).
        inner_lr: the pilot step's ``η``; None = the student optimizer's current lr.

    Algorithm options (keyword arguments; an unknown one is a ``TypeError``):
        common: ``teacher_scheduler=``, ``student_scheduler=`` (stepped once after
        both updates), ``shift_labels="auto"`` (causal-LM alignment, ``logits[:, :-1]``
        against ``labels[:, 1:]``: True/False, or ``"auto"`` = True when the teacher or the
        student is a HuggingFace causal LM, :func:`fastmeta.batching.resolve_shift_labels`),
        ``max_grad_norm=None`` (clip each committed update's gradients, the teacher's and
        the student's, to this global L2 norm as ``torch.nn.utils.clip_grad_norm_`` does,
        like the official MetaDistil/ReptileDistil code; ``.grad`` holds the clipped
        gradient), ``inner_steps=1``
        (engine), ``atomic=True`` (see the module docstring), ``grad_sync=None``
        (data parallelism: a callable averaging a list of tensors in place over the
        processes, applied by the engine to the pilot and quiz gradients so the
        engine-based algorithms (metadistil, lgtm, ikd) follow the global batch; see ``fastmeta.engine.meta_gradient``;
        the gradients the optimizers step with are averaged by the caller, e.g. DDP),
        ``loss_scale=None`` (float16: every backward of the step runs on ``S·loss`` and
        its gradients are divided by S, see ``fastmeta.engine.scaled_grad``; a step whose
        scaled gradients overflow raises ``FloatingPointError`` with nothing changed, so a
        dynamic scaler such as :class:`fastmeta.amp.DynamicLossScale` can back off and
        retry), ``jvp_precision="fp32"`` (under a bf16/fp16 autocast the engine's student
        tangent runs with autocast off; ``"autocast"`` keeps it under the caller's
        autocast; see ``fastmeta.engine.meta_gradient``), ``student_tangent="jvp"`` (how
        hypergrad="exact" takes the student tangent: ``"jvp"`` by forward mode, ``"double_vjp"``
        through the pilot's kept graph, faster at large batches, more memory; see
        ``fastmeta.engine.meta_gradient``), ``teacher_graph="keep"`` (``"recompute"``: the
        engine's teacher forward keeps no graph and is run again, same dropout masks, right
        before the teacher backward: one more teacher forward, less memory; hypergrad "exact"
        or "finite_diff"; see ``fastmeta.engine.meta_gradient``), ``pilot="optimizer"`` (the
        engine's pilot step is the student optimizer's real update: SGD/momentum/Adam/
        AdamW/amsgrad, differentiated exactly; ``"sgd"``: MetaDistil's official
        look-ahead ``θS' = θS − η·∇LS`` whatever the optimizer), ``adam_jacobian="exact"``
        (``"frozen_second_moment"``: Adam's second moment held fixed in the Jacobian, an
        approximation; both are refused by kd and reptile, which have no engine pilot step);
        ``inner_steps`` must be an int >= 1 (a float or bool is a
        ``TypeError``).
        Flags must be bools and numbers numbers (``"false"`` or ``"0.5"`` is a ``TypeError``).
        kd: ``teacher_ce=False``.
        metadistil: ``compute_influence=False``.
        lgtm: ``alpha=0.6`` (the teacher's CE weight, the paper's value),
        ``influence_objective="mixed"|"weighted"|"official"|"official_exact"``,
        ``compute_influence`` (default: True when ``inner_steps == 1``).
        reptile: ``layer_strategy="first"|"last"|"skip"|"both"``, ``layer_mapping=None``,
        ``non_layer="shared"|"none"``, ``pilot_optimizer="student"|"fresh_adamw"``,
        ``pilot_max_grad_norm=None``.
        ikd: ``gamma=1.0`` (Eq. 10), ``compute_influence=False``; the exact hypergrads
        refuse ``inner_steps > 1``, an ``inner_lr`` unlike the optimizer's, ``pilot="sgd"``
        for a non-SGD student and ``max_grad_norm``.

    Returns:
        :class:`StepOutput`.

    Raises:
        ValueError/TypeError naming the argument for bad input (missing labels, empty
        batch, teacher/student logits of different shapes, temperature <= 0, models
        or batches on different devices, unknown algorithm/hypergrad/option);
        FloatingPointError for a non-finite loss or gradient.  In every case both
        models and both optimizers are left exactly as they were.
    """
    start = time.perf_counter()
    timings: Dict[str, float] = {}
    # ------------------------------------------------------------------ validate (nothing is touched yet)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {sorted(ALGORITHMS)}, got {algorithm!r}")
    if hypergrad not in HYPERGRADS:
        raise ValueError(f"hypergrad must be one of {HYPERGRADS}, got {hypergrad!r}")
    check_hypergrad(algorithm, hypergrad)
    if not isinstance(teacher, torch.nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if not isinstance(student, torch.nn.Module):
        raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
    if not isinstance(student_optimizer, torch.optim.Optimizer):
        raise TypeError(f"student_optimizer must be a torch.optim.Optimizer, got {type(student_optimizer).__name__}")
    if teacher_optimizer is not None and not isinstance(teacher_optimizer, torch.optim.Optimizer):
        raise TypeError(f"teacher_optimizer must be a torch.optim.Optimizer or None, got {type(teacher_optimizer).__name__}")
    if teacher_optimizer is not None and teacher_optimizer is student_optimizer:
        raise ValueError("teacher_optimizer and student_optimizer must be two different optimizers")
    # each argument is checked here once; the algorithms and the engine's internal run() trust them
    temperature = batching.check_temperature(temperature)
    kd_weight = batching.check_kd_weight(kd_weight)
    batching.check_kd_kind(kd_loss)
    module = ALGORITHMS[algorithm]
    engine_checks_lr = getattr(module, "USES_ENGINE", False)  # its check_plan checks the student's lrs
    inner_lr_value = _resolve_inner_lr(inner_lr, student_optimizer, engine_checks_lr)
    options = dict(algorithm_options)
    shift_labels = batching.resolve_shift_labels(options.pop("shift_labels", "auto"), teacher, student)
    max_grad_norm = check_max_grad_norm("max_grad_norm", options.pop("max_grad_norm", None))
    inner_steps = check_count(options.pop("inner_steps", 1), "inner_steps")
    pilot = options.pop("pilot", "optimizer")
    adam_jacobian = options.pop("adam_jacobian", "exact")
    check_pilot_options(pilot, adam_jacobian)
    if not getattr(module, "USES_ENGINE", False):
        for name, value, default in (("pilot", pilot, "optimizer"), ("adam_jacobian", adam_jacobian, "exact")):
            if value != default:
                raise ValueError(
                    f"{name}={value!r} applies to the meta-gradient engine's pilot step (metadistil, lgtm, ikd); "
                    f"algorithm={algorithm!r} has none"
                    + (" (ReptileDistil's pilot step is set by pilot_optimizer=)" if algorithm == "reptile" else "")
                )
    atomic = check_flag("atomic", options.pop("atomic", True))
    grad_sync = options.pop("grad_sync", None)
    loss_scale = check_loss_scale(options.pop("loss_scale", None))
    jvp_precision = options.pop("jvp_precision", "fp32")
    check_choice("jvp_precision", jvp_precision, JVP_PRECISIONS)
    student_tangent = options.pop("student_tangent", "jvp")
    check_choice("student_tangent", student_tangent, STUDENT_TANGENTS)
    if student_tangent != "jvp" and not (getattr(module, "USES_ENGINE", False) and hypergrad == "exact"):
        raise ValueError(f"student_tangent={student_tangent!r} applies to hypergrad='exact' of the engine's "
                         f"algorithms (metadistil, lgtm, ikd); got algorithm={algorithm!r}, hypergrad={hypergrad!r}")
    teacher_graph = options.pop("teacher_graph", "keep")
    check_choice("teacher_graph", teacher_graph, TEACHER_GRAPHS)
    if teacher_graph != "keep" and not (getattr(module, "USES_ENGINE", False)
                                        and hypergrad in ("exact", "finite_diff")):
        raise ValueError(f"teacher_graph={teacher_graph!r} applies to hypergrad 'exact' and 'finite_diff' of the "
                         f"engine's algorithms (metadistil, lgtm, ikd); got algorithm={algorithm!r}, "
                         f"hypergrad={hypergrad!r}")
    teacher_scheduler = options.pop("teacher_scheduler", None)
    student_scheduler = options.pop("student_scheduler", None)
    split = batching.split_batch(batch, name="batch")
    if quiz_batch is None:
        if getattr(module, "NEEDS_QUIZ", True):
            raise ValueError(f"algorithm={algorithm!r} needs a quiz_batch (got None)")
        quiz = None
    else:
        quiz = batching.split_batch(quiz_batch, name="quiz_batch")
    splits = [("batch", split)] + ([("quiz_batch", quiz)] if quiz is not None else [])
    device = batching.check_same_device(teacher, student, *splits)
    timings["validate"] = time.perf_counter() - start

    transaction = Transaction(atomic=atomic)
    # buffers (BatchNorm running statistics) are small: saved so that a failing call restores them too
    saved_buffers = [(b, b.detach().clone()) for m in (teacher, student) for _, b in named_buffers(m)] if atomic else []
    ctx = StepContext(
        algorithm=algorithm,
        teacher=teacher,
        student=student,
        batch=split,
        quiz=quiz,
        raw_batch=batch,
        raw_quiz=quiz_batch,
        teacher_optimizer=teacher_optimizer,
        student_optimizer=student_optimizer,
        hypergrad=hypergrad,
        temperature=temperature,
        kd_weight=kd_weight,
        kd_loss=kd_loss,
        inner_lr=inner_lr_value,
        shift_labels=shift_labels,
        inner_steps=inner_steps,
        teacher_scheduler=teacher_scheduler,
        student_scheduler=student_scheduler,
        options=options,
        device=device,
        grad_sync=grad_sync,
        loss_scale=loss_scale,
        jvp_precision=jvp_precision,
        student_tangent=student_tangent,
        teacher_graph=teacher_graph,
        pilot=pilot,
        adam_jacobian=adam_jacobian,
        transaction=transaction,
        timings=timings,
        max_grad_norm=max_grad_norm,
    )
    # ------------------------------------------------------------------ compute, check, commit
    try:
        if inner_steps != 1 and not (getattr(module, "USES_ENGINE", False) and hypergrad != "first_order"):
            raise ValueError(
                f"inner_steps={inner_steps} is only meaningful for the engine's pilot step "
                f"(metadistil, lgtm); algorithm={algorithm!r} "
                f"with hypergrad={hypergrad!r} takes one pilot/course step"
            )
        module.check_options(ctx)
        if ctx.options:
            raise TypeError(
                f"meta_step(algorithm={algorithm!r}) got unknown option(s) {sorted(ctx.options)}"
            )
        output = module.run(ctx)
    except BaseException:
        transaction.rollback()
        with torch.no_grad():
            for buffer, value in saved_buffers:
                buffer.copy_(value)
        raise
    transaction.finish()
    timings["total"] = time.perf_counter() - start
    output.timings = timings
    output.tangent_precision = ctx.tangent_precision
    return output
