"""The student optimizer's update in the engine: a thin driver over :mod:`fastmeta.ops`' pilot ops.

The pilot step of every engine method is ONE update of the student optimizer,
``(θ', state') = U(θ, g, state)`` with ``g = ∇θS LS(θS, θT)``.  Its math (the update, its
new state and its exact adjoint, the reverse sweep's state adjoints included) has ONE
home: ``csrc/pilot_math.h`` (C++/CUDA) and its plain-PyTorch twin
:mod:`fastmeta.ops.pilot_twin`; optimizers are read by :mod:`fastmeta.ops.torch_optim`.
This module only groups the student's parameters and calls them:

``OptimizerUpdate.pilot``    the pilot point (and the new state when the trajectory goes on):
                             ONE fused call per (param group's rule, device, step, state presence)
``OptimizerUpdate.adjoint``  one reverse-sweep step: the direction ``a = −(∂L/∂g)/lr_ref``
                             (``adj_scale = −1/lr_ref`` gives it directly), ``∂L/∂θ`` through θ
                             itself and the old state's adjoints, ONE fused call per group
``OptimizerUpdate.step``     one tensor, through the twin, differentiable: the ``"autograd"``
                             reference differentiates these update values with a double backward
                             (``adam_jacobian="frozen_second_moment"``: the second moment from a
                             detached gradient, the same linearisation as the adjoint)
``OptimizerUpdate.vjp``      one tensor's closed-form adjoint (the fused op on one tensor)

Supported (``student_optimizer``; ``pilot="optimizer"``): ``None`` (SGD at ``inner_lr``),
``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay, maximize),
``torch.optim.Adam`` / ``AdamW`` (amsgrad, L2 or decoupled weight decay, maximize)::

      g' = ±g (+ λθ for L2)          m' = β1·m + (1−β1)·g'        s' = β2·s + (1−β2)·g'²
      ŝ  = max(s_max, s') (amsgrad) or s'                         t' = t + 1
      θ' = θ·(1 − ηλ if decoupled) − (η/bc1)·m'/(sqrt(ŝ)/sqrt(bc2) + eps),   bcK = 1 − βK^t'

Its exact Jacobian ``∂θ'/∂g`` is ``D = (1−β1)/(bc1·denom) − m̂'·(1−β2)·g'/(bc2·sqrt(ŝ)·denom²)``
(times ``−η``; amsgrad: the second term only where ``s'`` is the maximum), evaluated in a
cancellation-free form.  ``adam_jacobian="frozen_second_moment"`` drops the second term
(``s'`` held constant: the usual first-order linearisation, NOT the derivative of the real
step; kept as a named approximation).  Where ``ŝ = 0`` (a coordinate whose gradient and
second moment are both zero, e.g. an embedding row no token of the batch touched) the
second term is taken as 0, the limit along ``g``.

``pilot="sgd"`` (MetaDistil's official look-ahead): ``θ' = θ − η·g`` whatever optimizer
trains the student; ``η = inner_lr`` or, when None, the parameter's param-group lr
(:func:`resolve_lrs`, the one place ``inner_lr=None`` is resolved).  The optimizer and its
state are only read, never written.

Verified (``tests/test_engine_optimizer.py``, float64): ``step`` equals
``optimizer.step()`` to ~1e-16; ``vjp`` equals central differences of the real
``optimizer.step()`` and autograd through an independent transcription written in the
test, also chained over several steps (the state adjoints); ``pilot``/``adjoint`` equal
``step``/``vjp`` tensor by tensor.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from ..ops.torch_optim import (
    State, UpdateRule, groups_by_rule, param_groups_of, read_rule, read_state, rule_pilot, rule_twin, scalar,
    step_counts, update_kind,
)

PILOTS = ("optimizer", "sgd")
ADAM_JACOBIANS = ("exact", "frozen_second_moment")


class OptimizerUpdate:
    """One student optimizer update, per named parameter: values (``pilot``, ``step``) and exact adjoint.

    Build it with :func:`optimizer_update`.  ``lr[name]`` is each parameter's ``η``,
    ``lr_ref`` the reference ``η`` the engine scales its cotangent by (``inner_lr``,
    else the largest group lr): directions are expressed as ``a = −(∂L/∂g)/lr_ref``.
    ``adam_jacobian``: ``"exact"`` or ``"frozen_second_moment"`` (:data:`ADAM_JACOBIANS`).
    """

    def __init__(self, rules: Dict[str, UpdateRule], states: Dict[str, State], lr_ref: float, adam_jacobian: str):
        self.rules = rules
        self.states = states
        self.lr = {name: rule.lr for name, rule in rules.items()}
        self.lr_ref = lr_ref
        self.adam_jacobian = adam_jacobian
        self.exact = adam_jacobian == "exact"
        self._groups = groups_by_rule(rules)

    def initial_state(self, name: str) -> State:
        return self.states[name]

    # ------------------------------------------------------------------ all parameters, fused
    def pilot(self, theta: dict, grads: dict, states: dict, *, compute_state: bool = False, backend: str = "auto"):
        """``(θ', state')`` for every name (``state'`` None unless ``compute_state``): one fused call per group
        (``backend``: as in :func:`fastmeta.ops.adam_pilot`; ``"torch"`` runs the twin, for comparisons)."""
        new_theta, new_states = {}, {}
        for names in self._groups:
            values, stepped, *_ = rule_pilot(
                self.rules[names[0]], [theta[n] for n in names], [grads[n] for n in names],
                [states[n] for n in names], exact_jacobian=self.exact, compute_state=compute_state, backend=backend)
            new_theta.update(zip(names, values))
            new_states.update(zip(names, stepped or [None] * len(names)))
        return new_theta, new_states

    def adjoint(self, theta: dict, grads: dict, states: dict, adj_theta: dict, adj_states: Optional[dict] = None, *,
                full: bool = True, backend: str = "auto"):
        """One reverse-sweep step for every name: ``(direct, direction, adj_state)`` (``backend``: as in
        :meth:`pilot`).

        ``direction[name] = −(∂L/∂g)/lr_ref``; with ``full`` (a step before the first of the
        trajectory follows) also ``direct[name]`` (``∂L/∂θ`` through θ itself) and
        ``adj_state[name]``; else those two are ``{}``.  ``adj_states``: the adjoints of the
        new states handed back by the next step (None: the last step).
        """
        direct, direction, adj_out = {}, {}, {}
        adj_states = adj_states or {}
        for names in self._groups:
            _, _, adj_g, adj_p, adj_s = rule_pilot(
                self.rules[names[0]], [theta[n] for n in names], [grads[n] for n in names],
                [states[n] for n in names], vectors=[adj_theta[n] for n in names],
                adj_states=[adj_states.get(n) for n in names], adj_scale=-1.0 / self.lr_ref,
                exact_jacobian=self.exact, compute_params=False, compute_adj_params=full, compute_adj_state=full,
                backend=backend)
            direction.update(zip(names, adj_g))
            if full:
                direct.update(zip(names, adj_p))
                adj_out.update(zip(names, adj_s))
        return direct, direction, adj_out

    # ------------------------------------------------------------------ one tensor
    def step(self, name: str, theta: torch.Tensor, grad: torch.Tensor, state: State):
        """``(θ', state')`` of one update (out of place; differentiable by autograd: the twin)."""
        new, new_state, *_ = rule_twin(self.rules[name], theta, grad, state, exact_jacobian=self.exact,
                                       compute_state=True)
        return new, new_state

    def vjp(self, name: str, theta: torch.Tensor, grad: torch.Tensor, state: State,
            adj_theta_new: torch.Tensor, adj_state_new: Optional[State] = None):
        """Adjoints of one update: ``(∂L/∂θ through θ directly, ∂L/∂g, ∂L/∂state)``.

        ``adj_theta_new = ∂L/∂θ'``; ``adj_state_new = ∂L/∂state'`` (None: zero, e.g. the
        last step of the trajectory).  The full ``∂L/∂θ`` also has ``H·(∂L/∂g)`` (the
        student's Hessian): the engine adds it.
        """
        _, _, adj_g, adj_p, adj_s = rule_pilot(
            self.rules[name], [theta.detach()], [grad.detach()], [state], vectors=[adj_theta_new.detach()],
            adj_states=[adj_state_new], exact_jacobian=self.exact, compute_params=False, compute_adj_params=True,
            compute_adj_state=True)
        return adj_p[0], adj_g[0], adj_s[0]


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
    group_lr = {pid: scalar(group["lr"]) for pid, group in param_groups_of(optimizer).items()}
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
    group_of = param_groups_of(optimizer)
    for name, p in params.items():
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(f"student parameter {name!r} is not in any param group of student_optimizer")
        lr = scalar(group["lr"])
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
    rules: Dict[str, UpdateRule] = {}
    states: Dict[str, State] = {}
    if optimizer is None or pilot == "sgd":
        for name in params:
            rules[name] = UpdateRule("sgd", lrs[name])
            states[name] = {"buf": None}
        return OptimizerUpdate(rules, states, max(lrs.values()), adam_jacobian)
    adam = optimizer_kind(optimizer) == "adam"
    group_of = param_groups_of(optimizer)
    counts = step_counts(optimizer, list(params.values())) if adam else [None] * len(params)
    shared: Dict[tuple, UpdateRule] = {}  # one rule per (param group, lr): read once, not once per parameter
    for (name, p), count in zip(params.items(), counts):
        key = (id(group_of[id(p)]), lrs[name])
        rule = shared.get(key)
        if rule is None:
            rule = shared[key] = read_rule(optimizer, group_of[id(p)], lr=lrs[name])
        rules[name] = rule
        states[name] = read_state(optimizer, p, rule, step=count)
    return OptimizerUpdate(rules, states, max(lrs.values()), adam_jacobian)


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """``"sgd"`` or ``"adam"`` (Adam and AdamW); ``TypeError`` naming ``student_optimizer`` otherwise."""
    kind = update_kind(optimizer)
    if kind is None:
        raise TypeError(
            f"student_optimizer must be torch.optim.SGD, Adam or AdamW (or None for plain SGD) for the pilot step, "
            f"got {type(optimizer).__name__}; pass pilot='sgd' to take a plain SGD look-ahead step instead"
        )
    return kind
