"""Functional student primitives: parameter dicts, math attention, RNG replay, and ``J_S v``.

The meta-gradient engine evaluates the student at parameters other than its own
(the pilot point ``θS'``) and differentiates its logits in a parameter direction
``v`` (``u = J_S v``, a Jacobian-vector product).  Everything here works through
:func:`torch.func.functional_call`: the module's own parameters, ``.grad``,
train/eval mode and buffers are never written (the in-place finite difference is
the one exception, and it restores the parameters; see :func:`jvp_logits`).

Conventions
-----------
* Parameters are dicts ``{name: Tensor}`` keyed as in ``module.named_parameters()``
  (tied weights appear once, as ``named_parameters`` lists them; :func:`functional_logits`
  gives every name of a tied tensor its replacement, :func:`with_ties`).  Parameters with ``requires_grad=False`` are *frozen*: they get no
  gradient, no pilot update and no tangent; the module's own value is used.
* Buffers are the module's own (``functional_call`` falls back to them); a
  forward in train mode may update running statistics (BatchNorm): the engine
  wraps its work in :func:`preserved_buffers` so that a meta-gradient leaves them
  as they were.

Randomness (dropout)
--------------------
A JVP differentiates *one* function of the parameters; with dropout active the
forward it differentiates must use the same dropout masks as the forward whose
logits it pairs with.  :func:`capture_rng_state` records the generator state of
the CPU generator and of the model's accelerator before a forward;
:func:`replay_rng` sets that state again for the duration of a later forward and
then puts back the state it found, so the replayed forward draws the same masks
and the caller's random stream continues as if the replay had not happened.  Both
finite-difference forwards are replayed the same way.  In eval mode there is no
randomness and nothing to replay.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any, Iterator

import torch
import torch.autograd.forward_ad as fwAD

from ._walks import named_buffers, named_parameters, tied_names
from .batching import SplitBatch, extract_logits

__all__ = [
    "trainable_parameters",
    "parameter_dict",
    "math_attention",
    "RNGState",
    "capture_rng_state",
    "replay_rng",
    "preserved_buffers",
    "as_split_inputs",
    "functional_logits",
    "jvp_logits",
    "add_scaled_",
    "Perturbation",
    "central_pair",
    "transform_buffers",
    "default_fd_eps",
]


# --------------------------------------------------------------------------- parameters
def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """``{name: param}`` for every parameter with ``requires_grad=True`` (tied ones once)."""
    return {name: p for name, p in named_parameters(module) if p.requires_grad}


def parameter_dict(module: torch.nn.Module, *, include_frozen: bool = True) -> dict[str, torch.Tensor]:
    """``{name: param}`` of ``module.named_parameters()``; ``include_frozen=False`` drops requires_grad=False ones."""
    return {name: p for name, p in named_parameters(module) if include_frozen or p.requires_grad}


@contextlib.contextmanager
def preserved_buffers(*modules: torch.nn.Module) -> Iterator[list]:
    """Snapshot every floating/integer buffer (running stats, step counters) and restore it on exit.

    Yields the snapshot, ``[(buffer, its value on entry)]``.  Costs one copy of the
    buffers (small: BatchNorm statistics, position ids).
    """
    saved = []
    for module in modules:
        for _, buffer in named_buffers(module):
            saved.append((buffer, buffer.detach().clone()))
    try:
        yield saved
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                if buffer.data_ptr() != copy.data_ptr() and not torch.equal(buffer, copy):
                    buffer.copy_(copy)


# --------------------------------------------------------------------------- attention
def _sdpa_math_context():
    try:  # torch >= 2.3
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # pragma: no cover - older torch
        backend = getattr(torch.backends.cuda, "sdp_kernel", None)
        if backend is None:
            return contextlib.nullcontext()
        return backend(enable_flash=False, enable_math=True, enable_mem_efficient=False)


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Force PyTorch's math (composite) backend of ``scaled_dot_product_attention`` in this block.

    The fused SDPA kernels (flash, memory-efficient, cuDNN, and the CPU flash
    kernel) have no forward-mode AD formula and no double-backward formula; the
    math backend is built from differentiable primitives, so ``torch.func.jvp``
    and ``create_graph=True`` backward passes work through it.  Numerically it is
    the same attention (up to rounding).  Models that do not call SDPA (HF
    ``attn_implementation="eager"``) are unaffected.
    """
    with _sdpa_math_context():
        yield


# --------------------------------------------------------------------------- RNG
class RNGState:
    """Generator states of the CPU and (when the model lives there) the accelerator."""

    def __init__(self, device: torch.device | None):
        self.device = device
        self.cpu = torch.random.get_rng_state()
        self.cuda = None
        if device is not None and device.type == "cuda":
            self.cuda = torch.cuda.get_rng_state(device)

    def restore(self) -> None:
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def capture_rng_state(device: torch.device | str | None = None) -> RNGState:
    """Record the random generators a forward on ``device`` draws from (call it right before that forward)."""
    return RNGState(torch.device(device) if device is not None else None)


@contextlib.contextmanager
def replay_rng(state: RNGState | None) -> Iterator[None]:
    """Run the block with the generators set to ``state``; afterwards put back the state found on entry.

    ``state=None`` does nothing (no replay).
    """
    if state is None:
        yield
        return
    current = RNGState(state.device)
    state.restore()
    try:
        yield
    finally:
        current.restore()


# --------------------------------------------------------------------------- calls
def as_split_inputs(inputs: Any) -> SplitBatch:
    """Model inputs as a :class:`SplitBatch` (labels unused): a SplitBatch, a Mapping of kwargs,
    a tuple/list of positional arguments, or a single Tensor."""
    if isinstance(inputs, SplitBatch):
        return inputs
    dummy = torch.zeros(1, dtype=torch.long)
    if isinstance(inputs, Mapping):
        return SplitBatch((), dict(inputs), dummy)
    if isinstance(inputs, (tuple, list)):
        return SplitBatch(tuple(inputs), {}, dummy)
    return SplitBatch((inputs,), {}, dummy)


def functional_logits(
    model: torch.nn.Module, params: Mapping[str, torch.Tensor] | None, inputs: Any, *, name: str = "student"
) -> torch.Tensor:
    """Logits of ``model`` with its parameters replaced by ``params`` (others: the module's own).

    ``params=None`` calls the module directly.
    """
    split = as_split_inputs(inputs)
    if params is None:
        output = model(*split.args, **split.kwargs)
    else:
        output = torch.func.functional_call(model, with_ties(model, params), split.args, split.kwargs,
                                            tie_weights=False)
    return extract_logits(output, name=name)


def with_ties(model: torch.nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``params`` with every name of a tied tensor given the replacement of whichever of its names
    ``params`` has: ``functional_call``'s re-tying, from the model's tied names walked once per public call
    (``tie_weights=True`` walks the whole model again at every call: ~0.4 ms per call at a BERT-base-shaped
    student, several calls per step).  Two names of one tensor given different tensors: ``ValueError``."""
    params = dict(params)
    for group in tied_names(model):
        given = [name for name in group if name in params]
        if not given:
            continue
        value = params[given[0]]
        for name in given[1:]:
            if params[name] is not value:
                raise ValueError(f"{given[0]!r} and {name!r} name one tied tensor of the model but were given "
                                 "different tensors")
        for name in group:
            params[name] = value
    return params


def transform_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fresh copies of the module's buffers, for a ``functional_call`` inside a ``torch.func`` transform."""
    return {name: buffer.detach().clone() for name, buffer in named_buffers(model)}


def add_scaled_(tensors: list[torch.Tensor], vectors: list[torch.Tensor], alpha: float) -> None:
    """In place ``tensors[i] += alpha * vectors[i]`` (``fastmeta.ops.add_scaled_`` when available)."""
    try:
        from fastmeta.ops import add_scaled_ as ops_add_scaled_
    except ImportError:
        ops_add_scaled_ = None
    with torch.no_grad():
        if ops_add_scaled_ is not None:
            ops_add_scaled_(tensors, vectors, float(alpha))
        else:
            torch._foreach_add_(tensors, vectors, alpha=float(alpha))


RESTORES = ("fast", "exact")


def drop_autocast_casts() -> None:
    """Forget the caller's autocast casts of parameters: call after changing parameters in place.

    ``torch.autocast`` caches the low-precision copy it makes of each leaf tensor that requires
    grad (a weight) for the rest of the autocast region, keyed by the tensor and blind to
    in-place changes.  A parameter changed in place inside the region (an optimizer step, a
    finite-difference perturbation, a rollback) is otherwise still seen at its OLD value by
    every later forward in that region.  Dropping the cache makes the next forward cast
    again; outside autocast it is a no-op.
    """
    torch.clear_autocast_cache()


class Perturbation:
    """``θ ← θ + offset·v`` IN PLACE on a list of tensors, and its undo (the one perturb/restore helper).

    ``restore="fast"`` undoes by adding the perturbation back (``θ + εv − 2εv + εv``:
    within a couple of ulp of ``max(|θ|, |εv|)`` per element, no copy); ``"exact"``
    keeps a copy of the tensors and copies it back (bitwise, one copy).  Arguments are
    trusted (``restore`` in :data:`RESTORES`, tensors and vectors aligned).
    """

    def __init__(self, tensors: list[torch.Tensor], vectors: list[torch.Tensor], restore: str = "fast"):
        self.tensors, self.vectors = tensors, vectors
        self.offset = 0.0
        self.saved = [t.detach().clone() for t in tensors] if restore == "exact" else None

    def move_to(self, offset: float) -> None:
        """Put the tensors at ``θ + offset·v``."""
        add_scaled_(self.tensors, self.vectors, offset - self.offset)
        self.offset = offset
        drop_autocast_casts()

    def undo(self) -> None:
        if self.offset == 0.0:
            return
        if self.saved is not None:
            with torch.no_grad():
                for t, s in zip(self.tensors, self.saved):
                    t.copy_(s)
        else:
            add_scaled_(self.tensors, self.vectors, -self.offset)
        self.offset = 0.0
        drop_autocast_casts()


def central_pair(
    tensors: list[torch.Tensor],
    vectors: list[torch.Tensor],
    eps: float,
    evaluate,
    *,
    rng_state: RNGState | None = None,
    restore: str = "fast",
):
    """``(evaluate() at θ + εv, evaluate() at θ − εv)``: perturb in place, replay the RNG, restore.

    The one home of the central-difference pattern (``jvp_logits(method="finite_diff")``,
    :func:`fastmeta.hvp` / :func:`fastmeta.mixed_hvp` with ``method="finite_diff"``, the
    engine's LGTM differences): ``tensors`` are moved to ``θ ± εv`` with a
    :class:`Perturbation`, each ``evaluate()`` runs under :func:`replay_rng` of
    ``rng_state`` (both draw the dropout masks of the forward they pair with), and the
    tensors are restored (``restore``) whatever happens, an exception included.
    """
    perturbation = Perturbation(tensors, vectors, restore)
    try:
        perturbation.move_to(eps)
        with replay_rng(rng_state):
            plus = evaluate()
        perturbation.move_to(-eps)
        with replay_rng(rng_state):
            minus = evaluate()
    finally:
        perturbation.undo()
    return plus, minus


def default_fd_eps(params: list[torch.Tensor], direction: list[torch.Tensor]) -> float:
    """Central-difference step ``ε = sqrt(macheps) · max(1, ‖θ‖) / ‖v‖`` (norms over the perturbed tensors).

    The perturbation ``ε·v`` is a fixed *relative* change ``sqrt(macheps)`` of θ (the
    usual choice for finite-difference Jacobian-vector products, e.g. Knoll & Keyes
    2004).  Measured on small BERTs in float32 it gives ~1e-5 relative error on the
    meta-gradient, where the cube-root rule (optimal for smooth scalar functions)
    gave ~3e-3: the truncation error of a deep network's logits dominates.
    """
    dtype = direction[0].dtype if direction else torch.float32
    machine_eps = torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps
    with torch.no_grad():
        theta_norm = math.sqrt(sum(float(p.detach().double().square().sum()) for p in params))
        v_norm = math.sqrt(sum(float(v.detach().double().square().sum()) for v in direction))
    if v_norm == 0.0:
        return 1.0
    return math.sqrt(machine_eps) * max(1.0, theta_norm) / v_norm


def _dual_tensors_safe() -> bool:
    """Whether a fresh forward-mode level on dual tensors computes what ``torch.func.jvp`` would: not
    inside another forward-mode level (``fwAD.dual_level`` or ``torch.func.jvp``: a second one cannot
    open), nor inside other ``torch.func`` transforms (``vmap`` has no batching rule for dual tensors),
    nor where forward gradients are off (``torch.inference_mode``: the tangent would come back None)."""
    if getattr(fwAD, "_current_level", -1) >= 0 or torch.is_inference_mode_enabled():
        return False
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if active is not None and active():
        return False
    enabled = getattr(torch._C, "_is_fwd_grad_enabled", None)
    return enabled is None or bool(enabled())


def student_jvp(model: torch.nn.Module, split: SplitBatch, directions: Mapping[str, torch.Tensor], *,
                params: Mapping[str, torch.Tensor] | None = None, rng_state: RNGState | None = None,
                dual: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, J_S(θ)·a)`` for trusted arguments (the engine's; :func:`jvp_logits` checks and calls this).

    ``directions``: ``{name: a}`` for trainable parameters of ``model`` (their dtype and shape);
    ``params``: the point θ (default: the module's own parameters).  ``dual=True`` (the engine)
    runs dual tensors straight through forward-mode AD (``torch.autograd.forward_ad``: the formulas
    ``torch.func.jvp`` uses, without its transform layer around every op: 5.4 ms against 6.5 ms
    on the tiny benchmark model, where per-op overhead dominates,
    ``bench/results/profile_step_tiny_bs4_jvp_cpu.json``) when :func:`_dual_tensors_safe`, else ``torch.func.jvp``.
    Dual tensors see no parameter that an ``autograd.Function`` reads from its closure rather than
    from its inputs (forward AD is off inside such a forward): the engine's directions are zero on
    those (reverse mode gives them no gradient either), an arbitrary tangent need not be, so the
    public :func:`jvp_logits` keeps ``torch.func.jvp``, which raises there.
    """
    own = dict(named_parameters(model)) if params is None else params
    names = list(directions)
    primals = {name: own[name].detach() for name in names}
    constants = {name: t.detach() for name, t in (params or {}).items() if name not in directions}
    directions = {name: directions[name].detach() for name in names}

    def logits_of(primal_params):
        # buffers cloned inside the transform: a train-mode BatchNorm updates its running
        # statistics in place, which torch.func forbids on captured tensors (and which the
        # caller's buffers must not see twice)
        return functional_logits(model, {**transform_buffers(model), **constants, **primal_params}, split)

    with torch.no_grad(), math_attention(), replay_rng(rng_state):
        if not (dual and _dual_tensors_safe()):
            return torch.func.jvp(logits_of, (primals,), (directions,))
        with fwAD.dual_level():
            out = logits_of({name: fwAD.make_dual(primals[name], directions[name]) for name in names})
            logits, tangent_out = fwAD.unpack_dual(out)
    if tangent_out is None:  # the logits do not depend on the named parameters
        tangent_out = torch.zeros_like(logits)
    return logits, tangent_out


def jvp_logits(
    model: torch.nn.Module,
    inputs: Any,
    tangents: Mapping[str, torch.Tensor],
    *,
    method: str = "forward",
    eps: float | None = None,
    params: Mapping[str, torch.Tensor] | None = None,
    rng_state: RNGState | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student logits ``z = S(x; θ)`` and their tangent ``u = J_S(θ) v = d/dt S(x; θ + t·v)|_{t=0}``.

    ``tangents`` maps parameter names (as in ``model.named_parameters()``) to ``v``;
    parameters not named get no tangent (they are constants: frozen parameters,
    buffers).  Every name must be a parameter with ``requires_grad=True``.
    ``inputs`` are the model's inputs (a Mapping of keyword arguments, a tuple of
    positional ones, a Tensor, or a :class:`~fastmeta.batching.SplitBatch`).

    ``method="forward"`` (exact): ``torch.func.jvp`` over ``functional_call`` at
    ``params`` (default: the module's own parameters), run under
    :func:`math_attention` (the fused SDPA kernels have no forward-AD formula) and
    ``torch.no_grad`` (no backward graph is built; forward AD is unaffected).

    ``method="finite_diff"`` (approximate, works with every kernel):
    ``u ≈ (S(x; θ + ε v) − S(x; θ − ε v)) / 2ε`` under ``no_grad`` with the
    module's own parameters perturbed IN PLACE (no copy) and restored (``θ + εv −
    2εv + εv``: within a couple of ulp of the original, not bitwise); ``params``
    must be None.  ``eps`` defaults to :func:`default_fd_eps`.  The returned
    logits are ``(z₊ + z₋)/2`` (``S(x; θ)`` up to O(ε²)).

    ``rng_state`` (from :func:`capture_rng_state` before the forward whose logits
    this JVP pairs with): every forward here is run under :func:`replay_rng` so that
    dropout draws the same masks.  Train/eval mode is left as the caller set it.
    """
    if method not in ("forward", "finite_diff"):
        raise ValueError(f"method must be 'forward' or 'finite_diff', got {method!r}")
    split = as_split_inputs(inputs)
    own = dict(named_parameters(model))
    for name, tangent in tangents.items():
        if name not in own:
            raise KeyError(f"tangents has {name!r}, which is not a parameter of the model")
        if not own[name].requires_grad:
            raise ValueError(f"tangents has {name!r}, a frozen parameter (requires_grad=False): it gets no tangent")
        if tuple(tangent.shape) != tuple(own[name].shape):
            raise ValueError(
                f"tangent {name!r} has shape {tuple(tangent.shape)}, the parameter {tuple(own[name].shape)}"
            )
    names = list(tangents)

    if method == "forward":
        return student_jvp(model, split, tangents, params=params, rng_state=rng_state, dual=False)

    if params is not None:
        raise ValueError("method='finite_diff' perturbs the module's own parameters in place: params must be None")
    tensors = [own[name] for name in names]
    vectors = [tangents[name].detach() for name in names]
    if eps is None:
        eps = default_fd_eps(tensors, vectors)
    eps = float(eps)
    if not (eps > 0.0) or not math.isfinite(eps):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    with torch.no_grad():
        plus, minus = central_pair(
            tensors, vectors, eps, lambda: functional_logits(model, None, split), rng_state=rng_state
        )
    compute = torch.promote_types(plus.dtype, torch.float32)
    tangent_out = ((plus.to(compute) - minus.to(compute)) / (2.0 * eps)).to(plus.dtype)
    logits = ((plus.to(compute) + minus.to(compute)) * 0.5).to(plus.dtype)
    return logits, tangent_out
