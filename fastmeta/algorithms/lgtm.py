"""``algorithm="lgtm"``: LGTM (Ren, Zhong, Shi, Zhu, Yuan, Li: "Tailoring Instructions to
Student's Learning Levels Boosts Knowledge Distillation", ACL 2023), Algorithm 1, teacher first.

One step on a training batch ``x`` (size B) and a quiz (validation) batch ``xq``::

    1. pilot student step   θS' = the student optimizer's next step from θS on LS(x; θS, θT),
                            g = ∇θS' CE(yq, S(xq; θS'))
    2. teacher gradient     G = ∇θT L_aux + I,   L_aux = α·CE(y, T(x; θT)) + (1 − α)·KD_T
       teacher step         θT ← teacher_optimizer step with G
    3. student step         θS ← student_optimizer step with ∇θS LS(x; θS, θT_new)

``KD_T`` fits the TEACHER's distribution to the (detached) student's: the ``kd_loss``
kind with the roles swapped, for kl ``τ²·mean_rows KL(ps ‖ pt)`` (the official code:
the same KL without ``τ²``, identical at its τ = 1).  ``alpha`` (default 0.6, the
paper's App. D/E.2 value) weights the teacher's CE; the official ``t_alpha_kd = 0.4``
is ``1 − α``.  The distillation influence ``I`` (option ``influence_objective``):

* ``"mixed"`` (default): ``I = ∇θT LQ(θS'(θT)) = −η·w·∇θT Σ_i ⟨∇θS ℓ_i/B, P ⊙ g⟩``,
  the exact meta-gradient that the paper's finite difference (Eq. 10/18) estimates,
  scaled as the meta-gradient it is.  ``hypergrad``: ``"exact"`` (one JVP, one teacher
  backward), ``"finite_diff"`` (central differences along ``P ⊙ g``, ``ε = 0.01/‖P ⊙ g‖``),
  ``"autograd"`` (double backward).  ``inner_steps > 1`` needs no influences
  (``compute_influence`` then defaults to False).
* ``"weighted"``: Eq. 9 with the official code's sign, ``I = −(1/B)·Σ_i w_i·∇θT ℓ_i``
  with the exact influences ``w_i = ⟨∇θS ℓ_i, P ⊙ g⟩`` held constant (the paper prints
  ``+``, which moves the teacher UP the quiz loss).
* ``"official"``: the official code's teacher gradient (``utils_glue.py:59-201``),
  ``G = ∇θT L_aux − μ_T·h`` with ``μ_T`` the teacher optimizer's current lr (param
  group 0), the raw ``v = g`` (not preconditioned), and
  ``h = [∇θT L_T(θS + εv) − ∇θT L_T(θS − εv)]/2ε``, ``ε = 0.01/‖v‖``, both models in
  eval mode (the caller's modes are put back afterwards), ``L_T = L_aux``: the
  difference keeps ``(1 − α)·∇θT⟨∇θS KD_T, v⟩`` (``fastmeta.mixed_hvp``, finite
  difference; the student's parameters are restored bitwise).
* ``"official_exact"``: the same with ``h`` exact, ``(1 − α)·∇θT⟨∇θS KD_T, v⟩`` by
  one JVP and one teacher backward (``fastmeta.mixed_hvp``, ``method="exact"``).
  Both official objectives take one pilot step and ``hypergrad="exact"`` (their
  mixed product is fixed by the name).

``ℓ``: the ``kd_loss`` kind of ``LS`` (per sample, summed over its unmasked tokens).
Option ``compute_influence`` (default: True when ``inner_steps == 1``) also returns the
``w_i``; ``"weighted"`` needs them.  ``StepOutput.teacher_loss`` is ``L_aux``.

With ``"mixed"``, ``L_aux`` is taken on the teacher logits of the engine's forward (those
the student distils from, as the official code's one ``t_logits`` per step serves both
losses), and its gradient on them joins the meta-gradient's cotangent in ONE teacher
backward (``Options.teacher_loss``): a step runs the teacher forward twice (that one,
and the real student step's) and backward once.  ``"weighted"`` does the same with its
whole objective ``L_aux − (1/B)·Σ w_i·ℓ_i`` (built from the engine's influences) and no
meta term.  The official objectives take a teacher forward and backward of their own
for ``L_aux`` (their ``h`` runs in eval mode).
Deviations from the paper and the official code: ``docs/deviations.md``.
"""
from __future__ import annotations

import torch

from fastmeta import batching, losses
from fastmeta.algorithms._common import (
    StepContext, check_finite_grads, check_flag, check_number, eval_mode, trainable,
)
from fastmeta.algorithms.output import StepOutput
from fastmeta.functional import preserved_buffers
from fastmeta.hessian import LogitLoss, mixed_hvp_unchecked

HYPERGRADS = ("exact", "finite_diff", "autograd")
NEEDS_QUIZ = True
USES_ENGINE = True  # inner_steps > 1 goes to fastmeta.engine
INFLUENCE_OBJECTIVES = ("mixed", "weighted", "official", "official_exact")
OFFICIAL = ("official", "official_exact")
# KD_T(zt; zs) = kd_loss(zt, zs, kind) is kd_loss(zs, zt, kind') with the student first
_ROLES_SWAPPED = {"kl": "reverse_kl", "reverse_kl": "kl"}


def check_options(ctx: StepContext) -> None:
    ctx.require_teacher_optimizer()
    alpha = check_number("alpha (weight of the teacher's CE in its auxiliary loss)", ctx.option("alpha", 0.6), low=0.0, high=1.0)
    objective = ctx.option("influence_objective", "mixed")
    if objective not in INFLUENCE_OBJECTIVES:
        raise ValueError(f"influence_objective must be one of {INFLUENCE_OBJECTIVES}, got {objective!r}")
    compute = ctx.option("compute_influence", None)
    one_step = ctx.inner_steps == 1
    if compute is None:
        compute = one_step
    compute = check_flag("compute_influence", compute)
    if not one_step and (compute or objective != "mixed"):
        what = "compute_influence=True" if objective == "mixed" else f"influence_objective={objective!r}"
        raise ValueError(
            f"lgtm with inner_steps={ctx.inner_steps}: {what} needs inner_steps=1 (LGTM's influences and the official "
            "teacher update are defined for one pilot step); inner_steps > 1 works with influence_objective='mixed' "
            "and compute_influence=False"
        )
    if objective == "weighted" and not compute:
        raise ValueError("influence_objective='weighted' is built from the influences: it needs compute_influence=True")
    if objective in OFFICIAL and ctx.hypergrad != "exact":
        raise ValueError(
            f"influence_objective={objective!r} fixes how its mixed product is computed ('official': the official "
            f"code's central difference, 'official_exact': exact); leave hypergrad at 'exact' (got {ctx.hypergrad!r})"
        )
    ctx.settings.update(alpha=alpha, influence_objective=objective, compute_influence=compute)


def _official_mixed_product(ctx: StepContext, v, exact: bool):
    """``∇θT⟨∇θS KD_T(θS, θT), v⟩`` at the current student, teacher and student in eval mode."""
    mask = ctx.labels() != batching.IGNORE_INDEX
    if ctx.shift_labels:  # KD_T over the raw logits: the last position predicts nothing
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], 1)], dim=1)
    loss = LogitLoss.kd(_ROLES_SWAPPED.get(ctx.kd_loss, ctx.kd_loss), ctx.temperature, mask=mask)
    with eval_mode(ctx.teacher, ctx.student):  # trusted arguments; a non-finite h fails run's gradient check
        return mixed_hvp_unchecked(
            ctx.teacher, ctx.student, ctx.batch, ctx.batch, dict(v), loss,
            method="exact" if exact else "finite_diff", restore="exact",
        )


def _auxiliary_loss(ctx: StepContext, alpha: float):
    """``L_aux(zt, zs) = α·CE(y, zt) + (1 − α)·KD_T(zt; zs)`` on the training batch (``zs`` detached)."""
    labels = ctx.labels()
    mask = labels != batching.IGNORE_INDEX

    def loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, influences=None) -> torch.Tensor:
        batching.check_logits_pair(student_logits, teacher_logits)
        aux = None
        if alpha != 0.0:
            aux = alpha * batching.cross_entropy(teacher_logits, labels, name="batch labels")
        if alpha != 1.0:
            kd_t = (1.0 - alpha) * losses.kd_loss_unchecked(
                teacher_logits, student_logits.detach(), ctx.temperature, ctx.kd_loss, mask=mask
            )
            aux = kd_t if aux is None else aux + kd_t
        batching.check_finite(aux.detach(), "LGTM teacher auxiliary loss")
        return aux

    return loss


def _weighted_objective(ctx: StepContext, aux_loss, reported: dict):
    """``L_aux − (1/B)·Σ_i w_i·ℓ_i(zs, zt)`` with the influences ``w_i`` held constant (their gradient on the
    teacher is Eq. 9's influence term, with the official code's sign), as its two parts;
    ``reported["aux"]``: ``L_aux``."""
    mask = ctx.labels() != batching.IGNORE_INDEX

    def loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, influences) -> torch.Tensor:
        aux = aux_loss(teacher_logits, student_logits)
        reported["aux"] = aux.detach()
        rows = losses.kd_rows(student_logits.detach(), teacher_logits, ctx.temperature, ctx.kd_loss)
        rows = torch.where(mask, rows, rows.new_zeros(()))
        per_sample = batching.per_sample_sum(rows)
        weighted_term = (influences.to(per_sample.dtype) * per_sample).sum() / per_sample.shape[0]
        # two parts (their sum is the objective): under fp16/bf16 each takes a teacher backward of its own, the
        # weighted term being far smaller than L_aux's; the minus sign descends the quiz loss
        return aux, -weighted_term.to(aux.dtype)

    return loss


def run(ctx: StepContext):
    alpha = ctx.settings["alpha"]
    objective = ctx.settings["influence_objective"]
    official = objective in OFFICIAL
    aux_loss = _auxiliary_loss(ctx, alpha)
    reported = {}
    # "mixed" and "weighted": the engine differentiates the teacher's objective on the logits of its own
    # teacher forward (those the student distils from, hence their dropout masks: the official code's one
    # t_logits per step) and adds it to the meta-gradient's cotangent, ONE teacher forward and backward for both
    if objective == "mixed":  # G = ∇θT L_aux + ∇θT LQ(θS'(θT))
        extra = {"teacher_loss": aux_loss}
    elif objective == "weighted":  # G = ∇θT [L_aux − (1/B)·Σ w_i·ℓ_i]: the meta term's weight is 0
        extra = {"teacher_loss": _weighted_objective(ctx, aux_loss, reported), "meta_weight": 0.0}
    else:  # official: h needs v alone, and its own passes in eval mode (below)
        extra = {"keep_quiz_grads": True, "compute_teacher_grads": False}
    result = ctx.engine_meta_gradient(compute_influence=ctx.settings["compute_influence"], **extra)
    influences = result.influences

    if official:
        # its own teacher forward leaves the teacher's buffers (BatchNorm statistics) as the step found them
        with ctx.phase("teacher_gradient"), preserved_buffers(ctx.teacher):
            teacher_grads, aux = _official_teacher_gradient(ctx, result, aux_loss, objective)
    else:
        teacher_grads, aux = result.teacher_grads, reported.get("aux", result.teacher_loss)

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


def _official_teacher_gradient(ctx: StepContext, result, aux_loss, objective: str):
    """``(G, L_aux)`` for the official objectives: ``G = ∇θT L_aux − μ_T·(1 − α)·h``, a teacher forward and
    backward of their own (``h`` by :func:`_official_mixed_product`)."""
    params = trainable(ctx.teacher)
    # the student's logits on x at θS: the engine's pilot forward (no extra student pass)
    student_logits, _ = batching.align_logits_labels(
        result.student_logits, ctx.batch.labels, shift_labels=ctx.shift_labels, name="student"
    )
    teacher_logits = ctx.teacher_logits(grad=True)
    batching.check_finite(teacher_logits.detach(), "teacher logits on batch")
    aux = aux_loss(teacher_logits, student_logits)
    grads = ctx.grad(aux, [p for _, p in params])
    alpha = ctx.settings["alpha"]
    h = _official_mixed_product(ctx, result.quiz_grads, exact=objective == "official_exact")
    factor = -float(ctx.teacher_optimizer.param_groups[0]["lr"]) * (1.0 - alpha)
    influence = {name: factor * value for name, value in h.items()}
    teacher_grads = {}
    for (name, _), g in zip(params, grads):
        term = influence.get(name)
        if g is None:
            teacher_grads[name] = term
        elif term is None:
            teacher_grads[name] = g
        else:
            teacher_grads[name] = g + term.to(g.dtype)
    check_finite_grads(teacher_grads, "LGTM teacher gradient")
    return teacher_grads, aux
