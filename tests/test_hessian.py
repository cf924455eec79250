"""fastmeta.hvp / fastmeta.mixed_hvp against an independent float64 Hessian.

References (none of fastmeta's code): the MLP's full Hessian (``torch.autograd.functional.hessian``
of the loss as a function of its flattened parameters) times ``v``; for the transformers,
``torch.autograd.functional.vhp`` (PyTorch's double backward; the Hessian is symmetric, so
``vᵀH = Hv``) of the loss through ``torch.func.functional_call``, under the math SDPA backend.
Mixed products ``∇θT⟨∇θS L, v⟩`` are the teacher block of the joint Hessian applied to
``(0, v)``; the KD losses of the references are written out here (``_kd_loss_fp64``).

Models: an MLP, a tiny BERT (eager and sdpa attention) and a tiny GPT-2 LM, built
in-process (random init, offline), on every device of ``conftest.DEVICES``.  Tolerances
(HELPERS.md): forward_over_reverse, autograd and exact <= 1e-10 relative in float64;
finite_diff <= 1e-3 relative in float32 (against the float64 reference); parameters
bitwise unchanged for the exact methods, within 2 ulp (of max(|θ|, ε|v|)) for
finite_diff's fast restore, bitwise for restore="exact".
"""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES

import fastmeta
from fastmeta import losses
from fastmeta.hessian import hvp, mixed_hvp

transformers = pytest.importorskip("transformers")
on_devices = pytest.mark.parametrize("device", DEVICES)


# --------------------------------------------------------------------------- models
def _bert(layers, impl, seed, dropout=0.0):
    cfg = transformers.BertConfig(
        vocab_size=41, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    cfg._attn_implementation = impl
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg).double().eval()


def _gpt2(layers, seed):
    cfg = transformers.GPT2Config(
        vocab_size=37, n_embd=16, n_layer=layers, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _mlp(seed, d_in=7, d_out=5):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, 13), torch.nn.Tanh(), torch.nn.Linear(13, d_out)).double()


def _inputs(kind, device="cpu"):
    g = torch.Generator().manual_seed(123)
    if kind.startswith("bert"):
        ids = torch.randint(0, 41, (3, 7), generator=g)
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[0, 5:] = 0  # padding in one row
        labels = torch.randint(0, 3, (3,), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, labels.to(device)
    if kind == "gpt2":
        ids = torch.randint(0, 37, (2, 6), generator=g).to(device)
        return {"input_ids": ids}, ids
    x = torch.randn(6, 7, generator=g, dtype=torch.float64)
    return x.to(device), torch.randint(0, 5, (6,), generator=g).to(device)


def _model(kind, seed=0, layers=2, device="cpu"):
    if kind == "mlp":
        return _mlp(seed).to(device)
    if kind == "gpt2":
        return _gpt2(layers, seed).to(device)
    return _bert(layers, kind.split("_")[1], seed).to(device)


def _loss_fn(kind, device="cpu"):
    inputs, labels = _inputs(kind, device)
    if kind == "mlp":
        return lambda m: F.cross_entropy(m(inputs.to(next(m.parameters()).dtype)), labels)
    if kind == "gpt2":
        # next-token CE computed here: HF's built-in LM loss upcasts logits to float32
        # (logits.float()), which would cap a float64 test at float32 accuracy
        def lm_loss(m):
            z = m(**inputs).logits[:, :-1]
            return F.cross_entropy(z.reshape(-1, z.shape[-1]), labels[:, 1:].reshape(-1))

        return lm_loss
    return lambda m: F.cross_entropy(m(**inputs).logits, labels)


def _random_vector(module, seed=7, dtype=None):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(p.shape, generator=g, dtype=torch.float64).to(device=p.device, dtype=dtype or p.dtype)
        for p in module.parameters()
        if p.requires_grad
    ]


# --------------------------------------------------------------------------- independent references
class _Call(torch.nn.Module):
    """``forward() = fn(*modules)`` with the modules registered as children, so that
    ``torch.func.functional_call`` can substitute their parameters (names "m0.…", "m1.…")."""

    def __init__(self, fn, *modules):
        super().__init__()
        for i, module in enumerate(modules):
            self.add_module(f"m{i}", module)
        object.__setattr__(self, "_fn", fn)

    def forward(self):
        return self._fn(*self.children())


def _trainable_names(module, prefix):
    return [f"{prefix}.{n}" for n, p in module.named_parameters() if p.requires_grad]


def _reference_hessian_product(fn, modules, wrt, tangent, full=False):
    """``H·tangent`` of the scalar ``fn(*modules)`` in the parameters named in ``wrt`` (the
    others are constants), as a list aligned with ``wrt``.  ``full=True``: the explicit
    Hessian of the flattened parameters (``torch.autograd.functional.hessian``) times the
    flattened tangent (small models only); else ``torch.autograd.functional.vhp``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    call = _Call(fn, *modules)
    primals = [call.get_parameter(n).detach() for n in wrt]
    tangent = [t.to(p.dtype) for t, p in zip(tangent, primals)]

    def f(*params):
        with sdpa_kernel(SDPBackend.MATH):  # SDPA's fused kernels have no double backward
            return torch.func.functional_call(call, dict(zip(wrt, params)), ())

    if not full:
        return list(torch.autograd.functional.vhp(f, tuple(primals), tuple(tangent))[1])
    sizes = [p.numel() for p in primals]

    def f_flat(flat):
        return f(*[chunk.view_as(p) for chunk, p in zip(flat.split(sizes), primals)])

    flat = torch.cat([p.reshape(-1) for p in primals])
    hessian = torch.autograd.functional.hessian(f_flat, flat, vectorize=True)
    assert hessian.shape == (flat.numel(), flat.numel())
    product = hessian @ torch.cat([t.reshape(-1) for t in tangent])
    return [chunk.view_as(p) for chunk, p in zip(product.split(sizes), primals)]


def _reference_hvp(kind, model, v, device, names=None):
    """Independent ``∇²L·v`` for ``_loss_fn(kind)``; ``names`` restricts to those parameters."""
    names = names if names is not None else [n for n, p in model.named_parameters() if p.requires_grad]
    return _reference_hessian_product(_loss_fn(kind, device), [model], [f"m0.{n}" for n in names], v,
                                      full=kind == "mlp")


def _kd_loss_fp64(zs, zt, kind, temperature, mask=None):
    """Batchmean KD loss over the counted rows from the definitions (τ² scaling):
    kl τ²·KL(pt‖ps), reverse_kl τ²·KL(ps‖pt), softmax_mse τ²·mean_j (ps − pt)²,
    logit_mse mean_j (zs − zt)²."""
    tau = float(temperature)
    v = zs.shape[-1]
    zs, zt = zs.reshape(-1, v), zt.reshape(-1, v)
    if kind == "logit_mse":
        rows = F.mse_loss(zs, zt, reduction="none").mean(-1)
    else:
        log_ps, log_pt = F.log_softmax(zs / tau, -1), F.log_softmax(zt / tau, -1)
        if kind == "kl":
            rows = tau**2 * F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
        elif kind == "reverse_kl":
            rows = tau**2 * F.kl_div(log_pt, log_ps, reduction="none", log_target=True).sum(-1)
        else:
            rows = tau**2 * F.mse_loss(log_ps.exp(), log_pt.exp(), reduction="none").mean(-1)
    if mask is None:
        return rows.mean()
    keep = mask.reshape(-1)
    return rows[keep].sum() / keep.sum()


def _logits(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _reference_mixed(teacher, student, inputs, v, loss, kwargs, full=False):
    """Independent ``∇θT⟨∇θS L, v⟩``: the teacher block of the joint Hessian of
    ``L(θT, θS)`` applied to ``(0, v)`` (list over the teacher's trainable parameters)."""
    def fn(t, s):
        zs, zt = _logits(s, inputs), _logits(t, inputs)
        if callable(loss):
            return loss(zs, zt, **kwargs)
        return _kd_loss_fp64(zs, zt, loss, **kwargs)

    t_names, s_names = _trainable_names(teacher, "m0"), _trainable_names(student, "m1")
    t_params = [p for p in teacher.parameters() if p.requires_grad]
    zeros = [torch.zeros_like(p) for p in t_params]
    both = _reference_hessian_product(fn, [teacher, student], t_names + s_names, zeros + list(v), full=full)
    return both[: len(t_names)]


def _rel(a, b):
    a = list(a.values()) if isinstance(a, dict) else list(a)
    b = list(b.values()) if isinstance(b, dict) else list(b)
    assert len(a) == len(b)
    for x in a:
        assert torch.isfinite(x).all(), "NaN/inf in result"
    num = sum(float(((x.double() - y.double()) ** 2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float((y.double() ** 2).sum()) for y in b) ** 0.5
    assert den > 0, "reference is zero: the test would be vacuous"
    return num / den


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_bitwise_unchanged(module, snap):
    for k, v in module.state_dict().items():
        assert torch.equal(v, snap[k]), f"{k} changed"


def _ulp(t):
    finfo = torch.finfo(t.dtype)
    mant = {torch.float32: 23, torch.float64: 52, torch.float16: 10, torch.bfloat16: 7}[t.dtype]
    a = t.abs().double().clamp(min=finfo.tiny)
    return torch.exp2(torch.floor(torch.log2(a)) - mant)


def _float32_copy(module):
    return copy.deepcopy(module).float()


KINDS = ["mlp", "bert_eager", "bert_sdpa", "gpt2"]


# --------------------------------------------------------------------------- hvp
@pytest.fixture(scope="module")
def references():
    """Per (model kind, device): the float64 model, v and the independent H·v (computed once)."""
    cache = {}

    def get(kind, device):
        if (kind, device) not in cache:
            model = _model(kind, device=device)
            v = _random_vector(model)
            ref = _reference_hvp(kind, model, v, device)
            assert sum(float(t.abs().sum()) for t in ref) > 0
            cache[kind, device] = (model, v, ref)
        return cache[kind, device]

    return get


@on_devices
@pytest.mark.parametrize("kind", KINDS)
def test_hvp_forward_over_reverse_float64(kind, device, references):
    model, v, ref = references(kind, device)
    snap = _snapshot(model)
    got = hvp(_loss_fn(kind, device), model, v, method="forward_over_reverse")
    assert all(t.device == p.device for t, p in zip(got, model.parameters()))
    assert _rel(got, ref) <= 1e-10
    _assert_bitwise_unchanged(model, snap)


@on_devices
@pytest.mark.parametrize("kind", KINDS)
def test_hvp_finite_diff_float32(kind, device, references):
    model64, v, ref = references(kind, device)
    model = _float32_copy(model64)
    v32 = [t.float() for t in v]
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    got = hvp(_loss_fn(kind, device), model, v32, method="finite_diff", r=1e-2)
    assert all(t.dtype == torch.float32 for t in got)
    assert _rel(got, ref) <= 1e-3
    # fast restore: within 2 ulp of max(|θ|, ε|v|), element by element
    eps = 1e-2 / float(fastmeta.ops.norm(v32, dtype=torch.float64))
    for p, b, t in zip(params, before, v32):
        scale = torch.maximum(b.abs(), (eps * t).abs())
        assert torch.all((p.detach() - b).abs() <= 2 * _ulp(scale.float())), "fast restore off by > 2 ulp"
    # exact restore: bitwise
    snap = _snapshot(model)
    got_exact = hvp(_loss_fn(kind, device), model, v32, method="finite_diff", restore="exact")
    _assert_bitwise_unchanged(model, snap)
    assert _rel(got_exact, ref) <= 1e-3


@on_devices
@pytest.mark.parametrize("kind", ["mlp", "bert_sdpa"])
def test_hvp_autograd_float64_leaves_parameters_and_grads(kind, device, references):
    model, v, ref = references(kind, device)
    snap = _snapshot(model)
    got = hvp(_loss_fn(kind, device), model, v, method="autograd")
    assert _rel(got, ref) <= 1e-10
    _assert_bitwise_unchanged(model, snap)
    assert all(p.grad is None for p in model.parameters())


@on_devices
def test_hvp_dict_subset_and_frozen_parameters(device):
    model = _model("bert_eager", seed=3, device=device)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # frozen: a constant
    loss_fn = _loss_fn("bert_eager", device)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert "bert.embeddings.word_embeddings.weight" not in trainable
    subset = [n for n in trainable if "layer.1." in n or n.startswith("classifier")]
    g = torch.Generator().manual_seed(0)
    v = {n: torch.randn(trainable[n].shape, generator=g, dtype=torch.float64).to(device) for n in subset}
    # the Hessian block of the subset (every other parameter a constant), independently
    ref = dict(zip(subset, _reference_hvp("bert_eager", model, [v[n] for n in subset], device, names=subset)))
    for method in ("forward_over_reverse", "autograd"):
        got = hvp(loss_fn, model, v, method=method)
        assert isinstance(got, dict) and list(got) == subset and _rel(got, ref) <= 1e-10
    # the dict product is the Hessian block of the subset: equal to the full product
    # with zeros elsewhere, restricted to the subset
    full_v = [v[n] if n in v else torch.zeros_like(p) for n, p in trainable.items()]
    full = hvp(loss_fn, model, full_v, method="forward_over_reverse")
    full_d = dict(zip(trainable, full))
    assert _rel({n: full_d[n] for n in subset}, ref) <= 1e-10
    with pytest.raises(KeyError, match="not a trainable parameter"):
        hvp(loss_fn, model, {"bert.embeddings.word_embeddings.weight": torch.zeros(41, 16, device=device)})


@on_devices
def test_hvp_list_of_tensors_pure_function(device):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    b = torch.randn(3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64).to(device)

    def loss_fn(ps):
        w, c = ps
        return torch.tanh(x @ w + c).pow(3).sum()

    v = [torch.randn(4, 3, generator=g, dtype=torch.float64).to(device),
         torch.randn(3, generator=g, dtype=torch.float64).to(device)]
    # explicit Hessian as the reference
    flat = torch.cat([a.detach().reshape(-1), b.detach()])
    H = torch.autograd.functional.hessian(lambda f: loss_fn([f[:12].reshape(4, 3), f[12:]]), flat)
    ref_flat = H @ torch.cat([v[0].reshape(-1), v[1]])
    ref = [ref_flat[:12].reshape(4, 3), ref_flat[12:]]
    for method in ("forward_over_reverse", "autograd"):
        assert _rel(hvp(loss_fn, [a, b], v, method=method), ref) <= 1e-12
    before = [a.detach().clone(), b.detach().clone()]
    assert _rel(hvp(loss_fn, [a, b], v, method="finite_diff", r=1e-4), ref) <= 1e-6
    assert torch.allclose(a, before[0], rtol=0, atol=1e-15) and torch.allclose(b, before[1], rtol=0, atol=1e-15)


@on_devices
def test_hvp_finite_diff_replays_dropout_masks(device):
    model = _bert(2, "eager", seed=4, dropout=0.3).to(device).train()
    loss_fn = _loss_fn("bert_eager", device)
    v = _random_vector(model)
    torch.manual_seed(11)  # the reference's single forward draws the masks every method replays
    ref = _reference_hvp("bert_eager", model, v, device)
    torch.manual_seed(11)
    assert _rel(hvp(loss_fn, model, v, method="forward_over_reverse"), ref) <= 1e-10
    torch.manual_seed(11)
    got = hvp(loss_fn, model, v, method="finite_diff", r=1e-5, restore="exact")
    assert _rel(got, ref) <= 1e-6  # same masks in both gradients and in the exact product


@on_devices
def test_hvp_bad_inputs(device):
    model = _mlp(0).to(device)
    loss_fn = _loss_fn("mlp", device)
    v = _random_vector(model)
    with pytest.raises(ValueError, match="method must be one of"):
        hvp(loss_fn, model, v, method="double_backward")
    with pytest.raises(ValueError, match="list of 3 tensors but the module has 4"):
        hvp(loss_fn, model, v[:3])
    with pytest.raises(ValueError, match=r"vector\['0.weight'\] has shape"):
        hvp(loss_fn, model, {"0.weight": torch.zeros(2, 2, dtype=torch.float64, device=device)})
    bad = [t.clone() for t in v]
    bad[1][0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        hvp(loss_fn, model, bad)
    with pytest.raises(ValueError, match="restore must be one of"):
        hvp(loss_fn, model, v, method="finite_diff", restore="approx")
    with pytest.raises(ValueError, match="scalar"):
        hvp(lambda m: m(torch.zeros(2, 7, dtype=torch.float64, device=device)), model, v, method="autograd")
    zero = hvp(loss_fn, model, [torch.zeros_like(t) for t in v], method="finite_diff")
    assert all(torch.count_nonzero(z) == 0 for z in zero)


# --------------------------------------------------------------------------- mixed_hvp
def _pair(kind, device="cpu"):
    if kind == "gpt2":
        return _gpt2(2, seed=1).to(device), _gpt2(1, seed=2).to(device)
    if kind == "mlp":
        return _mlp(1).to(device), _mlp(2).to(device)
    impl = kind.split("_")[1]
    return _bert(2, impl, seed=1).to(device), _bert(1, impl, seed=2).to(device)


def _mixed_loss(kind, loss_name, device="cpu"):
    """(loss, loss_kwargs) for mixed_hvp."""
    kwargs = {"temperature": 2.0}
    if kind == "gpt2":
        mask = torch.ones(2, 6, dtype=torch.bool)
        mask[1, 4:] = False  # ignored tokens
        kwargs["mask"] = mask.to(device)
    if loss_name == "generic":  # a non-KD logit loss: autograd cotangent in logit space
        return (lambda zs, zt: (torch.tanh(zs - zt) ** 2).mean() + (zs.softmax(-1) * zt).sum() / zs.numel()), {}
    return loss_name, kwargs


def _teacher_student_inputs(kind, device="cpu"):
    inputs, _ = _inputs(kind, device)
    return inputs


MIXED_CASES = [
    ("bert_eager", "kl"),
    ("bert_sdpa", "kl"),
    ("bert_eager", "reverse_kl"),
    ("bert_eager", "softmax_mse"),
    ("mlp", "logit_mse"),
    ("mlp", "generic"),
    ("gpt2", "kl"),
    ("gpt2", "generic"),
]


@pytest.fixture(scope="module")
def mixed_references():
    cache = {}

    def get(kind, loss_name, device):
        key = (kind, loss_name, device)
        if key not in cache:
            teacher, student = _pair(kind, device)
            loss, kwargs = _mixed_loss(kind, loss_name, device)
            inputs = _teacher_student_inputs(kind, device)
            v = _random_vector(student, seed=9)
            ref = _reference_mixed(teacher, student, inputs, v, loss, kwargs, full=kind == "mlp")
            assert sum(float(t.abs().sum()) for t in ref) > 0
            cache[key] = (teacher, student, inputs, v, loss, kwargs, ref)
        return cache[key]

    return get


@on_devices
@pytest.mark.parametrize("method", ["exact", "forward_over_reverse", "autograd"])
@pytest.mark.parametrize("kind,loss_name", MIXED_CASES)
def test_mixed_hvp_exact_methods_float64(kind, loss_name, method, device, mixed_references):
    teacher, student, inputs, v, loss, kwargs, ref = mixed_references(kind, loss_name, device)
    snaps = _snapshot(teacher), _snapshot(student)
    got = mixed_hvp(teacher, student, inputs, v, loss=loss, loss_kwargs=kwargs, method=method)
    assert len(got) == sum(p.requires_grad for p in teacher.parameters())
    assert _rel(got, ref) <= 1e-10
    _assert_bitwise_unchanged(teacher, snaps[0])
    _assert_bitwise_unchanged(student, snaps[1])


@on_devices
@pytest.mark.parametrize("kind,loss_name", [("bert_eager", "kl"), ("bert_sdpa", "kl"), ("gpt2", "kl"),
                                            ("mlp", "generic")])
def test_mixed_hvp_finite_diff_float32(kind, loss_name, device, mixed_references):
    teacher64, student64, inputs, v, loss, kwargs, ref = mixed_references(kind, loss_name, device)
    teacher, student = _float32_copy(teacher64), _float32_copy(student64)
    if kind == "mlp":
        inputs = inputs.float()
    v32 = [t.float() for t in v]
    t_snap = _snapshot(teacher)
    params = [p for p in student.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    got = mixed_hvp(teacher, student, inputs, v32, loss=loss, loss_kwargs=kwargs, method="finite_diff")
    assert _rel(got, ref) <= 1e-3
    _assert_bitwise_unchanged(teacher, t_snap)
    eps = 1e-2 / float(fastmeta.ops.norm(v32, dtype=torch.float64))
    for p, b, t in zip(params, before, v32):
        scale = torch.maximum(b.abs(), (eps * t).abs())
        assert torch.all((p.detach() - b).abs() <= 2 * _ulp(scale.float()))
    s_snap = _snapshot(student)
    got = mixed_hvp(teacher, student, inputs, v32, loss=loss, loss_kwargs=kwargs, method="finite_diff",
                    restore="exact")
    _assert_bitwise_unchanged(student, s_snap)
    assert _rel(got, ref) <= 1e-3
    # the exact method in float32 for comparison (same tolerance class as float32 paths)
    exact32 = mixed_hvp(teacher, student, inputs, v32, loss=loss, loss_kwargs=kwargs, method="exact")
    assert _rel(exact32, ref) <= 1e-4


@on_devices
def test_mixed_hvp_exact_with_finite_diff_student_jvp(device, mixed_references):
    teacher, student, inputs, v, loss, kwargs, ref = mixed_references("bert_sdpa", "kl", device)
    snap = _snapshot(student)
    got = mixed_hvp(teacher, student, inputs, v, loss=loss, loss_kwargs=kwargs, method="exact",
                    student_jvp="finite_diff")
    assert _rel(got, ref) <= 1e-6
    for k, t in student.state_dict().items():  # in-place perturbation, restored to ~ulp
        assert torch.allclose(t, snap[k], rtol=1e-15, atol=1e-18), k


@on_devices
def test_mixed_hvp_dict_vector_and_kd_loss_callable(device, mixed_references):
    teacher, student, inputs, v, loss, kwargs, ref = mixed_references("bert_eager", "kl", device)
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    vd = dict(zip(names, v))
    got = mixed_hvp(teacher, student, inputs, vd, loss=losses.kd_loss, loss_kwargs=kwargs)
    t_names = [n for n, p in teacher.named_parameters() if p.requires_grad]
    assert isinstance(got, dict) and list(got) == t_names
    assert _rel(got, ref) <= 1e-10
    # docs/meta-gradient.md's closed form: -eta * mixed == J_T^T (eta*w*(pt*u - pt<pt,u>)/B) (tau cancels)
    plain = functools.partial(losses.kd_loss, temperature=2.0)
    got_generic = mixed_hvp(teacher, student, inputs, v, loss=plain, method="exact")
    assert _rel(got_generic, ref) <= 1e-10


@on_devices
def test_mixed_hvp_frozen_teacher_parameters(device, mixed_references):
    teacher, student, inputs, v, loss, kwargs, _ = mixed_references("bert_eager", "kl", device)
    teacher = copy.deepcopy(teacher)
    teacher.bert.embeddings.requires_grad_(False)
    ref = _reference_mixed(teacher, student, inputs, v, loss, kwargs)  # frozen ones are constants
    for method in ("exact", "autograd"):
        got = mixed_hvp(teacher, student, inputs, v, loss=loss, loss_kwargs=kwargs, method=method)
        assert len(got) == sum(p.requires_grad for p in teacher.parameters()) == len(ref)
        assert _rel(got, ref) <= 1e-10


@on_devices
def test_mixed_hvp_bad_inputs(device, mixed_references):
    teacher, student, inputs, v, loss, kwargs, _ = mixed_references("mlp", "logit_mse", device)
    with pytest.raises(ValueError, match="method must be one of"):
        mixed_hvp(teacher, student, inputs, v, method="lgtm")
    with pytest.raises(ValueError, match="loss must be one of"):
        mixed_hvp(teacher, student, inputs, v, loss="cosine")
    with pytest.raises(ValueError, match="not arguments of fastmeta.losses.kd_loss"):
        mixed_hvp(teacher, student, inputs, v, loss="kl", loss_kwargs={"alpha": 0.5})
    with pytest.raises(ValueError, match="student_jvp"):
        mixed_hvp(teacher, student, inputs, v, student_jvp="reverse")
