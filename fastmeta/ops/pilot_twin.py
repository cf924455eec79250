"""The plain-PyTorch twin of ``csrc/pilot_math.h``: one optimizer update and its exact adjoint, per tensor.

With ``csrc/pilot_math.h`` (C++/CUDA) this is the ONE home of the optimizer math of
fastmeta: :func:`fastmeta.ops.adam_pilot` / :func:`~fastmeta.ops.sgd_pilot` run it when
the extension cannot (``backend="torch"``, ineligible inputs, no build), and the
meta-gradient engine calls it directly, per tensor, where it needs the update as a
differentiable function (``hypergrad="autograd"``: autograd differentiates THESE update
values with a double backward, independently of the closed-form adjoint below that
``hypergrad="exact"`` uses).  The expressions and their order are those of
``pilot_math.h`` (see its header for the formulas); absent state / absent incoming
adjoints are skipped where the kernel reads zeros (adding or multiplying by an exact 0
changes no value).

Differentiability: out of place throughout; when autograd is recording and an input
requires grad, the square root is guarded (its derivative is taken as 0 where ``ŝ = 0``,
the limit along the gradient: an embedding row no token touched), and with
``exact_jacobian=False`` the second moment is computed from ``grad.detach()`` (autograd
then differentiates the frozen-second-moment linearisation, the same one as the adjoint).
Math in fp32 for fp16/bf16/fp32 storage, fp64 for fp64; outputs in ``theta``'s dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor
OptTensor = Optional[torch.Tensor]


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` whose derivative is 0 (not inf·0 = nan) where ``x == 0``."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


def _recording(*tensors: OptTensor) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _compute(theta: Tensor, *tensors: OptTensor):
    compute = torch.promote_types(theta.dtype, torch.float32)
    return (theta.to(compute),) + tuple(None if t is None else t.to(compute) for t in tensors)


def _out(x: OptTensor, dtype: torch.dtype) -> OptTensor:
    return None if x is None else x.to(dtype)


def adam_twin(
    theta: Tensor, grad: Tensor, m: OptTensor, s: OptTensor, smax: OptTensor, v: OptTensor = None,
    adj_m: OptTensor = None, adj_s: OptTensor = None, adj_smax: OptTensor = None, *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int, decoupled: bool,
    amsgrad: bool, maximize: bool, exact_jacobian: bool, adj_scale: float,
    compute_params: bool = True, compute_state: bool = False, compute_adj_params: bool = False,
    compute_adj_state: bool = False,
) -> Tuple[OptTensor, ...]:
    """``(θ', adj_grad, m', s', ŝ, adj_θ, adj_m, adj_s, adj_smax)`` of one Adam/AdamW update (None: not asked for).

    ``m``/``s``/``smax``: the state (None: none yet); ``step``: the step count of the step
    being taken; ``v = ∂L/∂θ'`` (None: no adjoint); ``adj_m``/``adj_s``/``adj_smax``: the
    adjoints of ``m'``, ``s'`` and ``ŝ`` (the next ``s_max``) handed back by the next
    step (None: 0, the last step).  ``adj_grad = adj_scale·∂L/∂grad``; ``adj_θ`` is ``∂L/∂θ``
    through θ itself (not through ``grad``); ``adj_s``/``adj_smax`` only with the exact
    Jacobian (the frozen one holds the second moment constant), ``adj_smax`` where ``smax``
    was given.  ``ŝ`` (the third state output) only with amsgrad.
    """
    dtype = theta.dtype
    differentiable = _recording(theta, grad, m, s, smax, v, adj_m, adj_s, adj_smax)
    sqrt = safe_sqrt if differentiable else torch.sqrt
    theta, grad, m, s, smax, v, adj_m, adj_s, adj_smax = _compute(theta, grad, m, s, smax, v, adj_m, adj_s, adj_smax)
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    l2 = weight_decay if (weight_decay != 0.0 and not decoupled) else 0.0
    decay = 1.0 - lr * weight_decay if (decoupled and weight_decay != 0.0) else 1.0
    step_size = lr / bc1
    g = -grad if maximize else grad
    if l2 != 0.0:
        g = g + l2 * theta
    g_s = g.detach() if (differentiable and not exact_jacobian) else g  # frozen: s' a constant for autograd
    m_new = (1.0 - beta1) * g if m is None else beta1 * m + (1.0 - beta1) * g
    s_new = ((1.0 - beta2) * g_s) * g_s if s is None else beta2 * s + ((1.0 - beta2) * g_s) * g_s
    from_s = None  # amsgrad with a maximum: where s' (not the old maximum) is used; ties (and a NaN s') go to s'
    s_hat = s_new
    if amsgrad and smax is not None:
        from_s = ~(s_new < smax)
        s_hat = torch.where(from_s, s_new, smax)
    root = sqrt(s_hat)
    r = root / math.sqrt(bc2)
    denom = r + eps
    out = [None] * 9
    if compute_params:
        out[0] = (theta if decay == 1.0 else decay * theta) - step_size * (m_new / denom)
    if compute_state:
        out[2], out[3] = m_new, s_new
        out[4] = s_hat if amsgrad else None
    if v is not None:
        inv_denom = 1.0 / denom
        plain = ((1.0 - beta1) / bc1) * inv_denom
        if exact_jacobian:
            numerator = torch.zeros_like(g)
            if s is not None:
                numerator = numerator + ((1.0 - beta1) * beta2) * s
            if m is not None:
                numerator = numerator - ((beta1 * (1.0 - beta2)) * m) * g
            positive = r > 0
            second = torch.where(positive, numerator / ((bc1 * bc2) * torch.where(positive, r, 1.0)), 0.0)
            d = (second + (1.0 - beta1) * eps / bc1) * inv_denom * inv_denom
            if from_s is not None:
                d = torch.where(from_s, d, plain)
        else:
            d = plain
        adj_g = (-lr * d) * v
        if adj_m is not None:
            adj_g = adj_g + (1.0 - beta1) * adj_m
        adj_s_hat = None
        if exact_jacobian:
            adj_g_s = adj_s
            if adj_smax is not None:
                part = adj_smax if from_s is None else torch.where(from_s, adj_smax, 0.0)
                adj_g_s = part if adj_g_s is None else adj_g_s + part
            if adj_g_s is not None:
                adj_g = adj_g + ((2.0 * (1.0 - beta2)) * g) * adj_g_s
        out[1] = adj_g * (-adj_scale if maximize else adj_scale)
        if compute_adj_params:
            out[5] = (v if decay == 1.0 else decay * v) + (l2 * adj_g if l2 != 0.0 else 0.0)
        if compute_adj_state:
            adj_m_new = (-step_size * v) * inv_denom
            if adj_m is not None:
                adj_m_new = adj_m_new + adj_m
            out[6] = beta1 * adj_m_new
            if exact_jacobian:
                positive = root > 0
                through_root = ((v * step_size) * m_new) * inv_denom * inv_denom / (
                    2.0 * math.sqrt(bc2) * torch.where(positive, root, 1.0))
                adj_s_hat = torch.where(positive, through_root, 0.0)
                if adj_smax is not None:
                    adj_s_hat = adj_s_hat + adj_smax
                adj_s_new = adj_s_hat if from_s is None else torch.where(from_s, adj_s_hat, 0.0)
                if adj_s is not None:
                    adj_s_new = adj_s_new + adj_s
                out[7] = beta2 * adj_s_new
                if from_s is not None:
                    out[8] = torch.where(from_s, 0.0, adj_s_hat)
    return tuple(_out(x, dtype) for x in out)


def sgd_twin(
    theta: Tensor, grad: Tensor, buf: OptTensor, v: OptTensor = None, adj_buf: OptTensor = None, *,
    lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
    adj_scale: float, compute_params: bool = True, compute_state: bool = False, compute_adj_params: bool = False,
    compute_adj_state: bool = False,
) -> Tuple[OptTensor, ...]:
    """``(θ', adj_grad, buf', adj_θ, adj_buf)`` of one ``torch.optim.SGD`` update (None: not asked for / none).

    ``buf``: the momentum buffer (None: the first step, ``buf' = g``); ``adj_buf``: the
    adjoint of ``buf'`` from the next step (None: 0).  ``adj_buf`` (output) only with
    momentum and a previous buffer.  See :func:`adam_twin` for the rest.
    """
    dtype = theta.dtype
    theta, grad, buf, v, adj_buf = _compute(theta, grad, buf, v, adj_buf)
    has_momentum = momentum != 0.0
    first = buf is None
    g = -grad if maximize else grad
    if weight_decay != 0.0:
        g = g + weight_decay * theta
    out = [None] * 5
    if compute_params or compute_state:
        buf_new = None
        update = g
        if has_momentum:
            buf_new = g if first else momentum * buf + (1.0 - dampening) * g
            update = g + momentum * buf_new if nesterov else buf_new
        if compute_params:
            out[0] = theta - lr * update
        if compute_state:
            out[2] = buf_new
    if v is not None:
        u = -lr * v
        b = None
        if not has_momentum:
            adj_g = u
        else:
            b = u * momentum if nesterov else u
            if adj_buf is not None:
                b = b + adj_buf
            through = b if first else (1.0 - dampening) * b
            adj_g = u + through if nesterov else through
        out[1] = adj_g * (-adj_scale if maximize else adj_scale)
        if compute_adj_params:
            out[3] = v + weight_decay * adj_g if weight_decay != 0.0 else v
        if compute_adj_state and has_momentum and not first:
            out[4] = momentum * b
    return tuple(_out(x, dtype) for x in out)
