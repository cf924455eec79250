"""Every ``meta_step`` algorithm against a plain, hand-written float64 reference of its paper.

The references below share no code with ``fastmeta``: each re-implements one
training step of the algorithm with ordinary autograd (double backward through a
``functional_call`` pilot step for the meta-gradients, per-sample autograd loops
for LGTM's influences, hand-written interpolation for Reptile) on deep copies of
the models, stepping the copies with their own ``torch.optim`` optimizers.  After
3 steps the parameters (and buffers) of both models must agree to 1e-9.

Each comparison runs on every device of ``conftest.DEVICES`` (the ``device`` fixture):
models, batches and references on that device, float64 throughout (CUDA has float64).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastmeta

TOL = 1e-9
TAU = 2.0
W = 0.6  # kd_weight


# --------------------------------------------------------------------------- models and batches
def tiny_bert(layers, attn="eager", seed=0, num_labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, num_labels=num_labels, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation=attn,
    )
    return BertForSequenceClassification(config).double()


def bert_batch(seed, size=4, length=7, num_labels=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (size, length), generator=g)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[0, -2:] = 0  # padding in one row
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, num_labels, (size,), generator=g)}


def tiny_gpt2(layers, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=30, n_embd=16, n_layer=layers, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )
    return GPT2LMHeadModel(config).double()


def lm_batch(seed, size=3, length=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30, (size, length), generator=g)
    labels = ids.clone()
    labels[0, 3:] = -100  # ignored tokens
    return {"input_ids": ids, "labels": labels}


class SmallCNN(torch.nn.Module):
    def __init__(self, width, seed, batch_norm=True):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(2, width, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(width) if batch_norm else torch.nn.Identity()
        self.head = torch.nn.Linear(width, 4)

    def forward(self, x):
        h = torch.tanh(self.norm(self.conv(x)))
        return self.head(h.mean(dim=(2, 3)))


def cnn_batch(seed, size=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(size, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (size,), generator=g))


def to_device(obj, device):
    """A model, a dict/tuple batch, or a list of them (None kept) on ``device`` (models move in place)."""
    if obj is None:
        return None
    if isinstance(obj, torch.nn.Module):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: v.to(device) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(t.to(device) for t in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    return obj.to(device)


# --------------------------------------------------------------------------- reference math (independent)
def ref_split(batch):
    if isinstance(batch, dict):
        return (), {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    inputs, labels = batch
    return (inputs,), {}, labels


def ref_logits(model, batch, params=None, shift=False):
    args, kwargs, labels = ref_split(batch)
    if params is None:
        out = model(*args, **kwargs)
    else:
        out = torch.func.functional_call(model, params, args, kwargs)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    if shift:
        return logits[:, :-1], labels[:, 1:]
    return logits, labels


def ref_kl_rows(zs, zt, tau=TAU):
    """τ²·KL(pt ‖ ps) per row."""
    log_ps = torch.log_softmax(zs / tau, -1)
    log_pt = torch.log_softmax(zt / tau, -1)
    return tau**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def ref_kd(zs, zt, labels, tau=TAU):
    mask = labels != -100
    return ref_kl_rows(zs, zt, tau)[mask].mean()


def ref_ce(z, labels):
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1), ignore_index=-100)


def ref_ls(zs, zt, labels, w=W):
    return (1 - w) * ref_ce(zs, labels) + w * ref_kd(zs, zt, labels)


def trainable_dict(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def set_grads_and_step(opt, model, grads):
    opt.zero_grad(set_to_none=True)
    for (n, p) in trainable_dict(model).items():
        g = grads.get(n)
        p.grad = None if g is None else g.detach().clone()
    opt.step()


def ref_student_step(T, S, optS, batch, shift=False):
    with torch.no_grad():
        zt, _ = ref_logits(T, batch, shift=shift)
    zs, y = ref_logits(S, batch, shift=shift)
    loss = ref_ls(zs, zt, y)
    optS.zero_grad(set_to_none=True)
    loss.backward()
    optS.step()
    return loss.detach()


def ref_meta_gradient(T, S, batch, quiz, eta, shift=False):
    """∇θT CE(yq, S(xq; θS − η∇θS LS)) by double backward (SGD pilot)."""
    sp = trainable_dict(S)
    zt, y = ref_logits(T, batch, shift=shift)
    zs, _ = ref_logits(S, batch, shift=shift)
    ls = ref_ls(zs, zt, y)
    g = torch.autograd.grad(ls, list(sp.values()), create_graph=True)
    fast = {n: p - eta * gi for (n, p), gi in zip(sp.items(), g)}
    zq, yq = ref_logits(S, quiz, params=fast, shift=shift)
    lq = ref_ce(zq, yq)
    tp = trainable_dict(T)
    tg = torch.autograd.grad(lq, list(tp.values()), allow_unused=True)
    return {n: gi for n, gi in zip(tp, tg)}, {n: gi.detach() for n, gi in zip(sp, g)}, fast


def ref_metadistil(T, S, optT, optS, batch, quiz, eta, shift=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        tg, _, _ = ref_meta_gradient(T, S, batch, quiz, eta, shift)
    set_grads_and_step(optT, T, tg)
    ref_student_step(T, S, optS, batch, shift)


def ref_lgtm(T, S, optT, optS, batch, quiz, eta, alpha, weighted):
    """LGTM Algorithm 1 with per-sample autograd (B double backwards) for the influence term."""
    sp, tp = trainable_dict(S), trainable_dict(T)
    # pilot (SGD) and the validation gradient g at θS'
    _, g_pilot, fast = ref_meta_gradient(T, S, batch, quiz, eta)
    fast = {n: v.detach() for n, v in fast.items()}
    fast_req = {n: v.clone().requires_grad_(True) for n, v in fast.items()}
    zq, yq = ref_logits(S, quiz, params=fast_req)
    g_val = torch.autograd.grad(ref_ce(zq, yq), list(fast_req.values()))
    zt, y = ref_logits(T, batch)
    zs, _ = ref_logits(S, batch)
    B = y.shape[0]
    influence = {n: torch.zeros_like(p) for n, p in tp.items()}
    ws = []
    for i in range(B):
        li = ref_kl_rows(zs[i : i + 1], zt[i : i + 1]).sum()
        gi = torch.autograd.grad(li, list(sp.values()), create_graph=True)
        dot = sum((a * b).sum() for a, b in zip(gi, g_val))
        ws.append(dot.detach())
        if not weighted:
            # ∇θT LQ(θS'(θT)) = −η·w·(1/B)·Σ_i ∇θT ⟨∇θS ℓ_i, g⟩
            ti = torch.autograd.grad(dot, list(tp.values()), retain_graph=True)
            for (n, _), t in zip(tp.items(), ti):
                influence[n] += -eta * W / B * t
    if weighted:
        zs_d = zs.detach()
        # Eq. 9 with the official code's sign: −(1/B)·Σ_i w_i·∇θT ℓ_i (descends the quiz loss)
        objective = sum(ws[i] * ref_kl_rows(zs_d[i : i + 1], zt[i : i + 1]).sum() for i in range(B)) / B
        ti = torch.autograd.grad(objective, list(tp.values()), retain_graph=True)
        for (n, _), t in zip(tp.items(), ti):
            influence[n] -= t
    # teacher auxiliary loss: α·CE(y, T(x)) + (1 − α)·τ²·mean KL(ps ‖ pt), student detached
    log_pt = torch.log_softmax(zt / TAU, -1)
    log_ps = torch.log_softmax(zs.detach() / TAU, -1)
    kd_t = TAU**2 * (log_ps.exp() * (log_ps - log_pt)).sum(-1).mean()
    aux = alpha * F.cross_entropy(zt, y) + (1 - alpha) * kd_t
    ag = torch.autograd.grad(aux, list(tp.values()))
    grads = {n: a + influence[n] for n, a in zip(tp, ag)}
    set_grads_and_step(optT, T, grads)
    ref_student_step(T, S, optS, batch)
    return torch.stack(ws)


def ref_reptile(T, S, optT, optS, batch, eta, pairs):
    """pairs: {teacher name: [student names]} written by hand; teacher SGD."""
    with torch.no_grad():
        zt, y = ref_logits(T, batch)
    zs, _ = ref_logits(S, batch)
    sp = trainable_dict(S)
    g = torch.autograd.grad(ref_ls(zs, zt, y), list(sp.values()))
    # pilot: a deep copy of the student stepped by a copy of its optimizer at lr = eta
    S_copy = copy.deepcopy(S)
    opt_copy = type(optS)(S_copy.parameters(), **{k: v for k, v in optS.defaults.items()})
    opt_copy.load_state_dict(copy.deepcopy(optS.state_dict()))
    for group in opt_copy.param_groups:
        group["lr"] = eta
    for (n, p), gi in zip(trainable_dict(S_copy).items(), g):
        p.grad = gi.clone()
    opt_copy.step()
    pilot = {n: p.detach() for n, p in trainable_dict(S_copy).items()}
    lr_t = optT.param_groups[0]["lr"]
    with torch.no_grad():
        for t_name, p in trainable_dict(T).items():
            sources = pairs.get(t_name)
            if sources:
                target = sum(pilot[s] for s in sources) / len(sources)
                p.add_(lr_t * (target - p))  # Reptile interpolation θT ← θT + ε(θS' − θT)
    ref_student_step(T, S, optS, batch)


def ref_ikd(T, S, optT, optS, batch, quiz, eta, first_order, shift=False):
    """IKD: course step and exam step from the same (θS, θT), committed together.

    exact: Eq. 13, ∇θT LQ(θS − η∇LS(θT)); first_order: Eq. 14, the exam gradient v at the
    CURRENT student, −η·∇θT⟨∇θS LS, v⟩ (only LS's KD term depends on θT).
    """
    if not first_order:
        tg, g, _ = ref_meta_gradient(T, S, batch, quiz, eta, shift)
        set_grads_and_step(optS, S, g)
        set_grads_and_step(optT, T, tg)
        return
    sp, tp = trainable_dict(S), trainable_dict(T)
    zt, y = ref_logits(T, batch, shift=shift)
    zs, _ = ref_logits(S, batch, shift=shift)
    g = torch.autograd.grad(ref_ls(zs, zt, y), list(sp.values()), create_graph=True)
    zq, yq = ref_logits(S, quiz, shift=shift)
    v = torch.autograd.grad(ref_ce(zq, yq), list(sp.values()))
    tg = torch.autograd.grad(-eta * sum((gi * vi).sum() for gi, vi in zip(g, v)), list(tp.values()), allow_unused=True)
    set_grads_and_step(optS, S, {n: gi.detach() for n, gi in zip(sp, g)})
    set_grads_and_step(optT, T, dict(zip(tp, tg)))


# --------------------------------------------------------------------------- harness
def make_optimizer(kind, model, lr):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if kind == "momentum":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.01)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    raise ValueError(kind)


def max_rel_diff(model_a, model_b, exact_ints=True):
    worst = 0.0
    for (na, a), (nb, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert na == nb
        if a.is_floating_point():
            assert torch.isfinite(a).all(), na
            diff = float((a - b).abs().max()) / max(1.0, float(b.abs().max()))
            worst = max(worst, diff)
        elif exact_ints:
            assert torch.equal(a, b), na
    return worst


def run_both(teacher, student, opt_kinds, lrs, batches, quizzes, fast_kwargs, reference, steps=3, device="cpu"):
    teacher, student = to_device(teacher, device), to_device(student, device)  # in place: the caller's modules move
    batches, quizzes = to_device(list(batches), device), to_device(list(quizzes), device)
    T_ref, S_ref = copy.deepcopy(teacher), copy.deepcopy(student)
    T_init, S_init = copy.deepcopy(teacher), copy.deepcopy(student)
    optT = make_optimizer(opt_kinds[0], teacher, lrs[0])
    optS = make_optimizer(opt_kinds[1], student, lrs[1])
    optT_ref = make_optimizer(opt_kinds[0], T_ref, lrs[0])
    optS_ref = make_optimizer(opt_kinds[1], S_ref, lrs[1])
    outputs = []
    for step in range(steps):
        out = fastmeta.meta_step(
            teacher, student, batches[step], quizzes[step], optT, optS,
            temperature=TAU, kd_weight=W, **fast_kwargs,
        )
        outputs.append(out)
        reference(T_ref, S_ref, optT_ref, optS_ref, batches[step], quizzes[step])
    assert max_rel_diff(student, S_ref) <= TOL
    assert max_rel_diff(teacher, T_ref) <= TOL
    # the comparison is not vacuous: the student always moved, the teacher whenever the algorithm updates it
    assert max_rel_diff(student, S_init, False) > 1e-6
    if any(o.teacher_updated for o in outputs):
        assert max_rel_diff(teacher, T_init, False) > 1e-6
    return outputs


def bert_data(num_labels=3):
    return [bert_batch(10 + i, num_labels=num_labels) for i in range(3)], [bert_batch(20 + i, num_labels=num_labels) for i in range(3)]


# --------------------------------------------------------------------------- kd
@pytest.mark.parametrize("student_opt", ["sgd", "adam"])
@pytest.mark.parametrize("teacher_ce", [False, True])
def test_kd_matches_reference(student_opt, teacher_ce, device):
    teacher, student = tiny_bert(2, seed=1), tiny_bert(1, seed=2)
    batches, _ = bert_data()

    def reference(T, S, optT, optS, batch, quiz):
        zt, y = ref_logits(T, batch)
        if teacher_ce:
            ce_t = F.cross_entropy(zt, y)
            gt = torch.autograd.grad(ce_t, list(trainable_dict(T).values()))
            zt = zt.detach()
        else:
            zt = zt.detach()
        zs, _ = ref_logits(S, batch)
        loss = ref_ls(zs, zt, y)
        optS.zero_grad(set_to_none=True)
        loss.backward()
        optS.step()
        if teacher_ce:
            set_grads_and_step(optT, T, dict(zip(trainable_dict(T), gt)))

    outs = run_both(teacher, student, ("sgd", student_opt), (0.05, 0.01 if student_opt == "adam" else 0.1),
                    batches, [None] * 3, {"algorithm": "kd", "teacher_ce": teacher_ce}, reference, device=device)
    assert outs[0].teacher_updated is teacher_ce and outs[0].quiz_loss is None
    assert (outs[0].teacher_loss is not None) is teacher_ce


def test_kd_cnn_batchnorm_train_mode(device):
    teacher, student = SmallCNN(6, 1), SmallCNN(3, 2)
    teacher.double(), student.double()
    batches = [cnn_batch(30 + i) for i in range(3)]

    def reference(T, S, optT, optS, batch, quiz):
        ref_student_step(T, S, optS, batch)

    run_both(teacher, student, ("sgd", "momentum"), (0.1, 0.1), batches, [None] * 3, {"algorithm": "kd"}, reference,
             device=device)
    assert teacher.training and student.training


# --------------------------------------------------------------------------- metadistil
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_metadistil_bert_matches_double_backward_reference(attn, device):
    teacher, student = tiny_bert(2, attn, seed=1), tiny_bert(1, attn, seed=2)
    batches, quizzes = bert_data()
    eta = 0.3

    def reference(T, S, optT, optS, batch, quiz):
        ref_metadistil(T, S, optT, optS, batch, quiz, eta)

    outs = run_both(teacher, student, ("adam", "sgd"), (0.01, eta), batches, quizzes,
                    {"algorithm": "metadistil", "hypergrad": "exact"}, reference, device=device)
    assert all(o.teacher_updated and o.quiz_loss is not None for o in outs)
    assert "meta_gradient" in outs[0].timings and "total" in outs[0].timings


def test_metadistil_gpt2_token_level_shift_labels(device):
    teacher, student = tiny_gpt2(2, seed=1), tiny_gpt2(1, seed=2)
    batches = [lm_batch(40 + i) for i in range(3)]
    quizzes = [lm_batch(50 + i) for i in range(3)]
    eta = 0.5

    def reference(T, S, optT, optS, batch, quiz):
        ref_metadistil(T, S, optT, optS, batch, quiz, eta, shift=True)

    run_both(teacher, student, ("sgd", "sgd"), (0.2, eta), batches, quizzes,
             {"algorithm": "metadistil", "shift_labels": True}, reference, device=device)


def test_metadistil_cnn_eval_mode_frozen_parameter(device):
    teacher, student = SmallCNN(6, 1), SmallCNN(3, 2)
    teacher.double().eval().to(device), student.double().eval().to(device)
    teacher.conv.bias.requires_grad_(False)
    student.conv.bias.requires_grad_(False)
    batches = [cnn_batch(60 + i) for i in range(3)]
    quizzes = [cnn_batch(70 + i) for i in range(3)]
    frozen_t, frozen_s = teacher.conv.bias.detach().clone(), student.conv.bias.detach().clone()

    def reference(T, S, optT, optS, batch, quiz):
        ref_metadistil(T, S, optT, optS, batch, quiz, 0.4)

    run_both(teacher, student, ("sgd", "sgd"), (0.2, 0.4), batches, quizzes, {"algorithm": "metadistil"}, reference,
             device=device)
    assert torch.equal(teacher.conv.bias, frozen_t) and torch.equal(student.conv.bias, frozen_s)
    assert not teacher.training and not student.training


def ref_adam_pilot_meta_gradient(T, S, optS, batch, quiz, frozen_second_moment=False):
    """MetaDistil's meta-gradient through ONE Adam step of the student, written out by hand.

    θ' = θ − lr·m̂'/(sqrt(ŝ')+eps) with m' = β1·m + (1−β1)·g, s' = β2·s + (1−β2)·g²: the value is Adam's
    next step, differentiated exactly; ``frozen_second_moment``: s' held constant in the derivative
    (the engine's ``adam_jacobian="frozen_second_moment"`` approximation).
    """
    group = optS.param_groups[0]
    beta1, beta2 = group["betas"]
    lr, eps = group["lr"], group["eps"]
    sp = trainable_dict(S)
    zt, y = ref_logits(T, batch)
    zs, _ = ref_logits(S, batch)
    g = torch.autograd.grad(ref_ls(zs, zt, y), list(sp.values()), create_graph=True)
    fast = {}
    for (n, p), gi in zip(sp.items(), g):
        state = optS.state.get(p, {})
        t = int(state["step"]) + 1 if state else 1
        m = state["exp_avg"] if state else torch.zeros_like(p)
        v = state["exp_avg_sq"] if state else torch.zeros_like(p)
        m_new = beta1 * m + (1 - beta1) * gi
        v_new = beta2 * v + (1 - beta2) * gi * gi
        if frozen_second_moment:
            v_new = v_new.detach()
        denom = (v_new / (1 - beta2**t)).sqrt() + eps
        fast[n] = p - lr * (m_new / (1 - beta1**t)) / denom
    zq, yq = ref_logits(S, quiz, params=fast)
    tp = trainable_dict(T)
    return dict(zip(tp, torch.autograd.grad(ref_ce(zq, yq), list(tp.values()))))


@pytest.mark.parametrize("adam_jacobian", ["exact", "frozen_second_moment"])
def test_metadistil_adam_student_matches_hand_written_adam_pilot(adam_jacobian, device):
    teacher, student = tiny_bert(2, seed=1), tiny_bert(1, seed=2)
    batches, quizzes = bert_data()
    frozen = adam_jacobian == "frozen_second_moment"

    def reference(T, S, optT, optS, batch, quiz):
        set_grads_and_step(optT, T, ref_adam_pilot_meta_gradient(T, S, optS, batch, quiz, frozen))
        ref_student_step(T, S, optS, batch)

    run_both(teacher, student, ("sgd", "adam"), (0.5, 0.02), batches, quizzes,
             {"algorithm": "metadistil", "adam_jacobian": adam_jacobian}, reference, device=device)


@pytest.mark.parametrize("algorithm", ["metadistil", "lgtm"])
def test_finite_diff_float32_close_to_exact(algorithm, device):
    """hypergrad='finite_diff' (LGTM's ε = 0.01/‖v‖ central difference) vs 'exact', float32, one step."""
    results = {}
    for hypergrad in ("exact", "finite_diff"):
        teacher, student = tiny_bert(2, seed=11).float().to(device), tiny_bert(1, seed=12).float().to(device)
        optT = torch.optim.SGD(teacher.parameters(), lr=1.0)
        optS = torch.optim.SGD(student.parameters(), lr=0.5)
        before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
        fastmeta.meta_step(teacher, student, to_device(bert_batch(1), device), to_device(bert_batch(2), device), optT,
                           optS, algorithm=algorithm, hypergrad=hypergrad, temperature=TAU, kd_weight=W)
        results[hypergrad] = torch.cat([(before[n] - p.detach()).flatten() for n, p in teacher.named_parameters()])
    exact, fd = results["exact"], results["finite_diff"]
    assert exact.norm() > 0
    error = float((fd - exact).norm() / exact.norm())
    assert error <= 1e-3


def _rows(kind, zs, zt, tau=TAU):
    """Per-row KD losses of the four kinds, written out (τ² scaling as documented in fastmeta.losses)."""
    log_ps, log_pt = torch.log_softmax(zs / tau, -1), torch.log_softmax(zt / tau, -1)
    if kind == "kl":
        return tau**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if kind == "reverse_kl":
        return tau**2 * (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    if kind == "softmax_mse":
        return tau**2 * (log_ps.exp() - log_pt.exp()).square().mean(-1)
    return (zs - zt).square().mean(-1)


@pytest.mark.parametrize("kind", ["reverse_kl", "softmax_mse", "logit_mse"])
def test_metadistil_other_kd_kinds_cnn(kind, monkeypatch, device):
    """kd_loss passes through to LS (pilot and real step); reference with the kind's own formula."""
    teacher, student = SmallCNN(6, 1, batch_norm=False).double(), SmallCNN(3, 2, batch_norm=False).double()
    batches = [cnn_batch(100 + i) for i in range(3)]
    quizzes = [cnn_batch(110 + i) for i in range(3)]
    eta = 0.4
    monkeypatch.setitem(globals(), "ref_kd", lambda zs, zt, labels, tau=TAU: _rows(kind, zs, zt, tau)[labels != -100].mean())

    def reference(T, S, optT, optS, batch, quiz):
        ref_metadistil(T, S, optT, optS, batch, quiz, eta)

    run_both(teacher, student, ("sgd", "sgd"), (0.3, eta), batches, quizzes,
             {"algorithm": "metadistil", "kd_loss": kind}, reference, device=device)


def test_param_groups_with_their_own_lrs_and_inner_lr_none(device):
    """inner_lr=None: each student parameter's pilot step uses its param group's lr (engine and reptile)."""
    teacher, student = tiny_bert(2, seed=1).to(device), tiny_bert(1, seed=2).to(device)
    batches, quizzes = (to_device(b, device) for b in bert_data())
    head = [p for n, p in student.named_parameters() if n.startswith("classifier")]
    body = [p for n, p in student.named_parameters() if not n.startswith("classifier")]

    def two_groups(model):
        named = dict(model.named_parameters())
        return torch.optim.SGD([
            {"params": [p for n, p in named.items() if not n.startswith("classifier")], "lr": 0.2},
            {"params": [p for n, p in named.items() if n.startswith("classifier")], "lr": 0.6},
        ])

    T_ref, S_ref = copy.deepcopy(teacher), copy.deepcopy(student)
    optT, optS = torch.optim.SGD(teacher.parameters(), lr=0.3), two_groups(student)
    optT_ref, optS_ref = torch.optim.SGD(T_ref.parameters(), lr=0.3), two_groups(S_ref)
    assert head and body
    for step in range(2):
        fastmeta.meta_step(teacher, student, batches[step], quizzes[step], optT, optS, algorithm="metadistil",
                           temperature=TAU, kd_weight=W)
        # reference: pilot θS' = θS − lr_group·g by hand
        sp = trainable_dict(S_ref)
        lr_of = {n: (0.6 if n.startswith("classifier") else 0.2) for n in sp}
        zt, y = ref_logits(T_ref, batches[step])
        zs, _ = ref_logits(S_ref, batches[step])
        g = torch.autograd.grad(ref_ls(zs, zt, y), list(sp.values()), create_graph=True)
        fast = {n: p - lr_of[n] * gi for (n, p), gi in zip(sp.items(), g)}
        zq, yq = ref_logits(S_ref, quizzes[step], params=fast)
        tp = trainable_dict(T_ref)
        set_grads_and_step(optT_ref, T_ref, dict(zip(tp, torch.autograd.grad(ref_ce(zq, yq), list(tp.values())))))
        ref_student_step(T_ref, S_ref, optS_ref, batches[step])
    assert max_rel_diff(teacher, T_ref) <= TOL and max_rel_diff(student, S_ref) <= TOL


# --------------------------------------------------------------------------- lgtm
@pytest.mark.parametrize("hypergrad", ["exact", "autograd"])
@pytest.mark.parametrize("objective", ["mixed", "weighted"])
def test_lgtm_matches_per_sample_reference(objective, hypergrad, device):
    teacher, student = tiny_bert(2, seed=3), tiny_bert(1, seed=4)
    batches, quizzes = bert_data()
    eta, alpha = 0.3, 0.3
    ref_influences = []

    def reference(T, S, optT, optS, batch, quiz):
        ref_influences.append(ref_lgtm(T, S, optT, optS, batch, quiz, eta, alpha, objective == "weighted"))

    outs = run_both(teacher, student, ("sgd", "sgd"), (0.1, eta), batches, quizzes,
                    {"algorithm": "lgtm", "alpha": alpha, "influence_objective": objective, "hypergrad": hypergrad},
                    reference,
                    device=device)
    for out, ref in zip(outs, ref_influences):
        assert out.influences.shape == (4,)
        torch.testing.assert_close(out.influences, ref, rtol=1e-9, atol=1e-12)
        assert out.teacher_loss is not None


# --------------------------------------------------------------------------- reptile
def _bert_pairs(teacher, student, strategy, lt, ls):
    """Hand-written mapping {teacher name: [student names]} for BERT layers + shared non-layer params."""
    targets = {
        "first": lambda i: [i], "last": lambda i: [i + lt - ls], "skip": lambda i: [2 * i + 1],
        "both": lambda i: [2 * i, 2 * i + 1],
    }[strategy]
    pairs = {}
    t_names = set(trainable_dict(teacher))
    for s_name in trainable_dict(student):
        if s_name.startswith("bert.encoder.layer."):
            i = int(s_name.split(".")[3])
            rest = ".".join(s_name.split(".")[4:])
            for j in targets(i):
                pairs.setdefault(f"bert.encoder.layer.{j}.{rest}", []).append(s_name)
        elif s_name in t_names:
            pairs.setdefault(s_name, []).append(s_name)
    return pairs


@pytest.mark.parametrize("strategy,student_opt", [("first", "sgd"), ("last", "adam"), ("skip", "sgd"), ("both", "momentum")])
def test_reptile_layerwise_matches_hand_interpolation(strategy, student_opt, device):
    teacher, student = tiny_bert(4, seed=5), tiny_bert(2, seed=6)
    pairs = _bert_pairs(teacher, student, strategy, 4, 2)
    batches, _ = bert_data()
    eta = 0.01 if student_opt == "adam" else 0.2

    def reference(T, S, optT, optS, batch, quiz):
        ref_reptile(T, S, optT, optS, batch, eta, pairs)

    outs = run_both(teacher, student, ("sgd", student_opt), (0.3, eta if student_opt != "momentum" else 0.1),
                    batches, [None] * 3,
                    {"algorithm": "reptile", "hypergrad": "first_order", "layer_strategy": strategy, "inner_lr": eta},
                    reference, device=device)
    assert outs[0].teacher_loss > 0


def test_reptile_user_mapping_and_strategy_errors(device):
    teacher, student = tiny_bert(2, seed=5).to(device), tiny_bert(1, seed=6).to(device)
    name = "bert.encoder.layer.0.output.dense.weight"
    mapping = {name: ["bert.encoder.layer.0.output.dense.weight", "bert.encoder.layer.1.output.dense.weight"]}
    batch = to_device(bert_batch(1), device)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    optT = torch.optim.SGD(teacher.parameters(), lr=0.5)
    optS = torch.optim.SGD(student.parameters(), lr=0.1)
    fastmeta.meta_step(teacher, student, batch, None, optT, optS, algorithm="reptile", layer_mapping=mapping)
    changed = {n for n, p in teacher.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(mapping[name])
    t2, s2 = tiny_bert(2, seed=1).to(device), tiny_bert(2, seed=2).to(device)
    opt_t2, opt_s2 = torch.optim.SGD(t2.parameters(), lr=0.1), torch.optim.SGD(s2.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="teacher has 2 layers"):
        fastmeta.meta_step(t2, s2, batch, None, opt_t2, opt_s2, algorithm="reptile", layer_strategy="skip")


# --------------------------------------------------------------------------- ikd
@pytest.mark.parametrize("hypergrad", ["exact", "first_order"])
def test_ikd_matches_reference(hypergrad, device):
    teacher, student = tiny_bert(2, seed=7), tiny_bert(1, seed=8)
    batches, quizzes = bert_data()
    eta = 0.3

    def reference(T, S, optT, optS, batch, quiz):
        ref_ikd(T, S, optT, optS, batch, quiz, eta, hypergrad == "first_order")

    outs = run_both(teacher, student, ("sgd", "sgd"), (0.2, eta), batches, quizzes,
                    {"algorithm": "ikd", "hypergrad": hypergrad}, reference, device=device)
    assert outs[0].quiz_loss is not None


def test_ikd_first_order_gpt2_token_level(device):
    teacher, student = tiny_gpt2(2, seed=1), tiny_gpt2(1, seed=2)
    batches = [lm_batch(80 + i) for i in range(3)]
    quizzes = [lm_batch(90 + i) for i in range(3)]
    eta = 0.5

    def reference(T, S, optT, optS, batch, quiz):
        ref_ikd(T, S, optT, optS, batch, quiz, eta, first_order=True, shift=True)

    run_both(teacher, student, ("sgd", "sgd"), (0.3, eta), batches, quizzes,
             {"algorithm": "ikd", "hypergrad": "first_order", "shift_labels": True}, reference, device=device)


# --------------------------------------------------------------------------- hypergrad validation (argument checks: CPU only)
@pytest.mark.parametrize("algorithm", ["kd", "metadistil", "lgtm"])
def test_first_order_rejected_outside_reptile_ikd(algorithm):
    teacher, student = tiny_bert(1, seed=1), tiny_bert(1, seed=2)
    optT = torch.optim.SGD(teacher.parameters(), lr=0.1)
    optS = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="first_order"):
        fastmeta.meta_step(teacher, student, bert_batch(1), bert_batch(2), optT, optS,
                           algorithm=algorithm, hypergrad="first_order")


@pytest.mark.parametrize("hypergrad", ["finite_diff", "autograd"])
def test_reptile_rejects_second_order_hypergrads(hypergrad):
    teacher, student = tiny_bert(1, seed=1), tiny_bert(1, seed=2)
    optT = torch.optim.SGD(teacher.parameters(), lr=0.1)
    optS = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="reptile"):
        fastmeta.meta_step(teacher, student, bert_batch(1), None, optT, optS, algorithm="reptile", hypergrad=hypergrad)
