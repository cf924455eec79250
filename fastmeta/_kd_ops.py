"""``torch.library`` custom ops over fastmeta's Triton KD kernels (``fastmeta/kernels``).

One op per kernel launcher, each behind a plain function signature that ``fastmeta.losses``
calls (its only caller; the argument checks are there, once):

``fastmeta_kernels::kd_loss_rows``            per-row KD losses + the per-row statistics
                                              (``kernels/kd_loss.py``), with a registered
                                              first-order backward:
``fastmeta_kernels::kd_loss_rows_backward``   ONE pass over V from the saved statistics
``fastmeta_kernels::kd_second_order_rows``    teacher cotangent and influence dots
                                              (``kernels/kd_second_order.py``)

The ops are opaque to ``torch.compile`` (fake implementations give the output shapes).
Triton itself is imported only when an op runs.  The plain-PyTorch twins of the same
math are ``kernels/kd_loss_reference.py`` and ``kernels/kd_second_order_reference.py``.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["kd_loss_rows", "kd_loss_rows_backward", "kd_second_order_rows"]

_KD_LOSS_FORWARD = "fastmeta_kernels::kd_loss_rows"
_KD_LOSS_BACKWARD = "fastmeta_kernels::kd_loss_rows_backward"
_KD_SECOND_ORDER = "fastmeta_kernels::kd_second_order_rows"


@torch.library.custom_op(_KD_LOSS_FORWARD, mutates_args=())
def kd_loss_rows(
    zs: torch.Tensor,
    zt: torch.Tensor,
    row_mask: Optional[torch.Tensor],
    temperature: float,
    kind: str,
    scale_by_temperature_squared: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from fastmeta.kernels.kd_loss import kd_loss_forward

    return kd_loss_forward(zs, zt, row_mask, temperature, kind, scale_by_temperature_squared)


@kd_loss_rows.register_fake
def _(zs, zt, row_mask, temperature, kind, scale_by_temperature_squared):
    n = zs.shape[0]
    return zs.new_empty(n, dtype=torch.float32), zs.new_empty(n, 6, dtype=torch.float32)


@torch.library.custom_op(_KD_LOSS_BACKWARD, mutates_args=())
def kd_loss_rows_backward(
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


@kd_loss_rows_backward.register_fake
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
    if torch.is_grad_enabled():
        # backward(create_graph=True) (a double backward, e.g. hypergrad="autograd" or
        # hessian.hvp(method="autograd")): the kernel's backward has no derivative of its
        # own, so this backward is the reference's, which autograd differentiates again.
        return _kd_loss_backward_differentiable(ctx, zs, zt, row_mask, grad_rows, need_s, need_t)
    gs, gt = kd_loss_rows_backward(
        grad_rows.float().contiguous(), zs, zt, stats, row_mask, ctx.temperature, ctx.kind, ctx.scale,
        bool(need_s), bool(need_t),
    )
    return (gs if need_s else None), (gt if need_t else None), None, None, None, None


def _kd_loss_backward_differentiable(ctx, zs, zt, row_mask, grad_rows, need_s, need_t):
    """The first-order backward as a graph of plain-PyTorch ops (the kernels' twin), so that it
    can be differentiated once more: same values as the kernel's backward up to rounding."""
    from fastmeta.kernels.kd_loss_reference import kd_rows_reference

    wanted = [x for x, need in ((zs, need_s), (zt, need_t)) if need]
    rows = kd_rows_reference(zs, zt, ctx.temperature, ctx.kind, ctx.scale)
    if row_mask is not None:
        rows = torch.where(row_mask, rows, rows.new_zeros(()))
    grads = iter(torch.autograd.grad(rows, wanted, grad_rows.to(rows.dtype), create_graph=True))
    gs = next(grads) if need_s else None
    gt = next(grads) if need_t else None
    return gs, gt, None, None, None, None


torch.library.register_autograd(_KD_LOSS_FORWARD, _kd_loss_backward, setup_context=_kd_loss_setup_context)


@torch.library.custom_op(_KD_SECOND_ORDER, mutates_args=())
def kd_second_order_rows(
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


@kd_second_order_rows.register_fake
def _(zs, zt, u, row_mask, temperature, kind, scale, cotangent_scale, need_cotangent, need_influence):
    c = torch.empty_like(zt) if need_cotangent else zt.new_empty(0)
    w = zs.new_empty(zs.shape[0] if need_influence else 0, dtype=torch.float32)
    return c, w
