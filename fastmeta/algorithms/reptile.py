"""``algorithm="reptile"``: ReptileDistil -- the teacher moved toward the pilot-updated student, layer by layer.

A first-order learning-to-teach step in the spirit of Reptile (Nichol, Achiam,
Schulman 2018: move the meta-parameters toward the task-adapted parameters
instead of differentiating through the adaptation)::

    1. pilot student step   θS' = one student_optimizer step with ∇θS LS(x; θS, θT)
                            (the optimizer's own rule and state, at lr = inner_lr;
                            computed on the live parameters and undone bitwise --
                            no copy of the module; option pilot_optimizer below)
    2. teacher step         for every mapped teacher parameter t with student sources s(t):
                                G_t = θT_t − mean_{s ∈ s(t)} θS'_s
                            θT ← teacher_optimizer step with G
    3. student step         θS ← student_optimizer step with ∇θS LS(x; θS, θT_new)

With plain SGD at learning rate ``ε`` the teacher update is exactly Reptile's
interpolation ``θT ← θT + ε·(θS' − θT)``: the teacher optimizer's learning rate
is the Reptile step size (momentum/Adam turn it into a preconditioned one).
The quiz batch is not used (it may be None); ``quiz_loss`` is None.

Pilot options: ``pilot_optimizer="student"`` (default; an SGD student gives the
paper's Eq. 9) or ``"fresh_adamw"`` -- the official code's pilot, the first step of a
brand-new transformers AdamW at the base lr (:func:`fresh_adamw_step`);
``pilot_max_grad_norm=None`` clips the pilot gradient first (official: 1.0).  The
official step is ``pilot_optimizer="fresh_adamw", pilot_max_grad_norm=1.0,
max_grad_norm=1.0, layer_strategy="skip", temperature=5`` with AdamW optimizers and
the teacher in eval mode (``docs/deviations.md``, ``tests/test_fidelity_reptile.py``).

Which teacher parameter follows which student parameter
--------------------------------------------------------
Layer parameters are recognised by a ``<prefix>.<i>.<rest>`` name whose
``<prefix>`` ends in ``layer``, ``layers``, ``h``, ``block`` or ``blocks``
(HF BERT ``bert.encoder.layer.i.…``, GPT-2 ``transformer.h.i.…``).  With ``L_s``
student and ``L_t`` teacher layers under the same prefix, option
``layer_strategy`` maps student layer ``i`` to teacher layer(s)

* ``"first"`` (default, as the official code; the paper's runs use ``"skip"``,
  which needs ``L_t ≥ 2·L_s``): ``i``     * ``"last"``: ``i + L_t − L_s``
* ``"skip"``:  ``2i + 1``                  * ``"both"``: ``2i`` and ``2i + 1``

and the student parameter ``<prefix>.<i>.<rest>`` to the teacher's
``<prefix>.<j>.<rest>`` (which must exist with the same shape: a ValueError
otherwise).  Non-layer parameters (embeddings, pooler, classifier, final norms),
option ``non_layer``: ``"shared"`` (default) maps a student parameter to the
teacher parameter of the SAME name when it exists, is trainable and has the same
shape (else it is not mapped); ``"none"`` maps none of them.  A user mapping,
option ``layer_mapping={student_name: teacher_name or [teacher_names]}``, replaces
the automatic one entirely.  Teacher parameters that nothing maps to get no
gradient (``.grad = None``) and are not stepped.

``hypergrad``: ``"first_order"`` or ``"exact"`` (the same thing: the rule above is
first order by construction and computed exactly).  ``StepOutput.teacher_loss`` is
``½·Σ_t ‖G_t‖²``.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch

from fastmeta.algorithms._common import (
    StepContext, check_finite_grads, check_max_grad_norm, clipped, simulate_optimizer_step, trainable,
)
from fastmeta.algorithms.output import StepOutput
from fastmeta.functional import preserved_buffers

HYPERGRADS = ("exact", "first_order")
NEEDS_QUIZ = False
STRATEGIES = ("first", "last", "skip", "both")
NON_LAYER = ("shared", "none")
PILOT_OPTIMIZERS = ("student", "fresh_adamw")

_LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layer|layers|h|block|blocks))\.(?P<index>\d+)\.(?P<rest>.+)$")


def _layer_counts(names) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for name in names:
        match = _LAYER_NAME.match(name)
        if match:
            prefix, index = match.group("prefix"), int(match.group("index"))
            counts[prefix] = max(counts.get(prefix, 0), index + 1)
    return counts


def teacher_layers_for(strategy: str, index: int, num_student: int, num_teacher: int) -> List[int]:
    """Teacher layer indices for student layer ``index`` under ``strategy`` (see the module docstring)."""
    if strategy == "first":
        targets = [index]
    elif strategy == "last":
        targets = [index + num_teacher - num_student]
    elif strategy == "skip":
        targets = [2 * index + 1]
    elif strategy == "both":
        targets = [2 * index, 2 * index + 1]
    else:
        raise ValueError(f"layer_strategy must be one of {STRATEGIES}, got {strategy!r}")
    for j in targets:
        if not (0 <= j < num_teacher):
            raise ValueError(
                f"layer_strategy={strategy!r} maps student layer {index} (of {num_student}) to teacher layer {j}, "
                f"but the teacher has {num_teacher} layers"
            )
    return targets


def build_mapping(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    *,
    layer_strategy: str = "first",
    non_layer: str = "shared",
    layer_mapping: Optional[Dict[str, object]] = None,
) -> Dict[str, List[str]]:
    """``{student parameter name: [teacher parameter names]}`` (trainable parameters only)."""
    student_params = dict(trainable(student))
    teacher_params = dict(trainable(teacher))
    mapping: Dict[str, List[str]] = {}
    if layer_mapping is not None:
        for s_name, t_names in layer_mapping.items():
            t_list = [t_names] if isinstance(t_names, str) else list(t_names)
            if s_name not in student_params:
                raise ValueError(f"layer_mapping names {s_name!r}, not a trainable parameter of the student")
            for t_name in t_list:
                if t_name not in teacher_params:
                    raise ValueError(f"layer_mapping maps {s_name!r} to {t_name!r}, not a trainable teacher parameter")
                if teacher_params[t_name].shape != student_params[s_name].shape:
                    raise ValueError(
                        f"layer_mapping maps {s_name!r} {tuple(student_params[s_name].shape)} to {t_name!r} "
                        f"{tuple(teacher_params[t_name].shape)}: shapes differ"
                    )
            mapping[s_name] = t_list
        return mapping
    if non_layer not in NON_LAYER:
        raise ValueError(f"non_layer must be one of {NON_LAYER}, got {non_layer!r}")
    student_counts = _layer_counts(name for name, _ in student.named_parameters())
    teacher_counts = _layer_counts(name for name, _ in teacher.named_parameters())
    for s_name, s_param in student_params.items():
        match = _LAYER_NAME.match(s_name)
        if match:
            prefix, index, rest = match.group("prefix"), int(match.group("index")), match.group("rest")
            if prefix not in teacher_counts:
                raise ValueError(f"student layer parameter {s_name!r} has no teacher layers under {prefix!r}")
            targets = []
            for j in teacher_layers_for(layer_strategy, index, student_counts[prefix], teacher_counts[prefix]):
                t_name = f"{prefix}.{j}.{rest}"
                if t_name not in teacher_params:
                    raise ValueError(f"student parameter {s_name!r} maps to {t_name!r}, not a trainable teacher parameter")
                if teacher_params[t_name].shape != s_param.shape:
                    raise ValueError(
                        f"student parameter {s_name!r} {tuple(s_param.shape)} maps to {t_name!r} "
                        f"{tuple(teacher_params[t_name].shape)}: shapes differ (use layer_mapping=)"
                    )
                targets.append(t_name)
            mapping[s_name] = targets
        elif non_layer == "shared":
            t_param = teacher_params.get(s_name)
            if t_param is not None and t_param.shape == s_param.shape:
                mapping[s_name] = [s_name]
    return mapping


def fresh_adamw_step(
    optimizer: torch.optim.Optimizer,
    params: List[Tuple[str, torch.nn.Parameter]],
    grads: Dict[str, Optional[torch.Tensor]],
    lr: Optional[float] = None,
) -> Dict[str, torch.Tensor]:
    """``θ'`` of the FIRST step of a brand-new AdamW (zero state), the official ReptileDistil pilot.

    transformers' ``AdamW`` (``correct_bias=True``) as the official code builds it every
    step (``run_glue_with_reptile.py:198-209,259``), written out for its first step::

        m = (1−β1)·g,  s = (1−β2)·g²,  θ' = θ − lr·sqrt(1−β2)/(1−β1) · m/(sqrt(s) + eps),
        then θ' ← θ' − lr·λ·θ'                     (decoupled decay, applied after the step)

    ≈ ``θ − lr·sign(g)``.  Per parameter group of the student optimizer: ``lr`` = ``lr``
    argument (inner_lr), else the group's base lr (``initial_lr``, set by a torch LR
    scheduler, else ``lr``: a fresh linear schedule without warm-up starts at the base
    lr); ``betas``/``eps`` = the group's (default (0.9, 0.999) / 1e-8); ``λ`` = the
    group's ``weight_decay`` for an AdamW student, else 0.  Nothing is written.
    """
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    decoupled = isinstance(optimizer, torch.optim.AdamW)
    pilot = {}
    with torch.no_grad():
        for name, p in params:
            g = grads.get(name)
            group = group_of.get(id(p))
            if g is None or group is None:
                continue
            step_lr = float(lr if lr is not None else group.get("initial_lr", group["lr"]))
            beta1, beta2 = (float(b) for b in group.get("betas", (0.9, 0.999)))
            eps = float(group.get("eps", 1e-8))
            g = g.to(p.dtype)
            exp_avg = (1.0 - beta1) * g
            denom = ((1.0 - beta2) * g * g).sqrt() + eps
            step_size = step_lr * math.sqrt(1.0 - beta2) / (1.0 - beta1)
            new = p.detach() - step_size * exp_avg / denom
            decay = float(group.get("weight_decay", 0.0)) if decoupled else 0.0
            if decay > 0.0:
                new = new - step_lr * decay * new
            pilot[name] = new
    return pilot


def check_options(ctx: StepContext) -> None:
    ctx.require_teacher_optimizer()
    pilot_optimizer = ctx.option("pilot_optimizer", "student")
    if pilot_optimizer not in PILOT_OPTIMIZERS:
        raise ValueError(f"pilot_optimizer must be one of {PILOT_OPTIMIZERS}, got {pilot_optimizer!r}")
    ctx.settings["pilot_optimizer"] = pilot_optimizer
    ctx.settings["pilot_max_grad_norm"] = check_max_grad_norm("pilot_max_grad_norm", ctx.option("pilot_max_grad_norm", None))
    strategy = ctx.option("layer_strategy", "first")
    if strategy not in STRATEGIES:
        raise ValueError(f"layer_strategy must be one of {STRATEGIES}, got {strategy!r}")
    non_layer = ctx.option("non_layer", "shared")
    if non_layer not in NON_LAYER:
        raise ValueError(f"non_layer must be one of {NON_LAYER}, got {non_layer!r}")
    layer_mapping = ctx.option("layer_mapping", None)
    ctx.settings["mapping"] = build_mapping(
        ctx.teacher, ctx.student, layer_strategy=strategy, non_layer=non_layer, layer_mapping=layer_mapping
    )
    if not ctx.settings["mapping"]:
        raise ValueError("reptile: no student parameter maps to a teacher parameter (pass layer_mapping=)")


def run(ctx: StepContext):
    mapping = ctx.settings["mapping"]
    # 1. pilot step (its forwards leave the buffers as they were: the real step below is the training forward)
    with preserved_buffers(ctx.teacher, ctx.student):
        pilot_loss, pilot_grads = ctx.student_step_gradients(phase="pilot")
    with ctx.phase("pilot.update"):
        params, clip = trainable(ctx.student), ctx.settings["pilot_max_grad_norm"]
        if ctx.settings["pilot_optimizer"] == "fresh_adamw":
            if clip is not None:
                pilot_grads = clipped(pilot_grads, clip)
            pilot = fresh_adamw_step(ctx.student_optimizer, params, pilot_grads, lr=ctx.inner_lr)
        else:
            pilot = simulate_optimizer_step(ctx.student_optimizer, params, pilot_grads, lr=ctx.inner_lr, max_grad_norm=clip)
    # 2. teacher gradient θT − mean θS'
    with ctx.phase("teacher_gradient"), torch.no_grad():
        sources: Dict[str, List[str]] = defaultdict(list)
        for s_name, t_names in mapping.items():
            if s_name in pilot:
                for t_name in t_names:
                    sources[t_name].append(s_name)
        teacher_grads = {}
        for t_name, t_param in trainable(ctx.teacher):
            names = sources.get(t_name)
            if not names:
                teacher_grads[t_name] = None
                continue
            target = pilot[names[0]].to(t_param.dtype)
            for s_name in names[1:]:
                target = target + pilot[s_name].to(t_param.dtype)
            if len(names) > 1:
                target = target / len(names)
            teacher_grads[t_name] = t_param.detach() - target
        check_finite_grads(teacher_grads, "reptile teacher gradient")
        teacher_loss = 0.5 * sum(g.double().square().sum() for g in teacher_grads.values() if g is not None)
    ctx.apply_teacher(teacher_grads, final=False)
    # 3. the real student step with the updated teacher
    loss, student_grads = ctx.student_step_gradients()
    ctx.apply_student(student_grads, final=True)
    return StepOutput(
        algorithm="reptile",
        student_loss=loss,
        pilot_student_loss=pilot_loss,
        teacher_loss=torch.as_tensor(teacher_loss).detach(),
        teacher_updated=True,
    )
