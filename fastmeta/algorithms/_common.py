"""Machinery shared by the algorithms of :func:`fastmeta.meta_step`.

* :class:`StepContext` -- the arguments of one ``meta_step`` call, validated, plus
  the phase timer and the :class:`Transaction` that commits the updates.
* :class:`Transaction` -- "compute everything, validate, then commit": gradients are
  computed with ``torch.autograd.grad`` (no ``.grad`` is written while computing);
  a model is changed only through :meth:`Transaction.apply`, which first saves what
  the step will overwrite (the stepped parameters, their ``.grad`` and the
  optimizer's ``state_dict``) so that a failure later in the same ``meta_step``
  (e.g. a non-finite student loss computed with the freshly updated teacher) puts
  BOTH models and BOTH optimizers back exactly as they were (bitwise).
* the student's real training step and the loss helpers every algorithm uses.
"""
from __future__ import annotations

import contextlib
import copy
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from fastmeta import batching
from fastmeta._walks import submodules
from fastmeta._validation import check_flag, check_number  # noqa: F401  (re-exported for the algorithms)
from fastmeta.engine import api, scaled_grad
from fastmeta.engine.optimizer import resolve_lrs
from fastmeta.functional import drop_autocast_casts, trainable_parameters


def trainable(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` for every parameter of ``model`` that requires grad (``named_parameters`` order)."""
    return list(trainable_parameters(model).items())


def all_finite(tensors) -> bool:
    """True when every tensor (None entries skipped) holds only finite values (one read, one host sync:
    :func:`fastmeta.ops.all_finite`)."""
    from fastmeta.ops import all_finite as ops_all_finite

    return ops_all_finite(tensors)


def check_finite_grads(grads: Dict[str, Optional[torch.Tensor]], what: str) -> None:
    """``FloatingPointError`` naming the first parameter whose gradient has a NaN/inf."""
    if all_finite(grads.values()):
        return
    for name, g in grads.items():
        if g is not None and not bool(torch.isfinite(g).all()):
            raise FloatingPointError(f"{what} for parameter {name!r} is not finite")
    raise FloatingPointError(f"{what} is not finite")


def check_max_grad_norm(name: str, value: Any) -> Optional[float]:
    """None (no clipping) or a finite number > 0."""
    return None if value is None else check_number(name, value, low=0.0, low_open=True)


def clipped(grads: Dict[str, Optional[torch.Tensor]], max_norm: float) -> Dict[str, Optional[torch.Tensor]]:
    """``grads`` scaled to global L2 norm ``max_norm`` at most (new tensors; None entries kept).

    The rule of ``torch.nn.utils.clip_grad_norm_`` (what the official codes call before
    each optimizer step): ``g ← g·min(1, max_norm/(‖g‖ + 1e-6))`` with ``‖g‖`` over all
    the gradients together.
    """
    present = [g for g in grads.values() if g is not None]
    if not present:
        return dict(grads)
    norms = [torch.linalg.vector_norm(g.detach(), 2, dtype=torch.float64) for g in present]
    total = torch.linalg.vector_norm(torch.stack(norms), 2)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return {name: None if g is None else g.detach() * coef.to(g.dtype) for name, g in grads.items()}


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module):
    """Put ``modules`` in eval mode for the block; afterwards every submodule's own flag is put back."""
    saved = [(m, m.training) for module in modules for m in submodules(module)]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training


@contextlib.contextmanager
def _restored(saved):
    """On exit, copy the saved values back into their parameters (None: nothing to do)."""
    try:
        yield
    finally:
        if saved:
            with torch.no_grad():
                for p, value in saved:
                    p.copy_(value)
            drop_autocast_casts()


# Snapshot buffers kept across steps, per optimizer, on the CPU only: {"params" | "state": [signature,
# copies, in_use]}.  Copying into kept buffers instead of fresh ones saves the page faults of fresh
# memory on the CPU (the snapshot alone: 53 ms instead of ~81 ms for a MiniLM teacher's 22.7M
# parameters + AdamW state, 2026-11-27), at the price of the copies staying allocated between steps.
# On CUDA the caching allocator hands a freed block back at no cost, so keeping only raises the peak:
# by the snapshot's size wherever the step peaks outside the snapshot's life (H200, BERT-base teacher,
# bs32 fp32: 8.15 GiB instead of 6.92 GiB, in the quiz's forward/backward), and CUDA snapshots are
# fresh copies, freed at the end of the step.  On the CPU the trade was measured in one step
# (bench.profile_step, MiniLM teacher, bs 4, 2 threads, 2026-11-28): fresh copies there took the
# teacher_update phase from 0.203 s to 0.286 s and did not lower the peak RSS (that step peaks while
# the snapshot is alive anyway).  A buffer is used by one live snapshot at a time (another snapshot of
# the same optimizer meanwhile gets fresh copies), and the state's is given up after a rollback: the
# optimizer then holds those very tensors.
_KEPT: "weakref.WeakKeyDictionary[torch.optim.Optimizer, dict]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def _kept_copies(optimizer: torch.optim.Optimizer, kind: str, tensors: List[torch.Tensor]):
    """``(copies of tensors, token)``: in the kept buffers of ``(optimizer, kind)`` when free and of the
    same layout, else fresh (:func:`fastmeta.ops.clone_all`), which become the kept ones when none is
    in use.  Only CPU tensors are kept (see ``_KEPT``).  ``token`` (None for copies not kept) is handed
    to :func:`_release`.  ``tensors`` may require grad: the copies are taken without autograd (no
    ``.detach()`` per tensor, a host cost paid hundreds of times per step)."""
    from fastmeta.ops import clone_all

    if not tensors or any(t.device.type != "cpu" for t in tensors):  # stops at the first CUDA tensor
        return clone_all(tensors), None  # nothing to keep, or not on the CPU
    signature = [(t.shape, t.dtype, t.device) for t in tensors]
    kept = _KEPT.setdefault(optimizer, {})
    entry = kept.get(kind)
    if entry is not None and entry[2]:
        return clone_all(tensors), None  # in use by another live snapshot
    if entry is None or entry[0] != signature:
        entry = [signature, clone_all(tensors), True]
        kept[kind] = entry
        return entry[1], entry
    entry[2] = True
    torch._foreach_copy_(entry[1], tensors)
    return entry[1], entry


def _release(optimizer: torch.optim.Optimizer, kind: str, token, *, give_up: bool = False) -> None:
    if token is None:
        return
    token[2] = False
    if give_up and _KEPT.get(optimizer, {}).get(kind) is token:
        del _KEPT[optimizer][kind]


class _Snapshot:
    """What one optimizer step may overwrite: stepped params, their ``.grad``, the optimizer state.

    The parameters and the state's tensors are copied into buffers kept per optimizer across steps
    on the CPU, fresh ones on CUDA (:func:`_kept_copies`; :func:`fastmeta.ops.clone_all`'s layout: one
    buffer per device and dtype, huge pages on Linux); the rest of ``state_dict()`` (step counts that
    are not tensors, param groups) is deep-copied.  Parameters and state get separate buffers: after a
    rollback the optimizer keeps the state copies (their buffer is then no longer kept).
    :meth:`release` (or :meth:`restore`) ends the snapshot.
    """

    def __init__(self, params: List[torch.nn.Parameter], optimizer: torch.optim.Optimizer):
        self.params = params
        self.optimizer = optimizer
        self.data, self._param_token = _kept_copies(optimizer, "params", params)
        self.grads = [p.grad for p in params]  # references: apply() replaces .grad, never writes into it
        state = optimizer.state_dict()  # references the live state tensors: copied right here, before the step
        live = [v for st in state["state"].values() for v in st.values() if isinstance(v, torch.Tensor)]
        copied, self._state_token = _kept_copies(optimizer, "state", live)
        copies = iter(copied)
        self.optimizer_state = {
            "state": {key: {name: next(copies) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                            for name, v in st.items()} for key, st in state["state"].items()},
            "param_groups": copy.deepcopy(state["param_groups"]),
        }

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved, grad in zip(self.params, self.data, self.grads):
                p.copy_(saved)
                p.grad = grad
        drop_autocast_casts()
        self.optimizer.load_state_dict(self.optimizer_state)
        self.release(restored=True)

    def release(self, restored: bool = False) -> None:
        """End the snapshot: its kept buffers are free for the next one (the state's given up if restored)."""
        _release(self.optimizer, "params", self._param_token)
        _release(self.optimizer, "state", self._state_token, give_up=restored)
        self._param_token = self._state_token = None


class Transaction:
    """Applies parameter updates through the models' optimizers, undoable until :meth:`finish`.

    ``apply(model_name, optimizer, named_grads)`` sets ``p.grad = g`` for every
    ``(name, p)`` with a gradient (``p.grad = None`` for the parameters of the
    optimizer that get none, so the optimizer skips them) and calls
    ``optimizer.step()``.  With ``atomic=True`` (default) it first snapshots the
    stepped parameters, their previous ``.grad`` and ``optimizer.state_dict()``;
    :meth:`rollback` restores every snapshot in reverse order.  :meth:`finish`
    steps the schedulers (after every check passed) and drops the snapshots.
    The LAST update of a step (``final=True``) needs no snapshot: nothing is
    checked after it.  So a ``meta_step`` snapshots at most one model: memory cost
    of ``atomic``, one copy of that model's stepped parameters plus its optimizer
    state, alive from its update to the end of ``meta_step``.
    """

    def __init__(self, atomic: bool = True):
        self.atomic = atomic
        self._snapshots: List[_Snapshot] = []
        self._schedulers: List[Any] = []

    def apply(
        self,
        optimizer: torch.optim.Optimizer,
        params: List[Tuple[str, torch.nn.Parameter]],
        grads: Dict[str, Optional[torch.Tensor]],
        scheduler: Any = None,
        final: bool = False,
        max_grad_norm: Optional[float] = None,
    ) -> None:
        """Step ``optimizer`` with ``grads``; ``final=True``: nothing can fail after this update, no snapshot.

        Parameters that are not in any param group of ``optimizer`` are left alone (the
        caller chose not to train them with it).  ``max_grad_norm``: the stepped
        gradients are first clipped to this global L2 norm (:func:`clipped`, the rule of
        ``torch.nn.utils.clip_grad_norm_`` that the official MetaDistil/ReptileDistil code
        calls before each optimizer step); ``.grad`` then holds the clipped gradient.
        """
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        stepped = [(name, p) for name, p in params if grads.get(name) is not None and id(p) in in_optimizer]
        stepped_ids = {id(p) for _, p in stepped}
        # parameters of the optimizer that receive no gradient this step get .grad = None
        # (they must not be stepped with a stale .grad); they are snapshotted too
        touched = [p for _, p in stepped] + [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None and id(p) not in stepped_ids
        ]
        if self.atomic and not final:
            self._snapshots.append(_Snapshot(touched, optimizer))
        for p in touched:
            p.grad = None
        if max_grad_norm is not None:
            grads = clipped({name: grads[name] for name, _ in stepped}, max_grad_norm)
        for name, p in stepped:
            p.grad = grads[name].detach().to(p.dtype)
        optimizer.step()
        drop_autocast_casts()  # the rest of the caller's autocast region sees the updated parameters
        if scheduler is not None:
            self._schedulers.append(scheduler)

    def rollback(self) -> None:
        for snapshot in reversed(self._snapshots):
            snapshot.restore()
        self._snapshots.clear()
        self._schedulers.clear()

    def finish(self) -> None:
        for scheduler in self._schedulers:
            scheduler.step()
        for snapshot in self._snapshots:
            snapshot.release()
        self._snapshots.clear()
        self._schedulers.clear()


@dataclass
class StepContext:
    """Everything one ``meta_step`` call needs, already validated by :func:`fastmeta.meta_step`."""

    algorithm: str
    teacher: torch.nn.Module
    student: torch.nn.Module
    batch: batching.SplitBatch
    quiz: Optional[batching.SplitBatch]
    raw_batch: Any
    raw_quiz: Any
    teacher_optimizer: Optional[torch.optim.Optimizer]
    student_optimizer: torch.optim.Optimizer
    hypergrad: str
    temperature: float
    kd_weight: float
    kd_loss: str
    inner_lr: Optional[float]  # None: each parameter's student param-group lr
    shift_labels: bool
    inner_steps: int
    teacher_scheduler: Any
    student_scheduler: Any
    options: Dict[str, Any]
    device: torch.device
    transaction: Transaction
    timings: Dict[str, float] = field(default_factory=dict)
    settings: Dict[str, Any] = field(default_factory=dict)  # the algorithm's validated options
    grad_sync: Any = None  # data parallelism: see fastmeta.engine.meta_gradient(grad_sync=)
    loss_scale: float = 1.0  # float16 loss scaling: see fastmeta.engine.scaled_grad
    jvp_precision: str = "fp32"  # see fastmeta.engine.meta_gradient(jvp_precision=)
    student_tangent: str = "jvp"  # see fastmeta.engine.meta_gradient(student_tangent=)
    teacher_graph: str = "keep"  # see fastmeta.engine.meta_gradient(teacher_graph=)
    tangent_precision: Optional[str] = None  # set by engine_meta_gradient
    pilot: str = "optimizer"  # see fastmeta.engine.meta_gradient(pilot=)
    adam_jacobian: str = "exact"  # see fastmeta.engine.meta_gradient(adam_jacobian=)
    max_grad_norm: Optional[float] = None  # clip both models' committed gradients (meta_step option)

    # ------------------------------------------------------------------ gradients
    def grad(self, loss: torch.Tensor, tensors: List[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
        """``∇ loss`` w.r.t. ``tensors`` (None where unused), through ``S·loss`` with ``S = loss_scale``."""
        return scaled_grad(loss, tensors, self.loss_scale, allow_unused=True)

    # ------------------------------------------------------------------ options
    def option(self, name: str, default: Any) -> Any:
        """Consume algorithm option ``name`` (unknown leftovers are an error in ``meta_step``)."""
        return self.options.pop(name, default)

    # ------------------------------------------------------------------ timing
    @contextlib.contextmanager
    def phase(self, name: str):
        """Add the wall time of the block to ``timings[name]`` (CUDA synchronised on both ends)."""
        sync = self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize(self.device)
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------------ models
    def teacher_logits(self, split: Optional[batching.SplitBatch] = None, *, grad: bool = False) -> torch.Tensor:
        """Aligned teacher logits on ``split`` (default: the training batch); no graph unless ``grad``."""
        split = self.batch if split is None else split
        with torch.set_grad_enabled(grad):
            logits = batching.model_logits(self.teacher, split, name="teacher")
        logits, _ = batching.align_logits_labels(logits, split.labels, shift_labels=self.shift_labels, name="teacher")
        return logits

    def student_logits(self, split: Optional[batching.SplitBatch] = None, *, grad: bool = True) -> torch.Tensor:
        split = self.batch if split is None else split
        with torch.set_grad_enabled(grad):
            logits = batching.model_logits(self.student, split, name="student")
        logits, _ = batching.align_logits_labels(logits, split.labels, shift_labels=self.shift_labels, name="student")
        return logits

    def labels(self, split: Optional[batching.SplitBatch] = None) -> torch.Tensor:
        split = self.batch if split is None else split
        if self.shift_labels:
            return split.labels[:, 1:]
        return split.labels

    def student_objective(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``LS = (1 − w)·CE(y, zs) + w·KD(zs, zt)`` on the training batch (teacher logits detached).

        ``FloatingPointError`` when either model's logits are not finite.
        """
        batching.check_logits_pair(student_logits, teacher_logits)
        batching.check_all_finite(("teacher logits on batch", teacher_logits.detach()),
                                  ("student logits on batch", student_logits.detach()))
        return batching.student_loss(
            student_logits,
            teacher_logits.detach(),
            self.labels(),
            temperature=self.temperature,
            kd_weight=self.kd_weight,
            kind=self.kd_loss,
        )

    def student_lrs(self) -> Dict[str, float]:
        """``{student parameter name: η}``: ``inner_lr``, or (None) the parameter's param-group lr
        (nan for a parameter in no group); ``fastmeta.engine.optimizer.resolve_lrs``."""
        return resolve_lrs(dict(trainable(self.student)), self.student_optimizer, self.inner_lr, missing=float("nan"))

    def require_teacher_optimizer(self) -> torch.optim.Optimizer:
        if self.teacher_optimizer is None:
            raise ValueError(f"algorithm={self.algorithm!r} updates the teacher: teacher_optimizer must not be None")
        return self.teacher_optimizer

    # ------------------------------------------------------------------ the real student step
    def student_step_gradients(
        self, teacher_logits: Optional[torch.Tensor] = None, *, phase: str = "student_step"
    ) -> Tuple[torch.Tensor, Dict[str, Optional[torch.Tensor]]]:
        """``(LS, ∇θS LS)`` at the current student, with ``teacher_logits`` (default: a fresh teacher forward).

        One teacher forward (no graph) if ``teacher_logits`` is None, one student
        forward and one backward (``torch.autograd.grad``: no ``.grad`` is written).
        Raises ``FloatingPointError`` when the loss or a gradient is not finite.
        """
        if teacher_logits is None:
            with self.phase(f"{phase}.teacher_forward"):
                teacher_logits = self.teacher_logits()
        with self.phase(f"{phase}.forward_backward"):
            params = trainable(self.student)
            if not params:
                raise ValueError("student has no parameter that requires grad")
            logits = self.student_logits()
            loss = self.student_objective(logits, teacher_logits)
            batching.check_finite(loss.detach(), "student loss")
            grads = self.grad(loss, [p for _, p in params])
            named = {name: g for (name, _), g in zip(params, grads)}
        check_finite_grads(named, "student gradient")
        return loss.detach(), named

    def apply_student(self, grads: Dict[str, Optional[torch.Tensor]], *, final: bool) -> None:
        """Student optimizer step; ``final``: the last update of the step (no snapshot needed)."""
        with self.phase("student_update"):
            self.transaction.apply(
                self.student_optimizer, trainable(self.student), grads, self.student_scheduler, final=final,
                max_grad_norm=self.max_grad_norm,
            )

    def apply_teacher(self, grads: Dict[str, Optional[torch.Tensor]], *, final: bool) -> None:
        """Teacher optimizer step; ``final``: the last update of the step (no snapshot needed)."""
        optimizer = self.require_teacher_optimizer()
        with self.phase("teacher_update"):
            self.transaction.apply(
                optimizer, trainable(self.teacher), grads, self.teacher_scheduler, final=final,
                max_grad_norm=self.max_grad_norm,
            )

    # ------------------------------------------------------------------ the engine
    def engine_meta_gradient(
        self, *, compute_influence: bool = False, hypergrad: Optional[str] = None, quiz_point: str = "pilot",
        keep_pilot: bool = False, compute_teacher_grads: bool = True, keep_student_grads: bool = False,
        keep_quiz_grads: bool = False, teacher_loss=None, meta_weight: float = 1.0,
    ):
        """``fastmeta.engine`` on this step's models, batches and (already validated) hyper-parameters.

        ``quiz_point="current"``: the quiz gradient at the current student (IKD's exam);
        ``keep_pilot``, ``compute_teacher_grads``: as in ``fastmeta.engine.meta_gradient``;
        ``keep_student_grads``: return the pilot gradient (``result.student_grads``; else it is
        freed inside the engine once used, and None); ``keep_quiz_grads``: return ``v`` alone
        (``result.quiz_grads``, without the pilot point); ``teacher_loss``, ``meta_weight``: the
        algorithm's own loss ``teacher_loss(zt, zs, influences)`` on the teacher's logits, whose gradient the
        engine's one teacher backward adds to ``meta_weight`` times the meta-gradient
        (``Options.teacher_loss``).  Only what ``meta_step`` could not check alone (the combination
        of options, the student optimizer) is checked here, once, before the engine runs
        (``fastmeta.engine.api.check_plan``).
        """
        method = self.hypergrad if hypergrad is None else hypergrad
        options = api.Options(
            inner_lr=self.inner_lr, temperature=self.temperature, kd_weight=self.kd_weight, kd_loss=self.kd_loss,
            hypergrad=method, inner_steps=self.inner_steps, pilot=self.pilot, adam_jacobian=self.adam_jacobian,
            quiz_point=quiz_point, compute_influence=compute_influence, shift_labels=self.shift_labels,
            keep_pilot=keep_pilot, compute_teacher_grads=compute_teacher_grads,
            keep_student_grads=keep_student_grads, keep_quiz_grads=keep_quiz_grads, teacher_loss=teacher_loss,
            meta_weight=meta_weight, grad_sync=self.grad_sync,
            jvp_precision=self.jvp_precision, loss_scale=self.loss_scale,
            student_tangent=self.student_tangent if method == "exact" else "jvp",
            teacher_graph=self.teacher_graph if method in ("exact", "finite_diff") else "keep",
        )
        api.check_plan(self.student, self.student_optimizer, options)
        # finite differences perturb the student's parameters in place and restore them to within a
        # couple of ulp; put back the exact bits afterwards (success or failure) so meta_step stays atomic
        saved = None
        if method == "finite_diff":
            saved = [(p, p.detach().clone()) for _, p in trainable(self.student)]
        with self.phase("meta_gradient"), _restored(saved):
            result = api.run(self.teacher, self.student, self.batch, self.quiz, self.device, self.student_optimizer,
                             options)
        self.tangent_precision = result.tangent_precision
        for key, value in (getattr(result, "timings", None) or {}).items():
            self.timings[f"meta_gradient.{key}"] = float(value)
        # the engine checked its losses (LS, LQ) and the teacher's logits; the results remain
        check_finite_grads(result.teacher_grads, "teacher meta-gradient" if teacher_loss is None else
                           "teacher gradient (meta-gradient + the algorithm's own loss)")
        if compute_influence and result.influences is not None:
            batching.check_finite(result.influences, "influences")
        return result


def simulate_optimizer_step(
    optimizer: torch.optim.Optimizer,
    params: List[Tuple[str, torch.nn.Parameter]],
    grads: Dict[str, Optional[torch.Tensor]],
    lr: Optional[float] = None,
    max_grad_norm: Optional[float] = None,
) -> Dict[str, torch.Tensor]:
    """``θ'``: the parameters ONE ``optimizer.step()`` with ``grads`` would produce, leaving everything as it was.

    Exact for any optimizer (its own update rule, state, momentum, weight decay):
    the step is taken for real on the live parameters and then undone bitwise
    (parameters, ``.grad``, ``optimizer.state_dict()``, which includes the param
    groups' learning rates).  ``lr`` (if given) replaces every param group's
    learning rate for this step; ``max_grad_norm`` clips ``grads`` first (:func:`clipped`).  Returns ``{name: θ'}`` (new tensors) for the
    parameters with a gradient.  Cost: one copy of the parameters and of the
    optimizer state while it runs.
    """
    seen = set()
    everything = []
    for p in [p for _, p in params] + [p for group in optimizer.param_groups for p in group["params"]]:
        if id(p) not in seen:
            seen.add(id(p))
            everything.append(p)
    snapshot = _Snapshot(everything, optimizer)
    try:
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        Transaction(atomic=False).apply(optimizer, params, grads, max_grad_norm=max_grad_norm)
        return {name: p.detach().clone() for name, p in params if grads.get(name) is not None}
    finally:
        snapshot.restore()
