"""``torch.optim``'s update rules as fastmeta reads and runs them (SGD, Adam, AdamW).

* reading (never writing) an optimizer: :func:`update_kind`, :func:`param_groups_of`,
  :func:`read_rule` (one param group's hyper-parameters as an :class:`UpdateRule`) and
  :func:`read_state` (one parameter's state as a plain dict; :func:`step_counts` reads the Adam
  step counts of many parameters in one host transfer);
* running a rule on lists of tensors through the fused pilot ops (:func:`rule_pilot`),
  or on one tensor through their twin, differentiably (:func:`rule_twin`).

State dicts (per parameter): Adam ``{"t": int, "m", "s", "smax"}`` (``t`` the number of
steps taken, tensors None when absent: the first step); SGD ``{"buf"}`` (None: the first
step, or no momentum).  Adjoint state dicts have the same tensor keys (None: zero).

This is the bottom layer (torch only): :func:`fastmeta.ops.precondition` and the
meta-gradient engine (:mod:`fastmeta.engine.optimizer`) both read optimizers here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .pilot import adam_pilot_unchecked, sgd_pilot_unchecked
from .pilot_twin import adam_twin, sgd_twin

State = Dict[str, object]


@dataclass(frozen=True)
class UpdateRule:
    """One param group's update (hashable: parameters with equal rules share one fused call)."""

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


def scalar(value) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def update_kind(optimizer) -> Optional[str]:
    """``"sgd"`` (``torch.optim.SGD``), ``"adam"`` (``Adam``, ``AdamW``) or None (no transcription here)."""
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam"
    return None


def param_groups_of(optimizer: torch.optim.Optimizer) -> dict:
    """``{id(param): its param group}``."""
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def read_rule(optimizer: torch.optim.Optimizer, group: dict, lr: Optional[float] = None) -> UpdateRule:
    """The update of ``group`` (a param group of ``optimizer``; ``lr`` overrides the group's)."""
    kind = update_kind(optimizer)
    if kind is None:
        raise TypeError(f"no update rule for {type(optimizer).__name__} (SGD, Adam and AdamW are supported)")
    common = dict(lr=scalar(group["lr"]) if lr is None else float(lr),
                  weight_decay=float(group.get("weight_decay", 0.0)), maximize=bool(group.get("maximize", False)))
    if kind == "sgd":
        return UpdateRule("sgd", momentum=float(group.get("momentum", 0.0)),
                          dampening=float(group.get("dampening", 0.0)), nesterov=bool(group.get("nesterov", False)),
                          **common)
    beta1, beta2 = (scalar(b) for b in group["betas"])
    decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
    return UpdateRule("adam", beta1=beta1, beta2=beta2, eps=float(group["eps"]), amsgrad=bool(group.get("amsgrad", False)),
                      decoupled=decoupled, **common)


def step_counts(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> list:
    """Each parameter's Adam step count (0 without state), the tensor ones read in ONE host transfer per
    device, dtype and shape (one for torch's optimizers).

    ``fused=True`` / ``capturable=True`` Adam keeps ``state["step"]`` on the parameter's
    device, where one ``.item()`` per parameter would synchronise once per parameter.  The
    tensors of a group are stacked as they are (float32 and float64 hold every count exactly):
    one op per group, not a conversion per parameter (a host cost paid at every step).
    """
    state = optimizer.state
    counts: list = []
    groups: dict = {}
    for i, p in enumerate(params):
        s = state[p].get("step", 0) if p in state else 0  # ``state`` is a defaultdict: no insertion
        if isinstance(s, torch.Tensor):
            counts.append(None)
            indices, tensors = groups.setdefault((s.device, s.dtype, s.shape), ([], []))
            indices.append(i)
            tensors.append(s)
        else:
            counts.append(int(s))
    for (_, _, shape), (indices, tensors) in groups.items():
        if shape.numel() != 1:
            raise ValueError(f"the optimizer's state['step'] of parameter {indices[0]} has shape {tuple(shape)}: "
                             "a step count is one number")
        values = torch.stack(tensors).detach().reshape(len(tensors)).tolist()
        for i, value in zip(indices, values):
            counts[i] = int(value)
    return counts


def read_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, rule: UpdateRule,
               step: Optional[int] = None) -> State:
    """``param``'s optimizer state as a state dict (the tensors themselves, not copies); ``step``: its Adam
    step count when already read (:func:`step_counts`)."""
    state = optimizer.state.get(param, {})
    if rule.kind == "sgd":
        return {"buf": state.get("momentum_buffer") if rule.momentum != 0.0 else None}
    return {
        "t": int(scalar(state.get("step", 0))) if step is None else step,
        "m": state.get("exp_avg"),
        "s": state.get("exp_avg_sq"),
        "smax": state.get("max_exp_avg_sq") if rule.amsgrad else None,
    }


def _entries(states: Sequence[Optional[State]], key: str, used: bool = True) -> list:
    """``states[i][key]`` for every i (None where a state or its entry is absent, or where not ``used``)."""
    if not used:
        return [None] * len(states)
    return [None if st is None else st.get(key) for st in states]


def rule_pilot(
    rule: UpdateRule, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: Sequence[State], *,
    vectors: Optional[Sequence[torch.Tensor]] = None, adj_states: Optional[Sequence[Optional[State]]] = None,
    adj_scale: float = 1.0, exact_jacobian: bool = True, compute_params: bool = True, compute_state: bool = False,
    compute_adj_params: bool = False, compute_adj_state: bool = False, backend: str = "auto",
):
    """``rule``'s update of ``params`` (and its adjoint) by ONE fused call per (device, step, state presence).

    Returns ``(new_params, new_states, adj_grads, adj_params, adj_states)``: lists aligned
    with ``params`` (None where not asked for; ``new_states``/``adj_states`` lists of state
    dicts).  Arguments as in :func:`~fastmeta.ops.adam_pilot` / :func:`~fastmeta.ops.sgd_pilot`, trusted:
    ``rule`` and ``states`` as :func:`read_rule`/:func:`read_state` read them from a torch
    optimizer (the engine's, every step), so the ops' unchecked entries run, without the public
    ops' argument checks.
    """
    params, grads = list(params), list(grads)
    adj_states = [None] * len(params) if adj_states is None else list(adj_states)
    vectors = None if vectors is None else list(vectors)
    want = dict(compute_params=compute_params, compute_state=compute_state, compute_adj_params=compute_adj_params,
                compute_adj_state=compute_adj_state, backend=backend, adj_scale=adj_scale)
    if rule.kind == "sgd":
        momentum = rule.momentum != 0.0
        res = sgd_pilot_unchecked(params, grads, _entries(states, "buf", momentum), vectors,
                                  _entries(adj_states, "buf", momentum), lr=rule.lr, momentum=rule.momentum,
                                  dampening=rule.dampening, weight_decay=rule.weight_decay, nesterov=rule.nesterov,
                                  maximize=rule.maximize, **want)
        new_states = None
        if compute_state:
            bufs = res.new_momentum_buffers or [None] * len(params)
            new_states = [{"buf": b} for b in bufs]
        adj_out = None
        if compute_adj_state and vectors is not None:
            abufs = res.adj_momentum_buffers or [None] * len(params)
            adj_out = [{"buf": b} for b in abufs]
        return res.new_params, new_states, res.adj_grads, res.adj_params, adj_out
    res = adam_pilot_unchecked(
        params, grads, _entries(states, "m"), _entries(states, "s"), _entries(states, "smax", rule.amsgrad), vectors,
        _entries(adj_states, "m"), _entries(adj_states, "s"), _entries(adj_states, "smax", rule.amsgrad),
        lr=rule.lr, beta1=rule.beta1, beta2=rule.beta2, eps=rule.eps, weight_decay=rule.weight_decay,
        step=[int(st["t"]) + 1 for st in states], decoupled=rule.decoupled, amsgrad=rule.amsgrad,
        maximize=rule.maximize, exact_jacobian=exact_jacobian, **want)
    new_states = None
    if compute_state:
        smax = res.new_max_exp_avg_sqs or [None] * len(params)
        new_states = [{"t": int(st["t"]) + 1, "m": m, "s": s, "smax": x}
                      for st, m, s, x in zip(states, res.new_exp_avgs, res.new_exp_avg_sqs, smax)]
    adj_out = None
    if compute_adj_state and vectors is not None:
        none = [None] * len(params)
        adj_out = [{"m": m, "s": s, "smax": x} for m, s, x in zip(
            res.adj_exp_avgs, res.adj_exp_avg_sqs or none, res.adj_max_exp_avg_sqs or none)]
    return res.new_params, new_states, res.adj_grads, res.adj_params, adj_out


def rule_twin(
    rule: UpdateRule, theta: torch.Tensor, grad: torch.Tensor, state: State, *, vector=None,
    adj_state: Optional[State] = None, adj_scale: float = 1.0, exact_jacobian: bool = True,
    compute_params: bool = True, compute_state: bool = False, compute_adj_params: bool = False,
    compute_adj_state: bool = False,
):
    """The same for ONE tensor through the twin (differentiable: autograd records it when it is on).

    Returns ``(new_param, new_state, adj_grad, adj_param, adj_state)`` (None where not asked for).
    """
    adj_state = adj_state or {}
    want = dict(compute_params=compute_params, compute_state=compute_state, compute_adj_params=compute_adj_params,
                compute_adj_state=compute_adj_state)
    if rule.kind == "sgd":
        buf = state.get("buf") if rule.momentum != 0.0 else None
        new, adj_g, new_buf, adj_theta, adj_buf = sgd_twin(
            theta, grad, buf, vector, adj_state.get("buf"), lr=rule.lr, momentum=rule.momentum,
            dampening=rule.dampening, weight_decay=rule.weight_decay, nesterov=rule.nesterov, maximize=rule.maximize,
            adj_scale=adj_scale, **want)
        return (new, {"buf": new_buf} if compute_state else None, adj_g, adj_theta,
                {"buf": adj_buf} if (compute_adj_state and vector is not None) else None)
    t = int(state["t"]) + 1
    new, adj_g, m, s, smax, adj_theta, adj_m, adj_s, adj_smax = adam_twin(
        theta, grad, state.get("m"), state.get("s"), state.get("smax"), vector, adj_state.get("m"),
        adj_state.get("s"), adj_state.get("smax"), lr=rule.lr, beta1=rule.beta1, beta2=rule.beta2, eps=rule.eps,
        weight_decay=rule.weight_decay, step=t, decoupled=rule.decoupled, amsgrad=rule.amsgrad,
        maximize=rule.maximize, exact_jacobian=exact_jacobian, adj_scale=adj_scale, **want)
    return (new, {"t": t, "m": m, "s": s, "smax": smax} if compute_state else None, adj_g, adj_theta,
            {"m": adj_m, "s": adj_s, "smax": adj_smax} if (compute_adj_state and vector is not None) else None)


def groups_by_rule(rules: Dict[str, UpdateRule]) -> List[List[str]]:
    """Names grouped by equal rules, in order of first appearance."""
    out: dict = {}
    for name, rule in rules.items():
        out.setdefault(rule, []).append(name)
    return list(out.values())
