"""Knowledge-distillation losses and their second-order products.

Public functions
----------------
``kd_loss(student_logits, teacher_logits, temperature=1.0, *, kind="kl", reduction="batchmean", mask=None)``
    Temperature-softmax KD loss, differentiable with respect to BOTH logits.
``kd_teacher_cotangent(student_logits, teacher_logits, student_tangent, temperature=1.0, *, kind="kl", reduction="batchmean", mask=None)``
    ``c = ∂/∂zt ⟨∂L/∂zs, u⟩`` with ``L = kd_loss(...)`` (same arguments) and
    ``u = student_tangent``: the teacher-logit cotangent of the meta-gradient
    (``∇θT = J_Tᵀ c``, see docs/meta-gradient.md).
``kd_influence(student_logits, teacher_logits, student_tangent, temperature=1.0, *, kind="kl", mask=None)``
    Per-row influence dots ``w_i = ⟨∂ℓ_i/∂zs_i, u_i⟩`` with ``ℓ_i`` the row's
    loss as ``reduction="none"`` returns it (LGTM's distillation influence).
    ``per_sample=True`` sums the rows of each sample (all dims but the first).
``kd_teacher_cotangent_and_influence(...)``
    Both of the above from one pass over the logits.

Math (per row, ``s = zs/τ``, ``t = zt/τ``, ``ps = softmax(s)``, ``pt = softmax(t)``,
``a = τ²`` with ``scale_by_temperature_squared=True`` (default), else 1):

    kl           ℓ = a · Σ pt (log pt − log ps)
    reverse_kl   ℓ = a · Σ ps (log ps − log pt)
    softmax_mse  ℓ = (a/V) · Σ (ps − pt)²     (batchmean == MetaDistil's F.mse_loss(ps, pt)·τ²)
    logit_mse    ℓ = (a/V) · Σ ((zs − zt)/τ)²  (== mean_j (zs − zt)² when scaled)

The gradients and second-order closed forms are in the docstrings of
``fastmeta.kernels.kd_loss_reference`` and ``fastmeta.kernels.kd_second_order_reference``.

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
* Triton path: ``torch.library`` custom ops (opaque to ``torch.compile``) with
  a registered first-order backward.  Memory: the forward saves only the two
  logits tensors (already alive) and 6 floats per row (both maxima and
  log-normalisers, the divergence / ⟨p, d⟩ terms), so the backward is ONE pass over V
  (read zs, zt; write the requested gradients); no ``[N, V]`` fp32 temporary.
  Double backward through ``kd_loss`` is not supported on this path: use
  ``kd_teacher_cotangent`` (the closed form) or ``backend="torch"``.
  ``kd_teacher_cotangent`` / ``kd_influence`` results are not differentiable on
  the Triton path.

Validation: errors name the argument (shape, dtype, device, temperature,
empty batch, mask).  ``check_finite=True`` (default) also checks that the
logits (and the tangent) are finite with one fused ``isfinite().all()`` per
tensor: one extra read of each input and a host synchronisation; pass
``check_finite=False`` to skip it in hot loops (non-finite inputs then give
NaN/inf results).  Under ``torch.compile`` the data-dependent checks
(finiteness, "all rows masked") are skipped; an all-masked batchmean then
evaluates 0/0 = NaN.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from fastmeta.kernels.kd_loss_reference import KINDS, compute_dtype, kd_loss_rows_reference
from fastmeta.kernels.kd_second_order_reference import kd_second_order_rows_reference

__all__ = [
    "kd_loss",
    "kd_teacher_cotangent",
    "kd_influence",
    "kd_teacher_cotangent_and_influence",
    "KINDS",
    "REDUCTIONS",
    "BACKENDS",
]

REDUCTIONS = ("batchmean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- validation
def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return False


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _check_temperature(temperature) -> float:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(
                f"temperature must be a positive finite number, got a tensor of shape {tuple(temperature.shape)}"
            )
        temperature = temperature.item()
    try:
        tau = float(temperature)
    except (TypeError, ValueError):
        raise TypeError(f"temperature must be a positive finite number, got {temperature!r}") from None
    if not (tau > 0.0 and tau < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return tau


def _check_logits(student_logits, teacher_logits, kind, reduction, mask, check_finite):
    if not isinstance(student_logits, torch.Tensor):
        raise TypeError(f"student_logits must be a torch.Tensor, got {type(student_logits).__name__}")
    if not isinstance(teacher_logits, torch.Tensor):
        raise TypeError(f"teacher_logits must be a torch.Tensor, got {type(teacher_logits).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
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
    if mask is not None:
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


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if x.device.type == "cuda" and x.dtype != torch.float64 and _triton_importable():
            return "triton"
        return "torch"
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


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` -> ``[N, V]`` with unit stride along V (copies only if needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def _counted_rows(mask: Optional[torch.Tensor], n_rows: int, reduction: str):
    """Number of counted rows (int in eager, tensor under torch.compile)."""
    if mask is None:
        return n_rows
    count = mask.sum()
    if _is_compiling():
        return count
    count = int(count)
    if count == 0 and reduction == "batchmean":
        raise ValueError("empty batch: every row is masked out (mask is all False), batchmean is undefined")
    return count


# ----------------------------------------------------------------------------- Triton custom ops
_KD_LOSS_FORWARD = "fastmeta_kernels::kd_loss_rows"
_KD_LOSS_BACKWARD = "fastmeta_kernels::kd_loss_rows_backward"
_KD_SECOND_ORDER = "fastmeta_kernels::kd_second_order_rows"


@torch.library.custom_op(_KD_LOSS_FORWARD, mutates_args=())
def _kd_loss_rows_op(
    zs: torch.Tensor,
    zt: torch.Tensor,
    row_mask: Optional[torch.Tensor],
    temperature: float,
    kind: str,
    scale_by_temperature_squared: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from fastmeta.kernels.kd_loss import kd_loss_forward

    return kd_loss_forward(zs, zt, row_mask, temperature, kind, scale_by_temperature_squared)


@_kd_loss_rows_op.register_fake
def _(zs, zt, row_mask, temperature, kind, scale_by_temperature_squared):
    n = zs.shape[0]
    return zs.new_empty(n, dtype=torch.float32), zs.new_empty(n, 6, dtype=torch.float32)


@torch.library.custom_op(_KD_LOSS_BACKWARD, mutates_args=())
def _kd_loss_rows_backward_op(
    grad_rows: torch.Tensor,
    zs: torch.Tensor,
    zt: torch.Tensor,
    stats: torch.Tensor,
    row_mask: Optional[torch.Tensor],
    temperature: float,
    kind: str,
    scale_by_temperature_squared: bool,
    need_student: bool,
    need_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from fastmeta.kernels.kd_loss import kd_loss_backward

    gs, gt = kd_loss_backward(
        grad_rows, zs, zt, stats, row_mask, temperature, kind, scale_by_temperature_squared,
        need_student, need_teacher,
    )
    if gs is None:
        gs = zs.new_empty(0)
    if gt is None:
        gt = zt.new_empty(0)
    return gs, gt


@_kd_loss_rows_backward_op.register_fake
def _(grad_rows, zs, zt, stats, row_mask, temperature, kind, scale, need_student, need_teacher):
    gs = torch.empty_like(zs) if need_student else zs.new_empty(0)
    gt = torch.empty_like(zt) if need_teacher else zt.new_empty(0)
    return gs, gt


def _kd_loss_setup_context(ctx, inputs, output):
    zs, zt, row_mask, temperature, kind, scale = inputs
    _, stats = output
    ctx.save_for_backward(zs, zt, stats, row_mask)
    ctx.temperature = temperature
    ctx.kind = kind
    ctx.scale = scale


def _kd_loss_backward(ctx, grad_rows, grad_stats):
    zs, zt, stats, row_mask = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_rows is None or not (need_s or need_t):
        return None, None, None, None, None, None
    gs, gt = _kd_loss_rows_backward_op(
        grad_rows.float().contiguous(), zs, zt, stats, row_mask, ctx.temperature, ctx.kind, ctx.scale,
        bool(need_s), bool(need_t),
    )
    return (gs if need_s else None), (gt if need_t else None), None, None, None, None


torch.library.register_autograd(_KD_LOSS_FORWARD, _kd_loss_backward, setup_context=_kd_loss_setup_context)


@torch.library.custom_op(_KD_SECOND_ORDER, mutates_args=())
def _kd_second_order_op(
    zs: torch.Tensor,
    zt: torch.Tensor,
    u: torch.Tensor,
    row_mask: Optional[torch.Tensor],
    temperature: float,
    kind: str,
    scale_by_temperature_squared: bool,
    cotangent_scale: float,
    need_cotangent: bool,
    need_influence: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from fastmeta.kernels.kd_second_order import kd_second_order

    c, w = kd_second_order(
        zs, zt, u, row_mask, temperature, kind, scale_by_temperature_squared, cotangent_scale,
        need_cotangent, need_influence,
    )
    if c is None:
        c = zt.new_empty(0)
    if w is None:
        w = zs.new_empty(0, dtype=torch.float32)
    return c, w


@_kd_second_order_op.register_fake
def _(zs, zt, u, row_mask, temperature, kind, scale, cotangent_scale, need_cotangent, need_influence):
    c = torch.empty_like(zt) if need_cotangent else zt.new_empty(0)
    w = zs.new_empty(zs.shape[0] if need_influence else 0, dtype=torch.float32)
    return c, w


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
    _check_logits(student_logits, teacher_logits, kind, reduction, mask, check_finite)
    tau = _check_temperature(temperature)
    which = _resolve_backend(backend, student_logits)
    out_dtype = student_logits.dtype
    lead_shape = student_logits.shape[:-1]
    zs = _rows(student_logits)
    zt = _rows(teacher_logits)
    n_rows = zs.shape[0]
    row_mask = None if mask is None else mask.reshape(-1)
    counted = _counted_rows(row_mask, n_rows, reduction)

    if which == "torch":
        loss_rows, _ = kd_loss_rows_reference(zs, zt, tau, kind, scale_by_temperature_squared)
        if row_mask is not None:
            loss_rows = torch.where(row_mask, loss_rows, loss_rows.new_zeros(()))
    else:
        loss_rows, _ = _kd_loss_rows_op(zs, zt, row_mask, tau, kind, bool(scale_by_temperature_squared))

    if reduction == "none":
        return loss_rows.reshape(lead_shape).to(out_dtype)
    total = loss_rows.sum()
    if reduction == "batchmean":
        total = total / counted
    return total.to(out_dtype)


def _second_order(
    student_logits, teacher_logits, student_tangent, temperature, kind, reduction, mask,
    scale_by_temperature_squared, check_finite, backend, need_cotangent, need_influence,
):
    _check_logits(student_logits, teacher_logits, kind, reduction, mask, check_finite)
    _check_tangent(student_tangent, student_logits, check_finite)
    tau = _check_temperature(temperature)
    which = _resolve_backend(backend, student_logits)
    zs = _rows(student_logits)
    zt = _rows(teacher_logits)
    u = _rows(student_tangent)
    n_rows = zs.shape[0]
    row_mask = None if mask is None else mask.reshape(-1)
    counted = _counted_rows(row_mask, n_rows, reduction)
    if reduction == "batchmean":
        row_scale = (1.0 / counted) if isinstance(counted, int) else None
    else:
        row_scale = 1.0

    if which == "torch":
        c, w = kd_second_order_rows_reference(zs, zt, u, tau, kind, scale_by_temperature_squared)
        if row_mask is not None:
            keep = row_mask.unsqueeze(-1)
            c = torch.where(keep, c, c.new_zeros(()))
            w = torch.where(row_mask, w, w.new_zeros(()))
        if row_scale is None:
            c = c / counted
        elif row_scale != 1.0:
            c = c * row_scale
    else:
        c, w = _kd_second_order_op(
            zs, zt, u, row_mask, tau, kind, bool(scale_by_temperature_squared),
            1.0 if row_scale is None else float(row_scale), need_cotangent, need_influence,
        )
        if row_scale is None and need_cotangent:
            c = c / counted
    cot = c.reshape(teacher_logits.shape).to(teacher_logits.dtype) if need_cotangent else None
    infl = w.reshape(student_logits.shape[:-1]) if need_influence else None
    return cot, infl


def _finish_influence(infl: torch.Tensor, per_sample: bool, out_dtype: torch.dtype) -> torch.Tensor:
    if per_sample and infl.dim() > 1:
        infl = infl.sum(dim=tuple(range(1, infl.dim())))
    return infl.to(out_dtype)


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
    cot, _ = _second_order(
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
    _, infl = _second_order(
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
    cot, infl = _second_order(
        student_logits, teacher_logits, student_tangent, temperature, kind, reduction, mask,
        scale_by_temperature_squared, check_finite, backend, True, True,
    )
    return cot, _finish_influence(infl, per_sample, student_logits.dtype)
