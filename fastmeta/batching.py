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
:func:`kd_rows`).  Until ``fastmeta.losses`` is importable this module uses a
plain-PyTorch twin with the same per-row definitions.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
KD_KINDS = ("kl", "reverse_kl", "softmax_mse", "logit_mse")

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
    counted = flat_labels != IGNORE_INDEX
    if not bool(counted.any()):
        raise ValueError(f"every row of {name} is -100 (ignored): the loss would be a mean over zero rows")
    num_classes = logits.shape[-1]
    counted_labels = flat_labels[counted]
    if bool(((counted_labels < 0) | (counted_labels >= num_classes)).any()):
        raise ValueError(
            f"{name} contain ids outside [0, {num_classes}) (other than -100); "
            f"min {int(counted_labels.min())}, max {int(counted_labels.max())}"
        )
    return F.cross_entropy(logits.reshape(-1, num_classes), flat_labels, ignore_index=IGNORE_INDEX, reduction="mean")


# --------------------------------------------------------------------------- KD losses
def _losses_module():
    try:
        from fastmeta import losses  # kernels helper's module (Triton on CUDA, PyTorch on CPU)
    except ImportError:
        return None
    return losses


def kd_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, kind: str) -> torch.Tensor:
    """Per-row KD loss ``ℓ_r`` (same shape as ``logits.shape[:-1]``), plain PyTorch, differentiable.

    With ``s = zs/τ``, ``t = zt/τ``, ``ps``/``pt`` their softmaxes, ``V`` classes::

        kl          ℓ = τ²·KL(pt ‖ ps)
        reverse_kl  ℓ = τ²·KL(ps ‖ pt)
        softmax_mse ℓ = τ²·mean_j (ps_j − pt_j)²
        logit_mse   ℓ = mean_j (zs_j − zt_j)²        (= τ²·mean_j ((zs_j − zt_j)/τ)²)

    the definitions of ``fastmeta.losses`` (Hinton's τ² scaling on).  fp16/bf16
    inputs are computed in float32, float64 stays float64.
    """
    check_kd_kind(kind)
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    zs = student_logits.to(dtype)
    zt = teacher_logits.to(dtype)
    tau = float(temperature)
    if kind == "logit_mse":
        return (zs - zt).square().mean(-1)
    log_ps = torch.log_softmax(zs / tau, dim=-1)
    log_pt = torch.log_softmax(zt / tau, dim=-1)
    if kind == "kl":
        return tau * tau * (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if kind == "reverse_kl":
        return tau * tau * (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    return tau * tau * (log_ps.exp() - log_pt.exp()).square().mean(-1)


def _batchmean(rows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return rows.sum() / rows.numel()
    count = mask.sum()
    return torch.where(mask, rows, rows.new_zeros(())).sum() / count.clamp_min(1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    kind: str = "kl",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``KD = (1/|rows|) Σ_{counted rows} ℓ_r`` (batchmean over ``mask``), differentiable in both logits.

    Uses ``fastmeta.losses.kd_loss`` when that module is importable, else :func:`kd_rows`.
    """
    losses = _losses_module()
    if losses is not None:
        return losses.kd_loss(student_logits, teacher_logits, temperature, kind=kind, reduction="batchmean", mask=mask)
    return _batchmean(kd_rows(student_logits, teacher_logits, temperature, kind), mask)


def kd_teacher_cotangent(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_tangent: torch.Tensor,
    temperature: float = 1.0,
    *,
    kind: str = "kl",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``c = ∂/∂zt ⟨∂KD/∂zs, u⟩`` for the batchmean KD loss (same shape as the logits).

    ``fastmeta.losses.kd_teacher_cotangent`` when available (closed form); else
    autograd on the logits only (cheap: no model is involved).
    """
    losses = _losses_module()
    if losses is not None:
        return losses.kd_teacher_cotangent(
            student_logits, teacher_logits, student_tangent, temperature, kind=kind, reduction="batchmean", mask=mask
        )
    with torch.enable_grad():
        zs = student_logits.detach().requires_grad_(True)
        zt = teacher_logits.detach().requires_grad_(True)
        loss = _batchmean(kd_rows(zs, zt, temperature, kind), mask)
        (grad_zs,) = torch.autograd.grad(loss, zs, create_graph=True)
        (cotangent,) = torch.autograd.grad(grad_zs, zt, grad_outputs=student_tangent.to(grad_zs.dtype))
    return cotangent.to(teacher_logits.dtype)


def kd_influence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_tangent: torch.Tensor,
    temperature: float = 1.0,
    *,
    kind: str = "kl",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per row ``⟨∂ℓ_r/∂zs_r, u_r⟩`` (shape ``logits.shape[:-1]``; masked rows 0).

    ``fastmeta.losses.kd_influence`` when available; else a forward-mode JVP of
    :func:`kd_rows` in the direction ``u`` (exact, logits only).
    """
    losses = _losses_module()
    if losses is not None:
        return losses.kd_influence(student_logits, teacher_logits, student_tangent, temperature, kind=kind, mask=mask)
    zt = teacher_logits.detach()
    zs = student_logits.detach()
    _, dots = torch.func.jvp(
        lambda z: kd_rows(z, zt, temperature, kind), (zs,), (student_tangent.detach().to(zs.dtype),)
    )
    if mask is not None:
        dots = torch.where(mask, dots, dots.new_zeros(()))
    return dots


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

    A term whose weight is exactly 0 is not evaluated (so ``kd_weight=1`` needs no
    valid class ids and ``kd_weight=0`` no teacher).  ``higher_order=True`` uses the
    plain-PyTorch :func:`kd_rows` (differentiable any number of times, forward mode
    included) instead of ``fastmeta.losses`` (whose fused backward is first order).
    """
    mask = row_mask(labels)
    loss = None
    if kd_weight != 1.0:
        loss = (1.0 - kd_weight) * cross_entropy(student_logits, labels)
    if kd_weight != 0.0:
        if not bool(mask.any()):
            raise ValueError("every row of the batch labels is -100 (ignored): the KD loss would be a mean over zero rows")
        if higher_order:
            kd = kd_weight * _batchmean(kd_rows(student_logits, teacher_logits, temperature, kind), mask)
        else:
            kd = kd_weight * kd_loss(student_logits, teacher_logits, temperature, kind=kind, mask=mask)
        kd = kd.to(student_logits.dtype) if kd.dtype != student_logits.dtype else kd
        loss = kd if loss is None else loss + kd
    return loss


# --------------------------------------------------------------------------- validation
def check_temperature(temperature: float) -> float:
    """``temperature`` must be a finite number > 0."""
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}") from None
    if not (value > 0.0) or value == float("inf"):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return value


def check_kd_weight(kd_weight: float) -> float:
    """``kd_weight`` must lie in [0, 1]."""
    value = float(kd_weight)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"kd_weight must lie in [0, 1], got {kd_weight}")
    return value


def check_kd_kind(kind: str) -> str:
    if kind not in KD_KINDS:
        raise ValueError(f"kd_loss must be one of {KD_KINDS}, got {kind!r}")
    return kind


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


def module_device(module: torch.nn.Module) -> torch.device | None:
    """Device of the module's first parameter (or buffer); None when it has neither."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None


def check_same_device(teacher: torch.nn.Module, student: torch.nn.Module, *splits: tuple[str, SplitBatch]) -> torch.device:
    """Every parameter of both models and every tensor of the batches on one device; returns it."""
    device = module_device(student)
    if device is None:
        raise ValueError("student has no parameters")
    for model_name, model in (("teacher", teacher), ("student", student)):
        for pname, param in model.named_parameters():
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
