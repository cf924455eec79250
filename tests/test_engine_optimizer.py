"""fastmeta.engine.optimizer: the student optimizer's update and its exact vector-Jacobian product.

References (none of them fastmeta code): ``optimizer.step()`` itself (values; central
differences of it for the Jacobian), the test-side transcription ``_optim_reference.ref_update``
differentiated by autograd (single steps, and chained over several steps for the state
adjoints), and Adam's first step in closed form, ``θ' = θ − η·g/(|g| + eps)``.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from _optim_reference import hypers_of, ref_update, state_of
from fastmeta.engine.optimizer import check_student_optimizer, optimizer_update, resolve_lrs

N = 7
CASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1)),
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "sgd_damp_wd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.1)),
    "sgd_nesterov_wd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05)),
    "sgd_maximize": (torch.optim.SGD, dict(lr=0.1, momentum=0.5, maximize=True)),
    "adam": (torch.optim.Adam, dict(lr=0.01)),
    "adam_l2": (torch.optim.Adam, dict(lr=0.01, weight_decay=0.1)),
    "adam_amsgrad": (torch.optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    "adam_maximize": (torch.optim.Adam, dict(lr=0.01, maximize=True, betas=(0.8, 0.99), eps=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    "adamw_amsgrad": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
}


def _make(case, warm_steps, seed=0):
    """A parameter, its optimizer after ``warm_steps`` steps with random gradients, and a fresh gradient."""
    cls, kwargs = CASES[case]
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(N, generator=g, dtype=torch.float64))
    opt = cls([p], **kwargs)
    for _ in range(warm_steps):
        p.grad = torch.randn(N, generator=g, dtype=torch.float64)
        opt.step()
    p.grad = None
    grad = torch.randn(N, generator=g, dtype=torch.float64)
    return p, opt, grad


def _real_step(p, opt, grad):
    """θ' by the real ``optimizer.step()`` on a deep copy (the original is untouched)."""
    q, o = copy.deepcopy((p, opt))
    q.grad = grad.clone()
    o.step()
    return q.detach()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("warm_steps", [0, 1, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_step_equals_torch_optim_step(case, warm_steps):
    p, opt, grad = _make(case, warm_steps)
    update = optimizer_update({"w": p}, opt, inner_lr=None)
    ours, _ = update.step("w", p.detach(), grad, update.initial_state("w"))
    real = _real_step(p, opt, grad)
    ref, _ = ref_update(*hypers_of(opt, p), p.detach(), grad, state_of(opt, p))
    assert _rel(ref, real) <= 1e-14  # the test's transcription is faithful
    assert _rel(ours, real) <= 1e-14
    assert not torch.equal(real, p.detach())


@pytest.mark.parametrize("warm_steps", [1, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_vjp_equals_autograd_through_the_test_transcription(case, warm_steps):
    p, opt, grad = _make(case, warm_steps)
    update = optimizer_update({"w": p}, opt, inner_lr=None)
    adj = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    adj_theta, adj_g, _ = update.vjp("w", p.detach(), grad, update.initial_state("w"), adj)
    theta = p.detach().clone().requires_grad_(True)
    g = grad.clone().requires_grad_(True)
    new, _ = ref_update(*hypers_of(opt, p), theta, g, state_of(opt, p))
    ref_theta, ref_g = torch.autograd.grad((new * adj).sum(), [theta, g])
    assert _rel(adj_g, ref_g) <= 1e-12
    assert _rel(adj_theta, ref_theta) <= 1e-12


@pytest.mark.parametrize("warm_steps", [1, 3])
@pytest.mark.parametrize("case", ["sgd_nesterov_wd", "sgd_maximize", "adam_l2", "adam_amsgrad", "adamw",
                                  "adam_maximize"])
def test_vjp_equals_central_differences_of_the_real_step(case, warm_steps):
    """Coordinate-wise central differences of ``optimizer.step()`` itself (h = 1e-6: accurate to ~1e-8)."""
    p, opt, grad = _make(case, warm_steps)
    update = optimizer_update({"w": p}, opt, inner_lr=None)
    adj = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _, adj_g, _ = update.vjp("w", p.detach(), grad, update.initial_state("w"), adj)
    h = 1e-6
    fd = torch.stack([
        ((_real_step(p, opt, grad + h * e) - _real_step(p, opt, grad - h * e)) * adj).sum() / (2 * h)
        for e in torch.eye(N, dtype=torch.float64)
    ])
    assert _rel(adj_g, fd) <= 1e-6


@pytest.mark.parametrize("case", ["adam", "adam_l2", "adamw", "adam_amsgrad"])
def test_adam_first_step_jacobian_in_closed_form(case):
    """At t = 1: θ' = base − η·g'/(|g'| + eps), so ∂θ'/∂g' = −η·eps/(|g'| + eps)², ~1e8 times smaller than
    the frozen-second-moment linearisation's −η/(|g'| + eps) (the naive autograd formula cancels here)."""
    p, opt, grad = _make(case, 0)
    _, h = hypers_of(opt, p)
    gp = grad + (h["weight_decay"] * p.detach() if not h["decoupled"] else 0.0)
    adj = torch.ones(N, dtype=torch.float64)
    exact = optimizer_update({"w": p}, opt, inner_lr=None)
    frozen = optimizer_update({"w": p}, opt, inner_lr=None, adam_jacobian="frozen_second_moment")
    _, adj_exact, _ = exact.vjp("w", p.detach(), grad, exact.initial_state("w"), adj)
    _, adj_frozen, _ = frozen.vjp("w", p.detach(), grad, frozen.initial_state("w"), adj)
    lr, eps = h["lr"], h["eps"]
    assert _rel(adj_exact, -lr * eps / (gp.abs() + eps) ** 2) <= 1e-12
    assert _rel(adj_frozen, -lr / (gp.abs() + eps)) <= 1e-12
    assert float((adj_frozen / adj_exact).min()) > 1e6


def test_zero_gradient_coordinate_is_guarded():
    """A coordinate with g = 0 and no second moment (e.g. an untouched embedding row): the real step leaves
    it alone; the update and its adjoint stay finite (sqrt is not differentiable at 0: the limit along g)."""
    p, opt, grad = _make("adam", 0)
    grad[2] = 0.0
    update = optimizer_update({"w": p}, opt, inner_lr=None)
    ours, _ = update.step("w", p.detach(), grad, update.initial_state("w"))
    assert _rel(ours, _real_step(p, opt, grad)) <= 1e-14
    _, adj_g, _ = update.vjp("w", p.detach(), grad, update.initial_state("w"), torch.ones(N, dtype=torch.float64))
    assert bool(torch.isfinite(adj_g).all())
    # t = 1: θ' = θ − η·g/(|g| + eps) is differentiable at g = 0 with derivative −η/eps
    lr, eps = opt.param_groups[0]["lr"], opt.param_groups[0]["eps"]
    assert abs(float(adj_g[2]) + lr / eps) <= 1e-12 * lr / eps
    h = 1e-13
    e2 = torch.zeros(N, dtype=torch.float64)
    e2[2] = 1.0
    fd = float((_real_step(p, opt, grad + h * e2) - _real_step(p, opt, grad - h * e2))[2]) / (2 * h)
    assert abs(fd - float(adj_g[2])) <= 1e-4 * lr / eps  # O(h/eps) + rounding of the real step
    g = grad.clone().requires_grad_(True)
    new, _ = update.step("w", p.detach(), g, update.initial_state("w"))
    (auto,) = torch.autograd.grad(new.sum(), g)
    assert bool(torch.isfinite(auto).all())


@pytest.mark.parametrize("warm_steps", [0, 2])
@pytest.mark.parametrize("case", ["sgd_momentum", "sgd_damp_wd", "sgd_nesterov_wd", "adam_l2", "adam_amsgrad",
                                  "adamw", "adam_maximize"])
def test_state_adjoints_over_chained_steps(case, warm_steps):
    """Three updates with independent gradients g_0, g_1, g_2 and L = ⟨θ_3, w⟩ + ⟨m_3, w'⟩-free: the reverse
    pass of ``vjp`` (state adjoints handed back step by step) equals autograd through three chained
    test-side updates, for every g_j and for θ_0."""
    p, opt, _ = _make(case, warm_steps)
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(N, dtype=torch.float64, generator=gen) for _ in range(3)]
    w = torch.randn(N, dtype=torch.float64, generator=gen)
    update = optimizer_update({"w": p}, opt, inner_lr=None)
    thetas, states = [p.detach()], [update.initial_state("w")]
    for g in grads:
        new, st = update.step("w", thetas[-1], g, states[-1])
        thetas.append(new)
        states.append(st)
    adj_theta, adj_state, adj_gs = w, None, []
    for j in reversed(range(3)):
        adj_theta, adj_g, adj_state = update.vjp("w", thetas[j], grads[j], states[j], adj_theta, adj_state)
        adj_gs.insert(0, adj_g)
    theta0 = p.detach().clone().requires_grad_(True)
    leaves = [g.clone().requires_grad_(True) for g in grads]
    theta, state = theta0, state_of(opt, p)
    for g in leaves:
        theta, state = ref_update(*hypers_of(opt, p), theta, g, state)
    refs = torch.autograd.grad((theta * w).sum(), [theta0] + leaves)
    assert _rel(adj_theta, refs[0]) <= 1e-12
    for j in range(3):
        assert _rel(adj_gs[j], refs[j + 1]) <= 1e-12, j


def test_per_group_learning_rates_and_pilot_sgd():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    params = dict(model.named_parameters())
    opt = torch.optim.Adam([{"params": list(model[0].parameters()), "lr": 0.02},
                            {"params": list(model[1].parameters())}], lr=0.005)
    assert resolve_lrs(params, opt, None) == {"0.weight": 0.02, "0.bias": 0.02, "1.weight": 0.005, "1.bias": 0.005}
    assert set(resolve_lrs(params, opt, 0.1).values()) == {0.1}
    sgd = optimizer_update(params, opt, inner_lr=None, pilot="sgd")
    assert sgd.lr_ref == 0.02
    theta, g = params["1.bias"].detach(), torch.ones(2, dtype=torch.float64)
    new, _ = sgd.step("1.bias", theta, g, sgd.initial_state("1.bias"))
    assert torch.equal(new, theta - 0.005 * g)


def test_unsupported_optimizer_is_a_type_error_naming_student_optimizer():
    model = torch.nn.Linear(3, 2)
    params = dict(model.named_parameters())
    opt = torch.optim.RMSprop(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="student_optimizer.*pilot='sgd'"):
        check_student_optimizer(params, opt, inner_lr=None, pilot="optimizer")
    check_student_optimizer(params, opt, inner_lr=None, pilot="sgd")  # a plain SGD look-ahead reads only the lr
    other = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not in any param group"):
        check_student_optimizer(params, other, inner_lr=None, pilot="optimizer")


def test_ops_precondition_is_a_deprecated_shim_of_the_frozen_factor():
    from fastmeta import ops

    p, opt, grad = _make("adam", 2)
    v = torch.randn(N, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="fastmeta.engine.optimizer"):
        (out,) = ops.precondition([v], opt, [p], grads=[grad])
    frozen = optimizer_update({"w": p}, opt, inner_lr=1.0, adam_jacobian="frozen_second_moment")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, adj_g, _ = frozen.vjp("w", p.detach(), grad, frozen.initial_state("w"), v)
    assert _rel(out, -adj_g) <= 1e-14


def test_fused_driver_equals_the_update_tensor_by_tensor():
    """``OptimizerUpdate.pilot`` / ``adjoint`` (one fused op call per param group's rule: here three
    groups, one parameter without state) equal ``step`` (the twin, per tensor) and ``vjp`` (the op on one
    tensor), over a trajectory of three steps (new states forward, state adjoints backward)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 5), torch.nn.Linear(5, 2)).double()
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([{"params": list(model[0].parameters()), "lr": 0.02},
                             {"params": list(model[1].parameters()), "amsgrad": True, "weight_decay": 0.1},
                             {"params": list(model[2].parameters()), "betas": (0.8, 0.99)}], lr=0.005)
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        for name, p in params.items():
            p.grad = None if name == "2.bias" else torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()
    assert "2.bias" not in opt.state
    update = optimizer_update(params, opt, inner_lr=None)
    grads = [{n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()} for _ in range(3)]
    thetas, states = [{n: p.detach() for n, p in params.items()}], [dict(update.states)]
    for j in range(3):
        new, new_states = update.pilot(thetas[-1], grads[j], states[-1], compute_state=True)
        for name in params:
            ref, ref_state = update.step(name, thetas[-1][name], grads[j][name], states[-1][name])
            assert _rel(new[name], ref) <= 1e-15, (j, name)
            for key, value in ref_state.items():
                if isinstance(value, torch.Tensor):
                    assert _rel(new_states[name][key], value) <= 1e-15, (j, name, key)
                else:
                    assert new_states[name][key] == value
        thetas.append(new)
        states.append(new_states)
    adj_theta = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
    adj_state, ref_theta, ref_state = None, dict(adj_theta), {n: None for n in params}
    for j in reversed(range(3)):
        direct, direction, adj_state = update.adjoint(thetas[j], grads[j], states[j], adj_theta, adj_state, full=True)
        for name in params:
            ref_direct, ref_g, ref_state[name] = update.vjp(name, thetas[j][name], grads[j][name], states[j][name],
                                                            ref_theta[name], ref_state[name])
            assert _rel(direction[name], ref_g * (-1.0 / update.lr_ref)) <= 1e-15, (j, name)
            assert _rel(direct[name], ref_direct) <= 1e-15, (j, name)
            ref_theta[name] = ref_direct
            for key, value in ref_state[name].items():
                if value is None:
                    assert adj_state[name][key] is None, (j, name, key)
                else:
                    assert torch.equal(adj_state[name][key], value) or _rel(adj_state[name][key], value) <= 1e-15, \
                        (j, name, key)
        adj_theta = direct
    _, last_only, rest = update.adjoint(thetas[0], grads[0], states[0], adj_theta, adj_state, full=False)
    assert rest == {} and set(last_only) == set(params)
