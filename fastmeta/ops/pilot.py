"""The pilot step, fused: ONE optimizer update, its new state and its exact adjoint, for a list of tensors.

``adam_pilot`` (``torch.optim.Adam``/``AdamW``: amsgrad, L2 or decoupled weight decay,
maximize) and ``sgd_pilot`` (``torch.optim.SGD``: momentum, dampening, nesterov, weight
decay, maximize) read every input element once and write every output element once
(the extension ops ``torch.ops.fastmeta.adam_pilot`` / ``sgd_pilot``, math in
``csrc/pilot_math.h``), or run the plain-PyTorch twin (:mod:`.pilot_twin`, the same
expressions) tensor by tensor.  Forward (the pilot point, and the new state for a
trajectory of several steps) and reverse (a step of the reverse sweep: the incoming
adjoints of ``θ'`` and of the new state in, the adjoints of the raw gradient, of ``θ``
and of the old state out) are the same op with different outputs asked for.

Schemas::

    fastmeta::adam_pilot(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs,
        Tensor[] max_exp_avg_sqs, Tensor[] vectors, Tensor[] adj_exp_avgs, Tensor[] adj_exp_avg_sqs,
        Tensor[] adj_max_exp_avg_sqs, float lr, float beta1, float beta2, float eps, float weight_decay,
        int step, bool decoupled, bool amsgrad, bool maximize, bool exact_jacobian, float adj_scale,
        bool compute_params, bool compute_state, bool compute_adj_params, bool compute_adj_state)
        -> (Tensor[] new_params, Tensor[] adj_grads, Tensor[] new_exp_avgs, Tensor[] new_exp_avg_sqs,
            Tensor[] new_max_exp_avg_sqs, Tensor[] adj_params, Tensor[] adj_exp_avgs, Tensor[] adj_exp_avg_sqs,
            Tensor[] adj_max_exp_avg_sqs)
    fastmeta::sgd_pilot(Tensor[] params, Tensor[] grads, Tensor[] momentum_buffers, Tensor[] vectors,
        Tensor[] adj_momentum_buffers, float lr, float momentum, float dampening, float weight_decay,
        bool nesterov, bool maximize, float adj_scale, bool compute_params, bool compute_state,
        bool compute_adj_params, bool compute_adj_state)
        -> (Tensor[] new_params, Tensor[] adj_grads, Tensor[] new_momentum_buffers, Tensor[] adj_params,
            Tensor[] adj_momentum_buffers)

(empty lists: absent state, no adjoint, no incoming state adjoint, outputs not asked for).
``adam_pilot_unchecked`` / ``sgd_pilot_unchecked`` are the same ops without the argument checks,
for callers whose arguments are already checked (the engine, every step, through
:func:`fastmeta.ops.torch_optim.rule_pilot`).
With ``backend="auto"`` a fallback to the twin for a reason other than a missing build (a
non-contiguous tensor, an unsupported dtype, several devices) warns once per reason
(:class:`FallbackWarning`): the fused op is the pilot step's fast path.
"""
from __future__ import annotations

import warnings
from typing import List, NamedTuple, Optional

import torch

from ._dispatch import (
    as_list, check_backend, check_pairs, extension_ops_available, finite, groups, ineligibility, device_of,
    optional_list, scatter,
)
from .pilot_twin import adam_twin, sgd_twin


class FallbackWarning(RuntimeWarning):
    """A fused op ran its plain-PyTorch twin (``backend="auto"``) for a reason other than a missing build."""


class AdamPilot(NamedTuple):
    """:func:`adam_pilot`'s results (lists aligned with ``params``; None where not asked for)."""

    new_params: Optional[List[torch.Tensor]]
    adj_grads: Optional[List[torch.Tensor]]
    new_exp_avgs: Optional[List[torch.Tensor]]
    new_exp_avg_sqs: Optional[List[torch.Tensor]]
    new_max_exp_avg_sqs: Optional[List[torch.Tensor]]
    adj_params: Optional[List[torch.Tensor]] = None
    adj_exp_avgs: Optional[List[torch.Tensor]] = None
    adj_exp_avg_sqs: Optional[List[torch.Tensor]] = None
    adj_max_exp_avg_sqs: Optional[List[torch.Tensor]] = None


class SgdPilot(NamedTuple):
    """:func:`sgd_pilot`'s results (lists aligned with ``params``; None where not asked for)."""

    new_params: Optional[List[torch.Tensor]]
    adj_grads: Optional[List[torch.Tensor]]
    new_momentum_buffers: Optional[List[torch.Tensor]]
    adj_params: Optional[List[torch.Tensor]] = None
    adj_momentum_buffers: Optional[List[torch.Tensor]] = None


_WARNED: set = set()


def _fused(backend: str, op: str, lists) -> bool:
    """Whether the extension runs ``op`` on ``lists``; ``"extension"``: raise naming why not; ``"auto"``: warn once."""
    if backend == "torch":
        return False
    reason = ineligibility(lists, same_dtype=True)
    if reason is None:
        device = device_of(lists)
        if extension_ops_available(device):
            return True
        if backend == "extension":
            raise RuntimeError(f"fastmeta.ops.{op}(backend='extension') cannot run: the fastmeta extension is "
                               f"not available for device {device}")
        return False  # the build (or FASTMETA_DISABLE_EXTENSION) has said so already
    if backend == "extension":
        raise RuntimeError(f"fastmeta.ops.{op}(backend='extension') cannot run: {reason}")
    if (op, reason) not in _WARNED:
        _WARNED.add((op, reason))
        warnings.warn(f"fastmeta.ops.{op}: {reason}: running the plain-PyTorch twin (slower) instead of the fused op",
                      FallbackWarning, stacklevel=4)
    return False


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


def _present(lst, idx) -> list:
    return [lst[i] for i in idx if lst[i] is not None]


@torch.no_grad()
def adam_pilot(
    params, grads, exp_avgs=None, exp_avg_sqs=None, max_exp_avg_sqs=None, vectors=None, *,
    lr: float, beta1: float, beta2: float, eps: float, step, weight_decay: float = 0.0, decoupled: bool = False,
    amsgrad: bool = False, maximize: bool = False, exact_jacobian: bool = True, adj_scale: float = 1.0,
    adj_exp_avgs=None, adj_exp_avg_sqs=None, adj_max_exp_avg_sqs=None, compute_params: bool = True,
    compute_state: bool = False, compute_adj_params: bool = False, compute_adj_state: bool = False,
    backend: str = "auto",
) -> AdamPilot:
    r"""ONE Adam/AdamW update of ``params`` (one param group) and its exact adjoint, in one pass.

    Per element, with ``t = step`` (the step count OF the step being taken,
    ``state["step"] + 1``), ``bcK = 1 − βK^t``::

        g  = ±grad (+ wd·θ, L2)          m' = β1·m + (1−β1)·g        s' = β2·s + (1−β2)·g²
        ŝ  = max(s_max, s') (amsgrad)    denom = sqrt(ŝ)/sqrt(bc2) + eps
        θ' = θ·(1 − lr·wd, decoupled) − (lr/bc1)·m'/denom

    and, for ``vectors`` ``= ∂L/∂θ'`` and the incoming adjoints ``adj_exp_avgs = ∂L/∂m'``,
    ``adj_exp_avg_sqs = ∂L/∂s'``, ``adj_max_exp_avg_sqs = ∂L/∂ŝ`` (a reverse sweep through
    several steps; None: 0), ``adj_grads = adj_scale·∂L/∂grad`` (``−lr·D ⊙ v`` at the last
    step, ``D`` the diagonal of the update's Jacobian: the exact one, ``exact_jacobian=True``,
    in a cancellation-free form, or the frozen-second-moment one), ``adj_params = ∂L/∂θ``
    through θ itself (``compute_adj_params``) and the old state's adjoints
    (``compute_adj_state``: ``adj_exp_avgs``; ``adj_exp_avg_sqs`` and, where a maximum was
    given, ``adj_max_exp_avg_sqs`` with the exact Jacobian).  The formulas:
    ``csrc/pilot_math.h``.  The engine passes ``adj_scale = −1/lr_ref`` to get its direction
    ``a = −(∂L/∂g)/lr_ref`` directly.

    ``exp_avgs``/``exp_avg_sqs``/``max_exp_avg_sqs`` (and the incoming adjoints): None (no
    state yet: the first step) or lists aligned with ``params`` whose entries may be None;
    maxima only with ``amsgrad``.  ``step``: an int, or one int per parameter.
    ``compute_params``: ``θ'``; ``compute_state``: ``m'``, ``s'`` (and ``ŝ``, the next
    ``s_max``, with amsgrad).  Nothing is written in place.  One extension call per
    (device, step, which lists are present); math in fp32 for fp16/bf16/fp32 storage,
    fp64 for fp64.
    """
    params = as_list("params", params)
    grads = as_list("grads", grads)
    check_pairs("params", params, "grads", grads)
    lists = [optional_list(name, x, params) for name, x in (
        ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("max_exp_avg_sqs", max_exp_avg_sqs),
        ("adj_exp_avgs", adj_exp_avgs), ("adj_exp_avg_sqs", adj_exp_avg_sqs),
        ("adj_max_exp_avg_sqs", adj_max_exp_avg_sqs))]
    ms, ss, mxs, ams, ass, axs = lists
    vs = None if vectors is None else as_list("vectors", vectors)
    if vs is not None:
        check_pairs("params", params, "vectors", vs)
    if not amsgrad and any(x is not None for x in mxs + axs):
        raise ValueError("max_exp_avg_sqs / adj_max_exp_avg_sqs given but amsgrad is False")
    if vs is None and (compute_adj_params or compute_adj_state or any(x is not None for x in ams + ass + axs)):
        raise ValueError("adjoints (adj_exp_avgs/adj_exp_avg_sqs/adj_max_exp_avg_sqs, compute_adj_params, "
                         "compute_adj_state) need vectors (∂L/∂θ')")
    check_backend(backend)
    lr, eps, weight_decay, adj_scale = (finite(n, x) for n, x in (
        ("lr", lr), ("eps", eps), ("weight_decay", weight_decay), ("adj_scale", adj_scale)))
    beta1, beta2 = finite("beta1", beta1), finite("beta2", beta2)
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not (0.0 <= value < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if eps < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return adam_pilot_unchecked(
        params, grads, ms, ss, mxs, vs, ams, ass, axs, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        step=_steps(step, len(params)), weight_decay=weight_decay, decoupled=bool(decoupled),
        amsgrad=bool(amsgrad), maximize=bool(maximize), exact_jacobian=bool(exact_jacobian), adj_scale=adj_scale,
        compute_params=bool(compute_params),
        compute_state=bool(compute_state), compute_adj_params=bool(compute_adj_params),
        compute_adj_state=bool(compute_adj_state), backend=backend)


@torch.no_grad()
def adam_pilot_unchecked(
    params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[Optional[torch.Tensor]],
    exp_avg_sqs: List[Optional[torch.Tensor]], max_exp_avg_sqs: List[Optional[torch.Tensor]],
    vectors: Optional[List[torch.Tensor]], adj_exp_avgs: List[Optional[torch.Tensor]],
    adj_exp_avg_sqs: List[Optional[torch.Tensor]], adj_max_exp_avg_sqs: List[Optional[torch.Tensor]], *,
    lr: float, beta1: float, beta2: float, eps: float, step: List[int], weight_decay: float, decoupled: bool,
    amsgrad: bool, maximize: bool, exact_jacobian: bool, adj_scale: float, compute_params: bool, compute_state: bool,
    compute_adj_params: bool, compute_adj_state: bool, backend: str = "auto",
) -> AdamPilot:
    """:func:`adam_pilot` for arguments already checked (the engine's, every step): every list aligned with
    ``params`` (entries None where absent), ``step`` one int per parameter, flags bools, numbers finite."""
    lists = [exp_avgs, exp_avg_sqs, max_exp_avg_sqs, adj_exp_avgs, adj_exp_avg_sqs, adj_max_exp_avg_sqs]
    ms, ss, mxs, ams, ass, axs = lists
    vs = vectors
    flags = dict(decoupled=decoupled, amsgrad=amsgrad, maximize=maximize, exact_jacobian=exact_jacobian)
    want = dict(compute_params=compute_params, compute_state=compute_state, compute_adj_params=compute_adj_params,
                compute_adj_state=compute_adj_state)
    n = len(params)
    out = [[None] * n for _ in range(9)]
    keys = [(p.device, step[i]) + tuple(lst[i] is None for lst in lists) for i, p in enumerate(params)]
    for idx in groups(keys):
        P, G = [params[i] for i in idx], [grads[i] for i in idx]
        V = [] if vs is None else [vs[i] for i in idx]
        present = [_present(lst, idx) for lst in lists]
        t = step[idx[0]]
        if _fused(backend, "adam_pilot", [P, G] + present[:3] + [V] + present[3:]):
            results = torch.ops.fastmeta.adam_pilot(
                P, G, *present[:3], V, *present[3:], lr, beta1, beta2, eps, weight_decay, t, decoupled,
                amsgrad, maximize, exact_jacobian, adj_scale, *want.values())
            for k in range(9):
                if len(results[k]):
                    scatter(out[k], idx, results[k])
            continue
        for i in idx:
            values = adam_twin(params[i], grads[i], ms[i], ss[i], mxs[i], None if vs is None else vs[i], ams[i],
                               ass[i], axs[i], lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                               step=t, adj_scale=adj_scale, **flags, **want)
            for k in range(9):
                out[k][i] = values[k]
    adj = vs is not None
    wanted = (compute_params, adj, compute_state, compute_state, compute_state and amsgrad, adj and compute_adj_params,
              adj and compute_adj_state, adj and compute_adj_state and exact_jacobian,
              adj and compute_adj_state and exact_jacobian and amsgrad)
    return AdamPilot(*(lst if w else None for lst, w in zip(out, wanted)))


@torch.no_grad()
def sgd_pilot(
    params, grads, momentum_buffers=None, vectors=None, *, lr: float, momentum: float = 0.0,
    dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False,
    adj_scale: float = 1.0, adj_momentum_buffers=None, compute_params: bool = True, compute_state: bool = False,
    compute_adj_params: bool = False, compute_adj_state: bool = False, backend: str = "auto",
) -> SgdPilot:
    r"""ONE ``torch.optim.SGD`` update of ``params`` and its adjoint, in one pass.

    Per element: ``g = ±grad (+ wd·θ)``; without momentum ``θ' = θ − lr·g``; with momentum
    ``buf' = g`` (no buffer yet) or ``μ·buf + (1−d)·g`` and ``θ' = θ − lr·(g + μ·buf')``
    (nesterov) or ``θ − lr·buf'``.  ``adj_grads = adj_scale·∂L/∂grad`` for ``∂L/∂θ' =
    vectors`` and ``∂L/∂buf' = adj_momentum_buffers`` (None: 0; the update is affine in
    ``g``); ``adj_params`` (``compute_adj_params``): ``∂L/∂θ`` through θ itself;
    ``adj_momentum_buffers`` (``compute_adj_state``, momentum and a previous buffer only):
    ``∂L/∂buf``.  ``momentum_buffers``: None or a list aligned with ``params`` whose entries
    may be None (no buffer yet: the first step); only with ``momentum != 0``.
    ``compute_state``: return ``buf'`` (momentum only).  See :func:`adam_pilot` for the rest.
    """
    params = as_list("params", params)
    grads = as_list("grads", grads)
    check_pairs("params", params, "grads", grads)
    bufs = optional_list("momentum_buffers", momentum_buffers, params)
    abufs = optional_list("adj_momentum_buffers", adj_momentum_buffers, params)
    vs = None if vectors is None else as_list("vectors", vectors)
    if vs is not None:
        check_pairs("params", params, "vectors", vs)
    check_backend(backend)
    lr, momentum, dampening, weight_decay, adj_scale = (
        finite(n, x) for n, x in (("lr", lr), ("momentum", momentum), ("dampening", dampening),
                                  ("weight_decay", weight_decay), ("adj_scale", adj_scale)))
    if momentum == 0.0 and any(b is not None for b in bufs + abufs):
        raise ValueError("momentum_buffers / adj_momentum_buffers given but momentum is 0")
    if vs is None and (compute_adj_params or compute_adj_state or any(b is not None for b in abufs)):
        raise ValueError("adjoints (adj_momentum_buffers, compute_adj_params, compute_adj_state) need vectors (∂L/∂θ')")
    return sgd_pilot_unchecked(
        params, grads, bufs, vs, abufs, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
        nesterov=bool(nesterov), maximize=bool(maximize), adj_scale=adj_scale, compute_params=bool(compute_params),
        compute_state=bool(compute_state), compute_adj_params=bool(compute_adj_params),
        compute_adj_state=bool(compute_adj_state), backend=backend)


@torch.no_grad()
def sgd_pilot_unchecked(
    params: List[torch.Tensor], grads: List[torch.Tensor], momentum_buffers: List[Optional[torch.Tensor]],
    vectors: Optional[List[torch.Tensor]], adj_momentum_buffers: List[Optional[torch.Tensor]], *, lr: float,
    momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool, adj_scale: float,
    compute_params: bool, compute_state: bool, compute_adj_params: bool, compute_adj_state: bool,
    backend: str = "auto",
) -> SgdPilot:
    """:func:`sgd_pilot` for arguments already checked (the engine's, every step): lists aligned with
    ``params`` (entries None where absent), flags bools, numbers finite."""
    bufs, abufs, vs = momentum_buffers, adj_momentum_buffers, vectors
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                 maximize=maximize, adj_scale=adj_scale)
    want = dict(compute_params=compute_params, compute_state=compute_state, compute_adj_params=compute_adj_params,
                compute_adj_state=compute_adj_state)
    n = len(params)
    out = [[None] * n for _ in range(5)]
    keys = [(p.device, bufs[i] is None, abufs[i] is None) for i, p in enumerate(params)]
    for idx in groups(keys):
        P, G = [params[i] for i in idx], [grads[i] for i in idx]
        B, AB = _present(bufs, idx), _present(abufs, idx)
        V = [] if vs is None else [vs[i] for i in idx]
        if _fused(backend, "sgd_pilot", [P, G, B, V, AB]):
            results = torch.ops.fastmeta.sgd_pilot(
                P, G, B, V, AB, lr, momentum, dampening, weight_decay, nesterov, maximize, adj_scale, *want.values())
            for k in range(5):
                if len(results[k]):
                    scatter(out[k], idx, results[k])
            continue
        for i in idx:
            values = sgd_twin(params[i], grads[i], bufs[i], None if vs is None else vs[i], abufs[i], **hyper, **want)
            for k in range(5):
                out[k][i] = values[k]
    adj, has_momentum = vs is not None, momentum != 0.0
    wanted = (compute_params, adj, compute_state and has_momentum, adj and compute_adj_params,
              adj and compute_adj_state and has_momentum)
    return SgdPilot(*(lst if w else None for lst, w in zip(out, wanted)))
