"""One MetaDistil step written the way a user of ``higher`` and a user of TorchOpt write it.

These are the *peers* of ``fastmeta.meta_step(algorithm="metadistil")`` in the benchmarks
(``bench.meta_step`` rows with ``"peer": "higher" | "torchopt"``, ``bench.growth``,
``bench.table4``'s higher row).  Both are optional (``pip install .[bench]``); a missing one is
reported by :func:`availability`, never replaced by something else.

The step (MetaDistil, Algorithm 1 with the pilot update; the same as fastmeta's)::

    zt  = T(x)                                                  (graph kept: LS depends on θT)
    θS' = U(θS, ∇θS LS(x; θS, θT))   differentiable             (pilot: the student optimizer's update)
    LQ  = CE(yq, S(xq; θS'))
    gT  = ∇θT LQ                     backprop through the pilot (double backward)
    teacher_optimizer.step() with gT
    real student step on x with the UPDATED teacher (no graph through the teacher)

with ``LS = (1 − w)·CE(y, S(x)) + w·KD`` and ``KD = fastmeta.kd_loss(zs, zt, τ)`` (τ²·KL,
batchmean) on ``backend="torch"``: the fused Triton path has no double backward, and these
peers differentiate through the KD gradient.

higher (``higher.innerloop_ctx(student, student_opt, copy_initial_weights=False,
track_higher_grads=True)``, its README's recipe): the patched student and a differentiable copy
of the student's torch optimizer, state included; ``diffopt.step(LS)``; the meta-gradient with
``torch.autograd.grad(LQ, teacher params)`` (``LQ.backward()`` would also push a gradient into
the student's initial weights, extra work for nothing); the real step with the torch optimizer
itself.  higher 0.2.1 has no differentiable ``AdamW`` (``facebookresearch/higher`` issues #88,
#140: users write one and ``higher.register_optim`` it): :class:`DifferentiableAdamW` below is
that class, higher's ``DifferentiableAdam`` with decoupled weight decay, so it also inherits
higher's Adam arithmetic: ``eps`` added to ``sqrt(v)`` BEFORE the bias correction (torch < 1.3),
i.e. an effective ``eps / sqrt(1 − β2^t)``, and bias corrections computed from the step counter it
copies from torch (a float32 tensor in fp32 training).  Same cost, slightly different numbers:
the correctness test (tests/test_bench_peers.py) compares at ``eps = 0`` and with SGD.

TorchOpt (its README's "Explicit Gradient, functional API", with ``torch.func.functional_call``
in place of the deprecated ``functorch.make_functional``): the student's optimizer is the
functional ``torchopt.adamw`` (``torchopt.adam`` / ``torchopt.sgd`` for those torch optimizers),
with the torch optimizer's hyper-parameters, and its state lives in TorchOpt (``opt.init`` once, at
the first step, as torch.optim allocates its state);
pilot ``opt.update(grads, state, params=params, inplace=False)`` +
``torchopt.apply_updates(..., inplace=False)`` (the new state is dropped); real step
``opt.update(..., inplace=True)`` + ``apply_updates(..., inplace=True)`` on the student's own
parameters.  Adam/AdamW get ``eps_root=1e-16`` (:data:`TORCHOPT_EPS_ROOT`), the knob TorchOpt's
docstrings prescribe for meta-gradients through Adam: with the default 0, a pilot gradient that is
exactly 0 (BERT's attention key bias) makes the meta-gradient NaN.  The teacher keeps its torch optimizer.  TorchOpt's ``MetaAdamW`` (OOP) was not used:
it replaces the module's parameters by non-leaf tensors and needs ``extract_state_dict`` /
``recover_state_dict`` / ``stop_gradient`` around every step to keep the real student step a
plain one, more code for the same graph.  TorchOpt keeps its Adam step counter as an int64 tensor
and computes ``1 − β^t`` in the default dtype.

Both peers run the differentiable part (pilot forward, quiz forward, meta backward) under
``sdpa_kernel(SDPBackend.MATH)``: the fused SDPA kernels have no double backward (without it
the meta backward raises), and the plain real student step runs with the model's own attention.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable

import torch
import torch.nn.functional as F

PEERS = ("higher", "torchopt")


# --------------------------------------------------------------------------- availability
def availability(name: str) -> dict[str, Any]:
    """``{"available": bool, "version": str | None, "reason": str | None}`` for one peer library."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose from {PEERS}")
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        return {"available": False, "version": None, "reason": f"not installed ({exc})"}
    except Exception as exc:  # noqa: BLE001 - installed but broken against this torch
        return {"available": False, "version": None, "reason": f"import failed: {type(exc).__name__}: {exc}"}
    version = getattr(module, "__version__", None)
    if version is None:  # higher has no __version__
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(name)
        except Exception:  # noqa: BLE001
            version = "?"
    return {"available": True, "version": str(version), "reason": None}


# --------------------------------------------------------------------------- shared pieces
def _split(batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return inputs, batch["labels"]


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def student_loss(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, *, temperature: float,
                 kd_weight: float) -> torch.Tensor:
    """``LS = (1 − w)·CE(y, zs) + w·τ²·KL(softmax(zt/τ) ‖ softmax(zs/τ))`` (batchmean), any order of
    differentiation (``fastmeta.kd_loss`` on its PyTorch backend), as fastmeta's ``student_loss``."""
    import fastmeta

    loss = (1.0 - kd_weight) * F.cross_entropy(_upcast(zs), labels)
    kd = fastmeta.kd_loss(zs, zt, temperature, backend="torch")
    return loss + kd_weight * _upcast(kd)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 (losses are reduced in fp32 under autocast); fp32/fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def math_sdpa():
    """The math backend of ``scaled_dot_product_attention`` (differentiable twice)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _teacher_update(peer, grads) -> None:
    """The teacher's optimizer step with the meta-gradient, as a user writes it."""
    peer.teacher_optimizer.zero_grad(set_to_none=True)
    for p, g in zip([p for p in peer.teacher.parameters() if p.requires_grad], grads):
        p.grad = g
    peer.teacher_optimizer.step()
    # under the bench's bf16 autocast region: the real step must see the updated teacher, not autocast's
    # cached casts of the old weights (fastmeta.functional.drop_autocast_casts; a no-op in fp32)
    torch.clear_autocast_cache()


# --------------------------------------------------------------------------- higher
_HIGHER_ADAMW = None


def _register_higher_adamw():
    """Register :class:`DifferentiableAdamW` for ``torch.optim.AdamW`` (higher 0.2.1 has none)."""
    global _HIGHER_ADAMW
    import higher
    import higher.optim as hopt

    if torch.optim.AdamW in hopt._opt_mapping:  # a later higher, or registered already
        return hopt._opt_mapping[torch.optim.AdamW]
    if _HIGHER_ADAMW is None:
        class DifferentiableAdamW(hopt.DifferentiableOptimizer):
            """higher's ``DifferentiableAdam`` with decoupled weight decay (the class users write)."""

            def _update(self, grouped_grads, **kwargs) -> None:
                for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
                    amsgrad = group["amsgrad"]
                    beta1, beta2 = group["betas"]
                    weight_decay = group["weight_decay"]
                    for p_idx, (p, g) in enumerate(zip(group["params"], grads)):
                        if g is None:
                            continue
                        state = self.state[group_idx][p_idx]
                        if len(state) == 0:
                            state["step"] = 0
                            state["exp_avg"] = torch.zeros_like(p.data)
                            state["exp_avg_sq"] = torch.zeros_like(p.data)
                            if amsgrad:
                                state["max_exp_avg_sq"] = torch.zeros_like(p.data)
                        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                        state["step"] += 1
                        if weight_decay != 0:
                            p = p * (1 - group["lr"] * weight_decay)  # decoupled (AdamW)
                        state["exp_avg"] = exp_avg = exp_avg * beta1 + (1 - beta1) * g
                        state["exp_avg_sq"] = exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * g * g
                        hopt._maybe_mask(exp_avg_sq, exp_avg_sq == 0.0)
                        if amsgrad:
                            state["max_exp_avg_sq"] = second = torch.max(state["max_exp_avg_sq"], exp_avg_sq)
                        else:
                            second = exp_avg_sq
                        denom = hopt._add(second.sqrt(), group["eps"])
                        bias_correction1 = 1 - beta1 ** state["step"]
                        bias_correction2 = 1 - beta2 ** state["step"]
                        step_size = group["lr"] * (bias_correction2 ** 0.5) / bias_correction1
                        group["params"][p_idx] = hopt._addcdiv(p, -step_size, exp_avg, denom)

        _HIGHER_ADAMW = DifferentiableAdamW
    higher.register_optim(torch.optim.AdamW, _HIGHER_ADAMW)
    return _HIGHER_ADAMW


class HigherMetaDistil:
    """MetaDistil with ``higher``: the student's pilot step through ``innerloop_ctx``."""

    name = "higher"

    def __init__(self, teacher, student, teacher_optimizer, student_optimizer, *, temperature: float,
                 kd_weight: float, attention: Callable[[], Any] = math_sdpa) -> None:
        import higher  # noqa: F401 - ImportError names the missing peer

        if isinstance(student_optimizer, torch.optim.AdamW):
            _register_higher_adamw()
        self.teacher, self.student = teacher, student
        self.teacher_optimizer, self.student_optimizer = teacher_optimizer, student_optimizer
        self.temperature, self.kd_weight = temperature, kd_weight
        self.attention = attention

    def meta_gradient(self, batch, quiz) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """``∇θT LQ(θS'(θT))`` (one tensor per trainable teacher parameter) and the losses."""
        import higher

        inputs, labels = _split(batch)
        quiz_inputs, quiz_labels = _split(quiz)
        teacher_params = [p for p in self.teacher.parameters() if p.requires_grad]
        with self.attention():
            zt = _logits(self.teacher(**inputs))
            with higher.innerloop_ctx(self.student, self.student_optimizer, copy_initial_weights=False,
                                      track_higher_grads=True) as (fmodel, diffopt):
                zs = _logits(fmodel(**inputs))
                pilot_loss = student_loss(zs, zt, labels, temperature=self.temperature, kd_weight=self.kd_weight)
                diffopt.step(pilot_loss)
                quiz_loss = F.cross_entropy(_upcast(_logits(fmodel(**quiz_inputs))), quiz_labels)
                grads = torch.autograd.grad(quiz_loss, teacher_params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(teacher_params, grads)]
        return grads, {"pilot_student_loss": pilot_loss.detach(), "quiz_loss": quiz_loss.detach()}

    def step(self, batch, quiz) -> dict[str, torch.Tensor]:
        grads, losses = self.meta_gradient(batch, quiz)
        _teacher_update(self, grads)
        losses["student_loss"] = _real_student_step(self, batch)
        return losses


def _real_student_step(peer, batch) -> torch.Tensor:
    """The real student step with the updated teacher (torch optimizer; autograd, first order)."""
    inputs, labels = _split(batch)
    with torch.no_grad():
        zt = _logits(peer.teacher(**inputs))
    peer.student_optimizer.zero_grad(set_to_none=True)
    zs = _logits(peer.student(**inputs))
    loss = student_loss(zs, zt, labels, temperature=peer.temperature, kd_weight=peer.kd_weight)
    loss.backward()
    peer.student_optimizer.step()
    return loss.detach()


# --------------------------------------------------------------------------- TorchOpt
# TorchOpt's documented knob for meta-gradients through Adam ("eps_root ... is needed for example when
# computing (meta-)gradients through Adam", torchopt.adam/adamw docstrings): without it, a coordinate
# whose pilot gradient is exactly 0 (BERT's key bias: softmax ignores it; unused embedding rows) has
# v = 0 and sqrt's backward at 0 turns the whole meta-gradient into NaN (measured on the tiny BERT).
# 1e-16 changes sqrt(v_hat) by < 1e-4 relative for |g| > 1e-6.  higher masks v == 0 instead.
TORCHOPT_EPS_ROOT = 1e-16


def torchopt_transform(optimizer: torch.optim.Optimizer, *, eps_root: float = TORCHOPT_EPS_ROOT):
    """The functional TorchOpt optimizer with the torch optimizer's hyper-parameters (one param group)."""
    import torchopt

    if len(optimizer.param_groups) != 1:
        raise ValueError("the TorchOpt peer supports a student optimizer with one param group")
    g = optimizer.param_groups[0]
    if g.get("maximize"):
        raise ValueError("the TorchOpt peer does not support maximize=True")
    if isinstance(optimizer, torch.optim.AdamW):
        if g.get("amsgrad"):
            raise ValueError("torchopt.adamw has no amsgrad")
        return torchopt.adamw(lr=g["lr"], betas=tuple(g["betas"]), eps=g["eps"], weight_decay=g["weight_decay"],
                              eps_root=eps_root)
    if isinstance(optimizer, torch.optim.Adam):
        if g.get("amsgrad") or g.get("decoupled_weight_decay"):
            raise ValueError("the TorchOpt peer maps torch.optim.Adam without amsgrad / decoupled weight decay")
        return torchopt.adam(lr=g["lr"], betas=tuple(g["betas"]), eps=g["eps"], weight_decay=g["weight_decay"],
                             eps_root=eps_root)
    if isinstance(optimizer, torch.optim.SGD):
        return torchopt.sgd(lr=g["lr"], momentum=g["momentum"], dampening=g["dampening"],
                            nesterov=g["nesterov"], weight_decay=g["weight_decay"])
    raise TypeError(f"no TorchOpt counterpart wired for {type(optimizer).__name__}")


class TorchOptMetaDistil:
    """MetaDistil with TorchOpt's functional (Optax-like) API; the student's optimizer state lives in TorchOpt.

    ``student_optimizer`` (a torch optimizer) only gives the hyper-parameters: the student is trained
    by TorchOpt's update, pilot and real step alike.
    """

    name = "torchopt"

    def __init__(self, teacher, student, teacher_optimizer, student_optimizer, *, temperature: float,
                 kd_weight: float, attention: Callable[[], Any] = math_sdpa,
                 eps_root: float = TORCHOPT_EPS_ROOT) -> None:
        import torchopt  # noqa: F401 - ImportError names the missing peer

        self.teacher, self.student = teacher, student
        self.teacher_optimizer = teacher_optimizer
        self.temperature, self.kd_weight = temperature, kd_weight
        self.attention = attention
        self.optimizer = torchopt_transform(student_optimizer, eps_root=eps_root)
        self.params = {n: p for n, p in student.named_parameters() if p.requires_grad}
        self.buffers = dict(student.named_buffers())
        # created at the first step, as torch.optim creates its state (so that a benchmark's "step memory"
        # counts the optimizer state of every row alike)
        self.state = None

    def _student(self, params, inputs) -> torch.Tensor:
        from torch.func import functional_call

        return _logits(functional_call(self.student, {**params, **self.buffers}, args=(), kwargs=inputs))

    def meta_gradient(self, batch, quiz) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        import torchopt

        inputs, labels = _split(batch)
        quiz_inputs, quiz_labels = _split(quiz)
        teacher_params = [p for p in self.teacher.parameters() if p.requires_grad]
        if self.state is None:
            self.state = self.optimizer.init(self.params)
        with self.attention():
            zt = _logits(self.teacher(**inputs))
            zs = self._student(self.params, inputs)
            pilot_loss = student_loss(zs, zt, labels, temperature=self.temperature, kd_weight=self.kd_weight)
            grads = torch.autograd.grad(pilot_loss, tuple(self.params.values()), create_graph=True)
            updates, _ = self.optimizer.update(dict(zip(self.params, grads)), self.state, params=self.params,
                                               inplace=False)
            pilot = torchopt.apply_updates(self.params, updates, inplace=False)
            quiz_loss = F.cross_entropy(_upcast(self._student(pilot, quiz_inputs)), quiz_labels)
            meta = torch.autograd.grad(quiz_loss, teacher_params, allow_unused=True)
        meta = [torch.zeros_like(p) if g is None else g for p, g in zip(teacher_params, meta)]
        return meta, {"pilot_student_loss": pilot_loss.detach(), "quiz_loss": quiz_loss.detach()}

    def step(self, batch, quiz) -> dict[str, torch.Tensor]:
        import torchopt

        meta, losses = self.meta_gradient(batch, quiz)
        _teacher_update(self, meta)
        inputs, labels = _split(batch)
        with torch.no_grad():
            zt = _logits(self.teacher(**inputs))
        zs = _logits(self.student(**inputs))
        loss = student_loss(zs, zt, labels, temperature=self.temperature, kd_weight=self.kd_weight)
        grads = torch.autograd.grad(loss, tuple(self.params.values()))
        with torch.no_grad():
            updates, self.state = self.optimizer.update(dict(zip(self.params, grads)), self.state,
                                                        params=self.params, inplace=True)
            torchopt.apply_updates(self.params, updates, inplace=True)
        losses["student_loss"] = loss.detach()
        return losses


def make_peer(name: str, teacher, student, teacher_optimizer, student_optimizer, *, temperature: float,
              kd_weight: float, **kwargs):
    """The peer's MetaDistil stepper (``.step(batch, quiz)``, ``.meta_gradient(batch, quiz)``)."""
    cls = {"higher": HigherMetaDistil, "torchopt": TorchOptMetaDistil}.get(name)
    if cls is None:
        raise ValueError(f"unknown peer {name!r}; choose from {PEERS}")
    return cls(teacher, student, teacher_optimizer, student_optimizer, temperature=temperature,
               kd_weight=kd_weight, **kwargs)
