"""``algorithm="metadistil"``: MetaDistil (Zhou, Xu, McAuley: "BERT Learns to Teach:
Knowledge Distillation with Meta Learning", ACL 2022), Algorithm 1 with the pilot update.

One step on a training batch ``x`` and a quiz batch ``xq``::

    1. pilot (experimental) student step    θS' = U(θS, ∇θS LS(x; θS, θT))  (the student optimizer's update)
    2. quiz loss                            LQ  = CE(yq, S(xq; θS'))
    3. teacher meta-update                  θT ← teacher_optimizer step with ∇θT LQ(θS'(θT))
    4. real student step, same batch x      θS ← student_optimizer step with ∇θS LS(x; θS, θT_new)

Steps 1-3 are ``fastmeta.engine.meta_gradient`` (functional: the student is never
copied -- the official code deep-copies it every step -- and with
``hypergrad="exact"`` no double backward is built; ``"autograd"`` is the
double-backward reference, ``"finite_diff"`` the in-place central differences).
The exact meta-gradient (``docs/meta-gradient.md``) is

    ∇θT LQ = −η·w·∇θT ⟨∇θS KD(θS, θT), D ⊙ v⟩ = J_Tᵀ c,   v = ∇θS' LQ,

(``η·D`` the Jacobian of the update: plain SGD ``D = 1``, the paper's Eq. 2)

one student JVP plus one teacher backward.  Step 4 cannot reuse the pilot's
student gradient: the teacher changed in step 3, so it costs one fresh teacher
forward (no graph) and one student forward/backward; nothing else is recomputed.

Atomicity: the teacher update (3) is applied with a snapshot; a failure in (4)
(e.g. the updated teacher produces non-finite logits) restores both models and
optimizers (see ``fastmeta.step``).

Option: ``compute_influence=False`` (also return LGTM's per-sample influences).
The official code's step (``docs/deviations.md``): ``kd_loss="softmax_mse"``,
``pilot="sgd", inner_lr=5e-5`` (its look-ahead), ``max_grad_norm=1.0``, the teacher in
eval mode, the whole held set as ``quiz_batch`` (``tests/test_fidelity_metadistil.py``).
"""
from __future__ import annotations

from fastmeta.algorithms._common import StepContext, check_flag
from fastmeta.algorithms.output import StepOutput

HYPERGRADS = ("exact", "finite_diff", "autograd")
NEEDS_QUIZ = True
USES_ENGINE = True  # inner_steps > 1 goes to fastmeta.engine


def check_options(ctx: StepContext) -> None:
    ctx.require_teacher_optimizer()
    ctx.settings["compute_influence"] = check_flag("compute_influence", ctx.option("compute_influence", False))


def run(ctx: StepContext):
    result = ctx.engine_meta_gradient(compute_influence=ctx.settings["compute_influence"])
    ctx.apply_teacher(result.teacher_grads, final=False)
    loss, student_grads = ctx.student_step_gradients()
    ctx.apply_student(student_grads, final=True)
    return StepOutput(
        algorithm="metadistil",
        student_loss=loss,
        quiz_loss=result.quiz_loss.detach(),
        pilot_student_loss=result.student_loss.detach(),
        influences=None if result.influences is None else result.influences.detach(),
        teacher_updated=True,
    )
