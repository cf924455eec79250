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

``precondition(vectors, optimizer, params=None, *, grads=None, first_moment_factor=True)``
    ``P ⊙ v`` with ``P`` the diagonal preconditioner of one step of ``optimizer``,
    read from the optimizer's own hyper-parameters and state; see its docstring for
    the exact linearisation used for SGD, SGD with momentum, Adam and AdamW.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

__all__ = [
    "add_scaled_",
    "dot",
    "norm",
    "central_difference",
    "adam_preconditioner",
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


def _state_step(state) -> int:
    step = state.get("step", 0)
    if isinstance(step, torch.Tensor):
        step = step.item()
    return int(step)


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
    r"""``P ⊙ v``: the diagonal preconditioner of ONE step of ``optimizer`` applied to ``vectors``.

    ``params`` (default: every parameter of every param group, in order) are the
    parameters ``vectors`` is aligned with; each one's hyper-parameters come from
    its param group and its state from ``optimizer.state``.  The learning rate is
    NOT part of ``P``: one step is written ``θ' = θ - lr · P ⊙ g + (terms that do
    not depend on the gradient g)``, and ``P ⊙ v`` is what replaces ``v`` in the
    SGD meta-gradient formulas (``∂θ'/∂g = -lr·diag(P)``).

    Which step is linearised
        * If the parameter HAS optimizer state and ``grads`` is None: the step the
          optimizer has just taken (its state already contains that step's gradient:
          ``exp_avg_sq`` and ``step = t`` as left by ``optimizer.step()``).
        * If ``grads`` is given: the NEXT step, taken from the current state with
          these gradients (second moment ``β2·s + (1-β2)·g²``, ``t = step + 1``).
        * No state yet (the optimizer has not stepped): first-step semantics, i.e.
          the next step with ``t = 1`` and zero moments; Adam then needs the
          gradient (``grads``, else ``param.grad``) and raises if it has none.

    SGD (``momentum = 0``): ``P = 1`` (exact).

    SGD with momentum ``μ``, dampening ``d``: the step is *affine* in the gradient
    (``buf' = μ·buf + (1-d)·g`` , ``θ' = θ - lr·buf'``; first step ``buf' = g``), so
    ``P`` is a constant and the linearisation is exact:
    ``P = 1 - d`` (``1`` on the first step, i.e. when the parameter has no
    momentum buffer yet; SGD keeps no step count, so with a buffer present the step
    is taken as a later one); Nesterov (``θ' = θ - lr·(g + μ·buf')``):
    ``P = 1 + μ(1-d)`` (``1 + μ`` on the first step).  Weight decay adds ``wd·θ`` to
    ``g`` and does not change ``P``; ``maximize=True`` negates ``P``.

    Adam / AdamW (``amsgrad`` uses ``max_exp_avg_sq``): the step is
    ``θ' = θ - lr · m̂ / (sqrt(v̂)+eps)`` with ``m' = β1·m + (1-β1)·g``,
    ``m̂ = m'/(1-β1^t)``.  We hold the second moment ``v̂`` constant (the usual
    first-order treatment; its own dependence on ``g`` through ``(1-β2)·g²`` is
    dropped) and differentiate the first moment exactly:
    ``P = (1-β1)/(1-β1^t) / (sqrt(v̂)+eps)``, ``v̂ = exp_avg_sq/(1-β2^t)``.
    ``first_moment_factor=False`` gives the bare ``1/(sqrt(v̂)+eps)``.  AdamW's
    decoupled weight decay and Adam's L2 term do not depend on ``g``'s direction
    ``v`` and do not enter ``P``.
    """
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

    is_adam = isinstance(optimizer, torch.optim.Adam) or type(optimizer).__name__ in ("Adam", "AdamW")
    is_sgd = isinstance(optimizer, torch.optim.SGD)
    if not (is_adam or is_sgd):
        raise TypeError(
            f"precondition supports torch.optim.SGD, Adam and AdamW, got {type(optimizer).__name__}"
        )

    out: List[Optional[torch.Tensor]] = [None] * len(vectors)
    if is_sgd:
        for i, (v, p) in enumerate(zip(vectors, params)):
            group = group_of[id(p)]
            mu, d = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0))
            state = optimizer.state.get(p, {})
            # SGD keeps no step count: a present momentum buffer means the linearised
            # step is not the first one (see the docstring)
            first = state.get("momentum_buffer", None) is None
            if mu == 0.0:
                factor = 1.0
            elif group.get("nesterov", False):
                factor = 1.0 + mu if first else 1.0 + mu * (1.0 - d)
            else:
                factor = 1.0 if first else 1.0 - d
            if group.get("maximize", False):
                factor = -factor
            out[i] = v * factor if factor != 1.0 else v.clone()
        return out  # type: ignore[return-value]

    # Adam / AdamW: group params that share hyper-parameters and step, then one fused call
    batches = {}
    for i, (v, p) in enumerate(zip(vectors, params)):
        group = group_of[id(p)]
        beta1, beta2 = (float(b) for b in group["betas"])
        eps = float(group["eps"])
        amsgrad = bool(group.get("amsgrad", False))
        state = optimizer.state.get(p, {})
        key_sq = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
        if grads_list is not None or not state or key_sq not in state:
            g = grads_list[i] if grads_list is not None else p.grad
            if g is None:
                raise ValueError(
                    f"params[{i}] has no optimizer state and no gradient: pass grads= (or set "
                    f".grad) to linearise Adam's first step"
                )
            step = _state_step(state) + 1 if state else 1
            s = state.get(key_sq) if state and key_sq in state else torch.zeros_like(v)
            if amsgrad and state and key_sq in state:
                # amsgrad's max is not differentiable-friendly; v̂ = max(old max, new second moment)
                new_sq = state["exp_avg_sq"].to(torch.promote_types(v.dtype, torch.float32)) * beta2 + (
                    g.to(torch.promote_types(v.dtype, torch.float32)) ** 2
                ) * (1.0 - beta2)
                s = torch.maximum(s.to(new_sq.dtype), new_sq).to(v.dtype)
                g = None
            with_grad = g is not None
        else:
            s = state[key_sq]
            step = _state_step(state)
            g = None
            with_grad = False
        sign = -1.0 if group.get("maximize", False) else 1.0
        key = (beta1, beta2, eps, step, sign, with_grad)
        batches.setdefault(key, []).append((i, v, s.to(v.dtype) if s.dtype != v.dtype else s, g))
    for (beta1, beta2, eps, step, sign, with_grad), items in batches.items():
        idx = [it[0] for it in items]
        res = adam_preconditioner(
            [it[1] for it in items],
            [it[2] for it in items],
            step=step,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            grads=[it[3].to(it[1].dtype) for it in items] if with_grad else None,
            first_moment_factor=first_moment_factor,
            backend=backend,
        )
        for i, r in zip(idx, res):
            out[i] = r if sign == 1.0 else r.neg_()
    return out  # type: ignore[return-value]
