"""Knowledge-distillation losses and their second-order products.

Public functions (each checks its arguments, once; formulas in its docstring)
----------------
``kd_loss(zs, zt, temperature=1.0, *, kind="kl", reduction="batchmean", mask=None)``
    Temperature-softmax KD loss, differentiable with respect to BOTH logits.
``kd_teacher_cotangent(zs, zt, u, temperature=1.0, *, kind, reduction, mask)``
    ``c = ∂/∂zt ⟨∂L/∂zs, u⟩`` with ``L = kd_loss(...)`` (same arguments): the
    teacher-logit cotangent of the meta-gradient (``∇θT = J_Tᵀ c``, docs/meta-gradient.md).
``kd_influence(zs, zt, u, temperature=1.0, *, kind, mask, per_sample=False)``
    Per-row influence dots ``w_i = ⟨∂ℓ_i/∂zs_i, u_i⟩`` with ``ℓ_i`` the row's loss as
    ``reduction="none"`` returns it (LGTM's distillation influence); ``per_sample=True``
    sums the rows of each sample (all dims but the first).
``kd_teacher_cotangent_and_influence(...)``
    Both of the above from one pass over the logits.

Kinds (per row, ``ps``/``pt`` the softmaxes of ``zs/τ``/``zt/τ``, ``a = τ²``, or 1 with
``scale_by_temperature_squared=False``): ``kl`` ``a·KL(pt ‖ ps)``, ``reverse_kl``
``a·KL(ps ‖ pt)``, ``softmax_mse`` ``(a/V)·‖ps − pt‖²`` (batchmean == MetaDistil's
``F.mse_loss(ps, pt)·τ²``), ``logit_mse`` ``(a/V)·‖(zs − zt)/τ‖²`` (== mean_j (zs − zt)²).
Gradients and second-order closed forms: ``fastmeta.kernels.kd_loss_reference`` and
``fastmeta.kernels.kd_second_order_reference``.

Shapes and reductions: logits are ``[..., V]``, flattened to ``N`` rows.
``mask`` (bool, shape ``logits.shape[:-1]``, True = the row counts) drops rows:
masked rows cost no kernel work and get zero loss, gradient, cotangent and
influence.  For token-level distillation with labels that use an ignore index,
pass ``mask=labels != -100``.  Reductions:

* ``"batchmean"``: sum over counted rows / number of counted rows (error if none count);
* ``"sum"``: sum over counted rows;
* ``"none"``: per-row values of shape ``logits.shape[:-1]`` (masked rows 0).

For ``kd_teacher_cotangent`` the reduction scales each row of ``c``:
``1/n_counted`` for batchmean, 1 for sum and none (row i of ``c`` depends on
row i only, so "none" gives the per-row cotangents).

Dtypes: fp16/bf16/fp32 are computed in float32 (fp32 accumulation), float64 in
float64.  ``kd_loss`` returns the logits' dtype; gradients come back in the
dtype of each logits tensor; the cotangent in the teacher logits' dtype; the
influences in the student logits' dtype.

Backends (``backend=``): ``"auto"`` (default) runs the Triton kernels on CUDA
tensors when Triton is importable (float64 goes to PyTorch), the PyTorch
reference otherwise; ``"torch"`` forces the reference; ``"triton"`` forces the
kernels (on CPU tensors this needs ``TRITON_INTERPRET=1`` set before Triton is
imported: that is how the tests drive them without a GPU).

* Torch path: plain differentiable PyTorch ops (any order of differentiation,
  traced natively by ``torch.compile``).
* Triton path: ``torch.library`` custom ops (opaque to ``torch.compile``) with a
  registered first-order backward: ONE pass over V from 6 saved floats per row, no
  ``[N, V]`` fp32 temporary (``kernels/kd_loss.py``).  Double backward through
  ``kd_loss`` is not supported there: use ``kd_teacher_cotangent`` (the closed form)
  or ``backend="torch"``; the second-order results are not differentiable there.

Validation (the public functions, once per call): errors name the argument (shape,
dtype, device, temperature, kind, reduction, backend, empty batch, mask).
``check_finite=True`` (default) also checks that the logits (and the tangent) are
finite, one ``isfinite().all()`` per tensor (an extra read and a host
synchronisation); ``check_finite=False`` skips it (non-finite inputs then give
NaN/inf).  Under ``torch.compile`` the data-dependent checks (finiteness, "all rows
masked") are skipped; an all-masked batchmean then evaluates 0/0 = NaN.

One home for KD
---------------
This module is the ONE entry point of the KD loss, its teacher cotangent and its
influences, over the Triton kernels (``fastmeta.kernels.kd_loss`` / ``kd_second_order``,
through the ``torch.library`` custom ops of :mod:`fastmeta._kd_ops`) and their
plain-PyTorch twins (``fastmeta.kernels.*_reference``).  Besides the public functions,
fastmeta's own layers, whose public entry points (``meta_step``, ``fastmeta.engine``,
``mixed_hvp``) already checked the arguments, call the trusted functions
:func:`kd_rows`, :func:`kd_loss_unchecked`, :func:`kd_teacher_grad_unchecked` and
:func:`kd_second_order_unchecked`: no temperature/kind/shape/mask check, no
``isfinite``, no host synchronisation (a masked batchmean divides by the count as a
tensor).  The caller guarantees logits ``[..., V]`` of one shape, dtype and device,
``kind`` in :data:`KINDS`, a float temperature > 0, a bool mask of
``logits.shape[:-1]`` or None with a counted row for batchmean.  The checks
(:func:`check_temperature`, :func:`check_kind`, :func:`check_logits`) serve every
public entry point (``fastmeta.batching.check_temperature`` / ``check_kd_kind`` are these).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional, Union

import torch

from fastmeta import _kd_ops
from fastmeta._validation import check_number
from fastmeta.kernels.kd_loss_reference import KINDS, kd_loss_grads_reference, kd_rows_reference
from fastmeta.kernels.kd_second_order_reference import kd_second_order_rows_reference

__all__ = [
    "kd_loss",
    "kd_teacher_cotangent",
    "kd_influence",
    "kd_teacher_cotangent_and_influence",
    "kd_rows",
    "check_temperature",
    "check_kind",
    "KINDS",
    "REDUCTIONS",
    "BACKENDS",
]

REDUCTIONS = ("batchmean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Count = Union[int, torch.Tensor]  # number of counted rows: an int, or a tensor (no host synchronisation)

# ----------------------------------------------------------------------------- validation (public entry points)
def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return False


_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None  # looked up once (triton is not imported)


def _triton_importable() -> bool:
    return _TRITON_IMPORTABLE


def check_temperature(temperature) -> float:
    """``temperature`` as a float: a real number (or one-element real tensor), finite and > 0.

    ``TypeError`` for a bool, a string or None; ``ValueError`` otherwise (both name
    ``temperature``).  The one temperature check of every public entry point.
    """
    return check_number("temperature", temperature, low=0.0, low_open=True)


def check_kind(kind, name: str = "kind") -> str:
    """``kind`` must be one of :data:`KINDS` (``ValueError`` naming ``name``)."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"{name} must be one of {KINDS}, got {kind!r}")
    return kind


def check_mask(mask, student_logits: torch.Tensor) -> None:
    """``mask``: None or a bool tensor of ``student_logits.shape[:-1]`` on the logits' device."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = row counts), got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal student_logits.shape[:-1] = "
            f"{tuple(student_logits.shape[:-1])}"
        )
    if mask.device != student_logits.device:
        raise ValueError(f"mask (on {mask.device}) must be on the logits' device {student_logits.device}")


def check_logits(student_logits, teacher_logits, mask=None, *, check_finite: bool = True) -> None:
    """The two logits tensors (and ``mask``) as the KD functions need them; errors name the argument.

    Same shape, dtype (fp16/bf16/fp32/fp64) and device, at least one row and one
    class; with ``check_finite`` both are finite (one ``isfinite().all()`` per tensor,
    a host synchronisation; skipped under ``torch.compile``).
    """
    if not isinstance(student_logits, torch.Tensor):
        raise TypeError(f"student_logits must be a torch.Tensor, got {type(student_logits).__name__}")
    if not isinstance(teacher_logits, torch.Tensor):
        raise TypeError(f"teacher_logits must be a torch.Tensor, got {type(teacher_logits).__name__}")
    if student_logits.dtype not in _FLOATING:
        raise TypeError(f"student_logits must be a floating tensor (fp16/bf16/fp32/fp64), got {student_logits.dtype}")
    if teacher_logits.dtype != student_logits.dtype:
        raise TypeError(
            f"teacher_logits dtype {teacher_logits.dtype} must equal student_logits dtype {student_logits.dtype}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits shape {tuple(student_logits.shape)} and teacher_logits shape "
            f"{tuple(teacher_logits.shape)} must be equal"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits (on {student_logits.device}) and teacher_logits (on {teacher_logits.device}) "
            "must be on the same device"
        )
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (the classes/vocabulary, last)")
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits has an empty last (class/vocabulary) dimension")
    if student_logits.numel() == 0:
        raise ValueError(
            f"empty batch: student_logits of shape {tuple(student_logits.shape)} has no rows"
        )
    check_mask(mask, student_logits)
    if check_finite and not _is_compiling():
        for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} contains non-finite values (inf or NaN)")


def _check_tangent(student_tangent, student_logits, check_finite):
    if not isinstance(student_tangent, torch.Tensor):
        raise TypeError(f"student_tangent must be a torch.Tensor, got {type(student_tangent).__name__}")
    if student_tangent.dtype not in _FLOATING:
        raise TypeError(f"student_tangent must be a floating tensor, got {student_tangent.dtype}")
    if student_tangent.shape != student_logits.shape:
        raise ValueError(
            f"student_tangent shape {tuple(student_tangent.shape)} must equal student_logits shape "
            f"{tuple(student_logits.shape)}"
        )
    if student_tangent.device != student_logits.device:
        raise ValueError(
            f"student_tangent (on {student_tangent.device}) must be on the logits' device {student_logits.device}"
        )
    if check_finite and not _is_compiling() and not bool(torch.isfinite(student_tangent).all()):
        raise ValueError("student_tangent contains non-finite values (inf or NaN)")


def _check_arguments(student_logits, teacher_logits, temperature, kind, reduction, mask, check_finite) -> float:
    """Every check of the public functions but the tangent's and the backend's; returns the temperature."""
    check_kind(kind)
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_logits(student_logits, teacher_logits, mask, check_finite=check_finite)
    return check_temperature(temperature)


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The public ``backend=`` argument: checked, and ``"auto"`` resolved to ``"torch"`` or ``"triton"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return _auto_backend(x)
    # forced triton
    if not _triton_importable():
        raise RuntimeError("backend='triton' needs the triton package, which is not importable")
    if x.dtype == torch.float64:
        raise TypeError("backend='triton' supports fp16/bf16/fp32 logits; float64 runs on backend='torch'")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' on {x.device.type} tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return "triton"


def _counted_rows(mask: Optional[torch.Tensor], n_rows: int, reduction: str) -> Count:
    """Number of counted rows (int in eager, tensor under torch.compile); the public "all masked" check."""
    if mask is None:
        return n_rows
    count = mask.sum()
    if _is_compiling():
        return count
    count = int(count)
    if count == 0 and reduction == "batchmean":
        raise ValueError("empty batch: every row is masked out (mask is all False), batchmean is undefined")
    return count


# ----------------------------------------------------------------------------- the unchecked core
def _auto_backend(x: torch.Tensor) -> str:
    """``"triton"`` for CUDA fp16/bf16/fp32 logits when Triton is importable, else ``"torch"``.

    Also ``"torch"`` under forward-mode AD or a ``torch.func`` transform (``jvp``, ``grad``,
    ``vmap``: e.g. ``hessian.hvp(method="forward_over_reverse")``): the Triton ops have
    reverse-mode formulas only.  (A double backward needs no switch: the ops' backward turns
    into the differentiable reference under ``create_graph=True``.)"""
    if x.device.type == "cuda" and x.dtype != torch.float64 and _triton_importable() and not _transformed(x):
        return "triton"
    return "torch"


def _transformed(x: torch.Tensor) -> bool:
    """Whether ``x`` is a forward-AD dual tensor or ``torch.func`` transforms are active."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if active is not None and active():
        return True
    from torch.autograd import forward_ad

    return forward_ad.unpack_dual(x).tangent is not None


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` -> ``[N, V]`` with unit stride along V (copies only if needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def _count(mask: Optional[torch.Tensor], n_rows: int) -> Count:
    """Counted rows without a host synchronisation (a tensor when there is a mask)."""
    return n_rows if mask is None else mask.sum()


def _divide(x: torch.Tensor, count: Count) -> torch.Tensor:
    return x / (count.to(x.dtype) if isinstance(count, torch.Tensor) else count)


def _loss(student_logits, teacher_logits, tau, kind, reduction, mask, scale, which, count) -> torch.Tensor:
    out_dtype = student_logits.dtype
    zs = _rows(student_logits)
    zt = _rows(teacher_logits)
    row_mask = None if mask is None else mask.reshape(-1)
    if which == "torch":
        loss_rows = kd_rows_reference(zs, zt, tau, kind, scale)
        if row_mask is not None:
            loss_rows = torch.where(row_mask, loss_rows, loss_rows.new_zeros(()))
    else:
        loss_rows, _ = _kd_ops.kd_loss_rows(zs, zt, row_mask, tau, kind, bool(scale))
    if reduction == "none":
        return loss_rows.reshape(student_logits.shape[:-1]).to(out_dtype)
    total = loss_rows.sum()
    if reduction == "batchmean":
        total = _divide(total, zs.shape[0] if count is None else count)
    return total.to(out_dtype)


def _second_order(
    student_logits, teacher_logits, student_tangent, tau, kind, reduction, mask, scale, which, count,
    need_cotangent, need_influence,
):
    """``(cotangent or None, per-row influences in fp32/fp64 or None)``."""
    zs = _rows(student_logits)
    zt = _rows(teacher_logits)
    u = _rows(student_tangent)
    row_mask = None if mask is None else mask.reshape(-1)
    if reduction == "batchmean":
        row_scale = (1.0 / count) if isinstance(count, int) else None
    else:
        row_scale = 1.0
    if which == "torch":
        c, w = kd_second_order_rows_reference(zs, zt, u, tau, kind, scale)
        if row_mask is not None:
            c = torch.where(row_mask.unsqueeze(-1), c, c.new_zeros(()))
            w = torch.where(row_mask, w, w.new_zeros(()))
        if row_scale is None:
            c = _divide(c, count)
        elif row_scale != 1.0:
            c = c * row_scale
    else:
        c, w = _kd_ops.kd_second_order_rows(
            zs, zt, u, row_mask, tau, kind, bool(scale), 1.0 if row_scale is None else float(row_scale),
            need_cotangent, need_influence,
        )
        if row_scale is None and need_cotangent:
            c = _divide(c, count)
    cot = c.reshape(teacher_logits.shape).to(teacher_logits.dtype) if need_cotangent else None
    infl = w.reshape(student_logits.shape[:-1]) if need_influence else None
    return cot, infl


def _finish_influence(infl: torch.Tensor, per_sample: bool, out_dtype: torch.dtype) -> torch.Tensor:
    if per_sample and infl.dim() > 1:
        infl = infl.sum(dim=tuple(range(1, infl.dim())))
    return infl.to(out_dtype)


# ----------------------------------------------------------------------------- trusted internal path
def kd_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    kind: str,
    *,
    scale_by_temperature_squared: bool = True,
) -> torch.Tensor:
    """Per-row KD loss ``ℓ_r`` (shape ``logits.shape[:-1]``), plain PyTorch, differentiable any number of times.

    The PyTorch twin of the kernels (``fastmeta.kernels.kd_loss_reference.kd_rows_reference``),
    the per-row ``ℓ`` of :func:`kd_loss` (Hinton's ``τ²`` scaling by default; ``kl``:
    ``τ²·KL(pt ‖ ps)``).  fp16/bf16 are computed in float32, float64 stays float64;
    every row (no mask).  Forward mode and ``torch.func`` transforms work.  Trusted arguments.
    """
    return kd_rows_reference(student_logits, teacher_logits, temperature, kind, scale_by_temperature_squared)


def kd_loss_unchecked(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    kind: str,
    *,
    reduction: str = "batchmean",
    mask: Optional[torch.Tensor] = None,
    scale_by_temperature_squared: bool = True,
    higher_order: bool = False,
) -> torch.Tensor:
    """:func:`kd_loss` on trusted arguments: no check, no host synchronisation.

    ``higher_order=True`` runs the PyTorch twin (differentiable any number of times,
    forward mode and ``torch.func`` included); else the Triton kernel for CUDA
    fp16/bf16/fp32 logits (first-order backward) when Triton is importable.
    """
    which = "torch" if higher_order else _auto_backend(student_logits)
    count = None if reduction != "batchmean" else _count(mask, student_logits.numel() // student_logits.shape[-1])
    return _loss(student_logits, teacher_logits, temperature, kind, reduction, mask, scale_by_temperature_squared,
                 which, count)


def kd_teacher_grad_unchecked(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    kind: str,
    *,
    reduction: str = "batchmean",
    mask: Optional[torch.Tensor] = None,
    scale_by_temperature_squared: bool = True,
) -> torch.Tensor:
    """``∂L/∂zt`` of ``L = kd_loss(zs, zt, τ, kind=, reduction=, mask=)`` (summed over rows for "none").

    Closed form (``kd_loss_grads_reference``; the Triton backward for CUDA
    fp16/bf16/fp32), no autograd graph; trusted arguments.  Returns the teacher
    logits' shape in the compute dtype (fp32, fp64 for fp64 logits); masked rows 0.
    """
    n_rows = student_logits.numel() // student_logits.shape[-1]
    count = _count(mask, n_rows) if reduction == "batchmean" else 1
    if _auto_backend(student_logits) == "torch":
        _, grad = kd_loss_grads_reference(student_logits, teacher_logits, temperature, kind,
                                          scale_by_temperature_squared)
        if mask is not None:
            grad = torch.where(mask.unsqueeze(-1), grad, grad.new_zeros(()))
        return grad if isinstance(count, int) and count == 1 else _divide(grad, count)
    zs, zt = _rows(student_logits), _rows(teacher_logits)
    row_mask = None if mask is None else mask.reshape(-1)
    scale = bool(scale_by_temperature_squared)
    _, stats = _kd_ops.kd_loss_rows(zs, zt, row_mask, temperature, kind, scale)
    ones = torch.ones(n_rows, device=zs.device, dtype=torch.float32)
    grad_rows = _divide(ones, count) if not (isinstance(count, int) and count == 1) else ones
    _, grad = _kd_ops.kd_loss_rows_backward(grad_rows, zs, zt, stats, row_mask, temperature, kind, scale, False, True)
    return grad.reshape(teacher_logits.shape).float()


def kd_second_order_unchecked(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_tangent: torch.Tensor,
    temperature: float,
    kind: str,
    *,
    reduction: str = "batchmean",
    mask: Optional[torch.Tensor] = None,
    scale_by_temperature_squared: bool = True,
    need_cotangent: bool = True,
    need_influence: bool = True,
    per_sample: bool = False,
):
    """``(kd_teacher_cotangent(...) or None, kd_influence(...) or None)`` on trusted arguments, one pass.

    No check and no host synchronisation (``batchmean`` over a mask divides by the
    count as a tensor).  ``student_tangent`` must have the logits' shape and device.
    The influences come back in the student logits' dtype (per sample with
    ``per_sample=True``).
    """
    n_rows = student_logits.numel() // student_logits.shape[-1]
    count = _count(mask, n_rows) if reduction == "batchmean" else n_rows
    cot, infl = _second_order(
        student_logits, teacher_logits, student_tangent, temperature, kind, reduction, mask,
        scale_by_temperature_squared, _auto_backend(student_logits), count, need_cotangent, need_influence,
    )
    if infl is not None:
        infl = _finish_influence(infl, per_sample, student_logits.dtype)
    return cot, infl


# ----------------------------------------------------------------------------- public API
def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    kind: str = "kl",
    reduction: str = "batchmean",
    mask: Optional[torch.Tensor] = None,
    scale_by_temperature_squared: bool = True,
    check_finite: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Temperature-softmax KD loss of ``[..., V]`` logits, differentiable w.r.t. both.

    Per row (``s = zs/τ``, ``t = zt/τ``, ``a = τ²`` or 1 with
    ``scale_by_temperature_squared=False``)::

        kl           a · KL(softmax(t) ‖ softmax(s))
        reverse_kl   a · KL(softmax(s) ‖ softmax(t))
        softmax_mse  (a/V) · ‖softmax(s) − softmax(t)‖²
        logit_mse    (a/V) · ‖s − t‖²      (= mean_j (zs − zt)² with a = τ²)

    then reduced over the counted rows (``mask``; ``batchmean`` divides by
    their number, ``sum`` adds, ``none`` returns ``logits.shape[:-1]`` with
    masked rows 0).  The result has the logits' dtype (accumulated in fp32, or
    fp64 for fp64 input).  ``batchmean`` with kind "kl" equals
    ``τ² · F.kl_div(log_softmax(s), log_softmax(t), log_target=True, reduction="batchmean")``
    on the flattened rows.  See the module docstring for backends, memory and checks.
    """
    tau = _check_arguments(student_logits, teacher_logits, temperature, kind, reduction, mask, check_finite)
    which = _resolve_backend(backend, student_logits)
    n_rows = student_logits.numel() // student_logits.shape[-1]
    counted = _counted_rows(None if mask is None else mask.reshape(-1), n_rows, reduction)
    return _loss(student_logits, teacher_logits, tau, kind, reduction, mask, scale_by_temperature_squared, which,
                 counted)


def _checked_second_order(
    student_logits, teacher_logits, student_tangent, temperature, kind, reduction, mask,
    scale_by_temperature_squared, check_finite, backend, need_cotangent, need_influence,
):
    tau = _check_arguments(student_logits, teacher_logits, temperature, kind, reduction, mask, check_finite)
    _check_tangent(student_tangent, student_logits, check_finite)
    which = _resolve_backend(backend, student_logits)
    n_rows = student_logits.numel() // student_logits.shape[-1]
    counted = _counted_rows(None if mask is None else mask.reshape(-1), n_rows, reduction)
    return _second_order(
        student_logits, teacher_logits, student_tangent, tau, kind, reduction, mask, scale_by_temperature_squared,
        which, counted, need_cotangent, need_influence,
    )


def kd_teacher_cotangent(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_tangent: torch.Tensor,
    temperature: float = 1.0,
    *,
    kind: str = "kl",
    reduction: str = "batchmean",
    mask: Optional[torch.Tensor] = None,
    scale_by_temperature_squared: bool = True,
    check_finite: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``c = ∂/∂zt ⟨∂L/∂zs, u⟩`` with ``L = kd_loss(zs, zt, τ, kind=, reduction=, mask=)``.

    Per row (before the reduction's row scale; ``a = τ²`` or 1)::

        kl           c = −(a/τ²) (pt ⊙ u − pt ⟨pt, u⟩)
        reverse_kl   c = −(a/τ²) (ps ⊙ u − ps ⟨ps, u⟩)
        softmax_mse  c = −(2a/(τ²V)) (pt ⊙ r − pt ⟨pt, r⟩),  r = ps ⊙ (u − ⟨ps, u⟩)
        logit_mse    c = −(2a/(τ²V)) u

    times ``1/n_counted`` for batchmean (1 for sum and none); masked rows are 0.
    The teacher's meta-gradient is then one ordinary backward:
    ``zt.backward(−η·w_kd · c)`` gives ``−η·w_kd·∇θT⟨∇θS KD, v⟩`` when
    ``u = J_S v``.  Returns ``teacher_logits``' shape and dtype.
    """
    cot, _ = _checked_second_order(
        student_logits, teacher_logits, student_tangent, temperature, kind, reduction, mask,
        scale_by_temperature_squared, check_finite, backend, True, False,
    )
    return cot


def kd_influence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_tangent: torch.Tensor,
    temperature: float = 1.0,
    *,
    kind: str = "kl",
    mask: Optional[torch.Tensor] = None,
    per_sample: bool = False,
    scale_by_temperature_squared: bool = True,
    check_finite: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-row influence dots ``w_i = ⟨∂ℓ_i/∂zs_i, u_i⟩`` (``ℓ_i`` = the row's unreduced loss).

    Per row (``a = τ²`` or 1)::

        kl           w = (a/τ) ⟨ps − pt, u⟩
        reverse_kl   w = (a/τ) (⟨ps ⊙ g, u⟩ − KL(ps‖pt) ⟨ps, u⟩),  g = log ps − log pt
        softmax_mse  w = (2a/(τV)) ⟨ps − pt, r⟩,  r = ps ⊙ (u − ⟨ps, u⟩)
        logit_mse    w = (2a/(τ²V)) ⟨zs − zt, u⟩

    Returns ``logits.shape[:-1]`` (masked rows 0) in the student logits'
    dtype.  ``per_sample=True``: rows are tokens of samples, the result is the
    per-sample sum over all dims but the first (``[B, L, V]`` -> ``[B]``),
    summed in fp32 before the cast.
    """
    _, infl = _checked_second_order(
        student_logits, teacher_logits, student_tangent, temperature, kind, "none", mask,
        scale_by_temperature_squared, check_finite, backend, False, True,
    )
    return _finish_influence(infl, per_sample, student_logits.dtype)


def kd_teacher_cotangent_and_influence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_tangent: torch.Tensor,
    temperature: float = 1.0,
    *,
    kind: str = "kl",
    reduction: str = "batchmean",
    mask: Optional[torch.Tensor] = None,
    per_sample: bool = False,
    scale_by_temperature_squared: bool = True,
    check_finite: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kd_teacher_cotangent(...), kd_influence(...))`` from a single pass over the logits.

    ``reduction`` applies to the cotangent only; the influences are always
    per row (or per sample with ``per_sample=True``).
    """
    cot, infl = _checked_second_order(
        student_logits, teacher_logits, student_tangent, temperature, kind, reduction, mask,
        scale_by_temperature_squared, check_finite, backend, True, True,
    )
    return cot, _finish_influence(infl, per_sample, student_logits.dtype)
