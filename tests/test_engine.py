"""Tests of the meta-gradient engine (fastmeta.engine) against independent float64 references.

The references here are written from the papers' definitions with plain autograd
(``torch.autograd.grad(..., create_graph=True)`` through a functional pilot step,
hand-written cross-entropy and KL) and share no code with the engine.

Every test that computes something runs on each device of ``conftest.DEVICES`` (the
``device`` fixture: "cpu", and "cuda" when a GPU is present): models, batches and the
float64 references all live on that device (CUDA has float64).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import fastmeta
from fastmeta.engine import meta_gradient

warnings.filterwarnings("ignore", message=".*attn_implementation.*")

transformers = pytest.importorskip("transformers")


# --------------------------------------------------------------------------- models and batches
def make_bert(hidden, layers, attn="eager", num_labels=3, dropout=0.0, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=97,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=0.0,
        attn_implementation=attn,
    )
    return transformers.BertForSequenceClassification(cfg).to(dtype).eval()


def make_gpt2(hidden, layers, seed=0, dtype=torch.float64, dropout=0.0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=61,
        n_embd=hidden,
        n_layer=layers,
        n_head=2,
        n_positions=32,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


class SmallCNN(nn.Module):
    def __init__(self, width, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.tanh(self.conv2(h))
        return self.head(h.mean(dim=(2, 3)))


def make_cnn(width, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return SmallCNN(width).to(dtype).train()


def bert_batch(batch_size, length, seed, num_labels=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    mask[0, length - 3 :] = 0
    if batch_size > 2:
        mask[2, length - 1 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, num_labels, (batch_size,), generator=g)}


def gpt2_batch(batch_size, length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    mask[0, length - 4 :] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[1, 2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def cnn_batch(batch_size, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch_size, 3, 7, 7, generator=g, dtype=dtype), torch.randint(0, 5, (batch_size,), generator=g))


def to_device(batch, device):
    """A dict or tuple batch with every tensor moved to ``device`` (the data is generated on CPU)."""
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return tuple(t.to(device) for t in batch)


def family(name, dtype=torch.float64, device="cpu"):
    """(teacher, student, batch, quiz_batch, shift_labels) for a model family, on ``device``."""
    if name in ("bert-eager", "bert-sdpa"):
        attn = name.split("-")[1]
        out = (
            make_bert(24, 2, attn, seed=1, dtype=dtype),
            make_bert(16, 1, attn, seed=2, dtype=dtype),
            bert_batch(5, 11, seed=3),
            bert_batch(4, 9, seed=4),
            False,
        )
    elif name == "gpt2":
        out = make_gpt2(24, 2, seed=1, dtype=dtype), make_gpt2(16, 1, seed=2, dtype=dtype), gpt2_batch(3, 10, 3), gpt2_batch(2, 8, 4), True
    elif name == "cnn":
        out = make_cnn(6, seed=1, dtype=dtype), make_cnn(4, seed=2, dtype=dtype), cnn_batch(6, 3, dtype), cnn_batch(5, 4, dtype), False
    else:
        raise ValueError(name)
    teacher, student, batch, quiz, shift = out
    return teacher.to(device), student.to(device), to_device(batch, device), to_device(quiz, device), shift


# --------------------------------------------------------------------------- independent reference
def _split(batch):
    if isinstance(batch, dict):
        return (), {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    return (batch[0],), {}, batch[1]


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def _align(z, y, shift):
    if shift:
        return z[:, :-1], y[:, 1:]
    return z, y


def ref_ce(z, y, shift):
    z, y = _align(z, y, shift)
    z = z.reshape(-1, z.shape[-1])
    y = y.reshape(-1)
    keep = y != -100
    logp = torch.log_softmax(z, -1)
    nll = -logp.gather(1, y.clamp_min(0)[:, None])[:, 0]
    return (nll * keep).sum() / keep.sum()


def ref_kl_rows(zs, zt, tau):
    log_ps = torch.log_softmax(zs / tau, -1)
    log_pt = torch.log_softmax(zt / tau, -1)
    return tau * tau * (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def ref_kd(zs, zt, y, tau, shift):
    zs, y2 = _align(zs, y, shift)
    zt, _ = _align(zt, y, shift)
    keep = (y2 != -100).to(zs.dtype)
    return (ref_kl_rows(zs, zt, tau) * keep).sum() / keep.sum()


def sgd_step(lr):
    return lambda name, theta, grad: theta - lr * grad


def reference_meta_grad(teacher, student, batch, quiz, *, lr, tau, w, shift=False, steps=1, step_fn=None):
    """∇θT CE(yq, S(xq; θS')) by double backward through a functional pilot step (the papers' definition)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    step_fn = step_fn or sgd_step(lr)
    tparams = [(n, p) for n, p in teacher.named_parameters() if p.requires_grad]
    args, kwargs, y = _split(batch)
    qargs, qkwargs, yq = _split(quiz)
    with sdpa_kernel(SDPBackend.MATH):
        zt = _logits(teacher(*args, **kwargs))
        theta = {n: p for n, p in student.named_parameters() if p.requires_grad}
        for _ in range(steps):
            zs = _logits(functional_call(student, theta, args, kwargs))
            ls = (1 - w) * ref_ce(zs, y, shift) + w * ref_kd(zs, zt, y, tau, shift)
            grads = torch.autograd.grad(ls, list(theta.values()), create_graph=True, allow_unused=True)
            theta = {
                n: step_fn(n, t, torch.zeros_like(t) if g is None else g) for (n, t), g in zip(theta.items(), grads)
            }
        lq = ref_ce(_logits(functional_call(student, theta, qargs, qkwargs)), yq, shift)
        grads = torch.autograd.grad(lq, [p for _, p in tparams], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(tparams, grads)}


def rel_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a) ** 0.5
    den = sum(float(b[k].double().square().sum()) for k in b) ** 0.5
    assert den > 0.0
    return num / den


FAMILIES = ["bert-eager", "bert-sdpa", "gpt2", "cnn"]


# --------------------------------------------------------------------------- exact vs references
@pytest.mark.parametrize("name", FAMILIES)
def test_exact_matches_autograd_and_reference_float64(name, device):
    teacher, student, batch, quiz, shift = family(name, device=device)
    kwargs = dict(inner_lr=0.3, temperature=2.0, kd_weight=0.7, shift_labels=shift)
    torch.manual_seed(0)
    exact = fastmeta.meta_grad(teacher, student, batch, quiz, hypergrad="exact", **kwargs)
    torch.manual_seed(0)
    auto = fastmeta.meta_grad(teacher, student, batch, quiz, hypergrad="autograd", **kwargs)
    torch.manual_seed(0)
    ref = reference_meta_grad(teacher, student, batch, quiz, lr=0.3, tau=2.0, w=0.7, shift=shift)
    assert set(exact) == {n for n, p in teacher.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(g).all() for g in exact.values())
    assert rel_err(exact, ref) <= 1e-10
    assert rel_err(auto, ref) <= 1e-10


def dropout_case(device):
    """Teacher and student BERTs in train mode with hidden dropout 0.2, and their batches."""
    teacher = make_bert(24, 2, "eager", dropout=0.2, seed=1).train().to(device)
    student = make_bert(16, 2, "eager", dropout=0.2, seed=2).train().to(device)
    return teacher, student, to_device(bert_batch(5, 11, 3), device), to_device(bert_batch(4, 9, 4), device)


DROPOUT_OPTIONS = {
    "jvp": {},  # the JVP replays the masks of the forward it differentiates (CUDA: the CUDA generator's state)
    "double_vjp": {"student_tangent": "double_vjp"},  # the kept graph IS the pilot forward's (its masks)
    "teacher_recompute": {"teacher_graph": "recompute"},  # the replayed teacher forward draws the first's masks
}


@pytest.mark.parametrize("option", sorted(DROPOUT_OPTIONS))
def test_exact_with_dropout_in_train_mode_matches_reference(option, device):
    """Dropout active in both models, every exact variant: the meta-gradient of the masks the forwards
    drew, and the generators end where the reference's do (no extra randomness consumed)."""
    teacher, student, batch, quiz = dropout_case(device)
    torch.manual_seed(7)  # seeds the CPU generator and every CUDA one
    got = meta_gradient(teacher, student, batch, quiz, inner_lr=0.5, temperature=1.5, kd_weight=0.6,
                        **DROPOUT_OPTIONS[option]).teacher_grads
    after_got = torch.rand(1, device=device)
    torch.manual_seed(7)
    ref = reference_meta_grad(teacher, student, batch, quiz, lr=0.5, tau=1.5, w=0.6)
    after_ref = torch.rand(1, device=device)
    assert rel_err(got, ref) <= 1e-10
    assert torch.equal(after_got, after_ref)


@pytest.mark.parametrize("name", FAMILIES)
def test_double_vjp_tangent_matches_reference_and_jvp_float64(name, device):
    """``student_tangent="double_vjp"``: the tangent back-propagated through the pilot's kept graph.
    Against the independent reference (meta-gradient) and the forward-mode JVP (influences)."""
    teacher, student, batch, quiz, shift = family(name, device=device)
    kwargs = dict(inner_lr=0.3, temperature=2.0, kd_weight=0.7, shift_labels=shift, compute_influence=True)
    got = meta_gradient(teacher, student, batch, quiz, student_tangent="double_vjp", **kwargs)
    jvp = meta_gradient(teacher, student, batch, quiz, student_tangent="jvp", **kwargs)
    ref = reference_meta_grad(teacher, student, batch, quiz, lr=0.3, tau=2.0, w=0.7, shift=shift)
    assert rel_err(got.teacher_grads, ref) <= 1e-10
    scale = float(jvp.influences.abs().max())
    assert scale > 0.0
    assert float((got.influences - jvp.influences).abs().max()) <= 1e-10 * scale
    assert rel_err(got.student_grads, jvp.student_grads) <= 1e-12  # the pilot gradient, through the split backward


@pytest.mark.parametrize("name,bad,hypergrad,value,message", [
    ("student_tangent", "reverse", "finite_diff", "double_vjp", "student_tangent='double_vjp' applies to hypergrad='exact'"),
    ("teacher_graph", "discard", "autograd", "recompute",
     "teacher_graph='recompute' applies to hypergrad 'exact' and 'finite_diff'"),
])
def test_engine_option_bad_values_name_the_argument(name, bad, hypergrad, value, message, device):
    teacher, student, batch, quiz, _ = family("cnn", device=device)
    with pytest.raises(ValueError, match=f"{name} must be one of"):
        meta_gradient(teacher, student, batch, quiz, inner_lr=0.3, **{name: bad})
    with pytest.raises(ValueError, match=message):
        meta_gradient(teacher, student, batch, quiz, inner_lr=0.3, hypergrad=hypergrad, **{name: value})


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("tangent", ["jvp", "double_vjp"])
def test_teacher_graph_recompute_matches_reference_float64(name, tangent, device):
    """``teacher_graph="recompute"``: no teacher graph through the pilot; the forward replayed before
    the teacher backward.  Against the independent reference, with both exact student tangents."""
    teacher, student, batch, quiz, shift = family(name, device=device)
    kwargs = dict(inner_lr=0.3, temperature=2.0, kd_weight=0.7, shift_labels=shift, compute_influence=True,
                  student_tangent=tangent)
    # cuDNN's default conv backward is not deterministic on CUDA (measured on an H200: the cnn
    # family's influences of two identical student sides differ in the last bits): deterministic
    # kernels, so that "the student's side does not change" can be asserted bitwise
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        got = meta_gradient(teacher, student, batch, quiz, teacher_graph="recompute", **kwargs)
        kept = meta_gradient(teacher, student, batch, quiz, teacher_graph="keep", **kwargs)
    ref = reference_meta_grad(teacher, student, batch, quiz, lr=0.3, tau=2.0, w=0.7, shift=shift)
    assert rel_err(got.teacher_grads, ref) <= 1e-10
    assert torch.equal(got.influences, kept.influences)  # the student's side does not change
    assert "teacher_recompute" in got.timings and "teacher_recompute" not in kept.timings


def test_teacher_graph_recompute_keeps_no_teacher_graph_through_the_student_passes(device):
    """The point of the option: the graph of the teacher's first forward is gone before the student's
    first pass, and the forward with a graph runs again after every student pass (pilot, quiz,
    tangent), right before the teacher backward.  With "keep" that graph is alive throughout."""
    import weakref

    teacher, student, batch, quiz, _ = family("bert-eager", device=device)
    calls, outputs = [], []

    def on_teacher(module, args, output):
        outputs.append(weakref.ref(output.logits))  # the first forward's output owns its graph
        calls.append("teacher")

    def on_student(module, args, output):
        calls.append("student (teacher graph alive)" if outputs[0]() is not None else "student")

    hooks = [teacher.register_forward_hook(on_teacher), student.register_forward_hook(on_student)]
    results = {}
    try:
        for graph in ("recompute", "keep"):
            calls.clear(), outputs.clear()
            meta_gradient(teacher, student, batch, quiz, inner_lr=0.3, kd_weight=0.7, teacher_graph=graph,
                          student_tangent="double_vjp")
            results[graph] = list(calls)
    finally:
        for h in hooks:
            h.remove()
    assert results["recompute"] == ["teacher", "student", "student", "teacher"]
    assert results["keep"] == ["teacher", "student (teacher graph alive)", "student (teacher graph alive)"]


@pytest.mark.parametrize("how", ["meta_step", "meta_step lgtm official", "meta_gradient", "meta_gradient keep_pilot"])
def test_student_sized_tensors_are_freed_before_the_tangent_pass(how, device, monkeypatch):
    """The pilot point θS' is freed after the quiz pass, the quiz gradient v and the pilot gradient g once the
    reverse sweep's adjoint used them: none is alive in the tangent's forward (where the exact step peaks at
    small batches), unless the caller keeps it (meta_gradient returns g; keep_pilot returns θS' and v)."""
    import weakref

    from fastmeta.engine import api

    teacher, student, batch, quiz, _ = family("bert-eager", device=device)
    refs: dict = {}
    real_trajectory, real_quiz = api.pilot_trajectory, api.quiz_gradient

    def trajectory(problem, *args, **kwargs):
        out = real_trajectory(problem, *args, **kwargs)
        refs["g"] = [weakref.ref(t) for t in out.first_grads.values()]
        refs["pilot point"] = [weakref.ref(t) for t in out.theta.values()]
        return out

    def quiz_gradient(problem, point, *args, **kwargs):
        lq, v = real_quiz(problem, point, *args, **kwargs)
        refs["v"] = [weakref.ref(t) for t in v.values()]
        return lq, v

    monkeypatch.setattr(api, "pilot_trajectory", trajectory)
    monkeypatch.setattr(api, "quiz_gradient", quiz_gradient)
    alive = []  # at every student forward: how many tensors of each kind are alive
    hook = student.register_forward_hook(
        lambda module, args, output: alive.append({k: sum(r() is not None for r in rs) for k, rs in refs.items()}))
    try:
        if how.startswith("meta_step"):
            opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (teacher, student)]
            extra = dict(algorithm="lgtm", influence_objective="official") if "lgtm" in how else \
                dict(algorithm="metadistil")
            fastmeta.meta_step(teacher, student, batch, quiz, *opts, hypergrad="exact", **extra)
        else:
            meta_gradient(teacher, student, batch, quiz, inner_lr=0.3, kd_weight=0.7,
                          keep_pilot=how.endswith("keep_pilot"))
    finally:
        hook.remove()
    n = len(refs["g"])
    assert n == len([p for p in student.parameters() if p.requires_grad]) > 0
    assert alive[0] == {}  # the pilot's forward: nothing yet
    assert alive[1] == {"g": n, "pilot point": n}  # the quiz pass at θS', with g kept for the adjoint
    tangent = alive[2]  # the tangent's forward (forward-mode JVP)
    if how == "meta_step":  # MetaDistil recomputes the real step's gradient: nothing student-sized is kept
        assert tangent == {"g": 0, "pilot point": 0, "v": 0}
        assert alive[3] == tangent  # the real student step
    elif how == "meta_step lgtm official":  # its mixed product needs v, nothing else
        assert tangent == {"g": 0, "pilot point": 0, "v": n}
    elif how == "meta_gradient":  # meta_gradient returns g (student_grads)
        assert tangent == {"g": n, "pilot point": 0, "v": 0}
    else:  # and keep_pilot returns θS' and v
        assert tangent == {"g": n, "pilot point": n, "v": n}


@pytest.mark.parametrize("hypergrad", ["exact", "finite_diff"])
def test_no_tangent_pass_when_nothing_needs_it(hypergrad, device):
    """compute_teacher_grads=False without influences (LGTM's official objectives with compute_influence=False):
    the tangent would feed nothing, so it is not taken; the quiz side is unchanged.  With influences it is."""
    teacher, student, batch, quiz, _ = family("bert-eager", device=device)
    kw = dict(inner_lr=0.3, kd_weight=0.7, hypergrad=hypergrad, compute_teacher_grads=False, keep_pilot=True)
    bare = meta_gradient(teacher, student, batch, quiz, **kw)
    assert bare.teacher_grads == {} and bare.influences is None and "student_jvp" not in bare.timings
    full = meta_gradient(teacher, student, batch, quiz, **kw, compute_influence=True)
    assert "student_jvp" in full.timings and full.influences is not None
    assert torch.equal(bare.quiz_loss, full.quiz_loss)
    for name, v in bare.quiz_grads.items():
        assert torch.equal(v, full.quiz_grads[name]), name


class _DriftingTeacher(nn.Module):
    """A teacher whose forward does not reproduce: an offset that grows with every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x) + 0.1 * self.calls


class _StatefulTeacher(nn.Module):
    """A teacher whose forward reads and updates a buffer (as spectral norm's power iteration does)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.calls += 1
        return self.inner(x) + 0.1 * self.calls


def test_teacher_graph_recompute_replays_with_the_buffers_the_first_forward_saw(device):
    teacher, student, batch, quiz, _ = family("cnn", device=device)
    stateful = _StatefulTeacher(teacher).to(device)
    got = meta_gradient(stateful, student, batch, quiz, inner_lr=0.3, teacher_graph="recompute").teacher_grads
    kept = meta_gradient(stateful, student, batch, quiz, inner_lr=0.3, teacher_graph="keep").teacher_grads
    assert rel_err(got, kept) <= 1e-14
    assert float(stateful.calls) == 0.0  # and put back afterwards, as every buffer


def test_teacher_graph_recompute_refuses_a_teacher_that_does_not_reproduce(device):
    teacher, student, batch, quiz, _ = family("cnn", device=device)
    drifting = _DriftingTeacher(teacher)
    with pytest.raises(RuntimeError, match="teacher_graph='recompute'.*did not reproduce"):
        meta_gradient(drifting, student, batch, quiz, inner_lr=0.3, teacher_graph="recompute")


@pytest.mark.parametrize("graph", ["keep", "recompute"])
def test_teacher_with_gradient_checkpointing_matches_reference(graph, device):
    """HF gradient checkpointing on the teacher (non-reentrant, dropout active): the teacher is only
    back-propagated once, at its own parameters, so the meta-gradient stays exact, whatever the teacher_graph."""
    teacher, student, batch, quiz = dropout_case(device)
    kwargs = dict(inner_lr=0.5, temperature=1.5, kd_weight=0.6)
    torch.manual_seed(7)
    ref = reference_meta_grad(teacher, student, batch, quiz, lr=0.5, tau=1.5, w=0.6)
    teacher.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(7)
    got = meta_gradient(teacher, student, batch, quiz, teacher_graph=graph, **kwargs).teacher_grads
    assert rel_err(got, ref) <= 1e-10


@pytest.mark.parametrize("hypergrad", ["exact", "finite_diff", "autograd"])
def test_student_with_gradient_checkpointing_is_refused(hypergrad, device):
    """A checkpointed student segment recomputes, in its backward, with the module's own parameters, not
    with those torch.func.functional_call put in for the pilot point: the quiz gradient would be silently
    wrong (measured 1.3e-5 relative in float64 with a 2-layer BERT student). Refused; nothing changes."""
    teacher, student, batch, quiz, _ = family("bert-eager", device=device)
    student.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    with pytest.raises(ValueError, match="student has gradient checkpointing enabled.*gradient_checkpointing_disable"):
        meta_gradient(teacher, student, batch, quiz, inner_lr=0.3, hypergrad=hypergrad)
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters())
    student.gradient_checkpointing_disable()
    student.disable_input_require_grads()  # transformers 5 leaves enable()'s input hook in place (next test)
    meta_gradient(teacher, student, batch, quiz, inner_lr=0.3, hypergrad=hypergrad)


@pytest.mark.parametrize("options", [{}, {"inner_steps": 2}, {"student_tangent": "double_vjp"},
                                     {"hypergrad": "finite_diff"}, {"hypergrad": "autograd"}])
def test_student_with_an_input_require_grads_hook(options, device):
    """HF's enable_input_require_grads() hook (PEFT; gradient checkpointing) calls requires_grad_() in the
    forward: the forward-mode JVP cannot run it and is refused by name; every other path is exact."""
    teacher, student, batch, quiz, _ = family("bert-eager", device=device)
    student.enable_input_require_grads()
    kwargs = dict(inner_lr=0.3, temperature=2.0, kd_weight=0.7, **options)
    forward_mode = options.get("hypergrad", "exact") == "exact" and "student_tangent" not in options
    if forward_mode:
        with pytest.raises(ValueError, match="input-require-grads hook.*disable_input_require_grads"):
            meta_gradient(teacher, student, batch, quiz, **kwargs)
        student.disable_input_require_grads()
    got = meta_gradient(teacher, student, batch, quiz, **kwargs).teacher_grads
    ref = reference_meta_grad(teacher, student, batch, quiz, lr=0.3, tau=2.0, w=0.7,
                              steps=options.get("inner_steps", 1))
    assert rel_err(got, ref) <= (1e-3 if options.get("hypergrad") == "finite_diff" else 1e-10)  # LGTM's central differences: approximate


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "softmax_mse", "logit_mse"])
def test_every_kd_kind_exact_matches_autograd(kind, device):
    teacher, student, batch, quiz, shift = family("gpt2", device=device)
    kwargs = dict(inner_lr=0.2, temperature=3.0, kd_weight=0.5, kd_loss=kind, shift_labels=shift)
    exact = meta_gradient(teacher, student, batch, quiz, hypergrad="exact", compute_influence=True, **kwargs)
    auto = meta_gradient(teacher, student, batch, quiz, hypergrad="autograd", compute_influence=True, **kwargs)
    assert rel_err(exact.teacher_grads, auto.teacher_grads) <= 1e-10
    assert torch.allclose(exact.influences, auto.influences, rtol=1e-10, atol=1e-14 * float(auto.influences.abs().max()))


@pytest.mark.parametrize("name", ["bert-sdpa", "gpt2"])
def test_finite_diff_float32_within_1e_3(name, device):
    """float32 finite differences against the float64 exact meta-gradient.

    ``fd_mode="logits"`` with its default ε; LGTM's teacher-gradient difference with
    ε = 1e-3/‖v‖.  LGTM's own ε = 0.01/‖v‖ has a larger *truncation* error (the same
    in float64: 3.5e-3 on the GPT-2 pair here), checked separately below.
    """
    teacher, student, batch, quiz, shift = family(name, device=device)
    kwargs = dict(inner_lr=0.3, temperature=2.0, kd_weight=0.7, shift_labels=shift)
    exact64 = meta_gradient(teacher, student, batch, quiz, keep_pilot=True, **kwargs)
    v_norm = sum(float(v.square().sum()) for v in exact64.quiz_grads.values()) ** 0.5
    paper64 = meta_gradient(teacher, student, batch, quiz, hypergrad="finite_diff", **kwargs).teacher_grads
    teacher32, student32 = teacher.float(), student.float()
    logits = meta_gradient(teacher32, student32, batch, quiz, hypergrad="finite_diff", fd_mode="logits", **kwargs)
    lgtm = meta_gradient(teacher32, student32, batch, quiz, hypergrad="finite_diff", fd_eps=1e-3 / v_norm, **kwargs)
    paper32 = meta_gradient(teacher32, student32, batch, quiz, hypergrad="finite_diff", **kwargs).teacher_grads
    assert all(g.dtype == torch.float32 for g in logits.teacher_grads.values())
    assert rel_err(logits.teacher_grads, exact64.teacher_grads) <= 1e-3
    assert rel_err(lgtm.teacher_grads, exact64.teacher_grads) <= 1e-3
    # the paper's ε: float32 reproduces the float64 run of the same approximation, which is within 1e-2 of exact
    assert rel_err(paper32, paper64) <= 1e-3
    assert rel_err(paper64, exact64.teacher_grads) <= 1e-2


# --------------------------------------------------------------------------- influence
def reference_influence(teacher, student, batch, val, *, lr, tau, w, shift=False):
    """LGTM's w_i = ⟨∇θS ℓ_i, ∇θS' Lval⟩ with a per-sample autograd loop."""
    args, kwargs, y = _split(batch)
    vargs, vkwargs, yv = _split(val)
    params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    with torch.no_grad():
        zt = _logits(teacher(*args, **kwargs))
    zs = _logits(student(*args, **kwargs))
    ls = (1 - w) * ref_ce(zs, y, shift) + w * ref_kd(zs, zt, y, tau, shift)
    grads = torch.autograd.grad(ls, list(params.values()), allow_unused=True)
    pilot = {n: (p - lr * g).detach().requires_grad_(True) for (n, p), g in zip(params.items(), grads)}
    lval = ref_ce(_logits(functional_call(student, pilot, vargs, vkwargs)), yv, shift)
    v = torch.autograd.grad(lval, list(pilot.values()), allow_unused=True)
    out = []
    for i in range(y.shape[0]):
        sub_args = tuple(a[i : i + 1] for a in args)
        sub_kwargs = {k: t[i : i + 1] for k, t in kwargs.items()}
        zs_i = _logits(student(*sub_args, **sub_kwargs))
        zt_i = zt[i : i + 1]
        y_i = y[i : i + 1]
        zs_a, y_a = _align(zs_i, y_i, shift)
        zt_a, _ = _align(zt_i, y_i, shift)
        keep = (y_a != -100).to(zs_a.dtype)
        loss_i = (ref_kl_rows(zs_a, zt_a, tau) * keep).sum()  # summed over the sample's counted tokens
        g_i = torch.autograd.grad(loss_i, list(params.values()), allow_unused=True)
        out.append(sum((a * b).sum() for a, b in zip(g_i, v) if a is not None and b is not None))
    return torch.stack(out)


@pytest.mark.parametrize("name", ["bert-sdpa", "gpt2", "cnn"])
def test_influence_matches_per_sample_loop(name, device):
    teacher, student, batch, quiz, shift = family(name, device=device)
    if name == "cnn":  # per-sample forwards need batch-independent normalisation
        teacher.eval()
        student.eval()
    got = fastmeta.influence(teacher, student, batch, quiz, inner_lr=0.4, temperature=2.0, kd_weight=0.5, shift_labels=shift)
    ref = reference_influence(teacher, student, batch, quiz, lr=0.4, tau=2.0, w=0.5, shift=shift)
    assert got.shape == (ref.shape[0],)
    assert float((got - ref).abs().max()) <= 1e-10 * float(ref.abs().max())


def test_influence_finite_diff_lgtm_float32(device):
    """LGTM's per-sample difference [ℓ_i(θ+εv) − ℓ_i(θ−εv)]/2ε with the paper's ε = 0.01/‖v‖:
    float32 reproduces float64 of the same approximation to 1e-3; its truncation error vs exact is < 1e-2."""
    teacher, student, batch, quiz, shift = family("bert-eager", device=device)
    exact = fastmeta.influence(teacher, student, batch, quiz, inner_lr=0.4, temperature=2.0)
    kwargs = dict(inner_lr=0.4, temperature=2.0, hypergrad="finite_diff", compute_influence=True)
    fd64 = meta_gradient(teacher, student, batch, quiz, **kwargs).influences
    fd32 = meta_gradient(teacher.float(), student.float(), batch, quiz, **kwargs).influences
    scale = float(exact.abs().max())
    assert float((fd32.double() - fd64).abs().max()) <= 1e-3 * scale
    assert float((fd64 - exact).abs().max()) <= 1e-2 * scale


# --------------------------------------------------------------------------- frozen, multi-step, optimizers
def test_frozen_parameters_respected(device):
    teacher, student, batch, quiz, _ = family("bert-eager", device=device)
    teacher.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    student.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    student.bert.encoder.layer[0].attention.self.query.bias.requires_grad_(False)
    before = student.bert.encoder.layer[0].attention.self.query.bias.detach().clone()
    result = meta_gradient(teacher, student, batch, quiz, inner_lr=0.3, keep_pilot=True)
    assert "bert.embeddings.word_embeddings.weight" not in result.teacher_grads
    assert "bert.embeddings.word_embeddings.weight" not in result.student_grads
    assert "bert.encoder.layer.0.attention.self.query.bias" not in result.pilot_params
    ref = reference_meta_grad(teacher, student, batch, quiz, lr=0.3, tau=1.0, w=0.5)
    assert rel_err(result.teacher_grads, ref) <= 1e-10
    assert torch.equal(student.bert.encoder.layer[0].attention.self.query.bias, before)


@pytest.mark.parametrize("name", ["bert-eager", "cnn"])
def test_inner_steps_2_matches_unrolled_double_backward(name, device):
    teacher, student, batch, quiz, shift = family(name, device=device)
    kwargs = dict(inner_lr=0.25, temperature=2.0, kd_weight=0.6, shift_labels=shift, inner_steps=2)
    torch.manual_seed(0)
    exact = fastmeta.meta_grad(teacher, student, batch, quiz, hypergrad="exact", **kwargs)
    torch.manual_seed(0)
    auto = fastmeta.meta_grad(teacher, student, batch, quiz, hypergrad="autograd", **kwargs)
    torch.manual_seed(0)
    ref = reference_meta_grad(teacher, student, batch, quiz, lr=0.25, tau=2.0, w=0.6, shift=shift, steps=2)
    one_step = reference_meta_grad(teacher, student, batch, quiz, lr=0.25, tau=2.0, w=0.6, shift=shift, steps=1)
    assert rel_err(exact, ref) <= 1e-10
    assert rel_err(auto, ref) <= 1e-10
    assert rel_err(one_step, ref) > 1e-6  # the second step matters: the test can tell them apart


def _warm_optimizer(student, optimizer, batch, steps=2):
    """Give the optimizer non-trivial state (moments, step counts) with a few ordinary steps."""
    args, kwargs, y = _split(batch)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ref_ce(_logits(student(*args, **kwargs)), y, False)
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def linearised_adam_step(optimizer, student, decoupled):
    """The linearised Adam(W) step, written independently: second moment of this gradient held constant."""
    group = optimizer.param_groups[0]
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    by_name = dict(student.named_parameters())

    def step(name, theta, grad):
        p = by_name[name]
        state = optimizer.state[p]
        t = int(state["step"]) + 1
        g_const = grad.detach() + (0.0 if decoupled else wd * theta.detach())
        s_new = b2 * state["exp_avg_sq"] + (1 - b2) * g_const**2
        denom = (s_new / (1 - b2**t)).sqrt() + eps
        g_full = grad + (0.0 if decoupled else wd * theta.detach())
        m_new = b1 * state["exp_avg"] + (1 - b1) * g_full
        out = theta - lr * (m_new / (1 - b1**t)) / denom
        if decoupled:
            out = out - lr * wd * theta.detach()
        return out

    return step


def real_update_step(optimizer, student):
    """One update of ``optimizer`` as a function of (θ, g): the test-side transcription of torch.optim's
    update (``tests/_optim_reference.py``, checked against ``optimizer.step()`` in test_engine_optimizer)."""
    from _optim_reference import hypers_of, ref_update, state_of

    by_name = dict(student.named_parameters())

    def step(name, theta, grad):
        p = by_name[name]
        return ref_update(*hypers_of(optimizer, p), theta, grad, state_of(optimizer, p))[0]

    return step


def _student_optimizer(opt_name, params):
    return {
        "adam": lambda: torch.optim.Adam(params, lr=1e-2, weight_decay=0.01),
        "adamw": lambda: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
        "adamw_amsgrad": lambda: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True),
        "sgd_momentum": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
        "sgd_nesterov": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    }[opt_name]()


@pytest.mark.parametrize("opt_name", ["adam", "adamw", "adamw_amsgrad", "sgd_momentum", "sgd_nesterov"])
def test_optimizer_pilot_matches_double_backward_through_the_real_update(opt_name, device):
    """The pilot step is the optimizer's real next update and the meta-gradient its exact derivative
    (Adam's second moment included): against a double backward through the test's own transcription."""
    teacher, student, batch, quiz, _ = family("bert-eager", device=device)
    opt = _student_optimizer(opt_name, list(student.parameters()))
    _warm_optimizer(student, opt, quiz)
    state_before = copy.deepcopy(opt.state_dict())
    result = meta_gradient(teacher, student, batch, quiz, inner_lr=None, student_optimizer=opt, keep_pilot=True)
    auto = meta_gradient(teacher, student, batch, quiz, inner_lr=None, student_optimizer=opt, hypergrad="autograd")
    ref = reference_meta_grad(teacher, student, batch, quiz, lr=None, tau=1.0, w=0.5, step_fn=real_update_step(opt, student))
    assert rel_err(result.teacher_grads, ref) <= 1e-10
    assert rel_err(auto.teacher_grads, ref) <= 1e-10
    # the pilot point is the optimizer's own next step from these gradients
    student_copy, opt_copy = copy.deepcopy((student, opt))  # one deepcopy keeps the params <-> state mapping
    for name, p in student_copy.named_parameters():
        p.grad = result.student_grads[name].clone()
    opt_copy.step()
    stepped = {n: p.detach() for n, p in student_copy.named_parameters()}
    assert rel_err(result.pilot_params, stepped) <= 1e-12
    # the optimizer was only read
    after = opt.state_dict()
    assert after["param_groups"] == state_before["param_groups"]
    for key, st in state_before["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(after["state"][key][k]), torch.as_tensor(v))


@pytest.mark.parametrize("opt_name", ["adam", "adamw"])
def test_frozen_second_moment_matches_double_backward_of_the_linearised_step(opt_name, device):
    """``adam_jacobian="frozen_second_moment"`` (the previous engine's Adam treatment, kept as a named
    approximation) against the independent linearised step above; it is NOT the real step's derivative."""
    teacher, student, batch, quiz, _ = family("bert-eager", device=device)
    opt = _student_optimizer(opt_name, list(student.parameters()))
    _warm_optimizer(student, opt, quiz)
    frozen = meta_gradient(teacher, student, batch, quiz, inner_lr=None, student_optimizer=opt,
                           adam_jacobian="frozen_second_moment").teacher_grads
    ref = reference_meta_grad(teacher, student, batch, quiz, lr=None, tau=1.0, w=0.5,
                              step_fn=linearised_adam_step(opt, student, decoupled=opt_name == "adamw"))
    assert rel_err(frozen, ref) <= 1e-10
    exact = meta_gradient(teacher, student, batch, quiz, inner_lr=None, student_optimizer=opt).teacher_grads
    assert rel_err(frozen, exact) > 0.05  # measured 0.27 here (pilot = 3rd Adam step; docs/meta-gradient.md)


# --------------------------------------------------------------------------- side effects
@pytest.mark.parametrize("hypergrad", ["exact", "exact-double_vjp", "exact+recompute", "finite_diff",
                                       "finite_diff+recompute", "autograd"])
def test_nothing_changes(hypergrad, device):
    hypergrad, _, graph = hypergrad.partition("+")
    hypergrad, _, tangent = hypergrad.partition("-")
    teacher, student, batch, quiz, _ = family("cnn", dtype=torch.float32 if hypergrad == "finite_diff" else torch.float64,
                                              device=device)
    teacher.eval()
    student.train()
    student.head.eval()  # a mixed-mode module tree must stay mixed
    for p in list(teacher.parameters()) + list(student.parameters()):
        p.grad = torch.randn_like(p)
    params = {id(p): p.detach().clone() for p in list(teacher.parameters()) + list(student.parameters())}
    grads = {id(p): p.grad.clone() for p in list(teacher.parameters()) + list(student.parameters())}
    buffers = [(b, b.clone()) for b in list(teacher.buffers()) + list(student.buffers())]
    modes = [(m, m.training) for m in list(teacher.modules()) + list(student.modules())]
    result = meta_gradient(teacher, student, batch, quiz, inner_lr=0.3, hypergrad=hypergrad, compute_influence=True,
                           student_tangent=tangent or "jvp", teacher_graph=graph or "keep")
    assert all(torch.isfinite(g).all() for g in result.teacher_grads.values())
    for p in list(teacher.parameters()) + list(student.parameters()):
        before = params[id(p)]
        if hypergrad == "finite_diff" and any(p is q for q in student.parameters()):
            # restored within a couple of ulp of max(|θ|, |ε d|)
            assert float((p.detach() - before).abs().max()) <= 4 * torch.finfo(p.dtype).eps * max(1.0, float(before.abs().max()))
        else:
            assert torch.equal(p.detach(), before)
        assert torch.equal(p.grad, grads[id(p)])
    for b, saved in buffers:
        assert torch.equal(b, saved)
    for m, mode in modes:
        assert m.training == mode


def test_finite_diff_restores_parameters_within_two_ulp_of_perturbation(device):
    teacher, student, batch, quiz, _ = family("bert-sdpa", dtype=torch.float32, device=device)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    result = meta_gradient(teacher, student, batch, quiz, inner_lr=0.3, hypergrad="finite_diff", keep_pilot=True)
    norm = sum(float(v.double().square().sum()) for v in result.quiz_grads.values()) ** 0.5
    eps = 0.01 / norm
    ulp = torch.finfo(torch.float32).eps
    for n, p in student.named_parameters():
        scale = torch.maximum(before[n].abs(), (eps * result.quiz_grads[n]).abs())
        assert bool(((p.detach() - before[n]).abs() <= 2 * ulp * scale).all()), n


# --------------------------------------------------------------------------- errors
def test_bad_input_raises_clear_errors_and_changes_nothing(device):
    teacher, student, batch, quiz, _ = family("bert-eager", device=device)
    snapshot = [p.detach().clone() for p in student.parameters()]
    kw = dict(inner_lr=0.1)
    with pytest.raises(ValueError, match="labels"):
        fastmeta.meta_grad(teacher, student, {k: v for k, v in batch.items() if k != "labels"}, quiz, **kw)
    with pytest.raises(ValueError, match="empty"):
        fastmeta.meta_grad(teacher, student, {k: v[:0] for k, v in batch.items()}, quiz, **kw)
    with pytest.raises(ValueError, match="temperature"):
        fastmeta.meta_grad(teacher, student, batch, quiz, temperature=0.0, **kw)
    with pytest.raises(ValueError, match="inner_lr"):
        fastmeta.meta_grad(teacher, student, batch, quiz, inner_lr=-1.0)
    for name, value, error in (("inner_lr", "0.1", TypeError), ("inner_lr", True, TypeError),
                               ("inner_lr", float("inf"), ValueError), ("fd_eps", "1e-3", TypeError),
                               ("fd_eps", float("nan"), ValueError), ("loss_scale", "2", TypeError)):
        # numbers are numbers (a string is not converted), as in meta_step: one check_number for all
        with pytest.raises(error, match=name):
            meta_gradient(teacher, student, batch, quiz, **{**kw, name: value})
    with pytest.raises(ValueError, match="hypergrad"):
        fastmeta.meta_grad(teacher, student, batch, quiz, hypergrad="magic", **kw)
    with pytest.raises(ValueError, match="first-order term is identically zero"):
        fastmeta.meta_grad(teacher, student, batch, quiz, hypergrad="first_order", **kw)
    other_teacher = make_bert(24, 1, num_labels=4, seed=5).to(device)
    with pytest.raises(ValueError, match="do not match student logits"):
        fastmeta.meta_grad(other_teacher, student, batch, quiz, **kw)
    meta_teacher = make_bert(24, 1, seed=5).to("meta")
    with pytest.raises(ValueError, match="different devices"):
        fastmeta.meta_grad(meta_teacher, student, batch, quiz, **kw)
    lm_teacher, lm_student, lm_batch, lm_quiz, _ = family("gpt2", device=device)
    with pytest.raises(ValueError, match="shift_labels"):
        fastmeta.meta_grad(lm_teacher, lm_student, {**lm_batch, "labels": lm_batch["labels"][:, :-1]}, lm_quiz, **kw)
    all_ignored = {**lm_batch, "labels": torch.full_like(lm_batch["labels"], -100)}
    with pytest.raises(ValueError, match="-100"):
        fastmeta.meta_grad(lm_teacher, lm_student, all_ignored, lm_quiz, shift_labels=True, **kw)
    with torch.no_grad():
        teacher.classifier.bias.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="teacher logits"):
        fastmeta.meta_grad(teacher, student, batch, quiz, **kw)
    assert all(torch.equal(p, s) for p, s in zip(student.parameters(), snapshot))
    assert all(p.grad is None for p in student.parameters())


def test_tuple_batches_and_result_fields(device):
    teacher, student, batch, quiz, _ = family("cnn", device=device)
    result = meta_gradient(teacher, student, batch, quiz, inner_lr=0.3, compute_influence=True, keep_pilot=True)
    assert result.influences.shape == (6,)
    assert result.student_loss.dim() == 0 and result.quiz_loss.dim() == 0
    assert result.teacher_logits.shape == (6, 5) and not result.teacher_logits.requires_grad
    assert set(result.student_grads) == {n for n, _ in student.named_parameters()}
    assert {"teacher_forward", "student_forward_backward", "quiz_forward_backward", "student_jvp", "teacher_backward", "total"} <= set(result.timings)
    # the student gradient is ∇θS LS at θS
    args, _, y = _split(batch)
    with torch.no_grad():
        zt = teacher(*args)
    zs = student(*args)
    ls = 0.5 * ref_ce(zs, y, False) + 0.5 * ref_kd(zs, zt, y, 1.0, False)
    grads = torch.autograd.grad(ls, list(student.parameters()))
    assert rel_err(result.student_grads, dict(zip([n for n, _ in student.named_parameters()], grads))) <= 1e-12
    assert abs(float(result.student_loss) - float(ls.detach())) <= 1e-12


@pytest.mark.parametrize("name", ["bert-eager", "cnn"])
def test_inner_steps_2_finite_diff(name, device):
    """LGTM-style differences along a 2-step trajectory (student HVPs by gradient differences):
    float32 reproduces float64 of the same approximation to 1e-3, which is within 1e-2 of exact."""
    teacher, student, batch, quiz, shift = family(name, device=device)
    kwargs = dict(inner_lr=0.25, temperature=2.0, kd_weight=0.6, shift_labels=shift, inner_steps=2)
    torch.manual_seed(0)
    exact = fastmeta.meta_grad(teacher, student, batch, quiz, **kwargs)
    torch.manual_seed(0)
    fd64 = fastmeta.meta_grad(teacher, student, batch, quiz, hypergrad="finite_diff", **kwargs)
    torch.manual_seed(0)
    fd32 = fastmeta.meta_grad(teacher.float(), student.float(), batch if name != "cnn" else (batch[0].float(), batch[1]),
                              quiz if name != "cnn" else (quiz[0].float(), quiz[1]), hypergrad="finite_diff", **kwargs)
    assert rel_err(fd64, exact) <= 1e-2
    assert rel_err(fd32, fd64) <= 1e-3


@pytest.mark.parametrize("hypergrad", ["exact", "autograd"])
def test_meta_weight_scales_the_meta_gradient_alone(hypergrad):
    """``Options.meta_weight`` (internal; IKD's γ) weights the meta-gradient with or without an own loss, in the
    exact path as in the double-backward reference; 0 gives zeros (no meta term is computed, none crashes)."""
    from fastmeta.batching import split_batch
    from fastmeta.engine import api

    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(5, 3).double(), torch.nn.Linear(5, 3).double()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
    quiz = (torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))

    def grads(weight):
        options = api.Options(inner_lr=0.1, temperature=2.0, hypergrad=hypergrad, meta_weight=weight)
        out = api.run(teacher, student, split_batch(batch), split_batch(quiz), torch.device("cpu"), None, options)
        return torch.cat([t.flatten() for t in out.teacher_grads.values()])

    full = grads(1.0)
    assert float(full.abs().max()) > 1e-4
    torch.testing.assert_close(grads(0.5), 0.5 * full, rtol=1e-12, atol=1e-15)
    zero = grads(0.0)
    assert zero.shape == full.shape and not zero.any()
