"""Batches, logits and the student/teacher losses the meta-gradient engine differentiates.

A *batch* is either

* a ``Mapping`` with a ``"labels"`` entry; every other entry is a keyword argument
  of the model (the HuggingFace convention: ``input_ids``, ``attention_mask``, ...), or
* a tuple ``(inputs, labels)`` where ``inputs`` is a Tensor (one positional argument),
  a Mapping (keyword arguments) or a tuple/list (positional arguments).

``labels`` are class ids ``[B]`` (one row per sample; logits ``[B, C]``) or token ids
``[B, L]`` (one row per token; logits ``[B, L, V]``) where ``-100`` marks a token
that counts in neither the cross-entropy nor the distillation loss.  With
``shift_labels=True`` (causal language models, HuggingFace convention: labels =
input_ids) the prediction at position ``t`` is scored against the label at
``t + 1``: ``logits[:, :-1]`` against ``labels[:, 1:]``.  ``shift_labels="auto"``
(see :func:`resolve_shift_labels`) shifts exactly when a model is a HuggingFace
causal LM, as HF's own loss does.

A model returns its logits, or an object with a ``.logits`` attribute (HF
``ModelOutput``), or a Mapping with a ``"logits"`` key.

Losses (``rows`` = the counted rows, ``mask = labels != -100`` after alignment)::

    CE(y, z)  = (1/|rows|) Σ_{r ∈ rows} −log softmax(z_r)[y_r]
    KD(zs,zt) = (1/|rows|) Σ_{r ∈ rows} ℓ(zs_r, zt_r)     (fastmeta.kd_loss, batchmean, mask)
    LS        = (1 − w)·CE(y, zs) + w·KD(zs, zt)

with the per-row ``ℓ`` of ``fastmeta.losses`` (``kl``: ``τ²·KL(pt ‖ ps)``; see
:func:`kd_rows`).  KD itself lives in ``fastmeta.losses`` (its one home): this
module's ``kd_rows``, ``kd_loss``, ``kd_teacher_cotangent``, ``kd_influence``,
``check_temperature`` are those functions under their historical names, and
:func:`student_loss` calls the trusted ``fastmeta.losses.kd_loss_unchecked``.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastmeta import losses
from fastmeta._walks import named_buffers, named_parameters
from fastmeta._validation import check_number

IGNORE_INDEX = -100
KD_KINDS = losses.KINDS

__all__ = [
    "IGNORE_INDEX",
    "KD_KINDS",
    "SplitBatch",
    "split_batch",
    "extract_logits",
    "model_logits",
    "align_logits_labels",
    "is_causal_lm",
    "resolve_shift_labels",
    "cross_entropy",
    "kd_rows",
    "kd_loss",
    "kd_teacher_cotangent",
    "kd_influence",
    "student_loss",
    "per_sample_sum",
    "check_temperature",
    "check_kd_weight",
    "check_kd_kind",
    "check_logits_pair",
    "check_finite",
    "check_all_finite",
    "check_same_device",
    "module_device",
]


# --------------------------------------------------------------------------- batches
@dataclass
class SplitBatch:
    """A batch taken apart: the model's call arguments and the labels.

    ``args``/``kwargs`` are passed as ``model(*args, **kwargs)``; ``labels`` is the
    label tensor; ``size`` the batch size (first dimension of ``labels``).
    """

    args: tuple
    kwargs: dict
    labels: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def tensors(self):
        """Every tensor among the inputs and the labels (for device checks)."""
        yield self.labels
        for value in list(self.args) + list(self.kwargs.values()):
            if isinstance(value, torch.Tensor):
                yield value


def split_batch(batch: Any, *, name: str = "batch") -> SplitBatch:
    """Split ``batch`` (Mapping with ``"labels"`` or ``(inputs, labels)``) into a :class:`SplitBatch`.

    Raises ``ValueError`` naming ``name`` when the labels are missing, are not an
    integer tensor, or the batch is empty.
    """
    if isinstance(batch, SplitBatch):
        split = batch
    elif isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError(
                f"{name} has no 'labels' entry (keys: {sorted(map(str, batch.keys()))}); a batch is a "
                "Mapping with 'labels' plus the model's keyword arguments, or an (inputs, labels) tuple"
            )
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        split = SplitBatch((), kwargs, batch["labels"])
    elif isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(
                f"{name} as a sequence must be (inputs, labels), got a {type(batch).__name__} of length {len(batch)}"
            )
        inputs, labels = batch
        if isinstance(inputs, Mapping):
            split = SplitBatch((), dict(inputs), labels)
        elif isinstance(inputs, (tuple, list)):
            split = SplitBatch(tuple(inputs), {}, labels)
        else:
            split = SplitBatch((inputs,), {}, labels)
    else:
        raise TypeError(
            f"{name} must be a Mapping with 'labels' or an (inputs, labels) tuple, got {type(batch).__name__}"
        )
    labels = split.labels
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"{name} labels must be integer class/token ids (dtype {labels.dtype} given); "
            "regression targets are not supported by the cross-entropy quiz loss"
        )
    if labels.dim() == 0:
        raise ValueError(f"{name} labels must have a batch dimension, got a 0-d tensor")
    if labels.shape[0] == 0 or labels.numel() == 0:
        raise ValueError(f"{name} is empty (labels of shape {tuple(labels.shape)})")
    return split


def extract_logits(output: Any, *, name: str = "model") -> torch.Tensor:
    """The logits of a model output: a Tensor, an object with ``.logits``, or a Mapping with ``"logits"``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"{name} must return logits (a Tensor) or an object with a .logits Tensor, got {type(output).__name__}"
        )
    return logits


def model_logits(model: Callable, split: SplitBatch, *, name: str = "model") -> torch.Tensor:
    """``model(*split.args, **split.kwargs)`` reduced to its logits."""
    return extract_logits(model(*split.args, **split.kwargs), name=name)


def align_logits_labels(
    logits: torch.Tensor, labels: torch.Tensor, *, shift_labels: bool = False, name: str = "model"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align logits with labels row by row; returns ``(logits [..., V], labels [...])``.

    ``[B, C]`` with ``[B]`` (classification), ``[B, L, V]`` with ``[B, L]``
    (token level).  ``shift_labels=True`` returns ``(logits[:, :-1], labels[:, 1:])``.
    Shapes are checked; the result is a view (no copy).
    """
    if shift_labels:
        if labels.dim() < 2 or logits.dim() < 3:
            raise ValueError(
                f"shift_labels=True needs token-level {name} logits [B, L, V] and labels [B, L]; "
                f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
            )
        logits = logits[:, :-1]
        labels = labels[:, 1:]
    if logits.dim() != labels.dim() + 1 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"{name} logits of shape {tuple(logits.shape)} do not match labels of shape {tuple(labels.shape)}: "
            "expected logits [..., V] with labels [...] (e.g. [B, C] with [B], or [B, L, V] with [B, L])"
            + ("" if shift_labels else "; for a causal LM pass shift_labels=True")
        )
    if logits.shape[-1] < 1:
        raise ValueError(f"{name} logits have an empty class dimension: {tuple(logits.shape)}")
    if labels.numel() == 0:
        raise ValueError(f"no rows left after aligning {name} logits with labels (sequence length 1 with shift_labels?)")
    return logits, labels


def _unwrap(model: Any) -> Any:
    """The module inside DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, torch.nn.Module) and type(model).__name__ in (
            "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"
        ):
            inner = getattr(model, "module", None)
        if inner is None:
            return model
        model = inner
    return model


def is_causal_lm(model: Any) -> bool:
    """True when ``model`` (unwrapped from DDP/DataParallel/FSDP/``torch.compile``) is a HuggingFace causal LM.

    Rule: its class name ends with ``"ForCausalLM"`` (every HF causal-LM class but a
    few, and PEFT's ``PeftModelForCausalLM``), or it is one of the causal-LM classes
    transformers registers for ``AutoModelForCausalLM`` (``GPT2LMHeadModel``,
    ``BertLMHeadModel``, ...; looked up only when transformers is already imported).
    Sequence classifiers, masked LMs and encoder-decoders (whose labels are not
    shifted by the user) are not causal LMs.
    """
    name = type(_unwrap(model)).__name__
    if name.endswith("ForCausalLM"):
        return True
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - a transformers without the auto mapping
        return False
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        if name == value or (isinstance(value, (tuple, list)) and name in value):
            return True
    return False


def resolve_shift_labels(shift_labels: Any, *models: Any) -> bool:
    """``shift_labels`` as a bool: True/False as given; ``"auto"``: True when a model is an HF causal LM.

    ``"auto"`` follows HuggingFace: a causal LM given ``labels`` (= ``input_ids``) scores
    position ``t`` against token ``t + 1``, so fastmeta shifts when :func:`is_causal_lm`
    holds for any of ``models`` (the teacher and the student), else not.  Anything but
    True, False or ``"auto"`` is a ``TypeError``/``ValueError`` naming ``shift_labels``.
    """
    if isinstance(shift_labels, bool):
        return shift_labels
    if isinstance(shift_labels, str):
        if shift_labels == "auto":
            return any(is_causal_lm(model) for model in models)
        raise ValueError(f"shift_labels must be True, False or 'auto', got {shift_labels!r}")
    raise TypeError(f"shift_labels must be True, False or 'auto', got {type(shift_labels).__name__}")


def row_mask(labels: torch.Tensor) -> torch.Tensor:
    """``labels != -100``: the rows that count in CE and KD."""
    return labels != IGNORE_INDEX


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, name: str = "labels") -> torch.Tensor:
    """Mean cross-entropy over the rows whose label is not -100 (aligned logits/labels).

    Raises ``ValueError`` when every row is ignored or a label is out of range.
    """
    flat_labels = labels.reshape(-1)
    num_classes = logits.shape[-1]
    counted = flat_labels != IGNORE_INDEX
    outside = counted & ((flat_labels < 0) | (flat_labels >= num_classes))
    # both checks in ONE host synchronisation (no boolean indexing on the way: it would sync as well)
    any_counted, any_outside = torch.stack([counted.any(), outside.any()]).tolist()
    if not any_counted:
        raise ValueError(f"every row of {name} is -100 (ignored): the loss would be a mean over zero rows")
    if any_outside:
        counted_labels = flat_labels[counted]
        raise ValueError(
            f"{name} contain ids outside [0, {num_classes}) (other than -100); "
            f"min {int(counted_labels.min())}, max {int(counted_labels.max())}"
        )
    return F.cross_entropy(logits.reshape(-1, num_classes), flat_labels, ignore_index=IGNORE_INDEX, reduction="mean")


# --------------------------------------------------------------------------- KD losses (fastmeta.losses)
kd_rows = losses.kd_rows  # per-row ℓ, plain PyTorch (any order of differentiation)
kd_loss = losses.kd_loss  # checked; batchmean over ``mask`` by default
kd_teacher_cotangent = losses.kd_teacher_cotangent  # checked closed form, batchmean by default
kd_influence = losses.kd_influence  # checked, per row


def per_sample_sum(rows: torch.Tensor) -> torch.Tensor:
    """Sum of per-row values over every dimension but the first: ``[B, ...] -> [B]``."""
    return rows.reshape(rows.shape[0], -1).sum(-1) if rows.dim() > 1 else rows


def student_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    kd_weight: float,
    kind: str,
    higher_order: bool = False,
) -> torch.Tensor:
    """``LS = (1 − w)·CE(y, zs) + w·KD(zs, zt)`` on aligned logits/labels; KD mask = ``labels != -100``.

    Arguments are trusted (``meta_step`` and the engine's public functions check
    ``temperature``, ``kd_weight`` and ``kind`` once; the logits come aligned and paired):
    KD is ``fastmeta.losses.kd_loss_unchecked``.  A term whose weight is exactly 0 is not
    evaluated (so ``kd_weight=1`` needs no valid class ids and ``kd_weight=0`` no
    teacher).  ``higher_order=True`` uses the plain-PyTorch twin (differentiable any
    number of times, forward mode included) instead of the fused kernel (first order).
    """
    mask = row_mask(labels)
    loss = None
    if kd_weight != 1.0:
        loss = (1.0 - kd_weight) * cross_entropy(student_logits, labels)
    if kd_weight != 0.0:
        if kd_weight == 1.0 and not bool(mask.any()):  # else cross_entropy reported it
            raise ValueError("every row of the batch labels is -100 (ignored): the KD loss would be a mean over zero rows")
        kd = kd_weight * losses.kd_loss_unchecked(student_logits, teacher_logits, temperature, kind, mask=mask,
                                                  higher_order=higher_order)
        loss = kd if loss is None else loss + kd
    return loss


# --------------------------------------------------------------------------- validation
check_temperature = losses.check_temperature  # the one temperature check (finite number > 0)


def check_kd_weight(kd_weight: float) -> float:
    """``kd_weight`` must be a number in [0, 1] (``TypeError`` for a bool or a string)."""
    return check_number("kd_weight", kd_weight, low=0.0, high=1.0)


def check_kd_kind(kind: str) -> str:
    """``kind`` (the ``kd_loss`` argument of meta_step and the engine) must be one of :data:`KD_KINDS`."""
    return losses.check_kind(kind, "kd_loss")


def check_logits_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Teacher and student logits must have the same shape and device."""
    if tuple(student_logits.shape) != tuple(teacher_logits.shape):
        raise ValueError(
            f"teacher logits of shape {tuple(teacher_logits.shape)} do not match student logits of shape "
            f"{tuple(student_logits.shape)}: distillation needs the same rows and classes/vocabulary"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"teacher logits are on {teacher_logits.device} but student logits on {student_logits.device}"
        )


def check_finite(value: torch.Tensor, name: str) -> None:
    """Raise ``FloatingPointError`` naming ``name`` when ``value`` has a NaN or an infinity."""
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(f"{name} is not finite ({value.detach().flatten()[:4].tolist()})")


def check_all_finite(*named: tuple[str, torch.Tensor]) -> None:
    """:func:`check_finite` of several ``(name, tensor)`` pairs (one device) with ONE host synchronisation."""
    if not bool(torch.stack([torch.isfinite(value).all() for _, value in named]).all()):
        for name, value in named:
            check_finite(value, name)


def module_device(module: torch.nn.Module) -> torch.device | None:
    """Device of the module's first parameter (or buffer); None when it has neither."""
    for _, tensor in named_parameters(module):
        return tensor.device
    for _, tensor in named_buffers(module):
        return tensor.device
    return None


def check_same_device(teacher: torch.nn.Module, student: torch.nn.Module, *splits: tuple[str, SplitBatch]) -> torch.device:
    """Every parameter of both models and every tensor of the batches on one device; returns it."""
    device = module_device(student)
    if device is None:
        raise ValueError("student has no parameters")
    for model_name, model in (("teacher", teacher), ("student", student)):
        for pname, param in named_parameters(model):
            if param.device != device:
                raise ValueError(
                    f"models on different devices: {model_name} parameter {pname!r} is on {param.device}, "
                    f"the student on {device}"
                )
    for batch_name, split in splits:
        for tensor in split.tensors():
            if tensor.device != device:
                raise ValueError(f"{batch_name} has a tensor on {tensor.device} but the models are on {device}")
    return device
