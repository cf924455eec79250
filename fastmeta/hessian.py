r"""Hessian-vector products without double backward: ``fastmeta.hvp`` and ``fastmeta.mixed_hvp``.

``hvp(loss_fn, module_or_params, vector, *, method=...)``
    ``∇²_θ L(θ) · v`` for a scalar loss of one set of parameters.

``mixed_hvp(teacher, student, inputs, vector, *, loss="kl", loss_kwargs=None, method=...)``
    The mixed product ``∇²_{θT θS} L · v = ∇_θT ⟨∇_θS L(T(x; θT), S(x; θS)), v⟩`` of a
    logit-level loss ``L = ℓ(zs, zt)`` of two modules (teacher ``T``, student ``S``),
    ``v`` over the student's parameters, the result over the teacher's.  This is the
    teacher's meta-gradient of MetaDistil / LGTM (times ``-η``; see
    ``docs/meta-gradient.md``).

Parameters and vectors
----------------------
* A module's parameters are its TRAINABLE ones (``requires_grad=True``, in
  ``named_parameters()`` order, tied weights once); frozen parameters are constants.
* ``vector`` is either a dict ``{name: Tensor}`` (a subset of the trainable parameters:
  the product is taken with respect to exactly those parameters, i.e. the Hessian block
  ``∇²_{θ_K θ_K}`` for the named set ``K``) or a list aligned with all trainable
  parameters.  The result has the same form: a dict with the same keys (for
  ``mixed_hvp``: keyed by the teacher's trainable parameter names) or a list
  (``mixed_hvp``: aligned with the teacher's trainable parameters).
* Every call leaves the parameters as it found them: bitwise for ``"autograd"``,
  ``"forward_over_reverse"`` and ``"exact"`` (they never write them);
  ``"finite_diff"`` perturbs them in place and restores them with ``restore="fast"``
  (add the perturbations back with :func:`fastmeta.ops.add_scaled_`: within a couple
  of ulp of ``max(|θ|, ε|v|)`` per element) or ``restore="exact"`` (keep a copy of the
  perturbed parameters, copy it back: bitwise, costs one parameter-sized copy).
  ``.grad`` is never touched; the version counters of the perturbed parameters do move
  (a graph saved before the call that uses them cannot be back-propagated after it).

Methods
-------
``"forward_over_reverse"`` (default of ``hvp``): ``torch.func.jvp`` of ``torch.func.grad``
    over ``torch.func.functional_call``.  Exact; one forward+backward with forward-mode
    tangents (≈ 2-3 backward costs), keeps one backward's activations.
``"finite_diff"``: central difference of first-order gradients,
    ``(∇L(θ+εv) − ∇L(θ−εv)) / 2ε`` with ``ε = r/‖v‖`` (``r = 1e-2`` as in DARTS / LGTM),
    parameters perturbed IN PLACE (no copy of the module, no ``create_graph``).
    Approximate: O(ε²) truncation error.  Meant for float32 and for kernels without
    second-order formulas.  Dropout masks: both gradients replay the same RNG state.
``"autograd"``: double backward (``create_graph=True``).  The reference, for tests and
    benchmarks: it keeps the whole backward graph alive.
``"exact"`` (``mixed_hvp`` only, its default): the logit-space factorisation.  One
    student JVP ``u = J_S v`` (forward mode, ``fastmeta.functional.jvp_logits``), the
    cotangent ``c = ∂/∂zt ⟨∂ℓ/∂zs, u⟩`` on the teacher's logits (:class:`LogitLoss`: KD's
    closed form from ``fastmeta.losses``, else autograd in logit space only) and ONE
    ordinary teacher backward ``J_Tᵀ c``.  Exact; no double backward, no graph of the student's backward.
    ``student_jvp="finite_diff"`` takes ``u`` by a central difference of the student's
    logits instead (works with any kernel; approximate).

``mixed_hvp(method="finite_diff")`` perturbs the student ``θS ± εv`` in place (forwards
under ``no_grad``), forms the teacher-logit cotangent ``(∂ℓ/∂zt(zs₊) − ∂ℓ/∂zt(zs₋))/2ε``
and does ONE teacher backward: by linearity of ``J_Tᵀ`` this equals the central
difference of the two teacher gradients ``∇_θT L(θS ± εv)`` (LGTM's estimate) at the
cost of one teacher backward instead of two.

Fused attention (HF ``attn_implementation="sdpa"``)
--------------------------------------------------
PyTorch's fused ``scaled_dot_product_attention`` kernels have no forward-mode AD formula
and no double-backward formula.  ``"forward_over_reverse"``, ``"autograd"`` and the
student JVP of ``"exact"`` therefore run under :func:`fastmeta.functional.math_attention`
(``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``, or ``torch.backends.cuda.sdp_kernel``
on older torch): users of these methods get the math (composite) SDPA backend: the same
attention up to rounding, exact derivatives, but the memory of an unfused attention in
those passes.  The teacher's first-order backward of ``"exact"`` and all passes of
``"finite_diff"`` run the model's own kernels (fused ones included).  Models that do not
call SDPA (``attn_implementation="eager"``, MLPs) are unaffected.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import losses, ops
from ._validation import check_choice
from .functional import (
    RESTORES,
    as_split_inputs,
    capture_rng_state,
    central_pair,
    functional_logits,
    jvp_logits,
    math_attention,
    trainable_parameters,
)

__all__ = ["hvp", "mixed_hvp", "forward_over_reverse", "LogitLoss", "mixed_hvp_unchecked"]

HVP_METHODS = ("forward_over_reverse", "finite_diff", "autograd")
MIXED_METHODS = ("exact", "forward_over_reverse", "finite_diff", "autograd")
KD_KINDS = losses.KINDS

Vector = Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]


# --------------------------------------------------------------------------- helpers
class _LossOfModule(torch.nn.Module):
    """``forward() = loss_fn(module)``: lets ``functional_call`` swap the module's parameters."""

    def __init__(self, module: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.module = module
        object.__setattr__(self, "_loss_fn", loss_fn)  # never registered as a submodule

    def forward(self):
        return self._loss_fn(self.module)


def _resolve_vector(
    vector: Vector, trainable: Dict[str, torch.Tensor], what: str
) -> Tuple[List[str], List[torch.Tensor], bool]:
    """(names, tangents cast to the parameters' dtype, was_dict)."""
    if isinstance(vector, torch.Tensor):
        raise TypeError(f"vector must be a dict name->Tensor or a list of Tensors over {what}, got a single Tensor")
    if isinstance(vector, Mapping):
        names = list(vector)
        if not names:
            raise ValueError("vector is an empty dict: name at least one parameter")
        tangents = []
        for name in names:
            if name not in trainable:
                raise KeyError(f"vector has {name!r}, which is not a trainable parameter of {what}")
            tangents.append(vector[name])
        was_dict = True
    else:
        tangents = list(vector)
        names = list(trainable)
        if len(tangents) != len(names):
            raise ValueError(
                f"vector is a list of {len(tangents)} tensors but {what} has {len(names)} trainable parameters"
            )
        was_dict = False
    out = []
    for name, t in zip(names, tangents):
        p = trainable[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"vector[{name!r}] must be a Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"vector[{name!r}] has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")
        if t.device != p.device:
            raise ValueError(f"vector[{name!r}] is on {t.device}, the parameter on {p.device}")
        if not t.is_floating_point():
            raise TypeError(f"vector[{name!r}] must be floating point, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"vector[{name!r}] has non-finite values")
        out.append(t.detach().to(p.dtype))
    return names, out, was_dict


def _pack(names: List[str], values: List[torch.Tensor], as_dict: bool):
    return dict(zip(names, values)) if as_dict else list(values)


def _grads_or_zeros(grads, params) -> List[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _finite_diff_eps(vectors: List[torch.Tensor], r: float) -> float:
    r = float(r)
    if not (math.isfinite(r) and r > 0):
        raise ValueError(f"r must be finite and > 0, got {r}")
    v_norm = float(ops.norm(vectors, dtype=torch.float64))
    return r / v_norm if v_norm > 0 else 0.0


def _model_device(module: torch.nn.Module) -> Optional[torch.device]:
    for p in module.parameters():
        return p.device
    return None


# --------------------------------------------------------------------------- hvp
def hvp(
    loss_fn: Callable[[Any], torch.Tensor],
    module_or_params: Union[torch.nn.Module, Sequence[torch.Tensor]],
    vector: Vector,
    *,
    method: str = "forward_over_reverse",
    r: float = 1e-2,
    restore: str = "fast",
):
    r"""Hessian-vector product ``∇²_θ L(θ) · v``.

    Args:
        loss_fn: ``loss_fn(module) -> scalar`` when ``module_or_params`` is an
            ``nn.Module`` (call the module inside: ``lambda m: F.cross_entropy(m(x), y)``);
            ``loss_fn(params) -> scalar`` when it is a list of tensors (a pure function
            of that list).
        module_or_params: the ``nn.Module`` whose trainable parameters ``θ`` are
            differentiated, or a list of tensors ``θ`` (``requires_grad=True`` for
            ``"finite_diff"`` / ``"autograd"``).
        vector: ``v`` as a dict ``{name: Tensor}`` (module only; a subset of the
            trainable parameters: the Hessian block of that subset) or a list aligned with
            the trainable parameters / the tensors.  Cast to the parameters' dtype.
        method: ``"forward_over_reverse"`` (exact, default), ``"finite_diff"`` (central
            difference of gradients, ``ε = r/‖v‖``, parameters perturbed in place and
            restored) or ``"autograd"`` (double backward; reference).  See the module
            docstring, also for fused SDPA attention (math backend in the exact paths).
        r: ``"finite_diff"`` perturbation size ``‖εv‖ = r``.
        restore: ``"finite_diff"`` restore of the parameters: ``"fast"`` (subtract the
            perturbation again) or ``"exact"`` (bitwise, one copy of the parameters).

    Returns:
        ``H v`` in the form of ``vector`` (dict with its keys, or list), in the
        parameters' dtype.
    """
    check_choice("method", method, HVP_METHODS)
    check_choice("restore", restore, RESTORES)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if isinstance(module_or_params, torch.nn.Module):
        module = module_or_params
        trainable = trainable_parameters(module)
        if not trainable:
            raise ValueError("module_or_params has no trainable parameters (all requires_grad=False)")
        names, vectors, as_dict = _resolve_vector(vector, trainable, "the module")
        params = [trainable[n] for n in names]
        device = _model_device(module)
    else:
        if isinstance(module_or_params, torch.Tensor):
            raise TypeError("module_or_params must be an nn.Module or a list of tensors, got a single Tensor")
        module = None
        params = list(module_or_params)
        if not params:
            raise ValueError("module_or_params is an empty list")
        if isinstance(vector, Mapping):
            raise TypeError("vector must be a list aligned with module_or_params when that is a list of tensors")
        trainable = {str(i): p for i, p in enumerate(params)}
        names, vectors, as_dict = _resolve_vector(list(vector), trainable, "module_or_params")
        device = params[0].device
        if method != "forward_over_reverse":
            for i, p in enumerate(params):
                if not p.requires_grad:
                    raise ValueError(f"module_or_params[{i}] must require grad for method={method!r}")

    if method == "forward_over_reverse":
        result = _hvp_forward_over_reverse(loss_fn, module, names, params, vectors)
    elif method == "autograd":
        result = _hvp_autograd(loss_fn, module, params, vectors)
    else:
        result = _hvp_finite_diff(loss_fn, module, params, vectors, r, restore, device)
    return _pack(names, result, as_dict)


def _call_loss(loss_fn, module, params):
    loss = loss_fn(module if module is not None else params)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar Tensor, got {type(loss).__name__}"
                         + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
    return loss.reshape(())


def forward_over_reverse(loss_fn: Callable, primals, tangents, *, has_aux: bool = False):
    """``torch.func.jvp`` of ``torch.func.grad(loss_fn)`` at ``primals`` along ``tangents``: ``H·t``.

    The exact Hessian-vector primitive (no double backward), run under ``no_grad``
    (forward-mode AD is unaffected; no backward graph outlives the call) and
    :func:`~fastmeta.functional.math_attention`.  ``has_aux=True``: ``loss_fn`` returns
    ``(loss, aux)`` and the result is ``(H·t, tangent of aux)``, e.g. the student's
    logit tangent ``J_S t`` from the same pass (the engine's multi-step sweep).
    ``primals``/``tangents`` are any pytree ``torch.func`` accepts (tuples, dicts).
    """
    grad_of = torch.func.grad(loss_fn, has_aux=has_aux)
    with torch.no_grad(), math_attention():
        _, tangent_out = torch.func.jvp(grad_of, (primals,), (tangents,))
    return tangent_out


def _hvp_forward_over_reverse(loss_fn, module, names, params, vectors):
    primals = tuple(p.detach() for p in params)
    if module is not None:
        wrapper = _LossOfModule(module, loss_fn)
        keys = ["module." + n for n in names]

        def loss_of(flat):
            out = torch.func.functional_call(wrapper, dict(zip(keys, flat)), ())
            if not isinstance(out, torch.Tensor) or out.numel() != 1:
                raise ValueError("loss_fn must return a scalar Tensor")
            return out.reshape(())

    else:

        def loss_of(flat):
            return _call_loss(loss_fn, None, list(flat))

    tangent_out = forward_over_reverse(loss_of, primals, tuple(vectors))
    return [t.detach() for t in tangent_out]


def _hvp_autograd(loss_fn, module, params, vectors):
    with torch.enable_grad(), math_attention():
        loss = _call_loss(loss_fn, module, params)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        pairs = [(g, v, p) for g, v, p in zip(grads, vectors, params) if g is not None and g.requires_grad]
        if not pairs:
            return [torch.zeros_like(p) for p in params]
        second = torch.autograd.grad(
            [g for g, _, _ in pairs], [p for p in params], grad_outputs=[v for _, v, _ in pairs], allow_unused=True
        )
    return [s.detach() for s in _grads_or_zeros(second, params)]


def _hvp_finite_diff(loss_fn, module, params, vectors, r, restore, device):
    eps = _finite_diff_eps(vectors, r)
    if eps == 0.0:
        return [torch.zeros_like(p) for p in params]
    rng = capture_rng_state(device)

    def gradient():
        with torch.enable_grad():
            loss = _call_loss(loss_fn, module, params)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        return _grads_or_zeros(grads, params)

    g_plus, g_minus = central_pair(params, vectors, eps, gradient, rng_state=rng, restore=restore)
    # written into g_plus: two gradient-sized lists at the peak, not three
    g_plus = [g if g.is_contiguous() else g.contiguous() for g in g_plus]
    return ops.central_difference(g_plus, g_minus, eps, inplace=True)


# --------------------------------------------------------------------------- mixed_hvp
_KD_KWARGS = ("temperature", "kind", "reduction", "mask", "scale_by_temperature_squared")


class LogitLoss:
    """A logit-level loss ``ℓ(zs, zt)`` with what each ``mixed_hvp`` method needs from it.

    :meth:`kd`: fastmeta's KD loss on the trusted path of ``fastmeta.losses`` (closed-form
    cotangent and teacher gradient, the PyTorch twin where a method differentiates twice),
    arguments checked once by :func:`mixed_hvp`, which also checks (``check_logits``) the
    first pair of logits.  Else a callable ``fn(zs, zt, **kwargs) -> scalar`` (autograd).
    """

    def __init__(self, fn: Optional[Callable] = None, kwargs: Optional[Mapping[str, Any]] = None, *,
                 kd: Optional[Dict[str, Any]] = None, check_logits: bool = False):
        self.fn = fn
        self.kwargs = dict(kwargs or {})
        self.kd_args = kd
        self._pending_check = check_logits and kd is not None

    @classmethod
    def kd(cls, kind: str, temperature: float, *, reduction: str = "batchmean", mask: Optional[torch.Tensor] = None,
           scale_by_temperature_squared: bool = True, check_logits: bool = False) -> "LogitLoss":
        """``fastmeta.losses.kd_loss(zs, zt, temperature, kind=, reduction=, mask=)`` with trusted arguments."""
        return cls(kd=dict(temperature=temperature, kind=kind, reduction=reduction, mask=mask,
                           scale_by_temperature_squared=scale_by_temperature_squared), check_logits=check_logits)

    def _check(self, zs: torch.Tensor, zt: torch.Tensor) -> None:
        if self._pending_check:
            self._pending_check = False
            losses.check_logits(zs.detach(), zt.detach(), self.kd_args["mask"], check_finite=True)

    def scalar(self, zs: torch.Tensor, zt: torch.Tensor, *, higher_order: bool = True) -> torch.Tensor:
        """``ℓ(zs, zt)`` as a 0-dim tensor (KD: the PyTorch twin unless ``higher_order=False``)."""
        if self.kd_args is None:
            value = self.fn(zs, zt, **self.kwargs)
        else:
            self._check(zs, zt)
            value = losses.kd_loss_unchecked(zs, zt, higher_order=higher_order, **self.kd_args)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError("loss must return a scalar Tensor (use a reducing reduction)")
        return value.reshape(())

    def cotangent(self, zs: torch.Tensor, zt: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``c = ∂/∂zt ⟨∂ℓ/∂zs, u⟩`` on the teacher's logits."""
        if self.kd_args is not None:
            self._check(zs, zt)
            c, _ = losses.kd_second_order_unchecked(zs.detach(), zt.detach(), u.detach(), need_influence=False,
                                                    **self.kd_args)
            return c
        with torch.enable_grad():
            zs_ = zs.detach().requires_grad_(True)
            zt_ = zt.detach().requires_grad_(True)
            value = self.scalar(zs_, zt_)
            (dzs,) = torch.autograd.grad(value, zs_, create_graph=True)
            (c,) = torch.autograd.grad((dzs * u.detach()).sum(), zt_, allow_unused=True)
        return torch.zeros_like(zt) if c is None else c

    def teacher_grad(self, zs: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
        """``∂ℓ/∂zt`` at ``(zs, zt)`` (logit space only)."""
        if self.kd_args is not None:
            self._check(zs, zt)
            return losses.kd_teacher_grad_unchecked(zs.detach(), zt.detach(), **self.kd_args).to(zt.dtype)
        with torch.enable_grad():
            zt_ = zt.detach().requires_grad_(True)
            value = self.scalar(zs.detach(), zt_)
            (c,) = torch.autograd.grad(value, zt_, allow_unused=True)
        return torch.zeros_like(zt) if c is None else c


def _resolve_loss(loss, loss_kwargs, method: str) -> LogitLoss:
    """``loss``/``loss_kwargs`` of :func:`mixed_hvp`, checked once, as a :class:`LogitLoss`."""
    kwargs = dict(loss_kwargs or {})
    if isinstance(loss, str):
        check_choice("loss", loss, KD_KINDS)
        if "kind" in kwargs and kwargs["kind"] != loss:
            raise ValueError(f"loss={loss!r} but loss_kwargs['kind']={kwargs['kind']!r}")
        kwargs["kind"] = loss
        loss = losses.kd_loss
    if not callable(loss):
        raise TypeError(f"loss must be a KD kind {KD_KINDS} or a callable loss(student_logits, teacher_logits, ...)")
    if loss is not losses.kd_loss:
        return LogitLoss(loss, kwargs)
    unknown = set(kwargs) - set(_KD_KWARGS)
    if unknown:
        raise ValueError(f"loss_kwargs has {sorted(unknown)}, not arguments of fastmeta.losses.kd_loss")
    kind = losses.check_kind(kwargs.get("kind", "kl"))
    temperature = losses.check_temperature(kwargs.get("temperature", 1.0))
    reduction = kwargs.get("reduction", "batchmean")
    check_choice("reduction", reduction, losses.REDUCTIONS)
    if reduction == "none" and method != "exact":
        raise ValueError("loss must return a scalar Tensor (use a reducing reduction)")
    scale = kwargs.get("scale_by_temperature_squared", True)
    return LogitLoss.kd(kind, temperature, reduction=reduction, mask=kwargs.get("mask"),
                        scale_by_temperature_squared=bool(scale), check_logits=True)


def mixed_hvp(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    inputs: Any,
    vector: Vector,
    *,
    loss: Union[str, Callable[..., torch.Tensor]] = "kl",
    loss_kwargs: Optional[Mapping[str, Any]] = None,
    method: str = "exact",
    teacher_inputs: Any = None,
    student_jvp: str = "forward",
    r: float = 1e-2,
    restore: str = "fast",
):
    r"""Mixed second derivative ``∇²_{θT θS} L · v = ∇_θT ⟨∇_θS L, v⟩`` of ``L = ℓ(S(x; θS), T(x; θT))``.

    Args:
        teacher, student: the two modules; the result is over the teacher's trainable
            parameters, ``vector`` over the student's.  Each must return logits (a Tensor,
            an object with ``.logits`` such as an HF output, or a dict with ``"logits"``).
        inputs: the student's inputs (a dict of keyword arguments, a tuple of positional
            ones, or a Tensor); also the teacher's unless ``teacher_inputs`` is given.
        vector: ``v``: dict ``{student param name: Tensor}`` or list aligned with the
            student's trainable parameters.  A dict gives a dict keyed by the teacher's
            trainable parameter names, a list a list aligned with them.
        loss: a KD kind (``"kl"``, ``"reverse_kl"``, ``"softmax_mse"``, ``"logit_mse"``:
            ``fastmeta.losses.kd_loss`` with that kind), ``fastmeta.losses.kd_loss``
            itself, or any callable ``loss(student_logits, teacher_logits, **loss_kwargs)
            -> scalar``.
        loss_kwargs: keyword arguments of the loss (KD: ``temperature``, ``reduction``,
            ``mask``, ``scale_by_temperature_squared``).
        method: ``"exact"`` (default: student JVP + closed-form logit cotangent + one
            teacher backward), ``"forward_over_reverse"`` (``torch.func`` jvp over grad of
            the whole loss), ``"finite_diff"`` (student perturbed in place by ``±εv``,
            ``ε = r/‖v‖``; one teacher backward) or ``"autograd"`` (double backward,
            the reference).  See the module docstring for fused SDPA attention.
        student_jvp: ``"exact"`` only: ``"forward"`` (forward-mode AD under the math SDPA
            backend, exact) or ``"finite_diff"`` (central difference of the student's
            logits with in-place perturbation; any kernel; approximate).
        r, restore: as in :func:`hvp`, for ``method="finite_diff"``.

    Returns:
        The teacher-parameter vector ``∇²_{θT θS} L · v`` (the teacher's meta-gradient
        of one SGD pilot step is ``−η`` times it, with ``L`` the KD part of the student
        loss; for another optimizer replace ``v`` by the direction ``−(∂θS'/∂g)ᵀ v/η`` of
        :mod:`fastmeta.engine.optimizer`, as :func:`fastmeta.engine.meta_gradient` does).
    """
    check_choice("method", method, MIXED_METHODS)
    check_choice("student_jvp", student_jvp, ("forward", "finite_diff"))
    check_choice("restore", restore, RESTORES)
    if not isinstance(teacher, torch.nn.Module) or not isinstance(student, torch.nn.Module):
        raise TypeError("teacher and student must be nn.Modules")
    logit_loss = _resolve_loss(loss, loss_kwargs, method)
    teacher_params = trainable_parameters(teacher)
    if not teacher_params:
        raise ValueError("teacher has no trainable parameters (all requires_grad=False)")
    student_params = trainable_parameters(student)
    if not student_params:
        raise ValueError("student has no trainable parameters (all requires_grad=False)")
    s_names, vectors, as_dict = _resolve_vector(vector, student_params, "the student")
    split_s = as_split_inputs(inputs)
    split_t = split_s if teacher_inputs is None else as_split_inputs(teacher_inputs)
    result = mixed_hvp_unchecked(teacher, student, split_t, split_s, dict(zip(s_names, vectors)), logit_loss,
                                 method=method, student_jvp=student_jvp, r=r, restore=restore)
    return result if as_dict else list(result.values())


def mixed_hvp_unchecked(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    split_t,
    split_s,
    vector: Dict[str, torch.Tensor],
    loss: LogitLoss,
    *,
    method: str = "exact",
    student_jvp: str = "forward",
    r: float = 1e-2,
    restore: str = "fast",
) -> Dict[str, torch.Tensor]:
    """:func:`mixed_hvp` on checked arguments (fastmeta's own callers, e.g. LGTM's official teacher update).

    ``split_t``/``split_s``: :class:`~fastmeta.batching.SplitBatch` inputs; ``vector``: a dict
    over trainable student parameters, finite, in their dtypes; ``loss``: a
    :class:`LogitLoss`.  Returns ``{teacher trainable parameter name: tensor}``.
    """
    teacher_params = trainable_parameters(teacher)
    student_params = trainable_parameters(student)
    s_names = list(vector)
    vectors = [vector[n] for n in s_names]
    t_names = list(teacher_params)
    t_list = [teacher_params[n] for n in t_names]
    s_list = [student_params[n] for n in s_names]
    if method == "exact":
        result = _mixed_exact(teacher, student, split_t, split_s, s_names, vectors, t_list, loss, student_jvp)
    elif method == "finite_diff":
        result = _mixed_finite_diff(teacher, student, split_t, split_s, s_list, vectors, t_list, loss, r, restore)
    elif method == "forward_over_reverse":
        result = _mixed_forward_over_reverse(teacher, student, split_t, split_s, t_names, s_names, vectors, loss)
    else:
        result = _mixed_autograd(teacher, student, split_t, split_s, t_list, s_list, vectors, loss)
    return dict(zip(t_names, result))


def _teacher_backward(zt, t_list, c):
    grads = torch.autograd.grad(zt, t_list, grad_outputs=c.to(zt.dtype), allow_unused=True)
    return [g.detach() for g in _grads_or_zeros(grads, t_list)]


def _mixed_exact(teacher, student, split_t, split_s, s_names, vectors, t_list, loss, student_jvp):
    tangents = dict(zip(s_names, vectors))
    zs, u = jvp_logits(student, split_s, tangents, method=student_jvp)
    with torch.enable_grad():
        zt = functional_logits(teacher, None, split_t, name="teacher")
    c = loss.cotangent(zs, zt, u)
    return _teacher_backward(zt, t_list, c)


def _mixed_finite_diff(teacher, student, split_t, split_s, s_list, vectors, t_list, loss, r, restore):
    eps = _finite_diff_eps(vectors, r)
    if eps == 0.0:
        return [torch.zeros_like(p) for p in t_list]
    with torch.enable_grad():
        zt = functional_logits(teacher, None, split_t, name="teacher")
    rng = capture_rng_state(_model_device(student))
    with torch.no_grad():
        zs_plus, zs_minus = central_pair(
            s_list, vectors, eps, lambda: functional_logits(student, None, split_s, name="student"),
            rng_state=rng, restore=restore,
        )
    c_plus = loss.teacher_grad(zs_plus, zt)
    c_minus = loss.teacher_grad(zs_minus, zt)
    (c,) = ops.central_difference([c_plus], [c_minus], eps)
    return _teacher_backward(zt, t_list, c)


def _mixed_forward_over_reverse(teacher, student, split_t, split_s, t_names, s_names, vectors, loss):
    t_primals = tuple(p.detach() for p in (dict(teacher.named_parameters())[n] for n in t_names))
    own_s = dict(student.named_parameters())
    s_primals = tuple(own_s[n].detach() for n in s_names)

    def total_loss(t_flat, s_flat):
        zt = functional_logits(teacher, dict(zip(t_names, t_flat)), split_t, name="teacher")
        zs = functional_logits(student, dict(zip(s_names, s_flat)), split_s, name="student")
        return loss.scalar(zs, zt)

    def teacher_grad(s_flat):
        return torch.func.grad(total_loss, argnums=0)(t_primals, s_flat)

    with math_attention():
        _, out = torch.func.jvp(teacher_grad, (s_primals,), (tuple(vectors),))
    return [t.detach() for t in out]


def _mixed_autograd(teacher, student, split_t, split_s, t_list, s_list, vectors, loss):
    with torch.enable_grad(), math_attention():
        zt = functional_logits(teacher, None, split_t, name="teacher")
        zs = functional_logits(student, None, split_s, name="student")
        value = loss.scalar(zs, zt)
        g_s = torch.autograd.grad(value, s_list, create_graph=True, allow_unused=True)
        pairs = [(g, v) for g, v in zip(g_s, vectors) if g is not None and g.requires_grad]
        if not pairs:
            return [torch.zeros_like(p) for p in t_list]
        second = torch.autograd.grad([g for g, _ in pairs], t_list, grad_outputs=[v for _, v in pairs],
                                     allow_unused=True)
    return [s.detach() for s in _grads_or_zeros(second, t_list)]
