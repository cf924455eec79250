"""``algorithm="ikd"``: Interactive Knowledge Distillation (Liu, Sun, Qiu, Huang: "Learning to
Teach with Student Feedback", arXiv:2109.04641, 2021): course and exam steps, trained jointly.

The *course step* is the student's real update with the current teacher (Eq. 4-5,
``LS = (1 − w)·CE + w·KD``, ``w = kd_weight`` = the paper's λ).  The *exam step*
updates the teacher with the student's feedback (Eq. 6-11)::

    G_tea = γ·G_meta + (1 − γ)·∇θT CE(y, T(x; θT))              (Eq. 10; option gamma)
    G_meta = ∇θT LQ(φ_{t+1}(θT)) = −η·w·∇θT ⟨∇θS KD(θS, θT), D ⊙ v⟩

with ``LQ = CE(yq, S(xq))`` on the quiz (exam) batch, ``η·D`` the Jacobian of the
student optimizer's step (plain SGD: ``D = 1``, the paper's Eq. 5) and ``v`` the exam
gradient.  Both updates are computed from ``(θS, θT)`` and committed together (Eq. 12,
``L_IKD = L_stu + L_tea``: joint).  ``hypergrad`` chooses ``v``:

``"first_order"`` -- Eq. 14: ``v = ∇θS LQ(θS)`` at the CURRENT student (the paper's
    ``φ_{t+1} ≈ φ_t``): no pilot point, no second student.  The mixed product is still
    exact: one student JVP and one teacher backward (``fastmeta.engine`` with
    ``quiz_point="current"``), the JVP replaying the dropout masks of the forward it
    differentiates.
``"exact" | "autograd" | "finite_diff"`` -- Eq. 13: ``v = ∇LQ(φ_{t+1})`` at the student
    after the course step, i.e. the engine's pilot point, which must be the student
    that is committed: ``inner_steps=1``, ``inner_lr`` None or equal to every param
    group's lr, ``pilot="sgd"`` only for a plain-SGD student, no ``max_grad_norm``
    (a ``ValueError`` names the option otherwise).  The engine differentiates the
    student optimizer's real update (Adam included).

Option ``gamma`` (default 1.0): the paper gives no value (nor λ, τ or the learning
rates); 1.0 is the pure exam feedback, fastmeta's behaviour before the option existed.
With ``gamma < 1`` the CE is taken on the teacher logits of the engine's forward (those the
student learns from) and its gradient joins the meta-gradient's cotangent in the engine's
one teacher backward (``Options.teacher_loss``, ``meta_weight=γ``): no teacher pass of its own.
``StepOutput``: ``student_loss`` = ``pilot_student_loss`` = the course loss ``LS``;
``quiz_loss`` = ``LQ`` (at ``φ_{t+1}``, or ``φ_t`` for first_order); ``teacher_loss`` =
``L_tea = γ·LQ + (1 − γ)·CE(y, T(x))``.  Deviations: ``docs/deviations.md``.
"""
from __future__ import annotations

import torch

from fastmeta import batching
from fastmeta.algorithms._common import StepContext, check_finite_grads, check_flag, check_number
from fastmeta.algorithms.output import StepOutput

HYPERGRADS = ("exact", "finite_diff", "autograd", "first_order")
NEEDS_QUIZ = True
USES_ENGINE = True  # inner_steps > 1 goes to fastmeta.engine (and is refused below)


def _plain_sgd(optimizer) -> bool:
    return isinstance(optimizer, torch.optim.SGD) and all(
        float(g.get("momentum", 0.0)) == 0.0 and float(g.get("weight_decay", 0.0)) == 0.0 and not g.get("maximize", False)
        for g in optimizer.param_groups
    )


def _check_quiz_student_is_committed(ctx: StepContext) -> None:
    """Eq. 13 evaluates the exam at φ_{t+1}: refuse what would make the engine's pilot point differ from it."""
    why = f"ikd with hypergrad={ctx.hypergrad!r} (Eq. 13) evaluates the exam at the student it commits"
    if ctx.inner_steps != 1:
        raise ValueError(f"{why}: inner_steps must be 1 (got {ctx.inner_steps}); the course step is one step")
    if ctx.inner_lr is not None:
        lrs = sorted({float(g["lr"]) for g in ctx.student_optimizer.param_groups})
        if any(lr != ctx.inner_lr for lr in lrs):
            raise ValueError(
                f"{why}: inner_lr={ctx.inner_lr} differs from the student optimizer's lr {lrs}; leave inner_lr=None"
            )
    if ctx.pilot == "sgd" and not _plain_sgd(ctx.student_optimizer):
        raise ValueError(
            f"{why}: pilot='sgd' differs from the {type(ctx.student_optimizer).__name__} step that is committed; "
            "leave pilot='optimizer'"
        )
    if ctx.max_grad_norm is not None:
        raise ValueError(f"{why}: max_grad_norm would clip the committed step but not the exam's; leave it None")


def check_options(ctx: StepContext) -> None:
    ctx.require_teacher_optimizer()
    ctx.settings["compute_influence"] = check_flag("compute_influence", ctx.option("compute_influence", False))
    ctx.settings["gamma"] = check_number("gamma", ctx.option("gamma", 1.0), low=0.0, high=1.0)
    if ctx.hypergrad != "first_order":
        _check_quiz_student_is_committed(ctx)


def _teacher_ce(ctx: StepContext, weight: float):
    """``(1 − γ)·CE(y, zt)`` on the course batch, as the engine's own-loss hook calls it (``zs`` and the
    influences unused)."""
    labels = ctx.labels()

    def loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, influences=None) -> torch.Tensor:
        ce = weight * batching.cross_entropy(teacher_logits, labels, name="batch labels")
        batching.check_finite(ce.detach(), "teacher CE")
        return ce

    return loss


def run(ctx: StepContext):
    first_order = ctx.hypergrad == "first_order"
    gamma = ctx.settings["gamma"]
    # Eq. 10, G_tea = γ·G_meta + (1 − γ)·∇θT CE(y, T(x)): the CE's gradient on the teacher's logits joins the
    # meta-gradient's cotangent in the engine's one teacher forward and backward
    own = {} if gamma == 1.0 else {"teacher_loss": _teacher_ce(ctx, 1.0 - gamma), "meta_weight": gamma}
    result = ctx.engine_meta_gradient(
        compute_influence=ctx.settings["compute_influence"],
        hypergrad="exact" if first_order else None,
        quiz_point="current" if first_order else "pilot",
        keep_student_grads=True,  # IKD's real student step is the pilot's gradient (the teacher steps after it)
        **own,
    )
    student_grads = dict(result.student_grads)
    check_finite_grads(student_grads, "student gradient")
    teacher_loss = result.quiz_loss.detach()
    if gamma != 1.0:
        teacher_loss = gamma * teacher_loss + result.teacher_loss
    ctx.apply_student(student_grads, final=False)
    ctx.apply_teacher(result.teacher_grads, final=True)
    loss = result.student_loss.detach()
    return StepOutput(
        algorithm="ikd",
        student_loss=loss,
        quiz_loss=result.quiz_loss.detach(),
        pilot_student_loss=loss,
        teacher_loss=teacher_loss,
        influences=None if result.influences is None else result.influences.detach(),
        teacher_updated=True,
    )
