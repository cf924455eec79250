"""``algorithm="kd"``: plain knowledge distillation (Hinton et al., 2015), the baseline.

One step::

    zt = T(x; θT)                                (no graph)
    θS ← student_optimizer step with ∇θS LS,     LS = (1 − w)·CE(y, zs) + w·KD(zs, zt)

The teacher is not updated and ``quiz_batch`` is not used (it may be None).
Cost: one teacher forward, one student forward and backward.

Option ``teacher_ce=True``: the teacher also takes one ``teacher_optimizer`` step
on its own supervised loss ``CE(y, T(x; θT))`` (online co-training).  Both
updates use the SAME teacher forward (the student distils from the pre-update
teacher's logits, detached), so the two steps are simultaneous; the teacher
forward then keeps its graph for that one backward.
``StepOutput.teacher_loss`` is that CE.

``hypergrad`` is irrelevant here (no meta-gradient); ``"first_order"`` is rejected
like for every non-first-order algorithm.
"""
from __future__ import annotations

from fastmeta import batching
from fastmeta.algorithms._common import StepContext, check_finite_grads, check_flag, trainable
from fastmeta.algorithms.output import StepOutput

HYPERGRADS = ("exact", "finite_diff", "autograd")
NEEDS_QUIZ = False


def check_options(ctx: StepContext) -> None:
    ctx.settings["teacher_ce"] = check_flag("teacher_ce", ctx.option("teacher_ce", False))
    if ctx.settings["teacher_ce"]:
        ctx.require_teacher_optimizer()


def run(ctx: StepContext):
    teacher_ce = ctx.settings["teacher_ce"]
    teacher_grads = None
    teacher_loss = None
    with ctx.phase("student_step.teacher_forward"):
        teacher_logits = ctx.teacher_logits(grad=teacher_ce)
    if teacher_ce:
        with ctx.phase("teacher_gradient"):
            params = trainable(ctx.teacher)
            teacher_loss = batching.cross_entropy(teacher_logits, ctx.labels(), name="batch labels")
            batching.check_finite(teacher_loss.detach(), "teacher loss")
            grads = ctx.grad(teacher_loss, [p for _, p in params])
            teacher_grads = {name: g for (name, _), g in zip(params, grads)}
            check_finite_grads(teacher_grads, "teacher gradient")
        teacher_logits = teacher_logits.detach()
    loss, student_grads = ctx.student_step_gradients(teacher_logits)
    # every check passed: commit
    if teacher_ce:
        ctx.apply_teacher(teacher_grads, final=False)
    ctx.apply_student(student_grads, final=True)
    return StepOutput(
        algorithm="kd",
        student_loss=loss,
        teacher_loss=None if teacher_loss is None else teacher_loss.detach(),
        teacher_updated=teacher_ce,
    )
