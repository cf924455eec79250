"""``algorithm="ikd"``: Interactive Knowledge Distillation (Liu, Sun, Qiu, Huang: "Learning to
Teach with Student Feedback", arXiv:2109.04641, 2021): a course step, then an exam step.

IKD alternates two steps: a *course step* optimises the student with the
teacher's soft targets, an *exam step* optimises the teacher with the feedback of
the student.  Unlike MetaDistil there is no pilot update: the course step IS the
student's real update, and the teacher learns from the student it has just
taught (MetaDistil's "pilot update" was introduced to remove exactly this
one-step lag).  One ``meta_step``::

    course   θS' = student_optimizer step with ∇θS LS(x; θS, θT)         (real, committed)
    exam     LQ  = CE(yq, S(xq; θS')),   v = ∇θS' LQ
             θT ← teacher_optimizer step with the teacher's feedback gradient G

The exam objective is the student's quiz loss after the course, as a function of
the teacher that taught it: ``∇θT LQ(θS'(θT)) = −η·w·∇θT ⟨∇θS KD(θS, θT), P ⊙ v⟩``
(second order: the mixed derivative).

``hypergrad="first_order"`` -- the first-order feedback (only first derivatives)
    The mixed product is replaced by a one-sided difference of the KD loss between
    the taught student and the student *corrected by its exam*,
    ``θS'' = θS' − η·v`` (one plain gradient step on the quiz loss; ``η`` = ``inner_lr``,
    or each parameter's student param-group lr when it is None):

        G = w·∇θT [ KD(S(x; θS''), T(x; θT)) − KD(S(x; θS'), T(x; θT)) ]

    By Taylor, ``KD(θS' − ηv) − KD(θS') = −η⟨∇θS KD(θS', θT), v⟩ + O(η²‖v‖²)``, so
    ``G = −η·w·∇θT⟨∇θS KD(θS', θT), v⟩ + O(η²)``: the exam's meta-gradient to first
    order in ``η``, evaluated at the taught student (the exam happens after the
    course).  Reading: the teacher lowers its distillation loss toward where the
    exam says the student should go and raises it toward where the student is.
    Cost: a quiz forward/backward at θS', two student forwards on ``x`` without
    graph (at θS' and at θS'', the latter through ``functional_call`` with the
    shifted parameters: no copy of the module) and one teacher backward (the
    teacher forward of the course step keeps its graph for it).  This is our
    reading of IKD's first-order exam step, written down here because the paper's
    exact update is not reproduced from its code; it is tested against an
    independent float64 implementation of these formulas.

``hypergrad="exact" | "finite_diff" | "autograd"`` -- the exam's exact meta-gradient
    ``G = ∇θT LQ(θS'(θT))`` from ``fastmeta.engine.meta_gradient``, whose pilot step
    is the course step (``student_grads = ∇θS LS`` at θS); both updates are then
    committed together, so the exact IKD step costs one engine call and no further
    pass.  (For SGD the engine's θS' is the optimizer's step exactly; for momentum
    and Adam it is the engine's linearisation, see ``fastmeta.ops.precondition``.)

``pilot_student_loss`` is the course loss ``LS``; ``student_loss`` too (it is the
loss of the student step that was applied); ``quiz_loss`` the exam loss ``LQ``.
"""
from __future__ import annotations

import torch

from fastmeta import batching
from fastmeta.algorithms._common import StepContext, check_finite_grads, trainable

HYPERGRADS = ("exact", "finite_diff", "autograd", "first_order")
NEEDS_QUIZ = True
USES_ENGINE = True  # inner_steps > 1 goes to fastmeta.engine


def check_options(ctx: StepContext) -> None:
    ctx.require_teacher_optimizer()
    ctx.settings["compute_influence"] = bool(ctx.option("compute_influence", False))
    if ctx.hypergrad == "first_order" and ctx.settings["compute_influence"]:
        raise ValueError("ikd with hypergrad='first_order' computes no influences (compute_influence=True needs an exact hypergrad)")


def _run_exact(ctx: StepContext):
    from fastmeta.step import StepOutput

    result = ctx.engine_meta_gradient(compute_influence=ctx.settings["compute_influence"])
    student_grads = dict(result.student_grads)
    check_finite_grads(student_grads, "student gradient")
    ctx.apply_student(student_grads, final=False)
    ctx.apply_teacher(result.teacher_grads, final=True)
    loss = result.student_loss.detach()
    return StepOutput(
        algorithm="ikd",
        student_loss=loss,
        quiz_loss=result.quiz_loss.detach(),
        pilot_student_loss=loss,
        influences=None if result.influences is None else result.influences.detach(),
        teacher_updated=True,
    )


def _run_first_order(ctx: StepContext):
    from fastmeta.functional import functional_logits, preserved_buffers
    from fastmeta.step import StepOutput

    # course step: the teacher forward keeps its graph for the exam's teacher backward
    with ctx.phase("course.teacher_forward"):
        teacher_logits = ctx.teacher_logits(grad=True)
    course_loss, course_grads = ctx.student_step_gradients(teacher_logits.detach(), phase="course")
    ctx.apply_student(course_grads, final=False)  # snapshot taken: undone if the exam fails

    with ctx.phase("exam"), preserved_buffers(ctx.student):
        params = trainable(ctx.student)
        quiz_logits = ctx.student_logits(ctx.quiz)
        batching.check_finite(quiz_logits.detach(), "student logits on quiz_batch")
        quiz_loss = batching.cross_entropy(quiz_logits, ctx.labels(ctx.quiz), name="quiz_batch labels")
        batching.check_finite(quiz_loss.detach(), "quiz loss")
        quiz_grads = ctx.grad(quiz_loss, [p for _, p in params])
        check_finite_grads({n: g for (n, _), g in zip(params, quiz_grads)}, "quiz gradient")
        with torch.no_grad():
            taught = ctx.student_logits(grad=False)
            lrs = ctx.student_lrs()
            corrected_params = {
                name: (p.detach() - lrs[name] * g.to(p.dtype)) if g is not None else p.detach()
                for (name, p), g in zip(params, quiz_grads)
            }
            corrected = functional_logits(ctx.student, corrected_params, ctx.batch, name="student")
            corrected, _ = batching.align_logits_labels(
                corrected, ctx.batch.labels, shift_labels=ctx.shift_labels, name="student"
            )
    batching.check_finite(taught, "student logits on batch after the course step")
    batching.check_finite(corrected, "exam-corrected student logits on batch")
    with ctx.phase("teacher_gradient"):
        labels = ctx.labels()
        mask = labels != batching.IGNORE_INDEX
        t_params = trainable(ctx.teacher)
        feedback = ctx.kd_weight * (
            batching.kd_loss(corrected, teacher_logits, ctx.temperature, kind=ctx.kd_loss, mask=mask)
            - batching.kd_loss(taught, teacher_logits, ctx.temperature, kind=ctx.kd_loss, mask=mask)
        )
        grads = ctx.grad(feedback, [p for _, p in t_params])
        teacher_grads = {name: g for (name, _), g in zip(t_params, grads)}
        check_finite_grads(teacher_grads, "IKD teacher feedback gradient")
    ctx.apply_teacher(teacher_grads, final=True)
    return StepOutput(
        algorithm="ikd",
        student_loss=course_loss,
        quiz_loss=quiz_loss.detach(),
        pilot_student_loss=course_loss,
        teacher_updated=True,
    )


def run(ctx: StepContext):
    if ctx.hypergrad == "first_order":
        return _run_first_order(ctx)
    return _run_exact(ctx)
