"""The engine's meta-gradient through the student optimizer's REAL update, against an unrolled reference.

The reference (``_optim_reference.unrolled_meta_grad``) is written in the test: teacher and
student through ``functional_call``, a hand-written CE and KL, the test's own transcription
of ``torch.optim``'s SGD/Adam/AdamW update (checked against ``optimizer.step()`` in
``tests/test_engine_optimizer.py``) and ``create_graph=True`` double backward through every
step.  It shares no code with fastmeta.  float64 throughout, tiny MLPs.

Defects of the previous engine each have a test that fails on it (checked by running these
tests against the previous ``fastmeta/engine.py``):
Adam/AdamW "exact" and "autograd" held the second moment fixed (``test_exact_and_autograd_match_
the_unrolled_reference[adam*]``: 0.2-1e4 relative error), ``inner_steps > 1`` with per-group
learning rates used the largest lr for every parameter (``[sgd_groups-2]``, ``[sgd_groups-3]``),
and ``meta_step(inner_steps=2.7)`` was silently 2 steps (``test_meta_step_inner_steps_must_be_an_int``).
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastmeta
from _optim_reference import ce, kl_rows, ref_update, hypers_of, rel_err, setup, state_of, unrolled_meta_grad, warm
from fastmeta.engine import meta_gradient

TAU, W = 2.0, 0.7


def _params(student):
    return list(student.parameters())


OPTIMIZERS = {
    "sgd_plain": (lambda s: None, 0),
    "sgd_momentum_damp_wd": (lambda s: torch.optim.SGD(_params(s), lr=0.2, momentum=0.9, dampening=0.1,
                                                       weight_decay=0.01), 2),
    "sgd_nesterov_wd": (lambda s: torch.optim.SGD(_params(s), lr=0.2, momentum=0.9, nesterov=True,
                                                  weight_decay=0.01), 2),
    "sgd_maximize": (lambda s: torch.optim.SGD(_params(s), lr=0.2, momentum=0.5, maximize=True), 0),
    "sgd_groups": (lambda s: torch.optim.SGD([{"params": _params(s)[:2], "lr": 0.3},
                                              {"params": _params(s)[2:], "lr": 0.05}]), 0),
    "adam_first_step": (lambda s: torch.optim.Adam(_params(s), lr=0.01), 0),
    "adam_l2": (lambda s: torch.optim.Adam(_params(s), lr=0.01, weight_decay=0.01), 3),
    "adamw": (lambda s: torch.optim.AdamW(_params(s), lr=0.01, weight_decay=0.1), 3),
    "adam_amsgrad": (lambda s: torch.optim.Adam(_params(s), lr=0.01, amsgrad=True), 3),
    "adam_groups": (lambda s: torch.optim.Adam([{"params": _params(s)[:2], "lr": 0.02},
                                                {"params": _params(s)[2:], "lr": 0.005}]), 2),
}


def _case(name, seed=0):
    teacher, student, batch, quiz = setup(seed)
    make, warm_steps = OPTIMIZERS[name]
    opt = make(student)
    if opt is not None:
        warm(student, opt, quiz, warm_steps)
    return teacher, student, batch, quiz, opt


def _engine(teacher, student, batch, quiz, opt, **kwargs):
    kwargs.setdefault("inner_lr", 0.3 if opt is None else None)
    return meta_gradient(teacher, student, batch, quiz, temperature=TAU, kd_weight=W, student_optimizer=opt, **kwargs)


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_exact_and_autograd_match_the_unrolled_reference(name, steps):
    teacher, student, batch, quiz, opt = _case(name)
    state = None if opt is None else copy.deepcopy(opt.state_dict())
    before = [p.detach().clone() for p in student.parameters()]
    exact = _engine(teacher, student, batch, quiz, opt, inner_steps=steps).teacher_grads
    auto = _engine(teacher, student, batch, quiz, opt, inner_steps=steps, hypergrad="autograd").teacher_grads
    ref = unrolled_meta_grad(teacher, student, batch, quiz, opt, tau=TAU, w=W, steps=steps,
                             inner_lr=0.3 if opt is None else None)
    assert rel_err(exact, ref) <= 1e-10
    assert rel_err(auto, ref) <= 1e-10
    assert all(torch.equal(p, b) for p, b in zip(student.parameters(), before))
    if opt is not None:  # the optimizer was only read
        after = opt.state_dict()
        assert after["param_groups"] == state["param_groups"]
        for key, st in state["state"].items():
            for k, v in st.items():
                assert torch.equal(torch.as_tensor(after["state"][key][k]), torch.as_tensor(v))


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_double_vjp_tangent_matches_the_unrolled_reference(name, steps):
    """``student_tangent="double_vjp"`` (step 0's tangent through the pilot's kept graph; later steps
    forward-over-reverse) through the optimizer's real update."""
    teacher, student, batch, quiz, opt = _case(name)
    got = _engine(teacher, student, batch, quiz, opt, inner_steps=steps, student_tangent="double_vjp").teacher_grads
    ref = unrolled_meta_grad(teacher, student, batch, quiz, opt, tau=TAU, w=W, steps=steps,
                             inner_lr=0.3 if opt is None else None)
    assert rel_err(got, ref) <= 1e-10


@pytest.mark.parametrize("name", ["sgd_groups", "adam_groups", "adamw"])
def test_finite_diff_follows_the_same_trajectory(name):
    """LGTM's central differences along the same reverse sweep: an approximation, measured ~1e-5 here."""
    teacher, student, batch, quiz, opt = _case(name)
    ref = unrolled_meta_grad(teacher, student, batch, quiz, opt, tau=TAU, w=W, steps=2)
    fd = _engine(teacher, student, batch, quiz, opt, inner_steps=2, hypergrad="finite_diff").teacher_grads
    assert rel_err(fd, ref) <= 1e-4


def test_the_pilot_point_is_the_optimizers_real_step():
    teacher, student, batch, quiz, opt = _case("adam_amsgrad")
    result = _engine(teacher, student, batch, quiz, opt, keep_pilot=True)
    student_copy, opt_copy = copy.deepcopy((student, opt))  # one deepcopy keeps the params <-> state mapping
    for name, p in student_copy.named_parameters():
        p.grad = result.student_grads[name].clone()
    opt_copy.step()
    stepped = {n: p.detach() for n, p in student_copy.named_parameters()}
    assert rel_err(result.pilot_params, stepped) <= 1e-14


@pytest.mark.parametrize("steps", [1, 2])
def test_pilot_sgd_with_an_adam_student(steps):
    """MetaDistil's official look-ahead: θS' = θS − η·∇LS whatever optimizer trains the student."""
    teacher, student, batch, quiz, opt = _case("adam_groups")
    lrs = {"0.weight": 0.02, "0.bias": 0.02, "2.weight": 0.005, "2.bias": 0.005}
    ref = unrolled_meta_grad(teacher, student, batch, quiz, opt, tau=TAU, w=W, steps=steps, sgd_pilot_lr=lrs)
    for hypergrad in ("exact", "autograd"):
        got = _engine(teacher, student, batch, quiz, opt, inner_steps=steps, pilot="sgd", hypergrad=hypergrad)
        assert rel_err(got.teacher_grads, ref) <= 1e-10
    with_lr = _engine(teacher, student, batch, quiz, opt, pilot="sgd", inner_lr=0.1).teacher_grads
    ref_lr = unrolled_meta_grad(teacher, student, batch, quiz, None, tau=TAU, w=W, inner_lr=0.1)
    assert rel_err(with_lr, ref_lr) <= 1e-10
    exact = _engine(teacher, student, batch, quiz, opt, inner_steps=steps).teacher_grads
    assert rel_err(exact, ref) > 1e-2  # the optimizer's own pilot is a different step


@pytest.mark.parametrize("steps", [1, 2])
def test_frozen_second_moment_is_a_named_approximation(steps):
    """``adam_jacobian="frozen_second_moment"`` equals a double backward through the test's step with the
    second moment detached, and differs from the exact meta-gradient (0.4-1 relative here)."""
    teacher, student, batch, quiz, opt = _case("adam_l2")
    frozen_ref = unrolled_meta_grad(teacher, student, batch, quiz, opt, tau=TAU, w=W, steps=steps,
                                    frozen_second_moment=True)
    exact_ref = unrolled_meta_grad(teacher, student, batch, quiz, opt, tau=TAU, w=W, steps=steps)
    for hypergrad in ("exact", "autograd"):
        got = _engine(teacher, student, batch, quiz, opt, inner_steps=steps, hypergrad=hypergrad,
                      adam_jacobian="frozen_second_moment")
        assert rel_err(got.teacher_grads, frozen_ref) <= 1e-10
    assert rel_err(frozen_ref, exact_ref) > 0.1


@pytest.mark.parametrize("name", ["sgd_nesterov_wd", "adamw"])
def test_quiz_point_current(name):
    """IKD's exam: v = ∇LQ(θS) at the current student, direction through the pilot step's Jacobian:
    the meta-gradient is ∇θT ⟨θS'(θT), v⟩."""
    teacher, student, batch, quiz, opt = _case(name)
    ref = unrolled_meta_grad(teacher, student, batch, quiz, opt, tau=TAU, w=W, quiz_at_current=True)
    for hypergrad in ("exact", "autograd"):
        got = _engine(teacher, student, batch, quiz, opt, quiz_point="current", hypergrad=hypergrad, keep_pilot=True)
        assert rel_err(got.teacher_grads, ref) <= 1e-10
        assert abs(float(got.quiz_loss) - float(ce(student(quiz[0]), quiz[1]).detach())) <= 1e-14
    pilot = _engine(teacher, student, batch, quiz, opt).teacher_grads
    assert rel_err(pilot, ref) > 1e-3
    with pytest.raises(ValueError, match="quiz_point='current' needs inner_steps=1"):
        _engine(teacher, student, batch, quiz, opt, quiz_point="current", inner_steps=2)


def _reference_influences(teacher, student, batch, quiz, opt):
    """w_i = ⟨∇θS ℓ_i, a⟩, a = −(∂θS'/∂g)ᵀ ∇LQ(θS') / η (η the largest group lr), per-sample loop."""
    x, y = batch
    named = dict(student.named_parameters())
    zt = teacher(x).detach()
    zs = student(x)
    ls = (1 - W) * ce(zs, y) + W * kl_rows(zs, zt, TAU).mean()
    grads = dict(zip(named, torch.autograd.grad(ls, list(named.values()))))
    leaves = {n: g.detach().requires_grad_(True) for n, g in grads.items()}
    pilot = {n: ref_update(*hypers_of(opt, p), p.detach(), leaves[n], state_of(opt, p))[0] for n, p in named.items()}
    pilot_for_v = {n: t.detach().requires_grad_(True) for n, t in pilot.items()}
    lq = ce(torch.func.functional_call(student, pilot_for_v, (quiz[0],)), quiz[1])
    v = torch.autograd.grad(lq, list(pilot_for_v.values()))
    adj = torch.autograd.grad(sum((pilot[n] * g).sum() for n, g in zip(named, v)), list(leaves.values()))
    lr_ref = max(g["lr"] for g in opt.param_groups)
    a = [-g / lr_ref for g in adj]
    out = []
    for i in range(x.shape[0]):
        loss_i = kl_rows(student(x[i : i + 1]), zt[i : i + 1], TAU).sum()
        g_i = torch.autograd.grad(loss_i, list(named.values()))
        out.append(sum((gi * ai).sum() for gi, ai in zip(g_i, a)))
    return torch.stack(out)


@pytest.mark.parametrize("name", ["adam_groups", "adam_amsgrad"])
def test_influences_through_the_adam_step(name):
    teacher, student, batch, quiz, opt = _case(name)
    ref = _reference_influences(teacher, student, batch, quiz, opt)
    scale = float(ref.abs().max())
    for hypergrad, tangent in (("exact", "jvp"), ("exact", "double_vjp"), ("autograd", "jvp")):
        got = _engine(teacher, student, batch, quiz, opt, hypergrad=hypergrad, compute_influence=True,
                      student_tangent=tangent).influences
        assert float((got - ref).abs().max()) <= 1e-10 * scale, (hypergrad, tangent)
    got = fastmeta.influence(teacher, student, batch, quiz, inner_lr=None, temperature=TAU, kd_weight=W,
                             student_optimizer=opt)
    assert float((got - ref).abs().max()) <= 1e-10 * scale


# --------------------------------------------------------------------------- arguments
def test_inner_steps_must_be_an_int():
    teacher, student, batch, quiz, opt = _case("adamw")
    for bad in (2.7, 2.0, True):
        with pytest.raises(TypeError, match="inner_steps"):
            _engine(teacher, student, batch, quiz, opt, inner_steps=bad)
    with pytest.raises(ValueError, match="inner_steps"):
        _engine(teacher, student, batch, quiz, opt, inner_steps=0)


@pytest.mark.parametrize("bad", [2.7, False])
def test_meta_step_inner_steps_must_be_an_int(bad):
    """meta_step used to run inner_steps=2.7 as 2 steps."""
    teacher, student, batch, quiz = setup(0)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.1)
    t_before, s_before = copy.deepcopy(teacher.state_dict()), copy.deepcopy(student.state_dict())
    with pytest.raises(TypeError, match="inner_steps"):
        fastmeta.meta_step(teacher, student, batch, quiz, t_opt, opt, inner_steps=bad)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_before.items())
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in s_before.items())
    assert not opt.state and not t_opt.state


def test_bad_pilot_options_name_the_argument():
    teacher, student, batch, quiz, opt = _case("adamw")
    with pytest.raises(ValueError, match="pilot must be one of"):
        _engine(teacher, student, batch, quiz, opt, pilot="adam")
    with pytest.raises(ValueError, match="adam_jacobian must be one of"):
        _engine(teacher, student, batch, quiz, opt, adam_jacobian="approx")
    with pytest.raises(ValueError, match="quiz_point must be one of"):
        _engine(teacher, student, batch, quiz, opt, quiz_point="exam")
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="pilot must be one of"):
        fastmeta.meta_step(teacher, student, batch, quiz, t_opt, opt, pilot="adam")


def test_unsupported_student_optimizer_and_pilot_sgd():
    teacher, student, batch, quiz = setup(0)
    opt = torch.optim.RMSprop(student.parameters(), lr=0.01)
    with pytest.raises(TypeError, match="student_optimizer.*pilot='sgd'"):
        _engine(teacher, student, batch, quiz, opt)
    got = _engine(teacher, student, batch, quiz, opt, pilot="sgd").teacher_grads
    ref = unrolled_meta_grad(teacher, student, batch, quiz, None, tau=TAU, w=W, inner_lr=0.01)
    assert rel_err(got, ref) <= 1e-10
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.1)
    before = copy.deepcopy((teacher.state_dict(), student.state_dict()))
    with pytest.raises(TypeError, match="student_optimizer"):
        fastmeta.meta_step(teacher, student, batch, quiz, t_opt, opt)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before[0].items())
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before[1].items())
    fastmeta.meta_step(teacher, student, batch, quiz, t_opt, opt, pilot="sgd")


@pytest.mark.parametrize("adam_jacobian", ["exact", "frozen_second_moment"])
def test_meta_step_commits_the_exact_meta_gradient_of_an_adam_student(adam_jacobian):
    """metadistil through meta_step: the teacher's SGD update is −lr_T times the reference meta-gradient."""
    teacher, student, batch, quiz, opt = _case("adam_groups")
    ref = unrolled_meta_grad(teacher, student, batch, quiz, opt, tau=TAU, w=W, steps=2,
                             frozen_second_moment=adam_jacobian != "exact")
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    t_opt = torch.optim.SGD(teacher.parameters(), lr=0.5)
    fastmeta.meta_step(teacher, student, batch, quiz, t_opt, opt, algorithm="metadistil", temperature=TAU,
                       kd_weight=W, inner_steps=2, adam_jacobian=adam_jacobian)
    step = {n: (before[n] - p.detach()) / 0.5 for n, p in teacher.named_parameters()}
    assert rel_err(step, ref) <= 1e-10


def _fp32_adamw_case():
    """The "adamw" case in float32 with a float32 AdamW student optimizer, warmed by 3 steps."""
    teacher, student, batch, quiz, _ = _case("adamw")
    teacher, student = teacher.float(), student.float()
    opt = torch.optim.AdamW(student.parameters(), lr=0.01, weight_decay=0.1)
    batch, quiz = (batch[0].float(), batch[1]), (quiz[0].float(), quiz[1])
    warm(student, opt, quiz, 3)
    return teacher, student, batch, quiz, opt


def test_double_vjp_tangent_under_bf16_autocast():
    """The kept graph ran under the caller's autocast: with jvp_precision='fp32' that is refused (nothing
    touched); with jvp_precision='autocast' it is the autocast tangent, close to the JVP's under autocast."""
    teacher, student, batch, quiz, opt = _fp32_adamw_case()
    before = [p.detach().clone() for p in list(teacher.parameters()) + list(student.parameters())]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="student_tangent='double_vjp'.*jvp_precision='autocast'"):
            _engine(teacher, student, batch, quiz, opt, student_tangent="double_vjp")
        got = _engine(teacher, student, batch, quiz, opt, student_tangent="double_vjp", jvp_precision="autocast")
        jvp = _engine(teacher, student, batch, quiz, opt, student_tangent="jvp", jvp_precision="autocast")
    assert all(torch.equal(p, b) for p, b in zip(list(teacher.parameters()) + list(student.parameters()), before))
    assert got.tangent_precision == "autocast bfloat16"
    ref = _engine(teacher.double(), student.double(), (batch[0].double(), batch[1]), (quiz[0].double(), quiz[1]),
                  _double_opt(student, opt)).teacher_grads
    err_got, err_jvp = rel_err(got.teacher_grads, ref), rel_err(jvp.teacher_grads, ref)
    # flash-attention's rule: within 2x the same-precision JVP's error (measured 4.7e-3 vs 4.4e-3)
    assert 0.0 < err_got <= 2 * err_jvp, (err_got, err_jvp)


def test_teacher_graph_recompute_under_bf16_autocast():
    """The replayed teacher forward runs under the caller's autocast, as the first one did (not under the
    tangent's fp32 context): the same meta-gradient as keeping the graph, bitwise on CPU."""
    teacher, student, batch, quiz, opt = _fp32_adamw_case()
    results = {}
    for graph in ("keep", "recompute"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[graph] = _engine(teacher, student, batch, quiz, opt, teacher_graph=graph)
        assert results[graph].tangent_precision == "fp32 (autocast off)"
    keep, recompute = results["keep"].teacher_grads, results["recompute"].teacher_grads
    assert sum(float(g.abs().sum()) for g in keep.values()) > 0.0
    assert all(torch.equal(keep[n], recompute[n]) for n in keep)


def _double_opt(student, opt):
    """A float64 AdamW with ``opt``'s hyper-parameters and (cast) state, over ``student``'s parameters."""
    out = torch.optim.AdamW(student.parameters(), **{k: v for k, v in opt.defaults.items() if k in ("lr", "weight_decay")})
    out.load_state_dict(opt.state_dict())
    for st in out.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and v.is_floating_point() and k != "step":
                st[k] = v.double()
    return out


def test_every_method_under_bf16_autocast_with_influences():
    """The caller's bf16 autocast: the trajectory's forwards stay under it, the student tangent runs in
    fp32 (``jvp_precision="fp32"``), for the reference path's influences too."""
    # warm state (_fp32_adamw_case): at Adam's first step the naive derivative ("autograd") cancels all of
    # fp32's digits (the true one is eps/(|g|+eps)², ~1e-8 of each term); "exact" is written without that
    # cancellation
    teacher, student, batch, quiz, opt = _fp32_adamw_case()
    results = {}
    for hypergrad in ("exact", "autograd", "finite_diff"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[hypergrad] = _engine(teacher, student, batch, quiz, opt, hypergrad=hypergrad,
                                         compute_influence=True)
        assert results[hypergrad].tangent_precision == "fp32 (autocast off)"
        assert all(torch.isfinite(g).all() for g in results[hypergrad].teacher_grads.values())
        assert bool(torch.isfinite(results[hypergrad].influences).all())
    exact, auto = results["exact"], results["autograd"]
    assert rel_err(auto.teacher_grads, exact.teacher_grads) <= 2e-2  # measured 6e-3 (bf16 forwards)
