"""MetaDistil against a transcription of the official GLUE code (github:JetRunner/MetaDistil @ 80e60c1,
``nlp/run_glue_distillation_meta.py:174-330``, ``nlp/distillation_meta.py:47-51``), float64, three steps.

The official step: an SGD look-ahead ``θS' = θS − assume_s_step_size·∇LS`` (second order,
whatever optimizer trains the student), ``LS = α·T²·MSE(softmax(zt/T), softmax(zs/T)) +
(1 − α)·CE`` (``--beta 0``: no PKD term, the paper's setting), the held-set CE at θS', the
teacher's meta-gradient clipped to global norm ``max_grad_norm`` and an AdamW teacher step,
then the real student step with the updated teacher (no graph), clipped, AdamW.  fastmeta:
``kd_loss="softmax_mse", pilot="sgd", inner_lr=assume_s_step_size, max_grad_norm=1.0``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastmeta
from _fidelity_models import bert_batch, max_rel_diff, tiny_bert

TOL = 1e-10


def forward(model, batch, params=None):
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    if params is None:
        return model(**kwargs).logits
    return torch.func.functional_call(model, params, (), kwargs).logits


def soft_loss(t_logits, s_logits, T):
    """distillation_meta.py:47-51."""
    return F.mse_loss(F.softmax(t_logits / T, dim=-1), F.softmax(s_logits / T, dim=-1)) * T * T


def official_step(t_model, s_model, t_opt, s_opt, batch, held, *, alpha, T, step_size, max_grad_norm):
    s_model.train(), t_model.eval()
    fast_weights = dict(s_model.named_parameters())
    t_logits, s_logits = forward(t_model, batch), forward(s_model, batch)
    assume_loss = alpha * soft_loss(t_logits, s_logits, T) + (1 - alpha) * F.cross_entropy(s_logits, batch["labels"])
    grads = torch.autograd.grad(assume_loss, list(s_model.parameters()), create_graph=True, retain_graph=True)
    fast_weights = {name: param - step_size * grad for (name, param), grad in zip(fast_weights.items(), grads)}
    s_prime_loss = F.cross_entropy(forward(s_model, held, fast_weights), held["labels"])
    t_grads = torch.autograd.grad(s_prime_loss, list(t_model.parameters()))
    for p, gr in zip(t_model.parameters(), t_grads):
        p.grad = gr
    t_norm = torch.nn.utils.clip_grad_norm_(t_model.parameters(), max_grad_norm)
    t_opt.step()
    for p in list(t_model.parameters()) + list(s_model.parameters()):
        p.grad = None
    s_model.train(), t_model.eval()
    with torch.no_grad():
        t_logits = forward(t_model, batch)
    s_logits = forward(s_model, batch)
    real_loss = alpha * soft_loss(t_logits, s_logits, T) + (1 - alpha) * F.cross_entropy(s_logits, batch["labels"])
    real_loss.backward()
    s_norm = torch.nn.utils.clip_grad_norm_(s_model.parameters(), max_grad_norm)
    s_opt.step()
    s_opt.zero_grad()
    return float(t_norm), float(s_norm)


@pytest.mark.parametrize("max_grad_norm", [1.0, 1e-4])
def test_metadistil_official_options_match_transcription(max_grad_norm):
    teacher, student = tiny_bert(2, seed=1), tiny_bert(1, seed=2)
    T_ref, S_ref = copy.deepcopy(teacher), copy.deepcopy(student)
    step_size, T, alpha = 0.05, 5.0, 0.5  # the official step size is 5e-5: larger so the pilot matters here

    def optimizers(t, s):
        return torch.optim.AdamW(t.parameters(), lr=1e-3, eps=1e-8), torch.optim.AdamW(s.parameters(), lr=2e-3, eps=1e-8)

    t_opt, s_opt = optimizers(teacher, student)
    t_ref, s_ref = optimizers(T_ref, S_ref)
    norms = []
    for step in range(3):
        batch, held = bert_batch(10 + step), bert_batch(20 + step, size=6)
        fastmeta.meta_step(teacher, student, batch, held, t_opt, s_opt, algorithm="metadistil", kd_loss="softmax_mse",
                           temperature=T, kd_weight=alpha, pilot="sgd", inner_lr=step_size,
                           max_grad_norm=max_grad_norm)
        norms.append(official_step(T_ref, S_ref, t_ref, s_ref, batch, held, alpha=alpha, T=T, step_size=step_size,
                                   max_grad_norm=max_grad_norm))
    if max_grad_norm < 1.0:
        assert all(t > max_grad_norm and s > max_grad_norm for t, s in norms), norms  # both clips were active
    assert max_rel_diff(student, S_ref) <= TOL
    assert max_rel_diff(teacher, T_ref) <= TOL
    assert max_rel_diff(teacher, tiny_bert(2, seed=1)) > 1e-4


def test_max_grad_norm_leaves_small_gradients_alone_and_records_the_clipped_grad():
    """Clipping follows clip_grad_norm_ (coefficient max_norm/(‖g‖ + 1e-6), at most 1) and .grad holds what was used."""
    teacher, student = tiny_bert(2, seed=1), tiny_bert(1, seed=2)
    batch, held = bert_batch(1), bert_batch(2)
    results = {}
    for clip in (None, 1e6, 1e-3):
        T, S = copy.deepcopy(teacher), copy.deepcopy(student)
        t_opt, s_opt = torch.optim.SGD(T.parameters(), lr=1.0), torch.optim.SGD(S.parameters(), lr=1.0)
        fastmeta.meta_step(T, S, batch, held, t_opt, s_opt, algorithm="metadistil", max_grad_norm=clip)
        grads = [p.grad for p in T.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        results[clip] = (torch.cat([p.detach().reshape(-1) for p in T.parameters()]), norm)
    assert torch.equal(results[None][0], results[1e6][0])  # a bound above the norm changes nothing, bitwise
    unclipped = results[None][1]
    # the recorded .grad is the clipped one: norm max_norm·‖g‖/(‖g‖ + 1e-6)
    assert abs(results[1e-3][1] - 1e-3 * unclipped / (unclipped + 1e-6)) < 1e-15
