"""fastmeta.ops: the C++ extension ops against their plain-PyTorch twins (CPU; CUDA when lent)."""
import math

import pytest
import torch

from fastmeta import ops

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPE_SETS = {
    "mixed": [(3, 5), (7,), (2, 3, 4), (1,), (33, 17)],
    "odd_large": [(40_001,), (129, 257)],  # several 32k chunks, odd tails
    "with_empty": [(0,), (5, 0), (11,)],
}


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


def _ext_or_skip(device):
    if not ops.extension_ops_available(device):
        pytest.skip(f"fastmeta extension not built for {device} (see fastmeta.backends())")


def _lists(shapes, dtype, device, n=2, seed=0, positive=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ts = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        if positive:
            ts = [t.abs() + 0.1 for t in ts]
        out.append([t.to(dtype=dtype, device=device) for t in ts])
    return out


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of floating-point numbers at |t| (in t's dtype, returned as float64)."""
    finfo = torch.finfo(t.dtype)
    a = t.abs().double()
    exponent = torch.floor(torch.log2(torch.clamp(a, min=finfo.tiny)))
    return torch.exp2(exponent - (finfo.bits - 1 - _exp_bits(t.dtype))).clamp(min=finfo.tiny)


def _exp_bits(dtype):
    return {torch.float16: 5, torch.bfloat16: 8, torch.float32: 8, torch.float64: 11}[dtype]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", list(SHAPE_SETS), ids=list(SHAPE_SETS))
def test_add_scaled_matches_twin(device, dtype, shapes):
    _ext_or_skip(device)
    params, vecs = _lists(SHAPE_SETS[shapes], dtype, device)
    a = [p.clone() for p in params]
    b = [p.clone() for p in params]
    ops.add_scaled_(a, vecs, -0.37, backend="extension")
    ops.add_scaled_(b, vecs, -0.37, backend="torch")
    # both compute p + alpha*v in fp32/fp64 math; the twin may fuse the multiply-add (FMA),
    # the extension rounds alpha*v first: they may differ by one rounding of each
    for x, y, v in zip(a, b, vecs):
        assert x.dtype == dtype and x.shape == y.shape
        diff = (x.double() - y.double()).abs()
        bound = _ulp(y) + _ulp((-0.37 * v.double()).to(dtype))
        assert torch.all(diff <= bound), f"max diff {diff.max() if diff.numel() else 0}"
    # against a float64 reference: within the roundings of alpha*v and of the sum
    for x, p, v in zip(a, params, vecs):
        ref = p.double() - 0.37 * v.double()
        bound = _ulp(ref.to(dtype)) + _ulp((0.37 * v.double()).to(dtype))
        assert torch.all((x.double() - ref).abs() <= bound)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", list(SHAPE_SETS), ids=list(SHAPE_SETS))
def test_dot_and_norm_match_reference(device, dtype, acc, shapes):
    _ext_or_skip(device)
    xs, ys = _lists(SHAPE_SETS[shapes], dtype, device, seed=1)
    ref = sum(float((x.double() * y.double()).sum()) for x, y in zip(xs, ys))
    ref_norm = math.sqrt(sum(float((x.double() ** 2).sum()) for x in xs))
    n = sum(x.numel() for x in xs)
    rtol = 1e-12 if acc == torch.float64 else 1e-5
    got = ops.dot(xs, ys, dtype=acc, backend="extension")
    twin = ops.dot(xs, ys, dtype=acc, backend="torch")
    assert got.dtype == acc and got.shape == ()
    # error bound relative to sum |x_i y_i| (the dot may cancel)
    scale = sum(float((x.double() * y.double()).abs().sum()) for x, y in zip(xs, ys)) + 1e-30
    err_ext = abs(float(got) - ref) / scale
    err_twin = abs(float(twin) - ref) / scale
    assert err_ext <= max(rtol, 2 * err_twin), (err_ext, err_twin)
    nrm = ops.norm(xs, dtype=acc, backend="extension")
    assert nrm.dtype == acc
    assert abs(float(nrm) - ref_norm) <= rtol * ref_norm + 1e-30, (float(nrm), ref_norm, n)
    assert torch.isfinite(got) and torch.isfinite(nrm)


@pytest.mark.parametrize("device", _devices())
def test_dot_is_deterministic_across_thread_counts(device):
    _ext_or_skip(device)
    xs, ys = _lists([(100_003,), (70_000,), (3,)], torch.float32, device, seed=2)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(ops.dot(xs, ys, backend="extension").item())
            results.append(ops.norm(xs, backend="extension").item())
    finally:
        torch.set_num_threads(before)
    assert results[0] == results[2] and results[1] == results[3]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", list(SHAPE_SETS), ids=list(SHAPE_SETS))
def test_central_difference_matches_twin(device, dtype, shapes):
    _ext_or_skip(device)
    gp, gm = _lists(SHAPE_SETS[shapes], dtype, device, seed=3)
    got = ops.central_difference(gp, gm, 3e-3, backend="extension")
    twin = ops.central_difference(gp, gm, 3e-3, backend="torch")
    assert len(got) == len(gp)
    for a, b, x in zip(got, twin, gp):
        assert a.dtype == x.dtype and a.shape == x.shape
        assert torch.equal(a, b)  # same fp32/fp64 math, same rounding
    # in place: written into g_plus, same values
    for backend in ("extension", "torch"):
        target = [g.clone() for g in gp]
        res = ops.central_difference(target, gm, 3e-3, inplace=True, backend=backend)
        assert all(r is t for r, t in zip(res, target))
        for a, b in zip(target, got):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_grads", [False, True])
def test_adam_preconditioner_matches_twin(device, dtype, with_grads):
    _ext_or_skip(device)
    shapes = SHAPE_SETS["mixed"] + [(40_001,)]
    (vs,) = _lists(shapes, dtype, device, n=1, seed=4)
    (sq,) = _lists(shapes, dtype, device, n=1, seed=5, positive=True)
    sq = [s * 1e-3 for s in sq]
    grads = _lists(shapes, dtype, device, n=1, seed=6)[0] if with_grads else None
    kw = dict(step=3, beta1=0.9, beta2=0.999, eps=1e-8, grads=grads)
    got = ops.adam_preconditioner(vs, sq, backend="extension", **kw)
    twin = ops.adam_preconditioner(vs, sq, backend="torch", **kw)
    c1 = (1 - 0.9) / (1 - 0.9**3)
    for a, b, v, s, i in zip(got, twin, vs, sq, range(len(vs))):
        s64 = s.double()
        if with_grads:
            s64 = 0.999 * s64 + 0.001 * grads[i].double() ** 2
        ref = c1 * v.double() / (torch.sqrt(s64 / (1 - 0.999**3)) + 1e-8)
        tol = {torch.float64: 1e-14, torch.float32: 1e-6}.get(dtype, 1e-2)
        assert torch.allclose(a.double(), ref, rtol=tol, atol=0)
        err_a = (a.double() - ref).abs().max()
        err_b = (b.double() - ref).abs().max()
        # acceptance rule: <= 2x the twin's error, or within 2 ulp when the twin is exact
        assert err_a <= max(2 * err_b, 2 * _ulp(ref.to(dtype)).max()), (err_a, err_b)


def test_empty_lists_all_backends():
    for backend in ("torch", "auto"):
        ops.add_scaled_([], [], 1.0, backend=backend)
        assert ops.dot([], [], backend=backend).item() == 0.0
        assert ops.norm([], dtype=torch.float64, backend=backend).dtype == torch.float64
        assert ops.central_difference([], [], 0.1, backend=backend) == []
        assert ops.adam_preconditioner([], [], step=1, beta1=0.9, beta2=0.99, eps=1e-8, backend=backend) == []


def test_bad_inputs_name_the_argument():
    a = [torch.zeros(3)]
    with pytest.raises(ValueError, match="tensors and vectors must have the same length"):
        ops.add_scaled_(a, [], 1.0)
    with pytest.raises(ValueError, match=r"xs\[0\] and ys\[0\] must have the same shape"):
        ops.dot(a, [torch.zeros(4)])
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        ops.central_difference(a, a, 0.0)
    with pytest.raises(ValueError, match="dtype"):
        ops.dot(a, a, dtype=torch.float16)
    with pytest.raises(ValueError, match="backend"):
        ops.dot(a, a, backend="cuda")
    with pytest.raises(ValueError, match="step must be >= 1"):
        ops.adam_preconditioner(a, a, step=0, beta1=0.9, beta2=0.9, eps=1e-8)
    with pytest.raises(TypeError, match="must be a list"):
        ops.norm(torch.zeros(3))


def test_non_contiguous_and_mixed_dtypes_fall_back_to_twin():
    p = torch.randn(6, 4).t()  # non-contiguous
    v = torch.randn(4, 6)
    expected = p + 0.5 * v
    ops.add_scaled_([p], [v], 0.5)  # auto: twin
    assert torch.allclose(p, expected)
    if ops.extension_ops_available("cpu"):
        with pytest.raises(RuntimeError, match="non-contiguous"):
            ops.add_scaled_([p], [v], 0.5, backend="extension")
        with pytest.raises(RuntimeError, match="mixed dtypes"):
            ops.dot([torch.zeros(2)], [torch.zeros(2, dtype=torch.float64)], backend="extension")


# ------------------------------------------------------------------------- #
# precondition(): the optimizer's own preconditioner
# ------------------------------------------------------------------------- #
def _model_and_grads(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x = torch.randn(11, 5, dtype=torch.float64)
    loss = model(x).pow(2).mean()
    loss.backward()
    return model


def _step_jacobian_diag(model, opt, direction, h=1e-6):
    """d theta' / d g along `direction` by finite differences of optimizer.step() (float64)."""
    import copy

    results = []
    for sign in (+1, -1):
        m = copy.deepcopy(model)
        o = type(opt)(m.parameters(), **{k: v for k, v in opt.defaults.items() if k not in ("foreach",)})
        o.load_state_dict(copy.deepcopy(opt.state_dict()))
        for p, p0, d in zip(m.parameters(), model.parameters(), direction):
            p.grad = p0.grad.clone() + sign * h * d
        o.step()
        results.append([p.detach().clone() for p in m.parameters()])
    lr = opt.param_groups[0]["lr"]
    return [-(a - b) / (2 * h * lr) for a, b in zip(*results)]


@pytest.mark.filterwarnings("ignore:fastmeta.ops.precondition is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    "kind,kwargs",
    [
        ("sgd", dict(lr=0.1)),
        ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.2)),
        ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ],
)
@pytest.mark.parametrize("steps_before", [0, 2])
def test_precondition_sgd_is_the_exact_step_jacobian(kind, kwargs, steps_before):
    model = _model_and_grads()
    opt = torch.optim.SGD(model.parameters(), **kwargs)
    for _ in range(steps_before):
        opt.step()
    direction = [torch.randn_like(p) for p in model.parameters()]
    # next step: with the gradients in p.grad; SGD's step is affine in g, so P is exact
    P_v = ops.precondition(direction, opt, grads=[p.grad for p in model.parameters()])
    J_v = _step_jacobian_diag(model, opt, direction)
    for a, b in zip(P_v, J_v):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.filterwarnings("ignore:fastmeta.ops.precondition is deprecated:DeprecationWarning")
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_precondition_adam_matches_first_moment_linearisation(cls, amsgrad):
    model = _model_and_grads(1)
    opt = cls(model.parameters(), lr=1e-2, betas=(0.8, 0.95), eps=1e-6, amsgrad=amsgrad)
    direction = [torch.randn_like(p) for p in model.parameters()]
    # no state: first-step semantics from p.grad
    first = ops.precondition(direction, opt)
    for p, d, out in zip(model.parameters(), direction, first):
        vhat = p.grad**2  # (1-b2) g^2 / (1-b2)
        ref = (1 - 0.8) / (1 - 0.8) * d / (vhat.sqrt() + 1e-6)
        assert torch.allclose(out, ref, rtol=1e-12)
    opt.step()
    opt.step()  # same gradient twice: state at t = 2
    after = ops.precondition(direction, opt)  # linearise the step just taken (t = 2)
    for p, d, out in zip(model.parameters(), direction, after):
        st = opt.state[p]
        sq = st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"]
        ref = (1 - 0.8) / (1 - 0.8**2) * d / ((sq / (1 - 0.95**2)).sqrt() + 1e-6)
        assert torch.allclose(out, ref, rtol=1e-12)
    # with the second moment held fixed this IS the step's Jacobian along d when g's
    # own second-moment contribution is frozen: check against the first-moment part only
    bare = ops.precondition(direction, opt, first_moment_factor=False)
    for a, b in zip(after, bare):
        assert torch.allclose(a, b * (1 - 0.8) / (1 - 0.8**2), rtol=1e-12)


@pytest.mark.filterwarnings("ignore:fastmeta.ops.precondition is deprecated:DeprecationWarning")
def test_precondition_rejects_unknown_optimizer_and_missing_gradient():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="SGD, Adam and AdamW"):
        ops.precondition([torch.ones(2, 2), torch.ones(2)], torch.optim.RMSprop(model.parameters()))
    with pytest.raises(ValueError, match="no optimizer state and no gradient"):
        ops.precondition([torch.ones(2, 2), torch.ones(2)], torch.optim.Adam(model.parameters()))


def test_compile_smoke_calls_extension_ops():
    """A caller of fastmeta.ops traced by torch.compile (fullgraph=False) gives the eager result."""
    if not ops.extension_ops_available("cpu"):
        pytest.skip("fastmeta extension not built for cpu")

    def step(ps, vs):
        n = torch.ops.fastmeta.norm(vs, torch.float32)
        d = torch.ops.fastmeta.central_difference(ps, vs, 0.5)
        return [x * n for x in d]

    ps = [torch.randn(5), torch.randn(3, 2)]
    vs = [torch.randn(5), torch.randn(3, 2)]
    eager = step(ps, vs)
    compiled = torch.compile(step, fullgraph=False, backend="aot_eager")(ps, vs)
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b)
    # the Meta kernels give shapes/dtypes without data
    meta = torch.ops.fastmeta.central_difference([torch.empty(4, device="meta")], [torch.empty(4, device="meta")], 1.0)
    assert meta[0].shape == (4,) and meta[0].device.type == "meta"


def test_all_finite_is_one_read_and_exact():
    """``ops.all_finite``: False for a NaN or an infinity anywhere (any dtype), True for finite values even
    where the fast path's norm overflows (float32 |x| ~ 1e30, float16 |x| ~ 6e4), None entries skipped."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) for s in [(3, 4), (1000,), (0,), (7,)]]
    assert ops.all_finite(base) and ops.all_finite([None, *base]) and ops.all_finite([])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            ts = [t.to(dtype) for t in base]
            ts[1][17] = bad
            assert not ops.all_finite(ts), (bad, dtype)
    big = [torch.full((10,), 1e30), torch.full((4,), 6e4, dtype=torch.float16), torch.arange(3)]
    assert bool(torch.isfinite(torch.stack(torch._foreach_norm(big[:1], 2))).all()) is False  # the norm overflows
    assert ops.all_finite(big)
