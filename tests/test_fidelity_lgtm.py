"""LGTM against the official code (github:twinkle0331/LGTM @ e9b615f, ``utils_glue.py``) and its maths.

* ``influence_objective="official"`` is compared, over three steps in float64, with a
  literal transcription of the official teacher step written below (deep-copied
  student stepped by a copy of its optimizer, validation gradient, ``R = 0.01/‖v‖``,
  both models in eval mode, two perturbed teacher backwards, ``g = dalpha − lr·h``);
  ``"official_exact"`` with the same transcription where ``h`` is a double backward.
* ``"weighted"`` descends the quiz loss: positive cosine with the exact meta-gradient
  on random float64 cases (it was negative in every case before the sign fix).
* ``compute_influence`` is honoured, ``inner_steps > 1`` works for ``"mixed"`` and is
  refused (naming the option, nothing changed) where it cannot apply.

No reference reuses fastmeta code.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastmeta
from _fidelity_models import bert_batch, max_rel_diff, tiny_bert

TOL = 1e-10


# --------------------------------------------------------------------------- models and data
class MLP(torch.nn.Module):
    def __init__(self, width, seed, classes=3, inputs=5):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = torch.nn.Linear(inputs, width)
        self.fc2 = torch.nn.Linear(width, classes)
        self.modes = []  # the training flag seen by each forward

    def forward(self, x):
        self.modes.append(self.training)
        return self.fc2(torch.tanh(self.fc1(x)))


def mlp_batch(seed, size=8, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 5, generator=g, dtype=torch.float64), torch.randint(0, classes, (size,), generator=g)


def logits_of(model, batch):
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return model(batch[0])


def labels_of(batch):
    return batch["labels"] if isinstance(batch, dict) else batch[1]


def params(model):
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- the official code, transcribed
def cal_loss(s_logits, t_logits, temperature, tau_squared=False):
    """utils_glue.py:12-18 (KL(p_t ‖ p_s) of its two arguments, batch mean, no τ²); ``tau_squared``: fastmeta's scaling."""
    soft_labels = F.log_softmax(t_logits / temperature, dim=-1)
    log_prob = F.log_softmax(s_logits / temperature, dim=-1)
    loss = torch.mean(torch.sum(-torch.exp(soft_labels) * log_prob + torch.exp(soft_labels) * soft_labels, dim=-1))
    return loss * temperature**2 if tau_squared else loss


def official_step(T, S, optT, optS, batch, quiz, *, alpha_kd, t_alpha_kd, temperature, exact_h=False):
    """One LGTM step: ``LGTMTeacher.step`` (utils_glue.py:53-201), then run_glue.py:714-744."""
    tau2 = temperature != 1.0  # fastmeta keeps τ² in every KD term; the official has none (same at τ = 1)
    y = labels_of(batch)
    T.train(), S.train()
    t_logits, s_logits = logits_of(T, batch), logits_of(S, batch)
    student_loss = alpha_kd * cal_loss(s_logits, t_logits.detach(), temperature, tau2) + (1 - alpha_kd) * F.cross_entropy(s_logits, y)
    teacher_loss = t_alpha_kd * cal_loss(t_logits, s_logits.detach(), temperature, tau2) + (1 - t_alpha_kd) * F.cross_entropy(t_logits, y)
    dtheta = torch.autograd.grad(student_loss, params(S))
    # unrolled model: the student's optimizer's next step from a copy of its state (detached)
    unrolled = copy.deepcopy(S)
    opt_copy = type(optS)(unrolled.parameters(), lr=optS.defaults["lr"])
    opt_copy.load_state_dict(copy.deepcopy(optS.state_dict()))
    for p, g in zip(params(unrolled), dtheta):
        p.grad = g.clone()
    opt_copy.step()
    dalpha = torch.autograd.grad(teacher_loss, params(T))
    unrolled.train()
    unrolled_loss = F.cross_entropy(logits_of(unrolled, quiz), labels_of(quiz))
    vector = torch.autograd.grad(unrolled_loss, params(unrolled))
    # _hessian_vector_product
    R = 1e-2 / torch.cat([v.reshape(-1) for v in vector]).norm()
    T.eval(), S.eval()
    if exact_h:
        t_logits = logits_of(T, batch)
        kl = cal_loss(t_logits, logits_of(S, batch), temperature, tau2)  # student NOT detached: d/dθS
        g_s = torch.autograd.grad(kl, params(S), create_graph=True)
        dot = sum((a * b).sum() for a, b in zip(g_s, vector))
        h = [t_alpha_kd * t for t in torch.autograd.grad(dot, params(T))]
    else:
        t_outputs = logits_of(T, batch)
        with torch.no_grad():
            for p, v in zip(params(S), vector):
                p.add_(R * v)
        s_outputs = logits_of(S, batch)
        loss_x = t_alpha_kd * cal_loss(t_outputs, s_outputs.detach(), temperature, tau2) + (1 - t_alpha_kd) * F.cross_entropy(t_outputs, y)
        grads_p = torch.autograd.grad(loss_x, params(T))
        with torch.no_grad():
            for p, v in zip(params(S), vector):
                p.sub_(2 * R * v)
        t_outputs = logits_of(T, batch)
        s_outputs = logits_of(S, batch)
        loss_y = t_alpha_kd * cal_loss(t_outputs, s_outputs.detach(), temperature, tau2) + (1 - t_alpha_kd) * F.cross_entropy(t_outputs, y)
        grads_n = torch.autograd.grad(loss_y, params(T))
        with torch.no_grad():
            for p, v in zip(params(S), vector):
                p.add_(R * v)
        h = [(x - z) / (2 * R) for x, z in zip(grads_p, grads_n)]
    eta = optT.param_groups[0]["lr"]
    g_teacher = [d - eta * i for d, i in zip(dalpha, h)]
    optT.zero_grad(set_to_none=True)
    for p, g in zip(params(T), g_teacher):
        p.grad = g.detach().clone()
    optT.step()
    # the student's real step with the updated teacher (teacher eval, student train)
    T.eval(), S.train()
    with torch.no_grad():
        t_logits = logits_of(T, batch)
    s_logits = logits_of(S, batch)
    loss = alpha_kd * cal_loss(s_logits, t_logits, temperature, tau2) + (1 - alpha_kd) * F.cross_entropy(s_logits, y)
    optS.zero_grad(set_to_none=True)
    loss.backward()
    optS.step()
    influence_norm = float(torch.sqrt(sum((eta * i).square().sum() for i in h)))
    aux_norm = float(torch.sqrt(sum(d.square().sum() for d in dalpha)))
    return influence_norm, aux_norm


def make_opt(kind, model, lr):
    return {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind](model.parameters(), lr=lr)


@pytest.mark.parametrize(
    "objective,opt_t,opt_s,temperature",
    [
        ("official", "adamw", "adamw", 1.0),  # the official setting: AdamW both, τ = 1
        ("official", "sgd", "sgd", 1.0),  # SGD teacher: the influence term is not drowned by Adam's normalisation
        ("official", "sgd", "adam", 2.0),  # fastmeta's τ² convention at τ ≠ 1
        ("official_exact", "sgd", "sgd", 1.0),
        ("official_exact", "adamw", "adam", 2.0),
    ],
)
def test_official_objectives_match_transcription_of_official_code(objective, opt_t, opt_s, temperature):
    teacher, student = tiny_bert(2, seed=3), tiny_bert(1, seed=4)
    T_ref, S_ref = copy.deepcopy(teacher), copy.deepcopy(student)
    lr_t = 0.5 if opt_t == "sgd" else 1e-2
    lr_s = 0.3 if opt_s == "sgd" else 1e-2
    optT, optS = make_opt(opt_t, teacher, lr_t), make_opt(opt_s, student, lr_s)
    optT_ref, optS_ref = make_opt(opt_t, T_ref, lr_t), make_opt(opt_s, S_ref, lr_s)
    alpha_kd, t_alpha_kd = 0.7, 0.4
    for step in range(3):
        batch, quiz = bert_batch(10 + step), bert_batch(20 + step)
        fastmeta.meta_step(
            teacher, student, batch, quiz, optT, optS, algorithm="lgtm", influence_objective=objective,
            alpha=1 - t_alpha_kd, kd_weight=alpha_kd, temperature=temperature, kd_loss="kl",
        )
        influence, aux = official_step(
            T_ref, S_ref, optT_ref, optS_ref, batch, quiz, alpha_kd=alpha_kd, t_alpha_kd=t_alpha_kd,
            temperature=temperature, exact_h=objective == "official_exact",
        )
        if opt_t == "sgd":
            assert influence > 1e-3 * aux  # the influence term matters in this comparison
    assert max_rel_diff(teacher, T_ref) <= TOL
    assert max_rel_diff(student, S_ref) <= TOL
    assert max_rel_diff(teacher, tiny_bert(2, seed=3)) > 1e-4


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _influence_term(objective, teacher, student, batch, quiz, eta, temperature):
    """The influence term I of one LGTM step: teacher SGD(lr=1) and alpha=1, so θT moves by −(∇θT CE_T + I)."""
    T, S = copy.deepcopy(teacher), copy.deepcopy(student)
    optT, optS = torch.optim.SGD(T.parameters(), lr=1.0), torch.optim.SGD(S.parameters(), lr=eta)
    before = flat(T.parameters())
    fastmeta.meta_step(T, S, batch, quiz, optT, optS, algorithm="lgtm", influence_objective=objective, alpha=1.0,
                       temperature=temperature, kd_weight=0.5)
    T0 = copy.deepcopy(teacher)
    ce_grad = flat(torch.autograd.grad(F.cross_entropy(T0(batch[0]), batch[1]), list(T0.parameters())))
    return (before - flat(T.parameters())) - ce_grad


def _exact_meta_gradient(teacher, student, batch, quiz, eta, temperature, w=0.5):
    """∇θT CE(yq, S(xq; θS − η∇θS LS)) by double backward (test-side)."""
    x, y = batch
    zt, zs = teacher(x), student(x)
    log_pt, log_ps = torch.log_softmax(zt / temperature, -1), torch.log_softmax(zs / temperature, -1)
    kd = temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    ls = (1 - w) * F.cross_entropy(zs, y) + w * kd
    names = [n for n, _ in student.named_parameters()]
    g = torch.autograd.grad(ls, list(student.parameters()), create_graph=True)
    fast = {n: p - eta * gi for (n, p), gi in zip(student.named_parameters(), g)}
    lq = F.cross_entropy(torch.func.functional_call(student, fast, (quiz[0],)), quiz[1])
    del names
    return torch.cat([t.reshape(-1) for t in torch.autograd.grad(lq, list(teacher.parameters()))])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_weighted_influence_descends_the_quiz_loss(temperature):
    """Eq. 9 with the official code's sign: cos(I, ∇θT LQ) > 0 (it was < 0 in every case before the fix)."""
    eta = 0.1
    cosines = []
    for seed in range(12):
        teacher, student = MLP(6, seed=100 + seed).double(), MLP(4, seed=200 + seed).double()
        batch, quiz = mlp_batch(300 + seed), mlp_batch(400 + seed)
        meta = _exact_meta_gradient(teacher, student, batch, quiz, eta, temperature)
        weighted = _influence_term("weighted", teacher, student, batch, quiz, eta, temperature)
        mixed = _influence_term("mixed", teacher, student, batch, quiz, eta, temperature)
        torch.testing.assert_close(mixed, meta, rtol=1e-9, atol=1e-13)  # the harness reads I correctly
        cosines.append(float(F.cosine_similarity(weighted, meta, dim=0)))
    assert min(cosines) > 0.0, cosines


def test_official_exact_is_the_limit_of_the_official_difference():
    """The test's own central differences of ∇θT KD_T converge (O(ε²)) to official_exact's h; official = r 1e-2."""
    alpha, eta = 0.3, 0.2
    teacher, student = MLP(6, seed=1).double(), MLP(4, seed=2).double()
    batch, quiz = mlp_batch(3), mlp_batch(4)
    x, y = batch

    def teacher_after(objective):
        T, S = copy.deepcopy(teacher), copy.deepcopy(student)
        optT, optS = torch.optim.SGD(T.parameters(), lr=1.0), torch.optim.SGD(S.parameters(), lr=eta)
        fastmeta.meta_step(T, S, batch, quiz, optT, optS, algorithm="lgtm", influence_objective=objective, alpha=alpha)
        return flat(T.parameters())

    def kd_t(T, zs):  # KL(ps ‖ pt), the teacher's own KD term (τ = 1)
        lp_s, lp_t = torch.log_softmax(zs, -1), torch.log_softmax(T(x), -1)
        return (lp_s.exp() * (lp_s - lp_t)).sum(-1).mean()

    # ∇θT L_aux at θS, and v = ∇ CE(quiz) at the SGD pilot point (kd_weight 0.5, τ 1)
    T0, S0 = copy.deepcopy(teacher), copy.deepcopy(student)
    aux = alpha * F.cross_entropy(T0(x), y) + (1 - alpha) * kd_t(T0, S0(x).detach())
    aux_grad = flat(torch.autograd.grad(aux, list(T0.parameters())))
    zs = S0(x)
    ls = 0.5 * F.cross_entropy(zs, y) + 0.5 * F.kl_div(torch.log_softmax(zs, -1), torch.softmax(T0(x), -1).detach(), reduction="batchmean")
    with torch.no_grad():
        for p, g in zip(S0.parameters(), torch.autograd.grad(ls, list(S0.parameters()))):
            p.sub_(eta * g)
    v = torch.autograd.grad(F.cross_entropy(S0(quiz[0]), quiz[1]), list(S0.parameters()))
    norm = float(flat(v).norm())

    def h_fd(r):
        out = []
        for sign in (1.0, -1.0):
            S2, T2 = copy.deepcopy(student), copy.deepcopy(teacher)
            with torch.no_grad():
                for p, vi in zip(S2.parameters(), v):
                    p.add_(sign * (r / norm) * vi)
            out.append(flat(torch.autograd.grad(kd_t(T2, S2(x).detach()), list(T2.parameters()))))
        return (out[0] - out[1]) / (2 * r / norm)

    base = flat(teacher.parameters())
    # SGD(lr=1): θT_new = θT − (∇L_aux − 1·(1 − α)·h)
    h_exact = ((teacher_after("official_exact") - base) + aux_grad) / (1 - alpha)
    h_official = ((teacher_after("official") - base) + aux_grad) / (1 - alpha)
    scale = float(h_exact.norm())
    torch.testing.assert_close(h_official, h_fd(1e-2), rtol=0, atol=1e-9 * scale)
    errors = [float((h_fd(r) - h_exact).norm()) / scale for r in (1e-1, 1e-2, 1e-3)]
    assert errors[0] > 1e-7  # the difference is not exact at the official step ...
    assert errors[1] < errors[0] / 50 and errors[2] < errors[1] / 50, errors  # ... and converges to h_exact


# --------------------------------------------------------------------------- options
def _models(seed=1):
    teacher, student = MLP(6, seed=seed).double(), MLP(4, seed=seed + 1).double()
    optT = torch.optim.SGD(teacher.parameters(), lr=0.5)
    optS = torch.optim.SGD(student.parameters(), lr=0.2)
    return teacher, student, optT, optS


def _state(*objects):
    return [copy.deepcopy(o.state_dict()) for o in objects]


def _same_state(a, b):
    for x, y in zip(a, b):
        assert torch.testing.assert_close(x, y, rtol=0, atol=0) is None


def test_official_runs_its_difference_in_eval_mode_and_restores_modes():
    teacher, student, optT, optS = _models()
    student.fc1.eval()  # a submodule in eval under a module in train mode: both flags must come back
    fastmeta.meta_step(teacher, student, mlp_batch(1), mlp_batch(2), optT, optS, algorithm="lgtm",
                       influence_objective="official")
    assert False in teacher.modes and False in student.modes  # the perturbed forwards ran in eval mode
    assert teacher.modes[-1] and student.modes[-1]  # the real step ran in the caller's modes
    assert teacher.training and student.training and not student.fc1.training


def test_alpha_default_is_the_papers():
    results = []
    for options in ({}, {"alpha": 0.6}):
        teacher, student, optT, optS = _models()
        fastmeta.meta_step(teacher, student, mlp_batch(1), mlp_batch(2), optT, optS, algorithm="lgtm", **options)
        results.append(flat(teacher.parameters()))
    assert torch.equal(results[0], results[1])


def test_compute_influence_false_is_honoured():
    outs, teachers = [], []
    for flag in (True, False):
        teacher, student, optT, optS = _models()
        outs.append(fastmeta.meta_step(teacher, student, mlp_batch(1), mlp_batch(2), optT, optS, algorithm="lgtm",
                                       compute_influence=flag))
        teachers.append(flat(teacher.parameters()))
    assert outs[0].influences is not None and outs[0].influences.shape == (8,)
    assert outs[1].influences is None
    torch.testing.assert_close(teachers[0], teachers[1], rtol=1e-13, atol=1e-15)


def test_inner_steps_two_matches_double_backward_through_two_sgd_steps():
    eta, alpha, w = 0.2, 0.6, 0.5
    teacher, student, optT, optS = _models(seed=5)
    T0, S0 = copy.deepcopy(teacher), copy.deepcopy(student)
    (x, y), quiz = mlp_batch(7), mlp_batch(8)
    out = fastmeta.meta_step(teacher, student, (x, y), quiz, optT, optS, algorithm="lgtm", inner_steps=2)
    assert out.influences is None  # no influences for a trajectory: compute_influence defaults to False
    # reference: ∇θT LQ(θ2(θT)) by double backward, plus ∇θT L_aux
    names = [n for n, _ in S0.named_parameters()]
    theta = dict(S0.named_parameters())
    zt = T0(x)
    for _ in range(2):
        zs = torch.func.functional_call(S0, theta, (x,))
        kd = F.kl_div(torch.log_softmax(zs, -1), torch.log_softmax(zt, -1), log_target=True, reduction="batchmean")
        ls = (1 - w) * F.cross_entropy(zs, y) + w * kd
        grads = torch.autograd.grad(ls, [theta[n] for n in names], create_graph=True)
        theta = {n: theta[n] - eta * g for n, g in zip(names, grads)}
    lq = F.cross_entropy(torch.func.functional_call(S0, theta, (quiz[0],)), quiz[1])
    meta = torch.autograd.grad(lq, list(T0.parameters()), retain_graph=True)
    zs0 = S0(x).detach()
    lp_s, lp_t = torch.log_softmax(zs0, -1), torch.log_softmax(zt, -1)
    aux = alpha * F.cross_entropy(zt, y) + (1 - alpha) * (lp_s.exp() * (lp_s - lp_t)).sum(-1).mean()
    aux_grads = torch.autograd.grad(aux, list(T0.parameters()))
    expected = flat(p - 0.5 * (m + a) for p, m, a in zip(T0.parameters(), meta, aux_grads))
    torch.testing.assert_close(flat(teacher.parameters()), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"inner_steps": 2, "influence_objective": "weighted"}, ValueError, "inner_steps"),
        ({"inner_steps": 2, "influence_objective": "official"}, ValueError, "inner_steps"),
        ({"inner_steps": 2, "compute_influence": True}, ValueError, "inner_steps"),
        ({"influence_objective": "weighted", "compute_influence": False}, ValueError, "compute_influence"),
        ({"influence_objective": "official", "hypergrad": "finite_diff"}, ValueError, "hypergrad"),
        ({"influence_objective": "official_exact", "hypergrad": "autograd"}, ValueError, "hypergrad"),
        ({"influence_objective": "paper"}, ValueError, "influence_objective"),
        ({"compute_influence": "yes"}, TypeError, "compute_influence"),
        ({"alpha": "0.6"}, TypeError, "alpha"),
        ({"alpha": True}, TypeError, "alpha"),
        ({"alpha": 1.5}, ValueError, "alpha"),
    ],
)
def test_bad_options_raise_and_change_nothing(options, error, match):
    teacher, student, optT, optS = _models()
    fastmeta.meta_step(teacher, student, mlp_batch(1), mlp_batch(2), optT, optS, algorithm="lgtm")  # non-empty state
    before = _state(teacher, student, optT, optS)
    with pytest.raises(error, match=match):
        fastmeta.meta_step(teacher, student, mlp_batch(3), mlp_batch(4), optT, optS, algorithm="lgtm", **options)
    _same_state(before, _state(teacher, student, optT, optS))


def test_official_exact_token_level_shifted_and_masked():
    """Causal LM (shift_labels="auto"), ignored tokens: h = (1 − α)·∇θT⟨∇θS KD_T, v⟩ over the counted, shifted rows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2(seed, layers):
        torch.manual_seed(seed)
        config = GPT2Config(n_layer=layers, n_embd=16, n_head=2, vocab_size=30, n_positions=16, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
        return GPT2LMHeadModel(config).double()

    def lm_batch(seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 30, (3, 6), generator=g)
        labels = ids.clone()
        labels[0, 3:] = -100
        return {"input_ids": ids, "labels": labels}

    alpha, eta = 0.3, 0.2
    teacher, student = gpt2(1, 2), gpt2(2, 1)
    batch, quiz = lm_batch(3), lm_batch(4)
    T, S = copy.deepcopy(teacher), copy.deepcopy(student)
    fastmeta.meta_step(T, S, batch, quiz, torch.optim.SGD(T.parameters(), lr=1.0), torch.optim.SGD(S.parameters(), lr=eta),
                       algorithm="lgtm", influence_objective="official_exact", alpha=alpha)
    y = batch["labels"][:, 1:]
    keep = y != -100

    def shifted(model, b, params=None):
        out = model(b["input_ids"]) if params is None else torch.func.functional_call(model, params, (b["input_ids"],))
        return out.logits[:, :-1]

    def kl_rows(p_logits, q_logits):  # KL(p ‖ q) per row
        lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
        return (lp.exp() * (lp - lq)).sum(-1)

    zt, zs = shifted(teacher, batch), shifted(student, batch)
    ls = 0.5 * F.cross_entropy(zs[keep], y[keep]) + 0.5 * kl_rows(zt.detach(), zs)[keep].mean()
    grads = torch.autograd.grad(ls, list(student.parameters()))
    fast = {n: p - eta * g for (n, p), g in zip(student.named_parameters(), grads)}
    zq, yq = shifted(student, quiz, fast), quiz["labels"][:, 1:]
    v = torch.autograd.grad(F.cross_entropy(zq[yq != -100], yq[yq != -100]), list(fast.values()))
    # L_aux and h, both from the test's own graph
    aux = alpha * F.cross_entropy(zt[keep], y[keep]) + (1 - alpha) * kl_rows(zs.detach(), zt)[keep].mean()
    aux_grad = torch.autograd.grad(aux, list(teacher.parameters()), retain_graph=True)
    g_s = torch.autograd.grad(kl_rows(shifted(student, batch), zt)[keep].mean(), list(student.parameters()), create_graph=True)
    dot = sum((a * b).sum() for a, b in zip(g_s, v))
    h = torch.autograd.grad(dot, list(teacher.parameters()), allow_unused=True)
    h = [torch.zeros_like(p) if t is None else t for p, t in zip(teacher.parameters(), h)]
    assert float(flat(h).norm()) > 1e-2 * float(flat(aux_grad).norm())  # the influence term matters here
    expected = flat(p - (a - (1 - alpha) * t) for p, a, t in zip(teacher.parameters(), aux_grad, h))
    torch.testing.assert_close(flat(T.parameters()), expected, rtol=1e-11, atol=1e-13)
    assert float((flat(T.parameters()) - flat(teacher.parameters())).norm()) > 1e-3


@pytest.mark.parametrize("objective", ["mixed", "weighted"])
@pytest.mark.parametrize("hypergrad", ["exact", "finite_diff", "autograd"])
def test_mixed_and_weighted_take_their_loss_on_the_meta_gradients_teacher_forward(hypergrad, objective):
    """The teacher's objective rides on the meta-gradient's teacher backward: a step runs the teacher twice
    (the engine's forward, whose logits the student distils from, and the real student step's), as the
    official code computes ``t_logits`` once for the student's and the teacher's losses; ``teacher_loss`` is
    ``L_aux`` at the teacher before its update (written out here).  ``"weighted"``: the teacher steps along
    ``∇θT [L_aux − (1/B)·Σ_i w_i·ℓ_i]`` with the step's influences ``w_i`` held constant (written out here
    from ``out.influences``, which the per-sample reference of test_algorithms checks), and no meta term."""
    alpha, tau = 0.3, 2.0
    teacher, student, optT, optS = _models(seed=3)
    T0, S0 = copy.deepcopy(teacher), copy.deepcopy(student)
    (x, y), quiz = mlp_batch(5), mlp_batch(6)
    out = fastmeta.meta_step(teacher, student, (x, y), quiz, optT, optS, algorithm="lgtm", hypergrad=hypergrad,
                             alpha=alpha, temperature=tau, influence_objective=objective)
    assert len(teacher.modes) == 2
    zt, zs = T0(x), S0(x).detach()
    log_pt, log_ps = F.log_softmax(zt / tau, -1), F.log_softmax(zs / tau, -1)
    kd_t = tau**2 * (log_ps.exp() * (log_ps - log_pt)).sum(-1).mean()
    aux = alpha * F.cross_entropy(zt, y) + (1 - alpha) * kd_t
    torch.testing.assert_close(out.teacher_loss, aux.detach(), rtol=1e-12, atol=0)
    if objective == "weighted":
        rows = tau**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # ℓ_i = τ²·KL(pt ‖ ps), zs held constant
        assert float(out.influences.abs().max()) > 0
        objective_loss = aux - (out.influences.detach() * rows).sum() / rows.shape[0]
        grads = torch.autograd.grad(objective_loss, list(T0.parameters()), retain_graph=True)
        expected = flat(p - 0.5 * g for p, g in zip(T0.parameters(), grads))  # optT: SGD, lr 0.5
        torch.testing.assert_close(flat(teacher.parameters()), expected, rtol=1e-12, atol=1e-14)
        aux_only = flat(p - 0.5 * g for p, g in zip(T0.parameters(), torch.autograd.grad(aux, list(T0.parameters()))))
        assert float((flat(teacher.parameters()) - aux_only).abs().max()) > 1e-8  # the weighted term moved it


@pytest.mark.parametrize("objective", ["mixed", "weighted", "official_exact"])
def test_a_step_moves_the_teachers_batchnorm_statistics_once(objective):
    """Only the real student step's teacher forward updates the teacher's buffers: the meta-gradient's forward
    and the objectives' own teacher passes leave them as the step found them (as MetaDistil's step does)."""
    runs = []
    for algorithm, options in (("metadistil", {}), ("lgtm", {"influence_objective": objective})):
        torch.manual_seed(0)
        teacher = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3)).double()
        _, student, _, optS = _models()
        optT = torch.optim.SGD(teacher.parameters(), lr=0.5)
        fastmeta.meta_step(teacher, student, mlp_batch(1), mlp_batch(2), optT, optS, algorithm=algorithm, **options)
        runs.append(int(teacher[1].num_batches_tracked))
    assert runs == [1, 1]


@pytest.mark.parametrize("hypergrad", ["exact", "autograd"])
def test_a_teacher_without_trainable_parameters_still_steps_the_student(hypergrad):
    """Nothing of the teacher to update (as in MetaDistil): the student steps and ``teacher_loss`` is L_aux."""
    alpha, tau = 0.3, 2.0
    teacher, student, _, optS = _models(seed=4)
    for p in teacher.parameters():
        p.requires_grad_(False)
    optT = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.5)
    T0, S0 = copy.deepcopy(teacher), copy.deepcopy(student)
    (x, y), quiz = mlp_batch(5), mlp_batch(6)
    out = fastmeta.meta_step(teacher, student, (x, y), quiz, optT, optS, algorithm="lgtm", hypergrad=hypergrad,
                             alpha=alpha, temperature=tau)
    assert torch.equal(flat(teacher.parameters()), flat(T0.parameters()))
    assert not torch.equal(flat(student.parameters()), flat(S0.parameters()))
    zt, zs = T0(x), S0(x).detach()
    log_pt, log_ps = F.log_softmax(zt / tau, -1), F.log_softmax(zs / tau, -1)
    aux = alpha * F.cross_entropy(zt, y) + (1 - alpha) * tau**2 * (log_ps.exp() * (log_ps - log_pt)).sum(-1).mean()
    torch.testing.assert_close(out.teacher_loss, aux.detach(), rtol=1e-12, atol=0)
