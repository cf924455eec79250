"""Adam's diagonal preconditioner (``adam_preconditioner``) and the deprecated ``precondition`` shim.

``precondition`` is self-contained in ``fastmeta.ops`` (it reads the optimizer with
:mod:`.torch_optim` and computes with the pilot ops and their twin's square root): no
import of the engine, which sits above ``fastmeta.ops``.
"""
from __future__ import annotations

import math
import warnings
from typing import List

import torch

from ._dispatch import as_list, check_pairs, use_extension
from .pilot import sgd_pilot
from .pilot_twin import safe_sqrt
from .torch_optim import param_groups_of, read_rule, read_state, step_counts, update_kind


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
    vectors = as_list("vectors", vectors)
    exp_avg_sqs = as_list("exp_avg_sqs", exp_avg_sqs)
    check_pairs("vectors", vectors, "exp_avg_sqs", exp_avg_sqs)
    grads_list: List[torch.Tensor] = []
    if grads is not None:
        grads_list = as_list("grads", grads)
        check_pairs("vectors", vectors, "grads", grads_list)
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
    if use_extension(backend, "adam_preconditioner", lists):
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

    Kept so that existing callers work; the exact Jacobian of the student optimizer's
    update is :func:`fastmeta.ops.adam_pilot` / :func:`~fastmeta.ops.sgd_pilot` (through
    ``fastmeta.engine.optimizer.OptimizerUpdate.vjp``, what the meta-gradient engine uses).
    ``backend`` is accepted and ignored.

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
    term, up to ~1e4x larger on the first step): use ``adam_pilot`` for that.
    """
    warnings.warn(
        "fastmeta.ops.precondition is deprecated (frozen-second-moment linearisation of Adam); the exact "
        "Jacobian of the optimizer's update is fastmeta.engine.optimizer.OptimizerUpdate.vjp "
        "(fastmeta.ops.adam_pilot / sgd_pilot)",
        DeprecationWarning,
        stacklevel=3,  # the caller of the torch.no_grad-decorated function
    )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    group_of = param_groups_of(optimizer)
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    params = ordered if params is None else as_list("params", params)
    vectors = as_list("vectors", vectors)
    check_pairs("vectors", vectors, "params", params)
    grads_list = None if grads is None else as_list("grads", grads)
    if grads_list is not None:
        check_pairs("vectors", vectors, "grads", grads_list)
    for i, p in enumerate(params):
        if id(p) not in group_of:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is not in any param group of the optimizer")
    if update_kind(optimizer) is None:
        raise TypeError(f"precondition supports torch.optim.SGD, Adam and AdamW, got {type(optimizer).__name__}")
    out = []
    steps = step_counts(optimizer, params)  # one host transfer, not one .item() per parameter
    for i, (v, p) in enumerate(zip(vectors, params)):
        rule = read_rule(optimizer, group_of[id(p)], lr=1.0)
        if rule.kind == "sgd":  # affine in g: P·v = −adjoint at lr = 1 (exact)
            buf = read_state(optimizer, p, rule)["buf"]
            res = sgd_pilot([p.detach()], [v], None if buf is None else [buf], [v], lr=1.0, momentum=rule.momentum,
                            dampening=rule.dampening, nesterov=rule.nesterov, maximize=rule.maximize, adj_scale=-1.0,
                            compute_params=False)
            out.append(res.adj_grads[0])
            continue
        state = optimizer.state.get(p, {})
        key_sq = "max_exp_avg_sq" if rule.amsgrad else "exp_avg_sq"
        compute = torch.promote_types(v.dtype, torch.float32)
        step = steps[i]
        if grads_list is not None or key_sq not in state:
            g = grads_list[i] if grads_list is not None else p.grad
            if g is None:
                raise ValueError(
                    f"params[{i}] has no optimizer state and no gradient: pass grads= (or set "
                    f".grad) to linearise Adam's first step"
                )
            g = g.to(compute)
            old = state.get("exp_avg_sq")
            s_hat = (1.0 - rule.beta2) * g * g if old is None else rule.beta2 * old.to(compute) + (1.0 - rule.beta2) * g * g
            if rule.amsgrad and key_sq in state:
                s_hat = torch.maximum(state[key_sq].to(compute), s_hat)
            t = step + 1
        else:
            s_hat, t = state[key_sq].to(compute), step
        denom = safe_sqrt(s_hat) / math.sqrt(1.0 - rule.beta2**t) + rule.eps
        factor = (((1.0 - rule.beta1) / (1.0 - rule.beta1**t)) if first_moment_factor else 1.0) / denom
        if rule.maximize:
            factor = -factor
        out.append((v.to(compute) * factor).to(v.dtype))
    return out
