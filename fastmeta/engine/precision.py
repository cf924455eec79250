"""Precision of the engine: autocast and the student tangent, loss scaling, the teacher backward.

Parameters, gradients and the returned meta-gradient stay in the parameters' dtype
(fp32); under the caller's bf16/fp16 ``torch.autocast`` the forwards and backwards
run in the autocast dtype, except:

* the student tangent (the JVP, the forward-over-reverse products of
  ``inner_steps > 1``, the finite-difference forwards) runs with autocast off, in
  fp32 (``jvp_precision="fp32"``, default; ``"autocast"`` keeps it in bf16/fp16).
  Measured on a 2-layer BERT against float64 (``tests/test_mixed_precision.py``):
  the exact meta-gradient is within ~3e-3 (bf16) / ~4e-4 (fp16) either way, a
  forward-mode tangent rounding like its primal; the finite-difference one within
  ~2e-3 (bf16) in fp32 and ~6e-3 when its two perturbed forwards run in bf16 (fp16:
  ~4e-4 either way).  (The ~75% error once measured for the latter was stale
  autocast casts: the perturbation, made in place, was not seen by the region's
  cached bf16 weights; :func:`fastmeta.functional.drop_autocast_casts` now follows
  every in-place change);
* the closed-form cotangent is computed in fp32 and multiplied by ``−η·w`` in fp32;
  for an fp16 teacher (or any ``loss_scale``) it is then brought to an ordinary
  loss gradient's magnitude (largest entry ≈ 1/rows, an exact power of two undone
  after the backward): with η = 1e-4 the fp16 teacher backward otherwise lost 56%
  of the meta-gradient to underflow (now ~5e-4);
* ``loss_scale`` S (fp16): every backward runs on ``S·loss`` and is unscaled in fp32
  (:func:`scaled_grad`); a power of two changes nothing but underflow, bitwise.
"""
from __future__ import annotations

import contextlib
import math

import torch

from .._validation import check_number

__all__ = ["JVP_PRECISIONS", "low_precision_autocast", "scaled_grad", "check_loss_scale"]

JVP_PRECISIONS = ("fp32", "autocast")


def low_precision_autocast(device: torch.device) -> torch.dtype | None:
    """The bf16/fp16 dtype of the autocast active for ``device``'s type, or None."""
    kind = device.type
    try:
        enabled = torch.is_autocast_enabled(kind)
        dtype = torch.get_autocast_dtype(kind)
    except (TypeError, AttributeError, RuntimeError):  # older signatures: cuda / cpu only
        if kind == "cuda":
            enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        elif kind == "cpu":
            enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        else:
            return None
    if enabled and dtype in (torch.float16, torch.bfloat16):
        return dtype
    return None


def tangent_precision(device: torch.device, jvp_precision: str):
    """``(context, description)`` for the student tangent computations (module docstring)."""
    dtype = low_precision_autocast(device)
    if dtype is None:
        return contextlib.nullcontext(), "default"
    if jvp_precision == "autocast":
        return contextlib.nullcontext(), f"autocast {str(dtype).replace('torch.', '')}"
    return torch.autocast(device_type=device.type, enabled=False), "fp32 (autocast off)"


def scaled_grad(loss: torch.Tensor, tensors, loss_scale: float = 1.0, **kwargs):
    """``torch.autograd.grad(loss, tensors)`` computed as ``grad(S·loss)/S`` (``S = loss_scale``).

    Loss scaling for float16 autocast: the backward's fp16 activation gradients are S
    times larger (no underflow below fp16's 6e-8); the parameter gradients (the
    parameters' dtype, fp32) are divided back.  With S a power of two both products are
    exact, so the result equals the unscaled gradient bitwise unless the unscaled
    backward underflowed (or the scaled one overflowed: non-finite gradients, which the
    callers report as ``FloatingPointError``).  ``S = 1``: a plain ``autograd.grad``.
    """
    if loss_scale == 1.0:
        return torch.autograd.grad(loss, tensors, **kwargs)
    return _unscaled(torch.autograd.grad(loss * loss_scale, tensors, **kwargs), loss_scale)


def _unscaled(grads, scale: float):
    """Gradients of a backward run on ``scale·(loss or cotangent)``, divided back (None kept)."""
    if scale == 1.0:
        return grads
    inverse = 1.0 / scale
    return tuple(None if g is None else g * inverse for g in grads)


def check_loss_scale(loss_scale) -> float:
    """``loss_scale`` as a float (None: 1.0): a finite number > 0 (``TypeError``/``ValueError`` naming it)."""
    return 1.0 if loss_scale is None else check_number("loss_scale", loss_scale, low=0.0, low_open=True)


def grads_or_zeros(grads, tensors):
    """``autograd.grad(..., allow_unused=True)`` results with None replaced by zeros."""
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 (the factor ``−η·w`` of the cotangent would push fp16 values into subnormals)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def teacher_backward(teacher_logits, teacher_params: dict, cotangent, loss_scale: float = 1.0,
                     retain_graph: bool = False) -> dict:
    """``J_Tᵀ c``: one ordinary backward of the teacher's logits with the given cotangent.

    ``loss_scale`` S: the backward runs on ``S·c`` and the gradients are divided by S.
    In float16 the cotangent ``−η·w·c`` is η times smaller than an ordinary loss
    gradient on the logits (η = 1e-4 underflowed most of the teacher's fp16 backward:
    56% error): it is first brought to an ordinary gradient's magnitude, i.e. its
    largest entry to about ``1/rows`` (a power of two P, undone exactly afterwards),
    so that the same S serves it as every other backward of the step.  ``retain_graph``: another
    backward through the same graph follows.
    """
    tensors = list(teacher_params.values())
    scale = float(loss_scale)
    if teacher_logits.dtype == torch.float16 or loss_scale != 1.0:
        largest = float(cotangent.detach().abs().max())
        if largest > 0.0 and math.isfinite(largest):
            rows = max(1, cotangent.numel() // max(1, cotangent.shape[-1]))
            scale *= 2.0 ** math.floor(math.log2(1.0 / (rows * largest)))
    grads = torch.autograd.grad(
        teacher_logits, tensors, grad_outputs=(cotangent * scale).to(teacher_logits.dtype), allow_unused=True,
        retain_graph=retain_graph,
    )
    grads = _unscaled(grads, scale)
    return {name: g.detach() for name, g in zip(teacher_params, grads_or_zeros(grads, tensors))}
