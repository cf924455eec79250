"""The student optimizer's update as a function, and its exact Jacobian (the one home of both).

The pilot step of every engine method is ONE update of the student optimizer,
``(θ', state') = U(θ, g, state)`` with ``g = ∇θS LS(θS, θT)``, written here as a
plain-PyTorch transcription of ``torch.optim``'s own single-tensor update (same
operations, same order of hyper-parameters; values agree with ``optimizer.step()``
to rounding, see ``tests/test_engine_optimizer.py``).  Every update acts
elementwise, so its Jacobian is diagonal and its vector-Jacobian product costs a
few elementwise operations:

``OptimizerUpdate.step``   the update (out-of-place, autograd-friendly: the
                           ``"autograd"`` reference differentiates it with a double
                           backward; with ``adam_jacobian="frozen_second_moment"`` its
                           second moment is detached, so autograd differentiates the
                           same linearisation as ``vjp``)
``OptimizerUpdate.vjp``    the closed-form adjoint: given ``∂L/∂θ'`` (and ``∂L/∂state'``
                           when the trajectory continues), ``∂L/∂g``, the part of
                           ``∂L/∂θ`` that does not go through ``g`` and ``∂L/∂state``

Supported (``student_optimizer``; ``pilot="optimizer"``):

* ``None``: SGD at ``inner_lr``.
* ``torch.optim.SGD``: momentum ``μ``, dampening ``d``, nesterov, weight decay ``λ``,
  maximize.  ``g' = ±g + λθ``; ``buf' = g'`` (first step) or ``μ·buf + (1−d)·g'``;
  ``θ' = θ − η·(g' + μ·buf')`` (nesterov) or ``θ − η·buf'``.
* ``torch.optim.Adam`` / ``AdamW`` (amsgrad, L2 or decoupled weight decay, maximize)::

      g' = ±g (+ λθ for L2)          m' = β1·m + (1−β1)·g'        s' = β2·s + (1−β2)·g'²
      ŝ  = max(s_max, s') (amsgrad) or s'                         t' = t + 1
      θ' = θ·(1 − ηλ if decoupled) − (η/bc1)·m'/(sqrt(ŝ)/sqrt(bc2) + eps),   bcK = 1 − βK^t'

  Its exact Jacobian ``∂θ'/∂g`` is ``D = (1−β1)/(bc1·denom) − m̂'·(1−β2)·g'/(bc2·sqrt(ŝ)·denom²)``
  (times ``−η``; amsgrad: the second term only where ``s'`` is the maximum).
  ``adam_jacobian="frozen_second_moment"`` drops the second term (``s'`` held
  constant: the usual first-order linearisation, NOT the derivative of the real
  step; kept as a named approximation).  Where ``ŝ = 0`` (a coordinate whose
  gradient and second moment are both zero, e.g. an embedding row no token of the
  batch touched) ``sqrt`` is not differentiable; both ``step`` (through a guarded
  square root) and ``vjp`` take the second term as 0 there, the limit along ``g``.

``pilot="sgd"`` (MetaDistil's official look-ahead): ``θ' = θ − η·g`` whatever
optimizer trains the student; ``η = inner_lr`` or, when None, the parameter's
param-group lr (:func:`resolve_lrs`, the one place ``inner_lr=None`` is resolved).
The optimizer and its state are only read, never written.

Verified (``tests/test_engine_optimizer.py``, float64): ``step`` equals
``optimizer.step()`` to ~1e-16; ``vjp`` equals central differences of the real
``optimizer.step()`` and autograd through an independent transcription written in
the test, also chained over several steps (the state adjoints).
``fastmeta.ops.precondition`` (the frozen-second-moment preconditioner of earlier
versions) is a deprecated shim over :func:`adam_frozen_factor` and ``vjp``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

PILOTS = ("optimizer", "sgd")
ADAM_JACOBIANS = ("exact", "frozen_second_moment")

State = Dict[str, object]  # per parameter: tensors (None = not yet created) and the int step "t"


@dataclass
class _Hyper:
    kind: str  # "sgd" | "adam"
    lr: float
    weight_decay: float = 0.0
    maximize: bool = False
    # sgd
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    # adam
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    amsgrad: bool = False
    decoupled: bool = False


def _scalar(value) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _first_moment(m, g, beta1: float):
    return (1.0 - beta1) * g if m is None else beta1 * m + (1.0 - beta1) * g


def _second_moment(s, g, beta2: float):
    return (1.0 - beta2) * g * g if s is None else beta2 * s + (1.0 - beta2) * g * g


def _denominator(s_hat: torch.Tensor, t: int, beta2: float, eps: float) -> torch.Tensor:
    """Adam's ``sqrt(ŝ)/sqrt(1 − β2^t) + eps`` (guarded square root)."""
    return _safe_sqrt(s_hat) / math.sqrt(1.0 - beta2**t) + eps


def adam_frozen_factor(s_hat: torch.Tensor, t: int, beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """``(1−β1)/(1−β1^t) / (sqrt(ŝ/(1−β2^t)) + eps)``: ``∂θ'/∂g / (−η)`` with the second moment ``ŝ`` held fixed.

    The frozen-second-moment linearisation of the Adam step ``t`` (an approximation:
    the real step's Jacobian has a second term, see :meth:`OptimizerUpdate.vjp`).
    """
    return ((1.0 - beta1) / (1.0 - beta1**t)) / _denominator(s_hat, t, beta2, eps)


class OptimizerUpdate:
    """One student optimizer update, per named parameter: ``step`` (values) and ``vjp`` (exact adjoint).

    Build it with :func:`optimizer_update`.  ``lr[name]`` is each parameter's ``η``,
    ``lr_ref`` the reference ``η`` the engine scales its cotangent by (``inner_lr``,
    else the largest group lr): directions are expressed as ``a = −(∂L/∂g)/lr_ref``.
    ``adam_jacobian``: ``"exact"`` or ``"frozen_second_moment"`` (:data:`ADAM_JACOBIANS`).
    """

    def __init__(self, hypers: Dict[str, _Hyper], states: Dict[str, State], lr_ref: float, adam_jacobian: str):
        self.hypers = hypers
        self.states = states
        self.lr = {name: h.lr for name, h in hypers.items()}
        self.lr_ref = lr_ref
        self.adam_jacobian = adam_jacobian

    def initial_state(self, name: str) -> State:
        return self.states[name]

    # ------------------------------------------------------------------ the update
    def step(self, name: str, theta: torch.Tensor, grad: torch.Tensor, state: State):
        """``(θ', state')`` of one update (out of place; differentiable by autograd)."""
        h = self.hypers[name]
        g = -grad if h.maximize else grad
        if h.kind == "sgd":
            if h.weight_decay != 0.0:
                g = g + h.weight_decay * theta
            if h.momentum == 0.0:
                return theta - h.lr * g, state
            buf = state.get("buf")
            buf_new = g if buf is None else h.momentum * buf + (1.0 - h.dampening) * g
            update = g + h.momentum * buf_new if h.nesterov else buf_new
            return theta - h.lr * update, {"buf": buf_new}
        t = int(state["t"]) + 1
        base = theta
        if h.weight_decay != 0.0:
            if h.decoupled:
                base = theta * (1.0 - h.lr * h.weight_decay)
            else:
                g = g + h.weight_decay * theta
        m, s, smax = state.get("m"), state.get("s"), state.get("smax")
        m_new = _first_moment(m, g, h.beta1)
        # frozen_second_moment: the same value, with the second moment a constant for autograd
        s_new = _second_moment(s, g.detach() if self.adam_jacobian != "exact" else g, h.beta2)
        s_hat = s_new
        if h.amsgrad and smax is not None:
            s_hat = torch.maximum(smax, s_new)
        denom = _denominator(s_hat, t, h.beta2, h.eps)
        theta_new = base - (h.lr / (1.0 - h.beta1**t)) * (m_new / denom)
        new_state: State = {"t": t, "m": m_new, "s": s_new}
        if h.amsgrad:
            new_state["smax"] = s_hat
        return theta_new, new_state

    # ------------------------------------------------------------------ its exact adjoint
    def vjp(self, name: str, theta: torch.Tensor, grad: torch.Tensor, state: State,
            adj_theta_new: torch.Tensor, adj_state_new: Optional[State] = None):
        """Adjoints of one update: ``(∂L/∂θ through θ directly, ∂L/∂g, ∂L/∂state)``.

        ``adj_theta_new = ∂L/∂θ'``; ``adj_state_new = ∂L/∂state'`` (None: zero, e.g. the
        last step of the trajectory).  The full ``∂L/∂θ`` also has ``H·(∂L/∂g)`` (the
        student's Hessian): the engine adds it.
        """
        h = self.hypers[name]
        adj_state_new = adj_state_new or {}
        if h.kind == "sgd":
            adj_update = -h.lr * adj_theta_new
            adj_state: State = {}
            if h.momentum == 0.0:
                adj_g = adj_update
            else:
                adj_buf_new = adj_update * h.momentum if h.nesterov else adj_update
                if adj_state_new.get("buf") is not None:
                    adj_buf_new = adj_buf_new + adj_state_new["buf"]
                adj_g = adj_update if h.nesterov else torch.zeros_like(adj_update)
                if state.get("buf") is None:
                    adj_g = adj_g + adj_buf_new
                else:
                    adj_g = adj_g + (1.0 - h.dampening) * adj_buf_new
                    adj_state["buf"] = h.momentum * adj_buf_new
            adj_theta = adj_theta_new
            if h.weight_decay != 0.0:
                adj_theta = adj_theta + h.weight_decay * adj_g
            return adj_theta, (-adj_g if h.maximize else adj_g), adj_state
        # adam: recompute the forward quantities (cheap, elementwise)
        t = int(state["t"]) + 1
        g = -grad if h.maximize else grad
        if h.weight_decay != 0.0 and not h.decoupled:
            g = g + h.weight_decay * theta
        m, s, smax = state.get("m"), state.get("s"), state.get("smax")
        m_new = _first_moment(m, g, h.beta1)
        s_new = _second_moment(s, g, h.beta2)
        bc1 = 1.0 - h.beta1**t
        bc2 = 1.0 - h.beta2**t
        exact = self.adam_jacobian == "exact"
        from_s = None  # amsgrad: where s' (not the old maximum) is the second moment used
        s_hat = s_new
        if h.amsgrad and smax is not None:
            s_hat = torch.maximum(smax, s_new)
            from_s = s_new >= smax  # torch.maximum's ties: measure zero; taken by s'
        root = _safe_sqrt(s_hat)
        r_hat = root / math.sqrt(bc2)
        denom = r_hat + h.eps
        step_size = h.lr / bc1
        # --- through θ' = base − step·m'/denom: ∂θ'/∂g' = −η·D with, after cancelling the g'² terms
        # analytically (the naive difference of the two terms loses all digits at the first step,
        # where D = eps/denom² ≈ 0),
        #     D = ([(1−β1)β2·s − β1(1−β2)·m·g'] / (bc1·bc2·r̂) + (1−β1)·eps/bc1) / denom²
        # (frozen second moment, or amsgrad where the old maximum is used: D = (1−β1)/(bc1·denom))
        plain = adam_frozen_factor(s_hat, t, h.beta1, h.beta2, h.eps)
        if exact:
            numerator = torch.zeros_like(g)
            if s is not None:
                numerator = numerator + (1.0 - h.beta1) * h.beta2 * s
            if m is not None:
                numerator = numerator - h.beta1 * (1.0 - h.beta2) * m * g
            positive = r_hat > 0
            second = torch.where(positive, numerator / (bc1 * bc2 * torch.where(positive, r_hat, 1.0)), 0.0)
            d = (second + (1.0 - h.beta1) * h.eps / bc1) / (denom * denom)
            if from_s is not None:
                d = torch.where(from_s, d, plain)
        else:
            d = plain
        adj_g = -h.lr * d * adj_theta_new
        adj_m_new = -step_size * adj_theta_new / denom
        adj_state: State = {}
        # --- through the moments handed to the next step (trajectories of several steps)
        adj_m_in = adj_state_new.get("m")
        if adj_m_in is not None:
            adj_g = adj_g + (1.0 - h.beta1) * adj_m_in
            adj_m_new = adj_m_new + adj_m_in
        adj_state["m"] = h.beta1 * adj_m_new
        if exact:
            # ŝ's adjoint from θ' (already inside D for g'; needed for the old s and s_max)
            adj_s_hat = torch.where(
                root > 0,
                adj_theta_new * step_size * m_new / (denom * denom * math.sqrt(bc2) * 2.0 * torch.where(root > 0, root, 1.0)),
                0.0,
            )
            adj_later = adj_state_new.get("s")  # s' handed on
            adj_max_later = adj_state_new.get("smax")  # ŝ handed on as the next s_max
            if adj_max_later is not None:
                adj_s_hat = adj_s_hat + adj_max_later
            adj_s_new = adj_s_hat if from_s is None else torch.where(from_s, adj_s_hat, 0.0)
            if from_s is not None:
                adj_state["smax"] = torch.where(from_s, 0.0, adj_s_hat)
            # g' through s' by the paths D does not hold: the later-step adjoints
            adj_g_s = adj_later
            if adj_max_later is not None:
                part = adj_max_later if from_s is None else torch.where(from_s, adj_max_later, 0.0)
                adj_g_s = part if adj_g_s is None else adj_g_s + part
            if adj_g_s is not None:
                adj_g = adj_g + 2.0 * (1.0 - h.beta2) * g * adj_g_s
            if adj_later is not None:
                adj_s_new = adj_s_new + adj_later
            adj_state["s"] = h.beta2 * adj_s_new
        adj_theta = adj_theta_new * (1.0 - h.lr * h.weight_decay) if (h.decoupled and h.weight_decay != 0.0) else adj_theta_new
        if h.weight_decay != 0.0 and not h.decoupled:
            adj_theta = adj_theta + h.weight_decay * adj_g
        return adj_theta, (-adj_g if h.maximize else adj_g), adj_state


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` whose derivative is 0 (not inf·0 = nan) where ``x == 0``."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


def resolve_lrs(
    params: Dict[str, torch.Tensor], optimizer: Optional[torch.optim.Optimizer], inner_lr: Optional[float],
    missing: Optional[float] = None,
) -> Dict[str, float]:
    """``{name: η}``: ``inner_lr``, or (None) the parameter's param-group ``lr`` (the one place this is resolved).

    A parameter in no param group gets ``missing`` (None: ``KeyError``; the public
    entry points report it first, see :func:`check_student_optimizer`).
    """
    if inner_lr is not None:
        return {name: float(inner_lr) for name in params}
    group_lr = {id(p): _scalar(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
    out = {}
    for name, p in params.items():
        if id(p) in group_lr:
            out[name] = group_lr[id(p)]
        elif missing is None:
            raise KeyError(name)
        else:
            out[name] = missing
    return out


def check_student_optimizer(
    params: Dict[str, torch.Tensor], optimizer, *, inner_lr: Optional[float], pilot: str
) -> None:
    """The public entry points' check of ``student_optimizer`` against the pilot step it must define.

    ``inner_lr`` is already a float > 0 or None.  Raises ``TypeError`` naming
    ``student_optimizer`` for an optimizer whose update has no transcription here
    (suggesting ``pilot='sgd'``), ``ValueError`` for a trainable student parameter in
    none of its param groups, or a group ``lr`` that is not finite and > 0 when
    ``inner_lr`` is None.
    """
    if optimizer is None:
        if inner_lr is None:
            raise ValueError("inner_lr is None and no student_optimizer was given: the pilot step needs a learning rate")
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"student_optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if pilot == "optimizer":
        optimizer_kind(optimizer)
    if pilot == "sgd" and inner_lr is not None:
        return  # θ − inner_lr·g: nothing of the optimizer is read
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for name, p in params.items():
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(f"student parameter {name!r} is not in any param group of student_optimizer")
        lr = _scalar(group["lr"])
        if inner_lr is None and not (0.0 < lr < math.inf):
            raise ValueError(
                f"inner_lr=None takes student_optimizer's param-group lr, which is {lr} for {name!r}: pass inner_lr > 0"
            )


def optimizer_update(
    params: Dict[str, torch.Tensor],
    optimizer: Optional[torch.optim.Optimizer],
    *,
    inner_lr: Optional[float],
    pilot: str = "optimizer",
    adam_jacobian: str = "exact",
) -> OptimizerUpdate:
    """Read ``optimizer``'s hyper-parameters and state (never written) into an :class:`OptimizerUpdate`.

    Arguments are trusted (checked by the public entry points with
    :func:`check_student_optimizer`).  ``lr_ref`` is ``inner_lr`` or the largest lr.
    """
    lrs = resolve_lrs(params, optimizer, inner_lr)
    hypers: Dict[str, _Hyper] = {}
    states: Dict[str, State] = {}
    if optimizer is None or pilot == "sgd":
        for name in params:
            hypers[name] = _Hyper("sgd", lrs[name])
            states[name] = {}
        return OptimizerUpdate(hypers, states, max(lrs.values()), adam_jacobian)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    kind = optimizer_kind(optimizer)
    for name, p in params.items():
        group = group_of[id(p)]
        state = optimizer.state.get(p, {})
        common = dict(lr=lrs[name], weight_decay=float(group.get("weight_decay", 0.0)),
                      maximize=bool(group.get("maximize", False)))
        if kind == "sgd":
            momentum = float(group.get("momentum", 0.0))
            hypers[name] = _Hyper("sgd", momentum=momentum, dampening=float(group.get("dampening", 0.0)),
                                  nesterov=bool(group.get("nesterov", False)), **common)
            states[name] = {"buf": state.get("momentum_buffer") if momentum != 0.0 else None}
        else:
            beta1, beta2 = (_scalar(b) for b in group["betas"])
            decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
            amsgrad = bool(group.get("amsgrad", False))
            hypers[name] = _Hyper("adam", beta1=beta1, beta2=beta2, eps=float(group["eps"]), amsgrad=amsgrad,
                                  decoupled=decoupled, **common)
            states[name] = {
                "t": int(_scalar(state.get("step", 0))),
                "m": state.get("exp_avg"),
                "s": state.get("exp_avg_sq"),
                "smax": state.get("max_exp_avg_sq") if amsgrad else None,
            }
    return OptimizerUpdate(hypers, states, max(lrs.values()), adam_jacobian)


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """``"sgd"`` or ``"adam"`` (Adam and AdamW); ``TypeError`` naming ``student_optimizer`` otherwise."""
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam"
    raise TypeError(
        f"student_optimizer must be torch.optim.SGD, Adam or AdamW (or None for plain SGD) for the pilot step, "
        f"got {type(optimizer).__name__}; pass pilot='sgd' to take a plain SGD look-ahead step instead"
    )
