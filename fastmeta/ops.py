"""Multi-tensor primitives for Hessian-vector and meta-gradient products.

Every op works on *lists* of tensors (one entry per parameter) and exists twice:

* the C++/CUDA extension op ``torch.ops.fastmeta.<name>`` (``csrc/``), used when
  the extension is built for the tensors' device and the inputs are eligible
  (same device, contiguous, float16/bfloat16/float32/float64, matching dtypes
  within each pair);
* a plain-PyTorch twin built from ``torch._foreach_*`` / ``torch`` ops with the
  same math, used otherwise (and compared against the extension in tests).

Each public function takes ``backend="auto" | "extension" | "torch"``.  ``"auto"``
uses the extension when possible and the twin otherwise; ``"extension"`` raises
if the extension cannot run these inputs (naming the reason); ``"torch"`` always
runs the twin.

Ops (extension schema in brackets)
----------------------------------
``add_scaled_(tensors, vectors, alpha)``
    In place, for every i: ``tensors[i] += alpha * vectors[i]``.  fp16/bf16 storage
    is updated with fp32 math (one rounding to the storage type).  Returns ``None``.
    [``fastmeta::add_scaled_(Tensor(a!)[] tensors, Tensor[] vectors, float alpha) -> ()``]

``dot(xs, ys, *, dtype=torch.float32)``
    ``sum_i <xs[i], ys[i]>`` as a 0-dim tensor of ``dtype`` (float32 or float64),
    accumulated in ``dtype``.  Deterministic: the extension splits every tensor into
    fixed-size chunks, sums each chunk in a fixed order and adds the partial sums
    in a fixed order, independent of the thread count / launch configuration.
    [``fastmeta::dot(Tensor[] xs, Tensor[] ys, ScalarType dtype) -> Tensor``]

``norm(xs, *, dtype=torch.float32)``
    Euclidean norm ``sqrt(sum_i ||xs[i]||^2)`` of the concatenated list, accumulated
    in ``dtype``, deterministic as ``dot``.
    [``fastmeta::norm(Tensor[] xs, ScalarType dtype) -> Tensor``]

``central_difference(g_plus, g_minus, eps, *, inplace=False)``
    New list ``out[i] = (g_plus[i] - g_minus[i]) / (2 * eps)`` (fp32 math for
    fp16/bf16, storage dtype of ``g_plus[i]``); ``inplace=True`` writes it into
    ``g_plus`` (contiguous) and returns ``g_plus``.
    [``fastmeta::central_difference(Tensor[] g_plus, Tensor[] g_minus, float eps) -> Tensor[]``,
    ``fastmeta::central_difference_(Tensor(a!)[] g_plus, Tensor[] g_minus, float eps) -> ()``]

``adam_preconditioner(vectors, exp_avg_sqs, *, step, beta1, beta2, eps, grads=None, first_moment_factor=True)``
    New list ``out[i] = c1 * vectors[i] / (sqrt(s_i / (1 - beta2**step)) + eps)`` with
    ``c1 = (1 - beta1) / (1 - beta1**step)`` (``c1 = 1`` if ``first_moment_factor`` is
    False) and ``s_i = exp_avg_sqs[i]`` -- or, when ``grads`` is given, the second
    moment *after* accumulating those gradients,
    ``s_i = beta2 * exp_avg_sqs[i] + (1 - beta2) * grads[i]**2``.
    Math in fp32 (fp64 for fp64 inputs); output dtype of ``vectors[i]``.
    [``fastmeta::adam_preconditioner(Tensor[] vectors, Tensor[] exp_avg_sqs, Tensor[] grads,
    float beta2, float bias_correction2, float eps, float scale) -> Tensor[]``; an empty
    ``grads`` list means "no gradient update"; ``scale = c1``,
    ``bias_correction2 = 1 - beta2**step``]

``adam_pilot(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, vectors, *, lr, beta1, beta2, eps, step, ...)``
    The meta-gradient engine's pilot step, fused: ONE Adam/AdamW update (``θ'``, and the
    new state with ``compute_state=True``) and the exact adjoint of the raw gradient
    ``adj_scale·∂L/∂g`` for ``∂L/∂θ' = vectors`` (``−lr·D ⊙ v``, ``D`` the diagonal of the
    update's Jacobian), each element read once and written once; returns an ``AdamPilot``.
    [``fastmeta::adam_pilot(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs,
    Tensor[] max_exp_avg_sqs, Tensor[] vectors, float lr, float beta1, float beta2, float eps,
    float weight_decay, int step, bool decoupled, bool amsgrad, bool maximize, bool exact_jacobian,
    float adj_scale, bool compute_params, bool compute_state) -> (Tensor[] new_params,
    Tensor[] adj_grads, Tensor[] new_exp_avgs, Tensor[] new_exp_avg_sqs, Tensor[] new_max_exp_avg_sqs)``;
    empty lists: absent state / no adjoint / outputs not asked for]

``sgd_pilot(params, grads, momentum_buffers, vectors, *, lr, momentum, dampening, weight_decay, ...)``
    The same for ``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay, maximize);
    returns an ``SgdPilot``.
    [``fastmeta::sgd_pilot(Tensor[] params, Tensor[] grads, Tensor[] momentum_buffers, Tensor[] vectors,
    float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize,
    float adj_scale, bool compute_params, bool compute_state) -> (Tensor[] new_params, Tensor[] adj_grads,
    Tensor[] new_momentum_buffers)``]

``precondition(vectors, optimizer, params=None, *, grads=None, first_moment_factor=True)``
    Deprecated shim (frozen-second-moment preconditioner ``P ⊙ v`` of one step of
    ``optimizer``); the one home of the optimizer's Jacobian is
    :mod:`fastmeta.engine.optimizer`, which it imports lazily (see its docstring).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence

import torch

__all__ = [
    "add_scaled_",
    "dot",
    "norm",
    "central_difference",
    "adam_preconditioner",
    "adam_pilot",
    "sgd_pilot",
    "AdamPilot",
    "SgdPilot",
    "precondition",
    "extension_ops_available",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BACKENDS = ("auto", "extension", "torch")


# --------------------------------------------------------------------------- #
# backend selection
# --------------------------------------------------------------------------- #
def extension_ops_available(device: torch.device | str = "cpu") -> bool:
    """True if ``torch.ops.fastmeta`` ops can run on ``device`` (builds on first call)."""
    try:
        from fastmeta import _extension  # lead's module; imported lazily
    except ImportError:
        return False
    try:
        if not _extension.extension_available(torch.device(device)):
            return False
    except Exception:  # a broken build must never crash a caller
        return False
    try:
        torch.ops.fastmeta.dot  # noqa: B018  (registered by the built library?)
    except (AttributeError, RuntimeError):
        return False
    return True


def _check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _as_list(name: str, tensors) -> List[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name} must be a list/tuple of tensors, got a single Tensor")
    out = list(tensors)
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a Tensor, got {type(t).__name__}")
    return out


def _check_pairs(name_a: str, a: Sequence[torch.Tensor], name_b: str, b: Sequence[torch.Tensor]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {len(a)} and {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(
                f"{name_a}[{i}] and {name_b}[{i}] must have the same shape, got "
                f"{tuple(x.shape)} and {tuple(y.shape)}"
            )
        if x.device != y.device:
            raise ValueError(f"{name_a}[{i}] is on {x.device} but {name_b}[{i}] is on {y.device}")
        if not x.is_floating_point() or not y.is_floating_point():
            raise TypeError(f"{name_a}[{i}] and {name_b}[{i}] must be floating point, got {x.dtype} and {y.dtype}")


def _ineligibility(lists: Sequence[Sequence[torch.Tensor]], same_dtype: bool = True) -> Optional[str]:
    """Why the extension cannot run these inputs (None if it can)."""
    first = [l for l in lists if len(l)]
    if not first:
        return None
    device = first[0][0].device
    for l in lists:
        for i, t in enumerate(l):
            if t.device != device:
                return f"tensors on several devices ({device}, {t.device})"
            if t.dtype not in _SUPPORTED_DTYPES:
                return f"unsupported dtype {t.dtype}"
            if not t.is_contiguous():
                return "a non-contiguous tensor"
    if same_dtype:
        for l in lists[1:]:
            for a, b in zip(lists[0], l):
                if a.dtype != b.dtype:
                    return f"mixed dtypes within a pair ({a.dtype}, {b.dtype})"
    return None


def _device_of(lists: Sequence[Sequence[torch.Tensor]]) -> torch.device:
    for l in lists:
        if len(l):
            return l[0].device
    return torch.device("cpu")


def _use_extension(backend: str, op: str, lists, same_dtype: bool = True) -> bool:
    _check_backend(backend)
    if backend == "torch":
        return False
    reason = _ineligibility(lists, same_dtype)
    device = _device_of(lists)
    if reason is None and not extension_ops_available(device):
        reason = f"the fastmeta extension is not available for device {device}"
    if reason is None:
        return True
    if backend == "extension":
        raise RuntimeError(f"fastmeta.ops.{op}(backend='extension') cannot run: {reason}")
    return False


def _check_accumulate_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype (accumulation dtype) must be torch.float32 or torch.float64, got {dtype}")


# --------------------------------------------------------------------------- #
# ops
# --------------------------------------------------------------------------- #
@torch.no_grad()
def add_scaled_(tensors, vectors, alpha: float, *, backend: str = "auto") -> None:
    """In place: ``tensors[i] += alpha * vectors[i]`` for every i (θ += α·v).

    fp16/bf16 storage is updated with fp32 math and a single rounding.
    """
    tensors = _as_list("tensors", tensors)
    vectors = _as_list("vectors", vectors)
    _check_pairs("tensors", tensors, "vectors", vectors)
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if not tensors:
        return None
    if _use_extension(backend, "add_scaled_", [tensors, vectors]):
        torch.ops.fastmeta.add_scaled_(tensors, vectors, alpha)
        return None
    torch._foreach_add_(tensors, vectors, alpha=alpha)
    return None


def _dot_twin(xs, ys, dtype):
    partials = [torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)) for x, y in zip(xs, ys)]
    out = torch.zeros((), dtype=dtype, device=_device_of([xs]))
    for p in partials:  # ordered sum
        out = out + p
    return out


@torch.no_grad()
def dot(xs, ys, *, dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """``sum_i <xs[i], ys[i]>``, accumulated in ``dtype``; a 0-dim tensor of ``dtype``.

    Empty lists give ``0`` on the CPU.  The extension path is deterministic
    (fixed chunking, ordered sum of partials).
    """
    xs = _as_list("xs", xs)
    ys = _as_list("ys", ys)
    _check_pairs("xs", xs, "ys", ys)
    _check_accumulate_dtype(dtype)
    if not xs:
        return torch.zeros((), dtype=dtype)
    if _use_extension(backend, "dot", [xs, ys]):
        return torch.ops.fastmeta.dot(xs, ys, dtype)
    return _dot_twin(xs, ys, dtype)


@torch.no_grad()
def norm(xs, *, dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """Euclidean norm of the concatenation of ``xs``: ``sqrt(sum_i ||xs[i]||²)``, in ``dtype``."""
    xs = _as_list("xs", xs)
    for i, x in enumerate(xs):
        if not x.is_floating_point():
            raise TypeError(f"xs[{i}] must be floating point, got {x.dtype}")
    _check_accumulate_dtype(dtype)
    if not xs:
        return torch.zeros((), dtype=dtype)
    if _use_extension(backend, "norm", [xs]):
        return torch.ops.fastmeta.norm(xs, dtype)
    return torch.sqrt(_dot_twin(xs, xs, dtype))


@torch.no_grad()
def central_difference(
    g_plus, g_minus, eps: float, *, inplace: bool = False, backend: str = "auto"
) -> List[torch.Tensor]:
    """``(g_plus[i] - g_minus[i]) / (2·eps)`` (dtype of ``g_plus[i]``): a new list, or written
    into ``g_plus`` and returned when ``inplace=True`` (one gradient-sized list less)."""
    g_plus = _as_list("g_plus", g_plus)
    g_minus = _as_list("g_minus", g_minus)
    _check_pairs("g_plus", g_plus, "g_minus", g_minus)
    eps = float(eps)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    if not g_plus:
        return []
    if _use_extension(backend, "central_difference", [g_plus, g_minus]):
        if inplace:
            torch.ops.fastmeta.central_difference_(g_plus, g_minus, eps)
            return g_plus
        return list(torch.ops.fastmeta.central_difference(g_plus, g_minus, eps))
    out = []
    for gp, gm in zip(g_plus, g_minus):
        compute = torch.promote_types(gp.dtype, torch.float32)
        if inplace and compute == gp.dtype:
            gp.sub_(gm).mul_(1.0 / (2.0 * eps))
            out.append(gp)
        elif inplace:
            gp.copy_(((gp.to(compute) - gm.to(compute)) * (1.0 / (2.0 * eps))).to(gp.dtype))
            out.append(gp)
        else:
            out.append(((gp.to(compute) - gm.to(compute)) * (1.0 / (2.0 * eps))).to(gp.dtype))
    return out


@torch.no_grad()
def adam_preconditioner(
    vectors,
    exp_avg_sqs,
    *,
    step: int,
    beta1: float,
    beta2: float,
    eps: float,
    grads=None,
    first_moment_factor: bool = True,
    backend: str = "auto",
) -> List[torch.Tensor]:
    r"""Adam's diagonal preconditioner applied to ``vectors``.

    .. math::
        out_i = c_1 \, v_i / (\sqrt{s_i / (1-\beta_2^{t})} + \epsilon), \quad
        c_1 = (1-\beta_1)/(1-\beta_1^{t})

    with ``t = step`` (the step count *of the step being linearised*, 1 for the
    first), ``s_i = exp_avg_sqs[i]``, or ``s_i = beta2·exp_avg_sqs[i] + (1-beta2)·grads[i]²``
    when ``grads`` is given (the second moment the step computes from those
    gradients).  ``first_moment_factor=False`` sets ``c_1 = 1`` (the bare
    ``1/(sqrt(v̂)+eps)``).  The learning rate is *not* included.
    """
    vectors = _as_list("vectors", vectors)
    exp_avg_sqs = _as_list("exp_avg_sqs", exp_avg_sqs)
    _check_pairs("vectors", vectors, "exp_avg_sqs", exp_avg_sqs)
    grads_list: List[torch.Tensor] = []
    if grads is not None:
        grads_list = _as_list("grads", grads)
        _check_pairs("vectors", vectors, "grads", grads_list)
    step = int(step)
    if step < 1:
        raise ValueError(f"step must be >= 1 (the step being linearised), got {step}")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not (0.0 <= float(value) < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if not (float(eps) >= 0.0):
        raise ValueError(f"eps must be >= 0, got {eps}")
    beta1, beta2, eps = float(beta1), float(beta2), float(eps)
    scale = (1.0 - beta1) / (1.0 - beta1**step) if first_moment_factor else 1.0
    bias_correction2 = 1.0 - beta2**step
    if not vectors:
        return []
    lists = [vectors, exp_avg_sqs] + ([grads_list] if grads_list else [])
    if _use_extension(backend, "adam_preconditioner", lists):
        return list(
            torch.ops.fastmeta.adam_preconditioner(
                vectors, exp_avg_sqs, grads_list, beta2, bias_correction2, eps, scale
            )
        )
    out = []
    for i, (v, s) in enumerate(zip(vectors, exp_avg_sqs)):
        compute = torch.promote_types(v.dtype, torch.float32)
        s_c = s.to(compute)
        if grads_list:
            g = grads_list[i].to(compute)
            s_c = s_c * beta2 + g * g * (1.0 - beta2)
        denom = torch.sqrt(s_c / bias_correction2) + eps
        out.append((v.to(compute) * scale / denom).to(v.dtype))
    return out


# --------------------------------------------------------------------------- #
# the pilot step: one optimizer update and its Jacobian-vector product, fused
# --------------------------------------------------------------------------- #
class AdamPilot(NamedTuple):
    """:func:`adam_pilot`'s results (lists aligned with ``params``; None where not asked for)."""

    new_params: Optional[List[torch.Tensor]]
    adj_grads: Optional[List[torch.Tensor]]
    new_exp_avgs: Optional[List[torch.Tensor]]
    new_exp_avg_sqs: Optional[List[torch.Tensor]]
    new_max_exp_avg_sqs: Optional[List[torch.Tensor]]


class SgdPilot(NamedTuple):
    """:func:`sgd_pilot`'s results (lists aligned with ``params``; None where not asked for)."""

    new_params: Optional[List[torch.Tensor]]
    adj_grads: Optional[List[torch.Tensor]]
    new_momentum_buffers: Optional[List[torch.Tensor]]


def _optional_list(name: str, tensors, params: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """``None`` -> all None; else a list aligned with ``params`` whose entries may be None."""
    if tensors is None:
        return [None] * len(params)
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name} must be a list/tuple of tensors (or None), got a single Tensor")
    out = list(tensors)
    if len(out) != len(params):
        raise ValueError(f"{name} must have the length of params ({len(params)}), got {len(out)}")
    for i, (t, p) in enumerate(zip(out, params)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a Tensor or None, got {type(t).__name__}")
        _check_pairs("params", [p], name, [t])  # same shape, device, floating point
    return out


def _finite(name: str, value) -> float:
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _pilot_groups(keys: Sequence[tuple]) -> List[List[int]]:
    """Indices grouped by key, groups in order of first appearance (one op call each)."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _scatter(results: List[Optional[torch.Tensor]], indices: Sequence[int], values) -> None:
    for i, value in zip(indices, values):
        results[i] = value


def _adam_pilot_twin(theta, grad, m, s, smax, v, *, lr, beta1, beta2, eps, weight_decay, step, decoupled, amsgrad,
                     maximize, exact_jacobian, adj_scale, compute_params, compute_state):
    """One tensor: the draft's ``OptimizerUpdate.step`` and ``vjp`` (last step) in plain PyTorch, out of place.

    Math in fp32 for fp16/bf16/fp32 storage, fp64 for fp64; outputs in ``theta``'s dtype.
    """
    dtype = theta.dtype
    compute = torch.promote_types(dtype, torch.float32)
    as_c = lambda x: None if x is None else x.to(compute)  # noqa: E731
    theta, grad, m, s, smax, v = (as_c(x) for x in (theta, grad, m, s, smax, v))
    g = -grad if maximize else grad
    base = theta
    if weight_decay != 0.0:
        if decoupled:
            base = theta * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * theta
    m_new = (1.0 - beta1) * g if m is None else beta1 * m + (1.0 - beta1) * g
    s_new = (1.0 - beta2) * g * g if s is None else beta2 * s + (1.0 - beta2) * g * g
    from_s = None  # amsgrad: where s' (not the old maximum) is the second moment used
    s_hat = s_new
    if amsgrad and smax is not None:
        s_hat = torch.maximum(smax, s_new)
        from_s = s_new >= smax
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    r_hat = torch.sqrt(s_hat) / math.sqrt(bc2)
    denom = r_hat + eps
    theta_new = adj = None
    if compute_params:
        theta_new = (base - (lr / bc1) * (m_new / denom)).to(dtype)
    if v is not None:
        plain = ((1.0 - beta1) / bc1) / denom
        if exact_jacobian:
            # D = ([(1−β1)β2·s − β1(1−β2)·m·g'] / (bc1·bc2·r̂) + (1−β1)·eps/bc1) / denom²
            # (the g'² terms of the two-term derivative cancelled analytically)
            numerator = torch.zeros_like(g)
            if s is not None:
                numerator = numerator + (1.0 - beta1) * beta2 * s
            if m is not None:
                numerator = numerator - beta1 * (1.0 - beta2) * m * g
            positive = r_hat > 0
            second = torch.where(positive, numerator / (bc1 * bc2 * torch.where(positive, r_hat, 1.0)), 0.0)
            d = (second + (1.0 - beta1) * eps / bc1) / (denom * denom)
            if from_s is not None:
                d = torch.where(from_s, d, plain)
        else:
            d = plain
        adj_g = -lr * d * v
        adj = ((-adj_g if maximize else adj_g) * adj_scale).to(dtype)
    state = (None, None, None)
    if compute_state:
        state = (m_new.to(dtype), s_new.to(dtype), s_hat.to(dtype) if amsgrad else None)
    return (theta_new, adj) + state


def _sgd_pilot_twin(theta, grad, buf, v, *, lr, momentum, dampening, weight_decay, nesterov, maximize, adj_scale,
                    compute_params, compute_state):
    """One tensor: the draft's SGD ``step`` and ``vjp`` (last step) in plain PyTorch, out of place."""
    dtype = theta.dtype
    compute = torch.promote_types(dtype, torch.float32)
    as_c = lambda x: None if x is None else x.to(compute)  # noqa: E731
    theta, grad, buf, v = (as_c(x) for x in (theta, grad, buf, v))
    g = -grad if maximize else grad
    if weight_decay != 0.0:
        g = g + weight_decay * theta
    buf_new = None
    if momentum == 0.0:
        update = g
    else:
        buf_new = g if buf is None else momentum * buf + (1.0 - dampening) * g
        update = g + momentum * buf_new if nesterov else buf_new
    theta_new = (theta - lr * update).to(dtype) if compute_params else None
    adj = None
    if v is not None:
        adj_update = -lr * v
        if momentum == 0.0:
            adj_g = adj_update
        else:
            adj_buf_new = adj_update * momentum if nesterov else adj_update
            adj_g = adj_update if nesterov else torch.zeros_like(adj_update)
            adj_g = adj_g + (adj_buf_new if buf is None else (1.0 - dampening) * adj_buf_new)
        adj = ((-adj_g if maximize else adj_g) * adj_scale).to(dtype)
    new_buf = buf_new.to(dtype) if (compute_state and buf_new is not None) else None
    return theta_new, adj, new_buf


@torch.no_grad()
def adam_pilot(
    params,
    grads,
    exp_avgs=None,
    exp_avg_sqs=None,
    max_exp_avg_sqs=None,
    vectors=None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    amsgrad: bool = False,
    maximize: bool = False,
    exact_jacobian: bool = True,
    adj_scale: float = 1.0,
    compute_params: bool = True,
    compute_state: bool = False,
    backend: str = "auto",
) -> AdamPilot:
    r"""ONE Adam/AdamW update of ``params`` and its exact Jacobian-vector product, in one pass.

    The student optimizer's pilot step of the meta-gradient engine
    (:class:`fastmeta.engine.optimizer.OptimizerUpdate`: ``step``, and ``vjp`` at the last
    step of a trajectory), for the tensors of ONE param group (``torch.optim.Adam``,
    ``AdamW``: ``decoupled=True``).  Per element, with ``t = step`` (the step count OF the
    step being taken, ``state["step"] + 1``), ``bcK = 1 − βK^t``::

        g  = ±grad (+ wd·θ, L2)          m' = β1·m + (1−β1)·g        s' = β2·s + (1−β2)·g²
        ŝ  = max(s_max, s') (amsgrad)    denom = sqrt(ŝ)/sqrt(bc2) + eps
        θ' = θ·(1 − lr·wd, decoupled) − (lr/bc1)·m'/denom
        adj_grads = adj_scale · ∂L/∂grad  for ∂L/∂θ' = vectors  (= adj_scale · ±(−lr·D ⊙ v))

    ``D = ∂θ'/∂g / (−lr)`` is the exact derivative (``exact_jacobian=True``, the draft's
    cancellation-free form; amsgrad: ``(1−β1)/(bc1·denom)`` where the old maximum is
    used) or the frozen-second-moment one (``False``: ``(1−β1)/(bc1·denom)``).  The
    engine passes ``adj_scale = −1/lr_ref`` to get its direction ``a = −(∂L/∂g)/lr_ref``
    directly.

    ``exp_avgs``/``exp_avg_sqs``/``max_exp_avg_sqs``: None (no state yet: the first step)
    or lists aligned with ``params`` whose entries may be None (that parameter has no
    state yet); ``max_exp_avg_sqs`` only with ``amsgrad``.  ``step``: an int, or one int
    per parameter (torch.optim keeps a step count per parameter).  ``vectors``: None (no
    adjoint) or ``∂L/∂θ'`` per parameter.  ``compute_params``: return ``θ'``;
    ``compute_state``: return ``m'``, ``s'`` (and ``ŝ``, the next ``s_max``, with amsgrad)
    for trajectories of several steps.  Nothing is written in place.

    The extension op (``fastmeta::adam_pilot``) reads every input element once and
    writes every output once (math in fp32 for fp16/bf16/fp32 storage, fp64 for fp64);
    it is called once per (device, step, which states are present).  The plain-PyTorch
    twin (``backend="torch"``) computes the same expressions tensor by tensor.
    """
    params = _as_list("params", params)
    grads = _as_list("grads", grads)
    _check_pairs("params", params, "grads", grads)
    ms = _optional_list("exp_avgs", exp_avgs, params)
    ss = _optional_list("exp_avg_sqs", exp_avg_sqs, params)
    mxs = _optional_list("max_exp_avg_sqs", max_exp_avg_sqs, params)
    vs = None if vectors is None else _as_list("vectors", vectors)
    if vs is not None:
        _check_pairs("params", params, "vectors", vs)
    if not amsgrad and any(x is not None for x in mxs):
        raise ValueError("max_exp_avg_sqs given but amsgrad is False")
    _check_backend(backend)
    lr, eps, weight_decay, adj_scale = (_finite(n, x) for n, x in
                                        (("lr", lr), ("eps", eps), ("weight_decay", weight_decay),
                                         ("adj_scale", adj_scale)))
    beta1, beta2 = _finite("beta1", beta1), _finite("beta2", beta2)
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not (0.0 <= value < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if eps < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    steps = _steps(step, len(params))
    flags = dict(decoupled=bool(decoupled), amsgrad=bool(amsgrad), maximize=bool(maximize),
                 exact_jacobian=bool(exact_jacobian))
    n = len(params)
    out = [[None] * n for _ in range(5)]
    keys = [(p.device, steps[i], ms[i] is None, ss[i] is None, mxs[i] is None) for i, p in enumerate(params)]
    for idx in _pilot_groups(keys):
        P = [params[i] for i in idx]
        G = [grads[i] for i in idx]
        M = [ms[i] for i in idx if ms[i] is not None]
        S = [ss[i] for i in idx if ss[i] is not None]
        MX = [mxs[i] for i in idx if mxs[i] is not None]
        V = [] if vs is None else [vs[i] for i in idx]
        t = steps[idx[0]]
        if _use_extension(backend, "adam_pilot", [P, G, M, S, MX, V]):
            results = torch.ops.fastmeta.adam_pilot(
                P, G, M, S, MX, V, lr, beta1, beta2, eps, weight_decay, t, flags["decoupled"], flags["amsgrad"],
                flags["maximize"], flags["exact_jacobian"], adj_scale, bool(compute_params), bool(compute_state))
            for k in range(5):
                if len(results[k]):
                    _scatter(out[k], idx, results[k])
            continue
        for i in idx:
            values = _adam_pilot_twin(
                params[i], grads[i], ms[i], ss[i], mxs[i], None if vs is None else vs[i], lr=lr, beta1=beta1,
                beta2=beta2, eps=eps, weight_decay=weight_decay, step=t, adj_scale=adj_scale,
                compute_params=bool(compute_params), compute_state=bool(compute_state), **flags)
            for k in range(5):
                out[k][i] = values[k]
    wanted = (compute_params, vs is not None, compute_state, compute_state, compute_state and amsgrad)
    return AdamPilot(*(lst if want else None for lst, want in zip(out, wanted)))


def _steps(step, n: int) -> List[int]:
    if isinstance(step, (list, tuple)):
        if len(step) != n:
            raise ValueError(f"step must be an int or one int per parameter ({n}), got {len(step)} values")
        values = [int(s.item() if isinstance(s, torch.Tensor) else s) for s in step]
    else:
        values = [int(step.item() if isinstance(step, torch.Tensor) else step)] * n
    for s in values:
        if s < 1:
            raise ValueError(f"step must be >= 1 (the step count of the step being taken), got {s}")
    return values


@torch.no_grad()
def sgd_pilot(
    params,
    grads,
    momentum_buffers=None,
    vectors=None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    adj_scale: float = 1.0,
    compute_params: bool = True,
    compute_state: bool = False,
    backend: str = "auto",
) -> SgdPilot:
    r"""ONE ``torch.optim.SGD`` update of ``params`` and its Jacobian-vector product, in one pass.

    Per element: ``g = ±grad (+ wd·θ)``; without momentum ``θ' = θ − lr·g``; with momentum
    ``buf' = g`` (no buffer yet) or ``μ·buf + (1−d)·g`` and ``θ' = θ − lr·(g + μ·buf')``
    (nesterov) or ``θ − lr·buf'``.  ``adj_grads = adj_scale · ∂L/∂grad`` for
    ``∂L/∂θ' = vectors`` (the update is affine in ``g``: ``−lr·c·v`` with ``c = 1``,
    ``1−d`` or, nesterov, ``1 + μ·(1 or 1−d)``; ``maximize`` negates it).

    ``momentum_buffers``: None or a list aligned with ``params`` whose entries may be None
    (no buffer yet: the first step); only with ``momentum != 0``.  ``compute_state``:
    return ``buf'`` (momentum only).  See :func:`adam_pilot` for the rest.
    """
    params = _as_list("params", params)
    grads = _as_list("grads", grads)
    _check_pairs("params", params, "grads", grads)
    bufs = _optional_list("momentum_buffers", momentum_buffers, params)
    vs = None if vectors is None else _as_list("vectors", vectors)
    if vs is not None:
        _check_pairs("params", params, "vectors", vs)
    _check_backend(backend)
    lr, momentum, dampening, weight_decay, adj_scale = (
        _finite(n, x) for n, x in (("lr", lr), ("momentum", momentum), ("dampening", dampening),
                                   ("weight_decay", weight_decay), ("adj_scale", adj_scale)))
    if momentum == 0.0 and any(b is not None for b in bufs):
        raise ValueError("momentum_buffers given but momentum is 0")
    flags = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=bool(nesterov),
                 maximize=bool(maximize), adj_scale=adj_scale)
    n = len(params)
    out = [[None] * n for _ in range(3)]
    keys = [(p.device, bufs[i] is None) for i, p in enumerate(params)]
    for idx in _pilot_groups(keys):
        P = [params[i] for i in idx]
        G = [grads[i] for i in idx]
        B = [bufs[i] for i in idx if bufs[i] is not None]
        V = [] if vs is None else [vs[i] for i in idx]
        if _use_extension(backend, "sgd_pilot", [P, G, B, V]):
            results = torch.ops.fastmeta.sgd_pilot(
                P, G, B, V, lr, momentum, dampening, weight_decay, flags["nesterov"], flags["maximize"], adj_scale,
                bool(compute_params), bool(compute_state))
            for k in range(3):
                if len(results[k]):
                    _scatter(out[k], idx, results[k])
            continue
        for i in idx:
            values = _sgd_pilot_twin(params[i], grads[i], bufs[i], None if vs is None else vs[i],
                                     compute_params=bool(compute_params), compute_state=bool(compute_state), **flags)
            for k in range(3):
                out[k][i] = values[k]
    wanted = (compute_params, vs is not None, compute_state and momentum != 0.0)
    return SgdPilot(*(lst if want else None for lst, want in zip(out, wanted)))


@torch.no_grad()
def precondition(
    vectors,
    optimizer: torch.optim.Optimizer,
    params=None,
    *,
    grads=None,
    first_moment_factor: bool = True,
    backend: str = "auto",
) -> List[torch.Tensor]:
    r"""Deprecated: ``P ⊙ v``, the diagonal preconditioner of ONE step of ``optimizer`` (frozen linearisation).

    Kept so that existing callers work; the one home of the student optimizer's
    Jacobian is :mod:`fastmeta.engine.optimizer` (its exact vector-Jacobian product,
    ``OptimizerUpdate.vjp``, is what the meta-gradient engine uses).  This shim
    computes with that module: SGD through ``OptimizerUpdate.vjp`` (SGD's step is
    affine in the gradient: exact), Adam/AdamW through
    :func:`fastmeta.engine.optimizer.adam_frozen_factor`.  It imports the engine lazily,
    inside the call: ``fastmeta.ops`` sits below the engine in the import order
    (engine -> hessian -> ops), so a module-level import would be a cycle.  ``backend``
    is accepted and ignored (the computation is elementwise PyTorch).

    ``params`` (default: every parameter of every param group, in order) are the
    parameters ``vectors`` is aligned with; each one's hyper-parameters come from
    its param group and its state from ``optimizer.state``.  The learning rate is
    NOT part of ``P``: ``θ' = θ − lr·P ⊙ g + (terms that do not depend on g)``.

    Which step is linearised
        * If the parameter HAS optimizer state and ``grads`` is None: the step the
          optimizer has just taken (``exp_avg_sq`` and ``step = t`` as left by
          ``optimizer.step()``).
        * If ``grads`` is given: the NEXT step, taken from the current state with
          these gradients (second moment ``β2·s + (1−β2)·g²``, ``t = step + 1``).
        * No state yet: first-step semantics (``t = 1``, zero moments); Adam then needs
          the gradient (``grads``, else ``param.grad``) and raises if it has none.

    SGD: ``P = 1``; with momentum ``μ``, dampening ``d``: ``1 − d`` (``1`` on the first
    step, when the parameter has no momentum buffer yet); Nesterov ``1 + μ(1−d)``
    (``1 + μ`` on the first step); ``maximize=True`` negates ``P``.  Exact.

    Adam / AdamW: the second moment ``v̂`` held constant (its dependence on ``g`` is
    dropped), ``P = (1−β1)/(1−β1^t) / (sqrt(v̂)+eps)`` (``first_moment_factor=False``:
    ``1/(sqrt(v̂)+eps)``).  NOT the Jacobian of the real Adam step (which has a second
    term, up to ~1e4x larger on the first step): use
    ``fastmeta.engine.optimizer.OptimizerUpdate.vjp`` for that.
    """
    import warnings

    from fastmeta.engine import optimizer as engine_optimizer

    warnings.warn(
        "fastmeta.ops.precondition is deprecated (frozen-second-moment linearisation of Adam); the exact "
        "Jacobian of the optimizer's update is fastmeta.engine.optimizer.OptimizerUpdate.vjp",
        DeprecationWarning,
        stacklevel=3,  # the caller of the torch.no_grad-decorated function
    )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    group_of = {}
    ordered = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[id(p)] = group
            ordered.append(p)
    params = ordered if params is None else _as_list("params", params)
    vectors = _as_list("vectors", vectors)
    _check_pairs("vectors", vectors, "params", params)
    grads_list = None if grads is None else _as_list("grads", grads)
    if grads_list is not None:
        _check_pairs("vectors", vectors, "grads", grads_list)
    for i, p in enumerate(params):
        if id(p) not in group_of:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is not in any param group of the optimizer")
    if not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(f"precondition supports torch.optim.SGD, Adam and AdamW, got {type(optimizer).__name__}")

    named = {str(i): p for i, p in enumerate(params)}
    if isinstance(optimizer, torch.optim.SGD):
        update = engine_optimizer.optimizer_update(named, optimizer, inner_lr=1.0)
        out = []
        for name, v, p in zip(named, vectors, params):
            _, adj_g, _ = update.vjp(name, p.detach(), v, update.initial_state(name), v)
            out.append(-adj_g)  # lr = 1: ∂θ'/∂g = −P
        return out
    out = []
    for i, (v, p) in enumerate(zip(vectors, params)):
        group = group_of[id(p)]
        beta1, beta2 = (float(b) for b in group["betas"])
        eps = float(group["eps"])
        amsgrad = bool(group.get("amsgrad", False))
        state = optimizer.state.get(p, {})
        key_sq = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
        compute = torch.promote_types(v.dtype, torch.float32)
        step = state.get("step", 0)
        step = int(step.item() if isinstance(step, torch.Tensor) else step)
        if grads_list is not None or key_sq not in state:
            g = grads_list[i] if grads_list is not None else p.grad
            if g is None:
                raise ValueError(
                    f"params[{i}] has no optimizer state and no gradient: pass grads= (or set "
                    f".grad) to linearise Adam's first step"
                )
            old = state.get("exp_avg_sq")
            s_hat = engine_optimizer._second_moment(None if old is None else old.to(compute), g.to(compute), beta2)
            if amsgrad and key_sq in state:
                s_hat = torch.maximum(state[key_sq].to(compute), s_hat)
            t = step + 1
        else:
            s_hat, t = state[key_sq].to(compute), step
        factor = engine_optimizer.adam_frozen_factor(s_hat, t, beta1, beta2, eps)
        if not first_moment_factor:
            factor = factor / ((1.0 - beta1) / (1.0 - beta1**t))
        if group.get("maximize", False):
            factor = -factor
        out.append((v.to(compute) * factor).to(v.dtype))
    return out
