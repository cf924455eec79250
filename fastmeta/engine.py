"""The meta-gradient engine: the teacher's gradient through the student's pilot update.

Notation (``docs``/``shared/design/meta-gradient.md``): teacher ``T(x; θT)`` with
logits ``zt``, student ``S(x; θS)`` with logits ``zs``, training batch ``(x, y)``,
quiz batch ``(xq, yq)``, temperature ``τ``, KD weight ``w``::

    LS(θS, θT) = (1 − w)·CE(y, zs) + w·KD(zs, zt)              (batchmean over counted rows)
    θS'        = θS − η·P ⊙ ∇θS LS − b                          (pilot step, see below)
    LQ(θS')    = CE(yq, S(xq; θS'))
    meta-gradient  ∇θT LQ(θS'(θT)) = −η·w·J_Tᵀ c,   c = ∂/∂zt ⟨∂KD/∂zs, u⟩,   u = J_S(θS)·(P ⊙ v),
                   v = ∇θS' LQ

``J_S``/``J_T`` are the Jacobians of the logits on ``x`` with respect to the
parameters.  Only the KD term of ``LS`` depends on θT, and KD depends on θS only
through ``zs`` and on θT only through ``zt``: the mixed second derivative
factorises through the logits.  Cost: one student JVP and one ordinary teacher
backward; no double backward, no ``create_graph``, no copy of the student beyond
the pilot parameters ``θS'`` (needed to evaluate the quiz loss; the student's own
parameters are never written).

Per-sample influence (LGTM), from the same JVP (``u`` without the learning rate)::

    w_i = ⟨∇θS ℓ_i, P ⊙ v⟩ = Σ_{rows r of sample i} ⟨∂ℓ_r/∂zs_r, u_r⟩

with ``ℓ_r`` the row's unreduced KD loss (``kl``: ``τ²·KL(pt_r ‖ ps_r)``), rows with
label -100 excluded.  For plain SGD (``P = 1``) this is exactly LGTM's
``⟨∇θS ℓ_i, ∇θS' Lval⟩``.

Pilot step and preconditioner ``P`` (``student_optimizer``)
------------------------------------------------------------
* ``None``: SGD, ``θS' = θS − η ∇LS`` (``P = 1``, ``b = 0``): exact.
* ``torch.optim.SGD`` (momentum ``μ``, dampening ``d``, nesterov, weight decay ``λ``):
  the step the optimizer would take now, ``g' = g + λθ``, ``buf' = μ·buf + (1−d)·g'``
  (``g'`` on the first step), ``θ' = θ − η·buf'`` (nesterov ``θ − η(g' + μ·buf')``).
  It is affine in ``g``, so ``P`` is a constant (``1``, ``1−d``, ``1+μ`` or ``1+μ(1−d)``)
  and ``b`` collects the momentum buffer and weight decay: exact.
* ``torch.optim.Adam`` / ``AdamW`` (``amsgrad`` included): the next step
  ``θ' = θ − η·m̂'/(sqrt(ŝ')+eps)`` with ``m' = β1·m + (1−β1)·g'`` and the second
  moment ``s' = β2·s + (1−β2)·g'²`` of *this* gradient.  Linearisation: ``s'`` is
  held constant (its dependence on ``g`` is dropped, the usual first-order
  treatment of Adam), the first moment is differentiated exactly:
  ``P = (1−β1)/(1−β1^t) / (sqrt(s'/(1−β2^t)) + eps)``, ``t`` = the step being
  taken.  The *value* of ``θS'`` is exactly the optimizer's next step.
  AdamW's decoupled decay and Adam's L2 term go into ``b``.
The optimizer and its state are only read.  ``inner_lr`` overrides the groups'
``lr``; ``inner_lr=None`` takes each parameter's group ``lr``.

``inner_steps = k > 1`` (plain SGD): ``θ_{j+1} = θ_j − η ∇LS(θ_j)`` on the same
batch, and the meta-gradient is back-propagated through the trajectory::

    a_k = ∇LQ(θ_k);   for j = k−1 … 0:  c += c(zs_j, zt, J_S(θ_j) a_{j+1}),
                                        a_j = a_{j+1} − η·H_S(θ_j) a_{j+1}
    meta-gradient = −η·w·J_Tᵀ c      (J_T is the same at every step: one teacher backward)

with ``H_S = ∇²θS LS`` (teacher logits fixed) from a forward-over-reverse product
(``torch.func.jvp`` of ``torch.func.grad``, which also yields ``J_S a`` in the
same pass).  Only the k parameter snapshots ``θ_1 … θ_{k−1}``, ``θ_k`` are kept.
With ``hypergrad="finite_diff"`` each step uses central differences instead, at
``θ_j ± εa`` (in place, ``ε = 0.01/‖a‖``): LGTM's difference of ``∂KD/∂zt`` for
``c_j`` and the difference of ``∇LS`` for ``H_S a``.

Hypergradient methods (``hypergrad``)
-------------------------------------
* ``"exact"``: forward-mode JVP (``torch.func.jvp`` under math attention),
  closed-form cotangent, one teacher backward.  Exact.
* ``"finite_diff"``: LGTM's estimate (its Eq. 10/18): with ``d = P ⊙ v`` and
  ``ε = 0.01/‖d‖`` (``fd_eps``), ``∇θT [KD(θS + εd) − KD(θS − εd)]/2ε`` with the
  student's parameters perturbed IN PLACE and restored (within a couple of ulp
  of ``max(|θ|, |εd|)``).  ``KD(θS ± εd)`` reaches θT only through ``zt``, so the
  difference is taken on the teacher-logit gradients ``∂KD/∂zt`` and ONE teacher
  backward applies ``J_Tᵀ`` (the paper's two teacher backward passes give the same
  vector; ``J_T`` is linear).  Per-sample influences are
  ``[ℓ_i(θS + εd) − ℓ_i(θS − εd)]/2ε``.  ``fd_mode="logits"`` instead takes the
  central difference of the student's logits (``u ≈ (zs₊ − zs₋)/2ε``, ε from
  :func:`fastmeta.functional.default_fd_eps` unless ``fd_eps``) and the closed-form
  cotangent.  Works with every attention kernel; float32 accuracy ~1e-4..1e-3.
* ``"autograd"``: double backward through the pilot step(s) with
  ``create_graph=True``, under math attention: the reference.
* ``"first_order"``: not a MetaDistil/LGTM meta-gradient (its first-order term is
  identically zero): ``ValueError``.  ReptileDistil/IKD feedback lives in
  ``fastmeta.algorithms``.

Mixed precision (the caller's ``torch.autocast``)
-------------------------------------------------
Parameters, gradients and the returned meta-gradient stay in the parameters' dtype
(fp32); the forwards and backwards run in the autocast dtype, except:

* the student tangent (the JVP, the forward-over-reverse products of
  ``inner_steps > 1``, the finite-difference forwards) runs with autocast off, in
  fp32 (``jvp_precision="fp32"``, default; ``"autocast"`` keeps it in bf16/fp16).
  Measured on a 2-layer BERT against float64 (``tests/test_mixed_precision.py``):
  the exact meta-gradient is within ~3e-3 (bf16) / ~2e-4 (fp16) either way, a
  forward-mode tangent rounding like its primal, but the finite-difference one is
  off by ~75% when its two perturbed forwards run in bf16/fp16 (their difference
  drowns in rounding) and within ~3e-3 in fp32;
* the closed-form cotangent is computed in fp32 and multiplied by ``−η·w`` in fp32;
  for an fp16 teacher (or any ``loss_scale``) it is then brought to an ordinary
  loss gradient's magnitude (largest entry ≈ 1/rows, an exact power of two undone
  after the backward): with η = 1e-4 the fp16 teacher backward otherwise lost 56%
  of the meta-gradient to underflow (now ~5e-4);
* ``loss_scale`` S (fp16): every backward runs on ``S·loss`` and is unscaled in fp32
  (:func:`scaled_grad`); a power of two changes nothing but underflow, bitwise.

Side effects: none.  Parameters (bitwise, except ``finite_diff``), ``.grad``,
train/eval mode, buffers (BatchNorm running statistics are restored) and the
optimizer state are as they were.  Random generators advance as the forwards
draw (dropout); forwards that must pair (the primal and its JVP, the two
finite-difference forwards) replay one generator state, see
:mod:`fastmeta.functional`.  With the student in training mode the student's
forwards on ``x`` run under math attention (a fused attention kernel draws its
dropout differently from the math path the JVP needs).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import batching
from .batching import (
    align_logits_labels,
    check_finite,
    check_kd_kind,
    check_kd_weight,
    check_logits_pair,
    check_same_device,
    check_temperature,
    cross_entropy,
    model_logits,
    per_sample_sum,
    row_mask,
    split_batch,
    student_loss,
)
from .functional import (
    capture_rng_state,
    functional_logits,
    jvp_logits,
    math_attention,
    preserved_buffers,
    replay_rng,
    add_scaled_,
    trainable_parameters,
    transform_buffers,
)

__all__ = ["MetaGradient", "meta_gradient", "meta_grad", "influence", "HYPERGRAD_METHODS"]

HYPERGRAD_METHODS = ("exact", "finite_diff", "autograd", "first_order")


@dataclass
class MetaGradient:
    """Everything one meta-gradient computation produces (all tensors detached).

    teacher_grads   ``{name: ∇θT LQ(θS'(θT))}`` for every teacher parameter that requires grad
                    (``{}`` when ``compute_teacher_grads=False``).
    influences      ``[B]`` per-sample influences ``w_i`` of ``batch`` (None unless requested).
    student_loss    ``LS`` on ``batch`` at ``θS`` with the current teacher (0-dim).
    quiz_loss       ``LQ = CE(yq, S(xq; θS'))`` at the pilot point (0-dim).
    teacher_logits  the teacher's raw logits on ``batch`` (model output shape).
    student_logits  the student's raw logits on ``batch`` at ``θS``.
    student_grads   ``{name: ∇θS LS}`` at ``θS`` (trainable student parameters): the gradient of the
                    pilot step, i.e. the real step's gradient when the teacher does not change.
    pilot_params    ``θS'`` (``{name: Tensor}``, trainable parameters) when ``keep_pilot=True``.
    quiz_grads      ``v = ∇θS' LQ`` when ``keep_pilot=True``.
    inner_lr        the learning rate η of the pilot step (``inner_lr`` or the optimizer's).
    hypergrad       the method used.
    timings         seconds per phase (teacher_forward, student_forward_backward, pilot_update,
                    quiz_forward_backward, student_jvp, teacher_backward, total; autograd:
                    teacher_backward is the double backward).
    tangent_precision  how the student tangent ``u = J_S a`` (or its finite difference) was
                    computed: ``"default"`` (no low-precision autocast was active),
                    ``"fp32 (autocast off)"`` (``jvp_precision="fp32"`` under a bf16/fp16
                    autocast) or ``"autocast <dtype>"`` (``jvp_precision="autocast"``).
    """

    teacher_grads: dict
    influences: torch.Tensor | None
    student_loss: torch.Tensor
    quiz_loss: torch.Tensor
    teacher_logits: torch.Tensor
    student_logits: torch.Tensor
    student_grads: dict
    pilot_params: dict | None = None
    quiz_grads: dict | None = None
    inner_lr: float = 0.0
    hypergrad: str = "exact"
    timings: dict = field(default_factory=dict)
    tangent_precision: str = "default"


# --------------------------------------------------------------------------- helpers
class _Timer:
    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.timings: dict[str, float] = {}
        self.device = device

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.sync:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize(self.device)
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def _grads_or_zeros(grads, tensors):
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]


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


def _tangent_precision(device: torch.device, jvp_precision: str):
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
    """``loss_scale`` as a float (None: 1.0); ``ValueError`` unless finite and > 0."""
    if loss_scale is None:
        return 1.0
    try:
        value = float(loss_scale)
    except (TypeError, ValueError):
        raise TypeError(f"loss_scale must be a number or None, got {type(loss_scale).__name__}") from None
    if not (value > 0.0) or not math.isfinite(value):
        raise ValueError(f"loss_scale must be finite and > 0, got {loss_scale}")
    return value


def _check_inner_lr(inner_lr, student_optimizer) -> float | None:
    if inner_lr is None:
        if student_optimizer is None:
            raise ValueError("inner_lr is None and no student_optimizer was given: the pilot step needs a learning rate")
        return None
    value = float(inner_lr)
    if not (value > 0.0) or not math.isfinite(value):
        raise ValueError(f"inner_lr must be finite and > 0, got {inner_lr}")
    return value


class _PilotStep:
    """The (linearised) pilot step ``θ' = θ − scale ⊙ g − offset`` for the named parameters.

    ``scale[name]`` is ``η·P`` (a float or a tensor), ``offset[name]`` the part of the
    step that does not depend on the gradient (None when 0).  ``lr`` is the reference
    learning rate η: ``scale/lr`` is the preconditioner ``P`` of the influences.
    """

    def __init__(self, scale: dict, offset: dict, lr: float):
        self.scale = scale
        self.offset = offset
        self.lr = lr

    def apply(self, name: str, theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        new = theta - self.scale[name] * grad
        if self.offset.get(name) is not None:
            new = new - self.offset[name]
        return new

    def direction(self, name: str, vector: torch.Tensor) -> torch.Tensor:
        """``(scale/η) ⊙ vector`` = ``P ⊙ v`` (with per-group learning rates relative to η)."""
        scale = self.scale[name]
        if isinstance(scale, float):
            factor = scale / self.lr
            return vector if factor == 1.0 else vector * factor
        return vector * (scale / self.lr)


def _pilot_step(
    params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], optimizer, inner_lr: float | None
) -> _PilotStep:
    """Build the linearised pilot step from ``optimizer``'s hyper-parameters and state (read only)."""
    if optimizer is None:
        return _PilotStep({name: float(inner_lr) for name in params}, {}, float(inner_lr))
    group_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[id(p)] = group
    lrs = set()
    scale: dict[str, Any] = {}
    offset: dict[str, Any] = {}
    is_adamw = isinstance(optimizer, torch.optim.AdamW)
    is_adam = isinstance(optimizer, torch.optim.Adam) or is_adamw
    is_sgd = isinstance(optimizer, torch.optim.SGD)
    if not (is_adam or is_sgd):
        raise TypeError(
            f"student_optimizer must be torch.optim.SGD, Adam or AdamW (or None for plain SGD), "
            f"got {type(optimizer).__name__}"
        )
    with torch.no_grad():
        for name, p in params.items():
            group = group_of.get(id(p))
            if group is None:
                raise ValueError(f"student parameter {name!r} is not in any param group of student_optimizer")
            if group.get("maximize", False):
                raise ValueError("student_optimizer with maximize=True is not supported by the pilot step")
            lr = float(inner_lr if inner_lr is not None else group["lr"])
            if isinstance(lr, torch.Tensor):
                lr = float(lr)
            lrs.add(lr)
            g = grads[name]
            wd = float(group.get("weight_decay", 0.0))
            state = optimizer.state.get(p, {})
            if is_sgd:
                mu = float(group.get("momentum", 0.0))
                damp = float(group.get("dampening", 0.0))
                buf = state.get("momentum_buffer") if mu != 0.0 else None
                decay = wd * p.detach() if wd != 0.0 else None
                if mu == 0.0:
                    factor, constant = 1.0, None
                elif buf is None:  # first step: buf' = g'
                    factor = 1.0 + mu if group.get("nesterov", False) else 1.0
                    constant = None
                elif group.get("nesterov", False):
                    factor = 1.0 + mu * (1.0 - damp)
                    constant = mu * mu * buf
                else:
                    factor = 1.0 - damp
                    constant = mu * buf
                scale[name] = lr * factor
                total = None
                if decay is not None:
                    total = factor * decay
                if constant is not None:
                    total = constant if total is None else total + constant
                offset[name] = None if total is None else lr * total
            else:
                beta1, beta2 = (float(b) for b in group["betas"])
                eps = float(group["eps"])
                step = state.get("step", 0)
                step = int(step.item() if isinstance(step, torch.Tensor) else step) + 1
                decoupled = is_adamw or bool(group.get("decoupled_weight_decay", False))
                gg = g + wd * p.detach() if (wd != 0.0 and not decoupled) else g
                m = state.get("exp_avg")
                s = state.get("exp_avg_sq")
                s_new = (1.0 - beta2) * gg * gg if s is None else beta2 * s + (1.0 - beta2) * gg * gg
                if group.get("amsgrad", False) and state.get("max_exp_avg_sq") is not None:
                    s_new = torch.maximum(state["max_exp_avg_sq"], s_new)
                bias1 = 1.0 - beta1**step
                bias2 = 1.0 - beta2**step
                denom = s_new.sqrt() / math.sqrt(bias2) + eps
                precond = ((1.0 - beta1) / bias1) / denom
                scale[name] = lr * precond
                total = None
                if m is not None:
                    total = lr * (beta1 / bias1) * m / denom
                if wd != 0.0:
                    extra = lr * wd * p.detach() if decoupled else lr * precond * (wd * p.detach())
                    total = extra if total is None else total + extra
                offset[name] = total
    lr_ref = float(inner_lr) if inner_lr is not None else max(lrs)
    return _PilotStep(scale, offset, lr_ref)


def _is_plain_sgd(optimizer) -> bool:
    if optimizer is None:
        return True
    if not isinstance(optimizer, torch.optim.SGD):
        return False
    return all(
        float(g.get("momentum", 0.0)) == 0.0 and float(g.get("weight_decay", 0.0)) == 0.0 and not g.get("maximize", False)
        for g in optimizer.param_groups
    )


def _kd_teacher_logit_grad(zs, zt, temperature, kind, mask):
    """``∂KD/∂zt`` (batchmean over ``mask``) at the given student logits (no model involved)."""
    with torch.enable_grad():
        zt_leaf = zt.detach().requires_grad_(True)
        loss = batching.kd_loss(zs.detach(), zt_leaf, temperature, kind=kind, mask=mask)
        (grad,) = torch.autograd.grad(loss, zt_leaf)
    return grad


def _kd_sample_losses(zs, zt, temperature, kind, mask):
    """Per-sample KD loss ``ℓ_i`` = sum of the row losses over the sample's counted rows."""
    rows = batching.kd_rows(zs.detach(), zt.detach(), temperature, kind)
    rows = torch.where(mask, rows, rows.new_zeros(()))
    return per_sample_sum(rows)


# --------------------------------------------------------------------------- the engine
def meta_gradient(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    batch: Any,
    quiz_batch: Any,
    *,
    inner_lr: float | None,
    temperature: float = 1.0,
    kd_weight: float = 0.5,
    kd_loss: str = "kl",
    hypergrad: str = "exact",
    inner_steps: int = 1,
    student_optimizer: torch.optim.Optimizer | None = None,
    compute_influence: bool = False,
    shift_labels: bool = False,
    compute_teacher_grads: bool = True,
    keep_pilot: bool = False,
    fd_eps: float | None = None,
    fd_mode: str = "lgtm",
    grad_sync: Callable[[list[torch.Tensor]], None] | None = None,
    jvp_precision: str = "fp32",
    loss_scale: float | None = None,
) -> MetaGradient:
    """Compute the teacher's meta-gradient ``∇θT CE(yq, S(xq; θS'(θT)))`` (module docstring for the math).

    Arguments after ``inner_steps`` are extras of the engine:

    student_optimizer       read-only source of the pilot step's preconditioner (module docstring).
    compute_influence       also return the per-sample influences ``w_i`` of ``batch`` (inner_steps=1).
    shift_labels            causal-LM alignment for both batches (``logits[:, :-1]`` vs ``labels[:, 1:]``).
    compute_teacher_grads   False: skip the teacher backward (influences only; no teacher graph kept).
    keep_pilot              also return ``θS'`` and ``v``.
    fd_eps, fd_mode         ``hypergrad="finite_diff"`` options (module docstring).
    grad_sync               data parallelism: a callable that replaces, in place, each tensor of a
                            list by its mean over the processes (e.g. an ``all_reduce`` / world size).
                            It is applied to the pilot gradient ``∇θS LS`` before the pilot step and to
                            the quiz gradient ``v`` before the JVP, so every process takes the pilot
                            step and the JVP direction of the GLOBAL batch; the teacher gradient stays
                            this process's shard term (average it like any DDP gradient). With equal
                            shards and batch-mean losses this equals one process on the concatenated
                            batches.  Only ``inner_steps=1`` and ``hypergrad`` "exact"/"finite_diff".
    jvp_precision           under a bf16/fp16 ``torch.autocast`` (the caller's): ``"fp32"`` (default)
                            computes the student tangent ``u = J_S a`` (the JVP, the forward-over-
                            reverse products of ``inner_steps > 1``, the finite-difference forwards)
                            with autocast switched off, i.e. in the parameters' dtype; ``"autocast"``
                            leaves it under the caller's autocast (cheaper, less accurate; see the
                            module docstring for measured errors).  No effect without autocast.
                            ``MetaGradient.tangent_precision`` says which was used.
    loss_scale              float16 loss scaling: every backward runs on ``S·loss`` (the teacher's on
                            ``S·c``) and its gradients are divided by ``S`` (:func:`scaled_grad`);
                            None = 1.  A power of two changes nothing but fp16 underflow.

    Raises ``ValueError``/``TypeError`` naming the argument for bad input (missing labels,
    empty batch, logits shape mismatch, temperature <= 0, models on different devices, ...)
    and ``FloatingPointError`` for a non-finite loss; nothing is modified in either case.
    """
    if hypergrad not in HYPERGRAD_METHODS:
        raise ValueError(f"hypergrad must be one of {HYPERGRAD_METHODS}, got {hypergrad!r}")
    if hypergrad == "first_order":
        raise ValueError(
            "hypergrad='first_order' has no MetaDistil/LGTM meta-gradient: the teacher enters the quiz loss only "
            "through the second-order term, so the first-order term is identically zero. Use 'exact', "
            "'finite_diff' or 'autograd' (ReptileDistil/IKD first-order feedback: algorithm='reptile'/'ikd')"
        )
    if fd_mode not in ("lgtm", "logits"):
        raise ValueError(f"fd_mode must be 'lgtm' or 'logits', got {fd_mode!r}")
    if jvp_precision not in JVP_PRECISIONS:
        raise ValueError(f"jvp_precision must be one of {JVP_PRECISIONS}, got {jvp_precision!r}")
    loss_scale = check_loss_scale(loss_scale)
    if grad_sync is not None and (not callable(grad_sync) or hypergrad == "autograd" or inner_steps != 1):
        raise NotImplementedError(
            "grad_sync must be a callable and is supported with inner_steps=1 and hypergrad 'exact' or "
            f"'finite_diff' (got hypergrad={hypergrad!r}, inner_steps={inner_steps!r})"
        )
    temperature = check_temperature(temperature)
    kd_weight = check_kd_weight(kd_weight)
    check_kd_kind(kd_loss)
    if not isinstance(inner_steps, int) or isinstance(inner_steps, bool) or inner_steps < 1:
        raise ValueError(f"inner_steps must be an int >= 1, got {inner_steps!r}")
    lr_value = _check_inner_lr(inner_lr, student_optimizer)
    if inner_steps > 1:
        if not _is_plain_sgd(student_optimizer):
            raise NotImplementedError(
                "inner_steps > 1 supports plain SGD pilot steps only (student_optimizer None or SGD without "
                "momentum/weight decay)"
            )
        if hypergrad == "finite_diff" and fd_mode != "lgtm":
            raise NotImplementedError("inner_steps > 1 with hypergrad='finite_diff' supports fd_mode='lgtm' only")
        if compute_influence:
            raise ValueError("compute_influence needs inner_steps=1 (LGTM's influence is defined for one pilot step)")
    if fd_eps is not None and not (float(fd_eps) > 0.0 and math.isfinite(float(fd_eps))):
        raise ValueError(f"fd_eps must be finite and > 0, got {fd_eps}")

    split_x = split_batch(batch, name="batch")
    split_q = split_batch(quiz_batch, name="quiz_batch")
    device = check_same_device(teacher, student, ("batch", split_x), ("quiz_batch", split_q))
    student_params = trainable_parameters(student)
    if not student_params:
        raise ValueError("student has no parameter with requires_grad=True: there is no pilot step to differentiate")
    teacher_params = trainable_parameters(teacher) if compute_teacher_grads else {}
    names = list(student_params)
    timer = _Timer(device)
    start_total = time.perf_counter()

    autograd_mode = hypergrad == "autograd"
    # with dropout active, the student's forwards on x must draw their masks the same way as the JVP's
    # math-attention forward: run them under math attention too (see module docstring)
    x_attention = math_attention if (autograd_mode or (student.training and hypergrad == "exact")) else contextlib.nullcontext
    outer = math_attention() if autograd_mode else contextlib.nullcontext()

    tangent_context, tangent_precision = _tangent_precision(device, jvp_precision)
    with preserved_buffers(teacher, student), outer, contextlib.ExitStack() as tangent_stack:
        # ---- teacher forward (graph kept only when its backward is needed)
        need_teacher_graph = bool(teacher_params) and kd_weight != 0.0
        with timer.phase("teacher_forward"), torch.set_grad_enabled(need_teacher_graph):
            teacher_raw = model_logits(teacher, split_x, name="teacher")
        teacher_aligned, labels = align_logits_labels(teacher_raw, split_x.labels, shift_labels=shift_labels, name="teacher")
        check_finite(teacher_aligned.detach(), "teacher logits on batch")
        mask = row_mask(labels)
        zt_const = teacher_aligned.detach()

        # ---- student forward/backward at θS (the pilot gradient), pilot step(s)
        theta = {name: p.detach() for name, p in student_params.items()}
        snapshots = []  # (θ_j dict, rng state, student logits aligned) for j = 0..k-1
        graph_theta = dict(student_params)  # autograd mode: θ_j with graph
        student_raw = None
        ls_first = None
        grads_first = None
        pilot = None
        for step_index in range(inner_steps):
            with timer.phase("student_forward_backward"):
                rng_state = capture_rng_state(device)
                with torch.enable_grad(), x_attention():
                    if autograd_mode:
                        current = graph_theta
                        raw = functional_logits(student, current, split_x)
                    else:
                        current = {
                            name: (t if step_index == 0 else t.detach().requires_grad_(True))
                            for name, t in (student_params if step_index == 0 else theta).items()
                        }
                        raw = functional_logits(student, None if step_index == 0 else current, split_x)
                    zs, _ = align_logits_labels(raw, split_x.labels, shift_labels=shift_labels, name="student")
                    if step_index == 0:
                        check_logits_pair(zs, teacher_aligned)
                    ls = student_loss(
                        zs,
                        teacher_aligned if autograd_mode else zt_const,
                        labels,
                        temperature=temperature,
                        kd_weight=kd_weight,
                        kind=kd_loss,
                        higher_order=autograd_mode,
                    )
                    check_finite(ls.detach(), "student loss LS on batch" + (f" (inner step {step_index})" if step_index else ""))
                    tensors = [current[name] for name in names]
                    grads = _grads_or_zeros(
                        scaled_grad(ls, tensors, loss_scale, create_graph=autograd_mode, allow_unused=True), tensors
                    )
            if step_index == 0:
                student_raw = raw.detach()
                ls_first = ls.detach()
                grads_first = {name: g.detach() for name, g in zip(names, grads)}
                if grad_sync is not None:  # in place: ``grads`` shares these tensors' storage
                    with timer.phase("grad_sync"):
                        grad_sync(list(grads_first.values()))
                with timer.phase("pilot_update"):
                    pilot = _pilot_step(student_params, grads_first, student_optimizer, lr_value)
            snapshots.append(({name: current[name].detach() for name in names}, rng_state, zs.detach()))
            with timer.phase("pilot_update"):
                if autograd_mode:
                    graph_theta = {name: pilot.apply(name, current[name], g) for name, g in zip(names, grads)}
                else:
                    with torch.no_grad():
                        theta = {name: pilot.apply(name, current[name].detach(), g.detach()) for name, g in zip(names, grads)}
            del raw, zs, ls, grads

        # ---- quiz loss at θS' and v = ∇θS' LQ
        with timer.phase("quiz_forward_backward"), torch.enable_grad():
            if autograd_mode:
                pilot_point = graph_theta
            else:
                pilot_point = {name: t.requires_grad_(True) for name, t in theta.items()}
            quiz_raw = functional_logits(student, pilot_point, split_q)
            quiz_logits, quiz_labels = align_logits_labels(quiz_raw, split_q.labels, shift_labels=shift_labels, name="student")
            lq = cross_entropy(quiz_logits, quiz_labels, name="quiz_batch labels")
            check_finite(lq.detach(), "quiz loss LQ at the pilot point")
            if autograd_mode:
                wanted = [teacher_params[n] for n in teacher_params] if (need_teacher_graph) else []
                pilot_tensors = [pilot_point[name] for name in names]
                outs = scaled_grad(lq, wanted + pilot_tensors, loss_scale, allow_unused=True)
                teacher_grad_list = _grads_or_zeros(outs[: len(wanted)], wanted)
                quiz_grads = dict(zip(names, (g.detach() for g in _grads_or_zeros(outs[len(wanted):], pilot_tensors))))
            else:
                pilot_tensors = [pilot_point[name] for name in names]
                quiz_grads = dict(
                    zip(names, _grads_or_zeros(scaled_grad(lq, pilot_tensors, loss_scale, allow_unused=True), pilot_tensors))
                )
                if grad_sync is not None:
                    grad_sync(list(quiz_grads.values()))
        del quiz_raw, quiz_logits

        # the student tangent (JVP / finite differences) in fp32 under a low-precision autocast
        tangent_stack.enter_context(tangent_context)
        influences = None
        teacher_grads: dict[str, torch.Tensor] = {}
        if autograd_mode:
            if need_teacher_graph:
                teacher_grads = {n: g.detach() for n, g in zip(teacher_params, teacher_grad_list)}
            if compute_influence:
                with timer.phase("student_jvp"):
                    theta0, rng0, zs0 = snapshots[0]
                    direction = {name: pilot.direction(name, quiz_grads[name]) for name in names}
                    u = _double_vjp_tangent(student, student_params, split_x, direction, rng0, shift_labels)
                    u = u[:, :-1] if shift_labels else u
                    influences = per_sample_sum(
                        batching.kd_influence(zs0, zt_const, u, temperature, kind=kd_loss, mask=mask)
                    )
        elif kd_weight == 0.0 and not compute_influence:
            pass  # LS does not depend on θT: zero meta-gradient (filled in below)
        elif hypergrad == "exact" or inner_steps > 1:
            cotangent = None
            a = {name: pilot.direction(name, quiz_grads[name]) for name in names}
            for j in reversed(range(inner_steps)):
                theta_j, rng_j, zs_j = snapshots[j]
                if hypergrad == "finite_diff":  # inner_steps > 1: LGTM-style differences along the trajectory
                    with timer.phase("student_jvp"):
                        c, hv = _fd_trajectory_step(
                            student, student_params if j == 0 else theta_j, split_x, a, zt_const, labels, mask, rng_j,
                            temperature=temperature, kd_weight=kd_weight, kind=kd_loss, shift_labels=shift_labels,
                            eps=fd_eps, need_hvp=j > 0,
                        )
                        cotangent = c if cotangent is None else cotangent + c
                        if hv is not None:
                            a = {name: a[name] - pilot.lr * hv[name] for name in names}
                    continue
                with timer.phase("student_jvp"):
                    if j == 0:
                        _, u = jvp_logits(student, split_x, a, rng_state=rng_j)
                        hv = None
                    else:
                        u, hv = _logits_jvp_and_hvp(
                            student, theta_j, split_x, a, zt_const, labels, rng_j,
                            temperature=temperature, kd_weight=kd_weight, kind=kd_loss, shift_labels=shift_labels,
                        )
                    u_aligned = u[:, :-1] if shift_labels else u
                    c = batching.kd_teacher_cotangent(zs_j, zt_const, u_aligned, temperature, kind=kd_loss, mask=mask)
                    cotangent = c if cotangent is None else cotangent + c
                    if j == 0 and compute_influence:
                        influences = per_sample_sum(
                            batching.kd_influence(zs_j, zt_const, u_aligned, temperature, kind=kd_loss, mask=mask)
                        )
                    if hv is not None:
                        eta = pilot.lr
                        a = {name: a[name] - eta * hv[name] for name in names}
            if need_teacher_graph:
                with timer.phase("teacher_backward"):
                    teacher_grads = _teacher_backward(
                        teacher_aligned, teacher_params, (-pilot.lr * kd_weight) * _at_least_fp32(cotangent), loss_scale
                    )
        else:  # finite_diff, inner_steps == 1
            theta0, rng0, zs0 = snapshots[0]
            direction = {name: pilot.direction(name, quiz_grads[name]) for name in names}
            with timer.phase("student_jvp"):
                if fd_mode == "logits":
                    _, u = jvp_logits(student, split_x, direction, method="finite_diff", eps=fd_eps, rng_state=rng0)
                    u_aligned = u[:, :-1] if shift_labels else u
                    cotangent = batching.kd_teacher_cotangent(zs0, zt_const, u_aligned, temperature, kind=kd_loss, mask=mask)
                    if compute_influence:
                        influences = per_sample_sum(
                            batching.kd_influence(zs0, zt_const, u_aligned, temperature, kind=kd_loss, mask=mask)
                        )
                else:
                    cotangent, influences = _lgtm_finite_difference(
                        student, student_params, split_x, direction, zt_const, mask, rng0,
                        temperature=temperature, kind=kd_loss, eps=fd_eps, shift_labels=shift_labels,
                        with_influence=compute_influence,
                    )
            if need_teacher_graph:
                with timer.phase("teacher_backward"):
                    teacher_grads = _teacher_backward(
                        teacher_aligned, teacher_params, (-pilot.lr * kd_weight) * _at_least_fp32(cotangent), loss_scale
                    )
        if compute_influence and influences is None:
            influences = torch.zeros(split_x.size, dtype=zt_const.dtype, device=device)
        if compute_teacher_grads and teacher_params and not teacher_grads:
            teacher_grads = {n: torch.zeros_like(p) for n, p in teacher_params.items()}

    timer.timings["total"] = time.perf_counter() - start_total
    return MetaGradient(
        teacher_grads=teacher_grads,
        influences=None if influences is None else influences.detach(),
        student_loss=ls_first,
        quiz_loss=lq.detach(),
        teacher_logits=teacher_raw.detach(),
        student_logits=student_raw,
        student_grads=grads_first,
        pilot_params={name: t.detach() for name, t in pilot_point.items()} if keep_pilot else None,
        quiz_grads=quiz_grads if keep_pilot else None,
        inner_lr=pilot.lr,
        hypergrad=hypergrad,
        timings=timer.timings,
        tangent_precision=tangent_precision,
    )


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 (the factor ``−η·w`` of the cotangent would push fp16 values into subnormals)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _teacher_backward(teacher_logits, teacher_params, cotangent, loss_scale=1.0):
    """``J_Tᵀ c``: one ordinary backward of the teacher's logits with the given cotangent.

    ``loss_scale`` S: the backward runs on ``S·c`` and the gradients are divided by S.
    In float16 the cotangent ``−η·w·c`` is η times smaller than an ordinary loss
    gradient on the logits (η = 1e-4 underflowed most of the teacher's fp16 backward:
    56% error): it is first brought to an ordinary gradient's magnitude, i.e. its
    largest entry to about ``1/rows`` (a power of two P, undone exactly afterwards),
    so that the same S serves it as every other backward of the step.
    """
    tensors = list(teacher_params.values())
    scale = float(loss_scale)
    if teacher_logits.dtype == torch.float16 or loss_scale != 1.0:
        largest = float(cotangent.detach().abs().max())
        if largest > 0.0 and math.isfinite(largest):
            rows = max(1, cotangent.numel() // max(1, cotangent.shape[-1]))
            scale *= 2.0 ** math.floor(math.log2(1.0 / (rows * largest)))
    grads = torch.autograd.grad(
        teacher_logits, tensors, grad_outputs=(cotangent * scale).to(teacher_logits.dtype), allow_unused=True
    )
    grads = _unscaled(grads, scale)
    return {name: g.detach() for name, g in zip(teacher_params, _grads_or_zeros(grads, tensors))}


def _logits_jvp_and_hvp(student, theta, split_x, direction, zt, labels, rng_state, *, temperature, kd_weight, kind, shift_labels):
    """Forward-over-reverse at ``theta``: ``(J_S a, H_S a)`` with ``H_S = ∇²θ LS`` (teacher logits fixed)."""
    names = list(direction)

    def loss_and_logits(params):
        raw = functional_logits(student, {**transform_buffers(student), **params}, split_x)
        zs, _ = align_logits_labels(raw, split_x.labels, shift_labels=shift_labels, name="student")
        loss = student_loss(zs, zt, labels, temperature=temperature, kd_weight=kd_weight, kind=kind, higher_order=True)
        return loss, raw

    grad_fn = torch.func.grad(loss_and_logits, has_aux=True)
    primals = {name: theta[name].detach() for name in names}
    tangents = {name: direction[name].detach() for name in names}
    with torch.no_grad(), math_attention(), replay_rng(rng_state):
        _, (hv, u) = torch.func.jvp(grad_fn, (primals,), (tangents,))
    return u, hv


def _lgtm_eps(vectors, eps: float | None) -> float:
    """LGTM/DARTS's step ``ε = 0.01/‖d‖`` (1 when ``d = 0``), unless ``eps`` is given."""
    if eps is None:
        norm = math.sqrt(sum(float(v.double().square().sum()) for v in vectors))
        return 0.01 / norm if norm > 0.0 else 1.0
    return float(eps)


def _fd_trajectory_step(
    student, params, split_x, direction, zt, labels, mask, rng_state, *, temperature, kd_weight, kind, shift_labels, eps, need_hvp
):
    """One step of the finite-difference backward sweep through an SGD trajectory (inner_steps > 1).

    At ``θ_j`` (``params``: the module's own parameters for j = 0, else the snapshot), with
    ``ε = 0.01/‖a‖`` (or ``eps``), perturbs ``θ_j`` IN PLACE to ``θ_j ± ε a`` and returns

        c_j  ≈ (∂KD/∂zt(θ_j + εa) − ∂KD/∂zt(θ_j − εa)) / 2ε      (LGTM's difference)
        H a  ≈ (∇LS(θ_j + εa) − ∇LS(θ_j − εa)) / 2ε              (when need_hvp; None otherwise)

    then restores ``θ_j`` (within a couple of ulp).  Each perturbed forward replays the
    dropout masks of the trajectory's forward at step j.
    """
    names = list(direction)
    tensors = [params[name] for name in names]
    vectors = [direction[name].detach() for name in names]
    eps = _lgtm_eps(vectors, eps)
    offset = 0.0
    results = {}
    try:
        for sign in (1.0, -1.0):
            add_scaled_(tensors, vectors, sign * eps - offset)
            offset = sign * eps
            with replay_rng(rng_state), torch.set_grad_enabled(need_hvp):
                leaves = {name: (t if t.requires_grad or not need_hvp else t.requires_grad_(True)) for name, t in zip(names, tensors)}
                raw = functional_logits(student, leaves, split_x)
                zs, _ = align_logits_labels(raw, split_x.labels, shift_labels=shift_labels, name="student")
                grads = None
                if need_hvp:
                    loss = student_loss(zs, zt, labels, temperature=temperature, kd_weight=kd_weight, kind=kind)
                    grads = _grads_or_zeros(torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True), tensors)
            zs64 = zs.detach().double()
            results[sign] = (_kd_teacher_logit_grad(zs64, zt.double(), temperature, kind, mask), grads)
            del raw, zs
    finally:
        if offset != 0.0:
            add_scaled_(tensors, vectors, -offset)
    cotangent = ((results[1.0][0] - results[-1.0][0]) / (2.0 * eps)).to(zt.dtype)
    hv = None
    if need_hvp:
        hv = {name: (gp - gm) / (2.0 * eps) for name, gp, gm in zip(names, results[1.0][1], results[-1.0][1])}
    return cotangent, hv


def _double_vjp_tangent(student, student_params, split_x, direction, rng_state, shift_labels):
    """``J_S d`` by the double-vjp trick (reverse mode twice, for the autograd reference path)."""
    names = list(direction)
    with torch.enable_grad(), math_attention(), replay_rng(rng_state):
        raw = functional_logits(student, None, split_x)
        dummy = torch.zeros_like(raw, requires_grad=True)
        tensors = [student_params[name] for name in names]
        grads = torch.autograd.grad(raw, tensors, grad_outputs=dummy, create_graph=True, allow_unused=True)
        pairs = [(g, direction[n]) for g, n in zip(grads, names) if g is not None]
        (u,) = torch.autograd.grad([g for g, _ in pairs], dummy, grad_outputs=[d for _, d in pairs])
    return u.detach()


def _lgtm_finite_difference(
    student, student_params, split_x, direction, zt, mask, rng_state, *, temperature, kind, eps, shift_labels, with_influence
):
    """LGTM's central difference: ``(∂KD/∂zt(θS + εd) − ∂KD/∂zt(θS − εd))/2ε`` and per-sample ``Δℓ_i/2ε``.

    The student's parameters are perturbed in place and restored.
    """
    names = list(direction)
    tensors = [student_params[name] for name in names]
    vectors = [direction[name].detach() for name in names]
    eps = _lgtm_eps(vectors, eps)
    offset = 0.0
    results = {}
    with torch.no_grad():
        try:
            for sign in (1.0, -1.0):
                add_scaled_(tensors, vectors, sign * eps - offset)
                offset = sign * eps
                with replay_rng(rng_state):
                    raw = functional_logits(student, None, split_x)
                zs, _ = align_logits_labels(raw, split_x.labels, shift_labels=shift_labels, name="student")
                # the difference of two nearby losses/gradients cancels most of their digits: evaluate
                # them in float64 from the (fp32/bf16) logits; measured: fp32 per-sample influences went
                # from 4e-3 to 2e-7 relative error against the float64 run of the same difference
                zs64, zt64 = zs.double(), zt.double()
                grad_zt = _kd_teacher_logit_grad(zs64, zt64, temperature, kind, mask)
                sample = _kd_sample_losses(zs64, zt64, temperature, kind, mask) if with_influence else None
                results[sign] = (grad_zt, sample)
        finally:
            if offset != 0.0:
                add_scaled_(tensors, vectors, -offset)
    cotangent = ((results[1.0][0] - results[-1.0][0]) / (2.0 * eps)).to(zt.dtype)
    influences = None
    if with_influence:
        influences = ((results[1.0][1] - results[-1.0][1]) / (2.0 * eps)).to(zt.dtype)
    return cotangent, influences


# --------------------------------------------------------------------------- public API
def meta_grad(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    batch: Any,
    quiz_batch: Any,
    *,
    inner_lr: float,
    temperature: float = 1.0,
    kd_weight: float = 0.5,
    kd_loss: str = "kl",
    hypergrad: str = "exact",
    inner_steps: int = 1,
    shift_labels: bool = False,
    student_optimizer: torch.optim.Optimizer | None = None,
    fd_eps: float | None = None,
) -> dict[str, torch.Tensor]:
    """``∇θT CE(yq, S(xq; θS'(θT)))`` for every teacher parameter that requires grad.

    ``θS' = θS − inner_lr·∇θS LS`` with ``LS = (1 − kd_weight)·CE(y, S(x)) + kd_weight·kd_loss(S(x), T(x), τ)``
    (``inner_steps`` SGD steps; ``student_optimizer`` for a momentum/Adam pilot step, see
    :mod:`fastmeta.engine`).  ``hypergrad``: ``"exact"`` (student JVP + closed-form cotangent +
    one teacher backward), ``"finite_diff"`` (LGTM's in-place central difference),
    ``"autograd"`` (double backward, the reference).  Keys as in ``teacher.named_parameters()``.
    Changes no parameter (finite_diff: within a couple of ulp), ``.grad``, mode, buffer or
    optimizer state.
    """
    return meta_gradient(
        teacher,
        student,
        batch,
        quiz_batch,
        inner_lr=inner_lr,
        temperature=temperature,
        kd_weight=kd_weight,
        kd_loss=kd_loss,
        hypergrad=hypergrad,
        inner_steps=inner_steps,
        shift_labels=shift_labels,
        student_optimizer=student_optimizer,
        fd_eps=fd_eps,
    ).teacher_grads


def influence(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    batch: Any,
    val_batch: Any,
    *,
    inner_lr: float,
    temperature: float = 1.0,
    kd_weight: float = 0.5,
    kd_loss: str = "kl",
    shift_labels: bool = False,
) -> torch.Tensor:
    """LGTM's per-sample distillation influence, exactly: ``[B]`` tensor of
    ``w_i = ⟨∇θS ℓ_i, ∇θS CE(y_val, S(x_val; θS'))⟩`` with ``θS' = θS − inner_lr·∇θS LS``
    and ``ℓ_i`` sample i's KD loss (``τ²·KL(pt_i ‖ ps_i)`` for kl; summed over the sample's
    unmasked tokens for token-level outputs).  One student JVP; no per-sample gradients.
    """
    return meta_gradient(
        teacher,
        student,
        batch,
        val_batch,
        inner_lr=inner_lr,
        temperature=temperature,
        kd_weight=kd_weight,
        kd_loss=kd_loss,
        hypergrad="exact",
        compute_influence=True,
        compute_teacher_grads=False,
        shift_labels=shift_labels,
    ).influences
