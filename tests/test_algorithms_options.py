"""``meta_step``'s common options: ``shift_labels="auto"`` (HF causal LMs), strict types, ``max_grad_norm``.

Causal LMs: HuggingFace trains a causal LM given ``labels = input_ids`` to predict token
``i + 1`` at position ``i`` (the model shifts internally).  ``shift_labels="auto"`` (the
default) does the same for HF causal-LM classes and nothing for other models.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastmeta
from fastmeta.batching import is_causal_lm, resolve_shift_labels


def tiny_gpt2(seed):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    return GPT2LMHeadModel(config).double()


def tiny_bert(seed):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertForSequenceClassification(config).double()


def lm_batch(seed, size=3, length=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (size, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}  # HF's convention: labels = input_ids


class MyForCausalLM(torch.nn.Module):
    def forward(self, x):
        return x


def test_is_causal_lm_rule():
    gpt2 = tiny_gpt2(0)
    assert is_causal_lm(gpt2) and is_causal_lm(torch.nn.DataParallel(gpt2))
    assert is_causal_lm(MyForCausalLM())  # any class named *ForCausalLM (remote code, PEFT wrappers)
    assert not is_causal_lm(tiny_bert(0)) and not is_causal_lm(torch.nn.Linear(2, 2))
    assert resolve_shift_labels("auto", gpt2, gpt2) is True
    assert resolve_shift_labels("auto", tiny_bert(0), tiny_bert(1)) is False
    assert resolve_shift_labels(False, gpt2) is False and resolve_shift_labels(True, tiny_bert(0)) is True
    with pytest.raises(ValueError, match="shift_labels"):
        resolve_shift_labels("yes", gpt2)
    with pytest.raises(TypeError, match="shift_labels"):
        resolve_shift_labels(1, gpt2)


def _shifted_ls(teacher, student, batch, tau=1.0, w=0.5, shift=True):
    """LS with position i scored against token i+1 (test-side)."""
    zs, zt, y = student(batch["input_ids"]).logits, teacher(batch["input_ids"]).logits, batch["labels"]
    if shift:
        zs, zt, y = zs[:, :-1], zt[:, :-1], y[:, 1:]
    log_ps, log_pt = torch.log_softmax(zs / tau, -1), torch.log_softmax(zt / tau, -1)
    kd = tau**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    return (1 - w) * F.cross_entropy(zs.reshape(-1, zs.shape[-1]), y.reshape(-1)) + w * kd


@pytest.mark.parametrize("shift_labels", ["default", "auto", True, False])
def test_causal_lm_trains_position_i_against_token_i_plus_1(shift_labels):
    teacher, student = tiny_gpt2(1), tiny_gpt2(2)
    batch = lm_batch(3)
    kwargs = {} if shift_labels == "default" else {"shift_labels": shift_labels}
    S_ref = copy.deepcopy(student)
    shift = shift_labels is not False
    expected = _shifted_ls(teacher, S_ref, batch, shift=shift)
    opt_t, opt_s = torch.optim.SGD(teacher.parameters(), lr=0.1), torch.optim.SGD(student.parameters(), lr=0.1)
    out = fastmeta.meta_step(teacher, student, batch, None, opt_t, opt_s, algorithm="kd", **kwargs)
    torch.testing.assert_close(out.student_loss, expected.detach(), rtol=1e-12, atol=1e-12)
    # and the step is the gradient of that loss
    grads = torch.autograd.grad(expected, list(S_ref.parameters()))
    for (name, p), p0, g in zip(student.named_parameters(), S_ref.parameters(), grads):
        torch.testing.assert_close(p.detach(), (p0 - 0.1 * g).detach(), rtol=1e-12, atol=1e-13, msg=name)


def test_classifier_is_not_shifted_under_auto():
    teacher, student = tiny_bert(1), tiny_bert(2)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 40, (4, 5), generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
    opt_t, opt_s = torch.optim.SGD(teacher.parameters(), lr=0.1), torch.optim.SGD(student.parameters(), lr=0.1)
    out = fastmeta.meta_step(teacher, student, batch, batch, opt_t, opt_s, algorithm="metadistil")
    assert torch.isfinite(out.quiz_loss)


class Net(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(x)


def mlp_batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)


@pytest.mark.parametrize(
    "algorithm,options,error,match",
    [
        ("metadistil", {"atomic": "false"}, TypeError, "atomic"),
        ("metadistil", {"shift_labels": "true"}, ValueError, "shift_labels"),
        ("metadistil", {"max_grad_norm": "1"}, TypeError, "max_grad_norm"),
        ("metadistil", {"max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
        ("metadistil", {"compute_influence": "no"}, TypeError, "compute_influence"),
        ("metadistil", {"temperature": "2.0"}, TypeError, "temperature"),
        ("metadistil", {"temperature": True}, TypeError, "temperature"),
        ("metadistil", {"kd_weight": "0.5"}, TypeError, "kd_weight"),
        ("metadistil", {"inner_lr": True}, TypeError, "inner_lr"),
        ("metadistil", {"inner_lr": "0.1"}, TypeError, "inner_lr"),
        ("kd", {"teacher_ce": "yes"}, TypeError, "teacher_ce"),
        ("ikd", {"gamma": "0.5"}, TypeError, "gamma"),
        ("ikd", {"gamma": -0.1}, ValueError, "gamma"),
        ("reptile", {"pilot_max_grad_norm": True}, TypeError, "pilot_max_grad_norm"),
    ],
)
def test_strict_option_types(algorithm, options, error, match):
    teacher, student = Net(1).double(), Net(2).double()
    opt_t, opt_s = torch.optim.Adam(teacher.parameters(), lr=0.1), torch.optim.SGD(student.parameters(), lr=0.1)
    before = [copy.deepcopy(o.state_dict()) for o in (teacher, student)]
    with pytest.raises(error, match=match):
        fastmeta.meta_step(teacher, student, mlp_batch(1), mlp_batch(2), opt_t, opt_s, algorithm=algorithm, **options)
    for b, m in zip(before, (teacher, student)):
        for k, v in m.state_dict().items():
            assert torch.equal(v, b[k])


def test_numbers_from_numpy_and_tensors_still_work():
    import numpy as np

    teacher, student = Net(1).double(), Net(2).double()
    opt_t, opt_s = torch.optim.SGD(teacher.parameters(), lr=0.1), torch.optim.SGD(student.parameters(), lr=0.1)
    fastmeta.meta_step(teacher, student, mlp_batch(1), mlp_batch(2), opt_t, opt_s, temperature=np.float64(2.0),
                       kd_weight=torch.tensor(0.5), inner_lr=np.float32(0.1), max_grad_norm=1)


@pytest.mark.parametrize("algorithm", ["kd", "metadistil", "lgtm", "reptile", "ikd"])
def test_max_grad_norm_clips_every_committed_update(algorithm):
    """With a tiny bound every stepped gradient has global norm max_norm·‖g‖/(‖g‖ + 1e-6) (clip_grad_norm_'s rule)."""
    teacher, student = Net(1).double(), Net(2).double()
    opt_t, opt_s = torch.optim.SGD(teacher.parameters(), lr=0.1), torch.optim.SGD(student.parameters(), lr=0.1)
    options = {"teacher_ce": True} if algorithm == "kd" else {}
    hypergrad = "first_order" if algorithm == "ikd" else "exact"  # ikd's exact refuses clipping (test_fidelity_ikd)
    fastmeta.meta_step(teacher, student, mlp_batch(1), mlp_batch(2), opt_t, opt_s, algorithm=algorithm,
                       hypergrad=hypergrad, max_grad_norm=1e-5, **options)
    for model in (teacher, student):
        norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
        assert 0.99e-5 < norm <= 1e-5, (algorithm, norm)
