"""Tests of fastmeta.functional (student JVPs, RNG replay, math attention) and fastmeta.batching.

The numerical tests run on each device of ``conftest.DEVICES`` (the ``device`` fixture); on
CUDA, dropout draws from the CUDA generator, so the RNG checks read that generator too.
Argument validation stays on CPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmeta import batching
from fastmeta.functional import (
    capture_rng_state,
    jvp_logits,
    math_attention,
    replay_rng,
    trainable_parameters,
)

transformers = pytest.importorskip("transformers")


def tiny_bert(attn, dropout=0.0, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0,
        attn_implementation=attn,
    )
    return transformers.BertForSequenceClassification(cfg).to(dtype)


def inputs(seed=0, batch=4, length=9, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -3:] = 0
    return {"input_ids": torch.randint(0, 50, (batch, length), generator=g).to(device), "attention_mask": mask.to(device)}


def rng_states(device):
    """The generator states a forward on ``device`` draws from (CPU, plus CUDA's on CUDA)."""
    device = torch.device(device)
    return (torch.random.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def same_rng(a, b):
    return torch.equal(a[0], b[0]) and (a[1] is None) == (b[1] is None) and (a[1] is None or torch.equal(a[1], b[1]))


def double_vjp_jvp(model, x, tangents, rng_state):
    """Reference ``J v`` by reverse mode twice (independent of torch.func)."""
    params = trainable_parameters(model)
    with torch.enable_grad(), math_attention(), replay_rng(rng_state):
        z = model(**x).logits
        w = torch.zeros_like(z, requires_grad=True)
        grads = torch.autograd.grad(z, list(params.values()), grad_outputs=w, create_graph=True)
        (u,) = torch.autograd.grad(grads, w, grad_outputs=[tangents[n] for n in params])
    return z.detach(), u


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_forward_jvp_matches_double_vjp_with_dropout(attn, device):
    model = tiny_bert(attn, dropout=0.3).train().to(device)
    x = inputs(device=device)
    tangents = {n: torch.randn_like(p) for n, p in trainable_parameters(model).items()}
    state = capture_rng_state(device)
    with math_attention():
        z_primal = model(**x).logits.detach()
    after_primal = rng_states(device)
    z, u = jvp_logits(model, x, tangents, rng_state=state)
    assert same_rng(rng_states(device), after_primal)  # the replay put the stream back
    z_ref, u_ref = double_vjp_jvp(model, x, tangents, state)
    assert torch.equal(z, z_primal)  # same dropout masks as the forward it pairs with
    assert float((u - u_ref).norm() / u_ref.norm()) <= 1e-12
    assert model.training


def test_student_jvp_dual_tensors_and_their_fallbacks():
    """The engine's JVP (student_jvp) runs dual tensors through forward-mode AD; where they would not
    compute what torch.func.jvp does it takes torch.func.jvp: inside a caller's forward-mode level
    (another cannot open), under torch.inference_mode (no forward gradients: the tangent would be
    None) and inside vmap (no batching rule for dual tensors).  Every way, against the double VJP."""
    import torch.autograd.forward_ad as fwAD

    from fastmeta.functional import as_split_inputs, student_jvp

    model = tiny_bert("eager").eval()
    x = inputs(0)  # no padding token: reverse mode gives the padding row no gradient, forward mode a tangent
    split = as_split_inputs(x)
    tangents = {n: torch.randn_like(p) for n, p in trainable_parameters(model).items()}
    _, u_ref = double_vjp_jvp(model, x, tangents, None)

    def close(u):
        return float((u - u_ref).norm() / u_ref.norm()) <= 1e-12

    assert close(student_jvp(model, split, tangents)[1])
    assert close(jvp_logits(model, x, tangents)[1])  # the public one: torch.func.jvp
    seen = []

    def outer(s):  # inside a torch.func.jvp: a forward-mode level is open
        seen.append(fwAD._current_level)
        seen.append(student_jvp(model, split, tangents)[1])
        return 2 * s

    one = torch.ones((), dtype=torch.float64)
    torch.func.jvp(outer, (one,), (one,))
    assert seen[0] >= 0 and close(seen[1])
    with torch.inference_mode():
        u_inference = student_jvp(model, split, tangents)[1]
    assert close(u_inference.clone())
    # vmap over two directions: the first one and twice it
    stacked = {n: torch.stack([t, 2 * t]) for n, t in tangents.items()}
    u_two = torch.func.vmap(lambda d: student_jvp(model, split, d)[1])(stacked)
    assert close(u_two[0]) and float((u_two[1] - 2 * u_ref).norm() / u_ref.norm()) <= 1e-12


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 2).double()
        self.unused = nn.Parameter(torch.ones(4, dtype=torch.float64))

    def forward(self, x):
        return self.used(x)


class _Closure(torch.autograd.Function):
    """Reads its module's weight from the closure, not from its inputs (forward AD is off inside)."""

    @staticmethod
    def forward(ctx, x, module):
        return x @ module.weight.t()

    @staticmethod
    def backward(ctx, grad):
        return None, None


class _ClosedOver(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3, dtype=torch.float64))

    def forward(self, x):
        return _Closure.apply(x, self)


def test_jvp_zero_tangent_and_a_parameter_read_from_a_closure():
    """No named parameter reaches the logits: a zero tangent, not None (both JVPs).  A parameter an
    autograd.Function reads from its closure: torch.func.jvp (the public jvp_logits) refuses; dual
    tensors cannot see it, which is why only the engine, whose directions are zero there (reverse
    mode gives it no gradient), uses them."""
    from fastmeta.functional import as_split_inputs, student_jvp

    x = torch.randn(5, 3, dtype=torch.float64)
    model = _Unused()
    unused = {"unused": torch.randn(4, dtype=torch.float64)}
    for u in (student_jvp(model, as_split_inputs(x), unused)[1], jvp_logits(model, x, unused)[1]):
        assert u is not None and u.shape == (5, 2) and not u.any()
    closed = _ClosedOver()
    with pytest.raises(RuntimeError):
        jvp_logits(closed, x, {"weight": torch.randn(2, 3, dtype=torch.float64)})


def test_forward_jvp_at_other_params_and_partial_tangents(device):
    model = tiny_bert("eager").eval().to(device)
    x = inputs(1, device=device)
    params = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in trainable_parameters(model).items()}
    names = [n for n in params if "encoder" in n]
    tangents = {n: torch.randn_like(params[n]) for n in names}
    z, u = jvp_logits(model, x, tangents, params=params)
    # reference: finite difference in float64 around `params` with only `names` moving
    eps = 1e-6

    def at(shift):
        moved = {n: (t + shift * tangents[n] if n in tangents else t) for n, t in params.items()}
        return torch.func.functional_call(model, moved, (), x).logits

    with torch.no_grad():
        u_fd = (at(eps) - at(-eps)) / (2 * eps)
        z_ref = at(0.0)
    assert torch.allclose(z, z_ref, rtol=0, atol=1e-12)
    assert float((u - u_fd).norm() / u_fd.norm()) <= 1e-7


def test_finite_diff_jvp_float32_and_restore(device):
    # The reference is the forward-mode JVP with the same dropout masks: in fp64 on CPU.  On CUDA
    # a dropout mask depends on the dtype (the RNG is drawn per vector of elements) and on SDPA's
    # backend (fused kernels draw their own), so there it is the fp32 forward-mode JVP of the
    # same eager model (first seen on an H200: the fp64 reference drew other masks, 0.64 off).
    on_cuda = torch.device(device).type == "cuda"
    model64 = tiny_bert("eager" if on_cuda else "sdpa", dropout=0.2).train().to(device)
    x = inputs(2, device=device)
    tangents64 = {n: torch.randn_like(p) for n, p in trainable_parameters(model64).items()}
    state = capture_rng_state(device)
    if not on_cuda:
        _, u64 = jvp_logits(model64, x, tangents64, rng_state=state)
    model = model64.float()
    tangents = {n: t.float() for n, t in tangents64.items()}
    if on_cuda:
        _, u64 = jvp_logits(model, x, tangents, rng_state=state)
        u64 = u64.double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    eps = 1e-3
    _, u = jvp_logits(model, x, tangents, method="finite_diff", eps=eps, rng_state=state)
    assert float((u.double() - u64).norm() / u64.norm()) <= 1e-3
    _, u_default = jvp_logits(model, x, tangents, method="finite_diff", rng_state=state)
    assert float((u_default.double() - u64).norm() / u64.norm()) <= 1e-3
    ulp = torch.finfo(torch.float32).eps
    for n, p in model.named_parameters():
        scale = torch.maximum(before[n].abs(), (eps * tangents[n]).abs())
        assert bool(((p.detach() - before[n]).abs() <= 2 * ulp * scale).all()), n


def test_jvp_rejects_frozen_unknown_and_misshaped_tangents():
    model = tiny_bert("eager")
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    x = inputs()
    with pytest.raises(ValueError, match="frozen"):
        jvp_logits(model, x, {"bert.embeddings.word_embeddings.weight": torch.zeros(50, 16, dtype=torch.float64)})
    with pytest.raises(KeyError, match="not a parameter"):
        jvp_logits(model, x, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        jvp_logits(model, x, {"classifier.bias": torch.zeros(4, dtype=torch.float64)})
    with pytest.raises(ValueError, match="method"):
        jvp_logits(model, x, {}, method="magic")


def test_jvp_in_train_mode_batchnorm_leaves_running_stats(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2)).double().to(device)
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64).to(device)
    model(x)  # materialise the lazy layer
    stats = [b.clone() for b in model.buffers()]
    tangents = {n: torch.randn_like(p) for n, p in trainable_parameters(model).items()}
    _, u = jvp_logits(model, x, tangents)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), stats))
    with torch.no_grad():
        eps = 1e-6
        params = dict(model.named_parameters())

        def at(shift):
            return torch.func.functional_call(
                model, {**{n: b.clone() for n, b in model.named_buffers()}, **{n: p + shift * tangents[n] for n, p in params.items()}}, (x,)
            )

        u_fd = (at(eps) - at(-eps)) / (2 * eps)
    assert float((u - u_fd).norm() / u_fd.norm()) <= 1e-7


# --------------------------------------------------------------------------- batching
def test_split_batch_forms_and_errors():
    ids = torch.zeros(2, 3, dtype=torch.long)
    labels = torch.tensor([0, 1])
    split = batching.split_batch({"input_ids": ids, "labels": labels})
    assert split.args == () and set(split.kwargs) == {"input_ids"} and split.size == 2
    split = batching.split_batch((ids, labels))
    assert split.args[0] is ids and split.kwargs == {}
    split = batching.split_batch(({"input_ids": ids}, labels))
    assert split.kwargs["input_ids"] is ids
    split = batching.split_batch(((ids, ids), labels))
    assert len(split.args) == 2
    with pytest.raises(ValueError, match="quiz_batch has no 'labels'"):
        batching.split_batch({"input_ids": ids}, name="quiz_batch")
    with pytest.raises(ValueError, match="empty"):
        batching.split_batch((ids[:0], labels[:0]))
    with pytest.raises(ValueError, match="integer"):
        batching.split_batch((ids, labels.float()))
    with pytest.raises(TypeError, match="Mapping"):
        batching.split_batch(ids)


def test_align_and_cross_entropy_with_ignored_tokens_and_shift(device):
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11, dtype=torch.float64).to(device)
    labels = torch.randint(0, 11, (3, 6)).to(device)
    labels[0, 4:] = -100
    z, y = batching.align_logits_labels(logits, labels, shift_labels=True)
    assert z.shape == (3, 5, 11) and torch.equal(y, labels[:, 1:])
    ce = batching.cross_entropy(z, y)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(ce, ref, rtol=1e-14)
    with pytest.raises(ValueError, match="shift_labels"):
        batching.align_logits_labels(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="-100"):
        batching.cross_entropy(z, torch.full_like(y, -100))
    with pytest.raises(ValueError, match="outside"):
        batching.cross_entropy(z, torch.full_like(y, 11))


def test_student_loss_masks_kd_rows_like_ce(device):
    torch.manual_seed(1)
    zs = torch.randn(2, 4, 7, dtype=torch.float64).to(device)
    zt = torch.randn(2, 4, 7, dtype=torch.float64).to(device)
    labels = torch.randint(0, 7, (2, 4)).to(device)
    labels[1, 1:] = -100
    loss = batching.student_loss(zs, zt, labels, temperature=2.0, kd_weight=0.3, kind="kl")
    keep = labels != -100
    kl = 4.0 * (F.softmax(zt / 2, -1) * (F.log_softmax(zt / 2, -1) - F.log_softmax(zs / 2, -1))).sum(-1)
    ref = 0.7 * F.cross_entropy(zs.reshape(-1, 7), labels.reshape(-1), ignore_index=-100) + 0.3 * kl[keep].mean()
    assert torch.allclose(loss, ref, rtol=1e-13)
    assert torch.allclose(
        batching.student_loss(zs, zt, labels, temperature=2.0, kd_weight=0.3, kind="kl", higher_order=True), ref, rtol=1e-13
    )


def test_validation_helpers():
    with pytest.raises(ValueError, match="temperature"):
        batching.check_temperature(0.0)
    with pytest.raises(ValueError, match="temperature"):
        batching.check_temperature(float("nan"))
    with pytest.raises(ValueError, match="kd_weight"):
        batching.check_kd_weight(1.5)
    with pytest.raises(ValueError, match="kd_loss"):
        batching.check_kd_kind("js")
    with pytest.raises(ValueError, match="do not match"):
        batching.check_logits_pair(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(FloatingPointError, match="quiz loss"):
        batching.check_finite(torch.tensor(float("nan")), "quiz loss")
    assert batching.extract_logits({"logits": torch.ones(1)}).shape == (1,)
    with pytest.raises(TypeError, match="logits"):
        batching.extract_logits(("not", "logits"))
