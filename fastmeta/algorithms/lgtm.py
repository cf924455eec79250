"""``algorithm="lgtm"``: LGTM (Ren, Zhong, Shi, Zhu, Yuan, Li: "Tailoring Instructions to
Student's Learning Levels Boosts Knowledge Distillation", ACL 2023), Algorithm 1, teacher first.

One step on a training batch ``x`` (size B) and a quiz (validation) batch ``xq``::

    1. pilot student step   θS' = θS − η·P ⊙ ∇θS LS(x; θS, θT),   g = ∇θS' CE(yq, S(xq; θS'))
    2. teacher gradient     G = I + ∇θT [α·CE(y, T(x; θT)) + (1 − α)·KD_T]
       teacher step         θT ← teacher_optimizer step with G
    3. student step         θS ← student_optimizer step with ∇θS LS(x; θS, θT_new)

Distillation influence ``I`` (option ``influence_objective``):

* ``"mixed"`` (default): ``I = ∇θT LQ(θS'(θT)) = −η·w·∇θT Σ_i ⟨∇θS ℓ_i/B, P ⊙ g⟩``,
  the gradient of the student's validation loss after the pilot step with respect
  to the teacher -- the mixed second derivative that the paper's finite difference
  (its Eq. 10 and 18, ``∇θT Σ_i [ℓ_i(θS + εg) − ℓ_i(θS − εg)]/2ε``) estimates,
  scaled as the meta-gradient it is.  ``hypergrad="exact"``: exact, one student
  JVP and one teacher backward (``fastmeta.engine``); ``"finite_diff"``: central
  differences in the direction ``d = P ⊙ g`` with the paper's step ``ε = 0.01/‖d‖``
  (the paper's approximation: ``fastmeta.engine``, ``fd_mode="lgtm"``);
  ``"autograd"``: double backward (reference).
* ``"weighted"``: the paper's Eq. 9 taken literally,
  ``I = (1/B)·Σ_i w_i·∇θT ℓ_i(θS, θT)`` with the exact per-sample influences
  ``w_i = ⟨∇θS ℓ_i, P ⊙ g⟩`` (``fastmeta.influence``, one JVP) held constant and
  ``ℓ_i`` sample i's KD loss (``τ²·KL(pt_i ‖ ps_i)`` for kl; summed over the
  sample's unmasked tokens for token-level outputs).

``ℓ``, ``KD``: the ``kd_loss`` kind of ``LS``.  The teacher's own distillation term
``KD_T`` fits the TEACHER's distribution to the (detached) student's: for kl,
``KD_T = τ²·mean_rows KL(ps ‖ pt)`` -- the official LGTM code computes its
teacher loss with the KD function's student slot filled by the teacher's logits
and its target slot by the detached student's (``KL(p_student ‖ p_teacher)``),
without the ``τ²`` factor (identical at τ = 1; we keep ``kd_loss``'s τ² scaling
so that ``α`` balances the same units as ``kd_weight``).  In general ``KD_T =
kd_loss(T(x), S(x).detach(), τ, kind)`` (roles swapped).  Option ``alpha`` is
the weight of the teacher's CE: the official code's ``alpha_kd_t`` weights
``KD_T`` (``alpha = 1 − alpha_kd_t``).  Default 0.5: an even balance, our choice (we
could not confirm the paper's own default offline; set it explicitly to reproduce
a run).

Costs beyond the engine's meta-gradient: one teacher forward with graph and its
backward (auxiliary loss; ``"weighted"`` shares it; the student's logits come from
the engine's pilot forward), then the fresh teacher forward and student forward/backward of
step 3.  ``StepOutput.teacher_loss`` is the auxiliary loss, ``influences`` the
``w_i`` (computed for every LGTM step: they are the paper's diagnostics and cost
no extra pass).
"""
from __future__ import annotations

import torch

from fastmeta import batching
from fastmeta.algorithms._common import StepContext, check_finite_grads, trainable

HYPERGRADS = ("exact", "finite_diff", "autograd")
NEEDS_QUIZ = True
USES_ENGINE = True  # inner_steps > 1 goes to fastmeta.engine
INFLUENCE_OBJECTIVES = ("mixed", "weighted")


def check_options(ctx: StepContext) -> None:
    ctx.require_teacher_optimizer()
    alpha = float(ctx.option("alpha", 0.5))
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha (weight of the teacher's CE in its auxiliary loss) must lie in [0, 1], got {alpha}")
    objective = ctx.option("influence_objective", "mixed")
    if objective not in INFLUENCE_OBJECTIVES:
        raise ValueError(f"influence_objective must be one of {INFLUENCE_OBJECTIVES}, got {objective!r}")
    ctx.option("compute_influence", True)  # always computed for LGTM
    ctx.settings.update(alpha=alpha, influence_objective=objective)


def run(ctx: StepContext):
    from fastmeta.step import StepOutput

    alpha = ctx.settings["alpha"]
    weighted = ctx.settings["influence_objective"] == "weighted"
    result = ctx.engine_meta_gradient(compute_influence=True)
    influences = result.influences
    if weighted and influences is None:
        raise RuntimeError("the engine returned no influences: influence_objective='weighted' needs them")

    with ctx.phase("teacher_gradient"):
        params = trainable(ctx.teacher)
        labels = ctx.labels()
        mask = labels != batching.IGNORE_INDEX
        # the student's logits on x at θS: the engine's pilot forward (no extra student pass)
        student_logits, _ = batching.align_logits_labels(
            result.student_logits, ctx.batch.labels, shift_labels=ctx.shift_labels, name="student"
        )
        teacher_logits = ctx.teacher_logits(grad=True)
        batching.check_logits_pair(student_logits, teacher_logits)
        batching.check_finite(teacher_logits.detach(), "teacher logits on batch")
        aux = None
        if alpha != 0.0:
            aux = alpha * batching.cross_entropy(teacher_logits, labels, name="batch labels")
        if alpha != 1.0:
            kd_t = (1.0 - alpha) * batching.kd_loss(
                teacher_logits, student_logits.detach(), ctx.temperature, kind=ctx.kd_loss, mask=mask
            ).to(teacher_logits.dtype)
            aux = kd_t if aux is None else aux + kd_t
        batching.check_finite(aux.detach(), "LGTM teacher auxiliary loss")
        objective = aux
        if weighted:
            rows = batching.kd_rows(student_logits.detach(), teacher_logits, ctx.temperature, ctx.kd_loss)
            rows = torch.where(mask, rows, rows.new_zeros(()))
            per_sample = batching.per_sample_sum(rows)
            weighted_term = (influences.detach().to(per_sample.dtype) * per_sample).sum() / per_sample.shape[0]
            objective = objective + weighted_term.to(objective.dtype)
        grads = ctx.grad(objective, [p for _, p in params])
        teacher_grads = {}
        for (name, _), g in zip(params, grads):
            influence_term = None if weighted else result.teacher_grads.get(name)
            if g is None:
                teacher_grads[name] = influence_term
            elif influence_term is None:
                teacher_grads[name] = g
            else:
                teacher_grads[name] = g + influence_term.to(g.dtype)
        check_finite_grads(teacher_grads, "LGTM teacher gradient")

    ctx.apply_teacher(teacher_grads, final=False)
    loss, student_grads = ctx.student_step_gradients()
    ctx.apply_student(student_grads, final=True)
    return StepOutput(
        algorithm="lgtm",
        student_loss=loss,
        quiz_loss=result.quiz_loss.detach(),
        pilot_student_loss=result.student_loss.detach(),
        teacher_loss=aux.detach(),
        influences=None if influences is None else influences.detach(),
        teacher_updated=True,
    )
