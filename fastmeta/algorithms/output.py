""":class:`StepOutput`: what one ``fastmeta.meta_step`` did (the algorithms' result type).

Defined in the algorithms layer, which builds it; ``fastmeta.step`` and ``fastmeta``
re-export it (``fastmeta.StepOutput``, ``fastmeta.step.StepOutput``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

__all__ = ["StepOutput"]


@dataclass
class StepOutput:
    """What one :func:`fastmeta.meta_step` did.  Every tensor is detached.

    Attributes:
        algorithm: the algorithm that ran.
        student_loss: ``LS`` of the student step that was applied, evaluated at the
            student's parameters before the step and with the teacher whose logits
            that step used (metadistil/lgtm/reptile: the UPDATED teacher; kd/ikd: the
            current one, ikd's student step being its course step).
        quiz_loss: ``LQ = CE(yq, S(xq; θS'))`` after the pilot (course) step (ikd with
            ``"first_order"``: at the current student, Eq. 14); None for kd and reptile
            (which read no quiz batch).
        pilot_student_loss: ``LS`` at the pre-step student with the pre-update teacher
            (the loss of the pilot/course step); None for kd.
        teacher_loss: the teacher's own objective where the algorithm has one: lgtm's
            auxiliary ``α·CE(y, T(x)) + (1 − α)·KD_T``, kd's ``CE(y, T(x))`` with
            ``teacher_ce=True``, reptile's ``½‖θT − θS'‖²`` over the mapped parameters,
            ikd's ``γ·LQ + (1 − γ)·CE(y, T(x))`` (Eq. 10); else None.
        influences: LGTM's per-sample distillation influences ``w_i`` ``[batch size]``
            where computed (lgtm; any algorithm with ``compute_influence=True`` that
            calls the engine), else None.
        teacher_updated: whether the teacher optimizer stepped.
        timings: wall-clock seconds per phase; an algorithm reports the phases it has:
            ``"validate"``; ``"meta_gradient"`` (the engine call) with the engine's own
            ``"meta_gradient.<phase>"`` (teacher_forward, student_forward_backward,
            pilot_update, quiz_forward_backward, student_jvp, teacher_backward, total);
            ``"pilot.teacher_forward"``, ``"pilot.forward_backward"``, ``"pilot.update"``
            (reptile); ``"teacher_gradient"`` (work beyond the engine: LGTM's official
            objectives' own teacher pass and mixed product, Reptile's differences, kd's
            teacher CE; LGTM's mixed and weighted objectives and IKD's teacher CE ride on
            the engine's ``teacher_backward``);
            ``"teacher_update"`` / ``"student_update"`` (optimizer steps, snapshot
            included); ``"student_step.teacher_forward"`` and
            ``"student_step.forward_backward"`` (the real student step); ``"total"``.
            CUDA is synchronised around each phase.
        tangent_precision: how the engine computed the student tangent (its
            ``MetaGradient.tangent_precision``: ``"default"``, ``"fp32 (autocast off)"``
            or ``"autocast bfloat16"``/``"autocast float16"``); None when the
            algorithm did not call the engine.
    """

    algorithm: str
    student_loss: torch.Tensor
    quiz_loss: Optional[torch.Tensor] = None
    pilot_student_loss: Optional[torch.Tensor] = None
    teacher_loss: Optional[torch.Tensor] = None
    influences: Optional[torch.Tensor] = None
    teacher_updated: bool = False
    timings: Dict[str, float] = field(default_factory=dict)
    tangent_precision: Optional[str] = None
