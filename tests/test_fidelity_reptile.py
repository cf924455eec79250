"""ReptileDistil against a transcription of the official code (github:maxinge8698/ReptileDistil @ 8f914d9,
``run_glue_with_reptile.py:190-422``), float64, three steps.

The official step: a deep copy of the student takes ONE step of a brand-new transformers
AdamW (zero state, base lr, fresh linear schedule without warm-up) after clipping its
gradient to norm ``max_grad_norm``; every mapped teacher parameter gets the gradient
``θT − θS'`` (layer strategy skip: student layer i → teacher layer 2i+1, other parameters
by name), clipped, and a persistent teacher AdamW steps; the student then takes its real
step with the updated teacher, clipped too.  fastmeta reproduces it with
``pilot_optimizer="fresh_adamw", pilot_max_grad_norm=c, max_grad_norm=c,
layer_strategy="skip", temperature=5``.  The transformers AdamW step is written out
below from its algorithm (transformers 4.12 ``AdamW.step``), not taken from fastmeta.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import fastmeta
from _fidelity_models import bert_batch, tiny_bert

TOL = 1e-10


def transformers_adamw_step(params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, state=None):
    """transformers.AdamW.step (correct_bias=True), one step, state dict per parameter (fresh when None)."""
    state = {} if state is None else state
    for p in params:
        if p.grad is None:
            continue
        st = state.setdefault(p, {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)})
        exp_avg, exp_avg_sq = st["exp_avg"], st["exp_avg_sq"]
        beta1, beta2 = betas
        st["step"] += 1
        with torch.no_grad():
            exp_avg.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
            denom = exp_avg_sq.sqrt().add_(eps)
            bias_correction1 = 1.0 - beta1 ** st["step"]
            bias_correction2 = 1.0 - beta2 ** st["step"]
            step_size = lr * math.sqrt(bias_correction2) / bias_correction1
            p.addcdiv_(exp_avg, denom, value=-step_size)
            if weight_decay > 0.0:
                p.add_(p, alpha=-lr * weight_decay)
    return state


def kd_loss(s_logits, t_logits, T):
    return F.kl_div(F.log_softmax(s_logits / T, dim=-1), F.softmax(t_logits / T, dim=-1), reduction="batchmean") * T * T


def inputs_of(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def official_step(teacher, student, t_opt, s_opt, s_sched, batch, *, alpha, T, max_grad_norm, base_lr, weight_decay):
    y = batch["labels"]
    student.train(), teacher.eval()
    fast_model = copy.deepcopy(student)
    fast_logits = fast_model(**inputs_of(batch)).logits
    with torch.no_grad():
        teacher_logits = teacher(**inputs_of(batch)).logits
    loss = (1 - alpha) * F.cross_entropy(fast_logits, y) + alpha * kd_loss(fast_logits, teacher_logits, T)
    loss.backward()
    pilot_norm = torch.nn.utils.clip_grad_norm_(fast_model.parameters(), max_grad_norm)
    no_decay = ["bias", "LayerNorm.weight"]
    decay = [p for n, p in fast_model.named_parameters() if not any(nd in n for nd in no_decay)]
    keep = [p for n, p in fast_model.named_parameters() if any(nd in n for nd in no_decay)]
    transformers_adamw_step(decay, base_lr, weight_decay=weight_decay)  # a brand-new optimizer: fresh state
    transformers_adamw_step(keep, base_lr, weight_decay=0.0)
    # skip strategy, 6 -> 12 in the official (str.replace on the layer index); here 2 -> 4: i -> 2i + 1
    teacher_weights = dict(teacher.named_parameters())
    sum_gradients = {}
    for fast_n, fast_p in fast_model.named_parameters():
        parts = fast_n.split(".")
        if fast_n.startswith("bert.encoder.layer."):
            parts[3] = str(2 * int(parts[3]) + 1)
        name = ".".join(parts)
        gradient = (teacher_weights[name] - fast_p).detach()
        sum_gradients[name] = sum_gradients[name] + gradient if name in sum_gradients else gradient
    t_opt.zero_grad(set_to_none=True)
    for n, p in teacher.named_parameters():
        if n in sum_gradients:
            p.grad = sum_gradients[n].clone()
    teacher_norm = torch.nn.utils.clip_grad_norm_(teacher.parameters(), max_grad_norm)
    t_opt.step()
    teacher.eval()
    student_logits = student(**inputs_of(batch)).logits
    with torch.no_grad():
        teacher_logits = teacher(**inputs_of(batch)).logits
    loss = (1 - alpha) * F.cross_entropy(student_logits, y) + alpha * kd_loss(student_logits, teacher_logits, T)
    s_opt.zero_grad(set_to_none=True)
    loss.backward()
    student_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
    s_opt.step()
    s_sched.step()
    return float(pilot_norm), float(teacher_norm), float(student_norm)


def max_rel_diff(a, b):
    """Largest relative difference over the state, attention key biases excepted.

    A key bias cancels in the softmax: its true gradient is 0 and the computed one is
    rounding noise (~1e-17), which the pilot's sign-like AdamW step turns into a step
    of ±lr in either implementation.  Nothing else depends on those biases.
    """
    worst = 0.0
    for (na, x), (nb, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        if x.is_floating_point() and not na.endswith("attention.self.key.bias"):
            worst = max(worst, float((x - y).abs().max()) / max(1.0, float(y.abs().max())))
    return worst


def groups(model, weight_decay):
    no_decay = ["bias", "LayerNorm.weight"]
    return [
        {"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)], "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ]


@pytest.mark.parametrize("max_grad_norm,weight_decay", [(1.0, 0.0), (0.05, 0.01)])
def test_reptile_official_options_match_transcription(max_grad_norm, weight_decay):
    teacher, student = tiny_bert(4, seed=5), tiny_bert(2, seed=6)
    T_ref, S_ref = copy.deepcopy(teacher), copy.deepcopy(student)
    base_lr = 3e-3

    def optimizers(T, S):
        t_opt = torch.optim.AdamW(groups(T, weight_decay), lr=2e-3, eps=1e-8)
        s_opt = torch.optim.AdamW(groups(S, weight_decay), lr=base_lr, eps=1e-8)
        sched = torch.optim.lr_scheduler.LambdaLR(s_opt, lambda step: 1.0 - 0.3 * step)  # decays: the pilot must not
        return t_opt, s_opt, sched

    t_opt, s_opt, s_sched = optimizers(teacher, student)
    t_ref, s_ref, sched_ref = optimizers(T_ref, S_ref)
    clipped = []
    for step in range(3):
        batch = bert_batch(10 + step)
        fastmeta.meta_step(
            teacher, student, batch, None, t_opt, s_opt, algorithm="reptile", hypergrad="first_order",
            layer_strategy="skip", pilot_optimizer="fresh_adamw", pilot_max_grad_norm=max_grad_norm,
            max_grad_norm=max_grad_norm, temperature=5.0, kd_weight=0.5, student_scheduler=s_sched,
        )
        norms = official_step(T_ref, S_ref, t_ref, s_ref, sched_ref, batch, alpha=0.5, T=5.0,
                              max_grad_norm=max_grad_norm, base_lr=base_lr, weight_decay=weight_decay)
        clipped.append([n > max_grad_norm for n in norms])
    if max_grad_norm < 1.0:
        assert all(all(c) for c in clipped)  # every clip was active
    assert max_rel_diff(student, S_ref) <= TOL
    assert max_rel_diff(teacher, T_ref) <= TOL
    assert max_rel_diff(teacher, tiny_bert(4, seed=5)) > 1e-4


def test_fresh_adamw_pilot_ignores_the_student_optimizer_state():
    """The pilot of "fresh_adamw" depends on the gradient only, not on the student optimizer's moments."""
    teacher, student = tiny_bert(4, seed=5), tiny_bert(2, seed=6)
    results = []
    for warm in (False, True):
        T, S = copy.deepcopy(teacher), copy.deepcopy(student)
        t_opt, s_opt = torch.optim.SGD(T.parameters(), lr=1.0), torch.optim.AdamW(S.parameters(), lr=1e-2)
        if warm:  # give the student optimizer some state, then put the student back
            saved = copy.deepcopy(S.state_dict())
            for p in S.parameters():
                p.grad = torch.randn_like(p)
            s_opt.step()
            S.load_state_dict(saved)
        before = [p.detach().clone() for p in T.parameters()]
        fastmeta.meta_step(T, S, bert_batch(1), None, t_opt, s_opt, algorithm="reptile", layer_strategy="skip",
                           pilot_optimizer="fresh_adamw")
        results.append(torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, T.parameters())]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"pilot_optimizer": "adamw"}, ValueError, "pilot_optimizer"),
        ({"pilot_max_grad_norm": 0.0}, ValueError, "pilot_max_grad_norm"),
        ({"pilot_max_grad_norm": "1"}, TypeError, "pilot_max_grad_norm"),
        ({"max_grad_norm": -1.0}, ValueError, "max_grad_norm"),
    ],
)
def test_reptile_bad_options(options, error, match):
    teacher, student = tiny_bert(4, seed=5), tiny_bert(2, seed=6)
    t_opt, s_opt = torch.optim.SGD(teacher.parameters(), lr=1.0), torch.optim.SGD(student.parameters(), lr=0.1)
    before = [copy.deepcopy(m.state_dict()) for m in (teacher, student)]
    with pytest.raises(error, match=match):
        fastmeta.meta_step(teacher, student, bert_batch(1), None, t_opt, s_opt, algorithm="reptile", **options)
    for b, m in zip(before, (teacher, student)):
        for k, v in m.state_dict().items():
            assert torch.equal(v, b[k])
