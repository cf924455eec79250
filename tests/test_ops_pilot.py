"""fastmeta.ops.adam_pilot / sgd_pilot: the fused pilot step (one optimizer update, its new state and its
exact adjoint, the reverse sweep's state adjoints included).

Three layers of references:

1. the extension op (``torch.ops.fastmeta.adam_pilot`` / ``sgd_pilot``, CPU and CUDA) against
   its plain-PyTorch twin (``backend="torch"``, ``fastmeta.ops.pilot_twin``), every output (the
   adjoint outputs with incoming state adjoints too), every dtype, odd sizes, empty tensors,
   several tensors and chunks;
2. the twin's (and the op's) ``θ'`` and new state against the REAL ``torch.optim`` step
   (Adam, AdamW, amsgrad, L2 / decoupled weight decay, maximize, SGD variants; 0, 1 and 3
   warm steps);
3. the adjoint ``∂L/∂g`` for ``∂L/∂θ' = v`` against two independent float64 references:
   central finite differences of the real ``optimizer.step()`` (the update is elementwise,
   so one pair of perturbed steps gives the whole diagonal) and ``torch.autograd`` through a
   functional Adam/SGD written here, single steps and chained over three steps (the state
   adjoints), both backends.
"""
import copy
import math
import warnings

import pytest
import torch

from conftest import DEVICES
from fastmeta import ops

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 5), (7,), (0,), (2, 3, 4), (1,), (40_001,), (129, 257), (5, 0), (70_001,)]  # 32k/64k chunks, tails
MANY_SHAPES = [(i % 7 + 1, 3) for i in range(45)]  # more tensors than one CUDA launch holds

ADAM_CASES = {
    "adam": dict(),
    "adam_l2": dict(weight_decay=0.1),
    "adamw": dict(decoupled=True, weight_decay=0.05),
    "amsgrad": dict(amsgrad=True),
    "amsgrad_adamw_maximize": dict(amsgrad=True, decoupled=True, weight_decay=0.02, maximize=True),
    "adam_l2_maximize": dict(weight_decay=0.01, maximize=True),
}
SGD_CASES = {
    "plain": dict(),
    "wd_maximize": dict(weight_decay=0.1, maximize=True),
    "momentum": dict(momentum=0.9),
    "momentum_dampening_wd": dict(momentum=0.8, dampening=0.3, weight_decay=0.05),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "nesterov_wd_maximize": dict(momentum=0.7, nesterov=True, weight_decay=0.01, maximize=True),
}
ADAM_HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def _ext_or_skip(device):
    if not ops.extension_ops_available(device):
        pytest.skip(f"fastmeta extension not built for {device} (see fastmeta.backends())")


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of the floating-point numbers of t's dtype at |t| (float64)."""
    finfo = torch.finfo(t.dtype)
    mantissa = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}[t.dtype]
    a = t.abs().double().clamp(min=finfo.tiny)
    return torch.exp2(torch.floor(torch.log2(a)) - mantissa)


# --------------------------------------------------------------------------- inputs
def _adam_inputs(shapes, dtype, device, seed, *, state=True, amsgrad=False):
    """Realistic Adam inputs (float64, then cast): gradients over 4 decades, a second moment
    consistent with them, an amsgrad maximum both above and below the new second moment, and
    a 'dead' prefix (θ = g = m = s = s_max = 0: an untouched embedding row, r̂ = 0)."""
    gen = torch.Generator().manual_seed(seed)
    out = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "vectors")}
    for shape in shapes:
        n = math.prod(shape)
        scale = 10.0 ** torch.empty(n, dtype=torch.float64).uniform_(-4, 0, generator=gen)
        theta = torch.randn(n, generator=gen, dtype=torch.float64)
        g = torch.randn(n, generator=gen, dtype=torch.float64) * scale
        m = 0.3 * torch.randn(n, generator=gen, dtype=torch.float64) * scale
        s = (torch.randn(n, generator=gen, dtype=torch.float64) * scale) ** 2 + 0.1 * scale**2
        smax = s * torch.empty(n, dtype=torch.float64).uniform_(0.5, 2.0, generator=gen)
        v = torch.randn(n, generator=gen, dtype=torch.float64)
        dead = slice(0, max(1, n // 20)) if n else slice(0, 0)
        for t in (theta, g, m, s, smax):
            t[dead] = 0.0
        for key, t in zip(out, (theta, g, m, s, smax, v)):
            out[key].append(t.reshape(shape).to(device=device, dtype=dtype))
    if not state:
        out["exp_avgs"] = out["exp_avg_sqs"] = None
    if not (state and amsgrad):
        out["max_exp_avg_sqs"] = None
    return out


def _sgd_inputs(shapes, dtype, device, seed, *, state=True):
    gen = torch.Generator().manual_seed(seed)
    out = {k: [] for k in ("params", "grads", "momentum_buffers", "vectors")}
    for shape in shapes:
        for key in out:
            out[key].append(torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype))
    if not state:
        out["momentum_buffers"] = None
    return out


def _adjoint_inputs(shapes, dtype, device, seed, *, amsgrad=False):
    """Incoming state adjoints (∂L/∂m', ∂L/∂s', ∂L/∂ŝ) of a reverse sweep: random, scaled like the real ones."""
    gen = torch.Generator().manual_seed(seed)
    out = {"adj_exp_avgs": [], "adj_exp_avg_sqs": [], "adj_max_exp_avg_sqs": []}
    for shape in shapes:
        for key, scale in zip(out, (1e-2, 1e2, 1e2)):
            out[key].append((scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device=device,
                                                                                               dtype=dtype))
    if not amsgrad:
        out["adj_max_exp_avg_sqs"] = None
    return out


# --------------------------------------------------------------------------- comparisons
def _rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x − y| / max |y| (normwise: the adjoint's numerator may cancel elementwise)."""
    if y.numel() == 0:
        return 0.0
    return float((x.double() - y.double()).abs().max() / y.double().abs().max().clamp(min=1e-300))


# normwise tolerances of the op vs its twin: the same expressions in the same math type, so
# only the compiler's instruction choices (vector units) differ: no FMA contraction (the
# extension builds with -ffp-contract=off / nvcc -fmad=false; with it, bf16 adam_l2 was 2-4
# elements > 1 ulp off on an H200, where g = grad + wd*theta cancels)
TOLERANCE = {torch.float64: 1e-13, torch.float32: 2e-6}


def _assert_matches_twin(got, twin, dtype, what):
    assert len(got) == len(twin), what
    worst = 0.0
    for i, (a, b) in enumerate(zip(got, twin)):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape and a.device == b.device, (what, i)
        if b.numel() == 0:
            continue
        if dtype in TOLERANCE:
            err = _rel_err(a, b)
            assert err <= TOLERANCE[dtype], f"{what}[{i}]: normwise error {err:.3g} > {TOLERANCE[dtype]:.0e}"
            worst = max(worst, err)
        else:
            # fp16/bf16 storage, fp32 math on both sides: at most one rounding of the storage apart
            diff = torch.where(a == b, 0.0, (a.double() - b.double()).abs())  # equal infinities: fp16 overflow
            bound = _ulp(b) + 1e-6 * b.double().abs().max().clamp(min=1e-30)
            assert torch.all(diff <= bound), f"{what}[{i}]: {int((diff > bound).sum())} elements off by > 1 ulp"
    return worst


# --------------------------------------------------------------------------- 1. op vs twin
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_adam_pilot_op_matches_twin(device, dtype, case):
    _ext_or_skip(device)
    flags = ADAM_CASES[case]
    amsgrad = flags.get("amsgrad", False)
    for state in (False, True):
        x = _adam_inputs(SHAPES, dtype, device, seed=11, state=state, amsgrad=amsgrad)
        for exact in (True, False):
            for incoming in (False, True):  # the last step of a sweep / an earlier one (state adjoints in)
                adj_in = _adjoint_inputs(SHAPES, dtype, device, seed=17, amsgrad=amsgrad) if incoming else {}
                kw = dict(ADAM_HYPER, step=4 if state else 1, exact_jacobian=exact, adj_scale=-1.0 / 3e-3,
                          compute_params=True, compute_state=True, compute_adj_params=True, compute_adj_state=True,
                          **adj_in, **flags)
                got = ops.adam_pilot(**x, backend="extension", **kw)
                twin = ops.adam_pilot(**x, backend="torch", **kw)
                for field in got._fields:
                    a, b = getattr(got, field), getattr(twin, field)
                    absent = (field in ("new_max_exp_avg_sqs", "adj_max_exp_avg_sqs") and not amsgrad) or (
                        field in ("adj_exp_avg_sqs", "adj_max_exp_avg_sqs") and not exact)
                    if absent:
                        assert a is None and b is None, field
                        continue
                    if field == "adj_max_exp_avg_sqs" and not state:  # no maximum given: no adjoint of it
                        assert all(t is None for t in a) and all(t is None for t in b)
                        continue
                    _assert_matches_twin(a, b, dtype, f"{case} state={state} exact={exact} in={incoming} {field}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_pilot_op_matches_twin(device, dtype, case):
    _ext_or_skip(device)
    flags = SGD_CASES[case]
    for state in (False, True) if flags.get("momentum") else (False,):
        x = _sgd_inputs(SHAPES, dtype, device, seed=12, state=state)
        for incoming in (False, True) if flags.get("momentum") else (False,):
            adj_in = {}
            if incoming:
                adj_in["adj_momentum_buffers"] = _sgd_inputs(SHAPES, dtype, device, seed=18)["momentum_buffers"]
            kw = dict(lr=0.05, adj_scale=2.0, compute_params=True, compute_state=True, compute_adj_params=True,
                      compute_adj_state=True, **adj_in, **flags)
            got = ops.sgd_pilot(**x, backend="extension", **kw)
            twin = ops.sgd_pilot(**x, backend="torch", **kw)
            for field in got._fields:
                a, b = getattr(got, field), getattr(twin, field)
                if field in ("new_momentum_buffers", "adj_momentum_buffers") and not flags.get("momentum"):
                    assert a is None and b is None
                    continue
                if field == "adj_momentum_buffers" and not state:  # the first step: no previous buffer
                    assert all(t is None for t in a) and all(t is None for t in b)
                    continue
                _assert_matches_twin(a, b, dtype, f"{case} state={state} in={incoming} {field}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_reverse_sweep_skips_zero_strips_exactly(device, amsgrad):
    """An adjoints-only call (the reverse sweep) skips the strips whose incoming adjoints are all 0
    (an embedding's rows that no quiz token touched): those outputs must be exactly 0, and every
    other element equal to the twin's (which never skips), also where only ONE incoming adjoint
    of a strip is nonzero."""
    _ext_or_skip(device)
    shapes = [(600, 16), (1000,), (257, 3)]
    x = _adam_inputs(shapes, torch.float32, device, seed=21, amsgrad=amsgrad)
    adj_in = _adjoint_inputs(shapes, torch.float32, device, seed=22, amsgrad=amsgrad)
    gen = torch.Generator().manual_seed(23)
    for i, shape in enumerate(shapes):
        rows = shape[0]
        live = (torch.rand(rows, generator=gen) < 0.05).to(device)  # ~5% of the rows touched
        only_m = (torch.rand(rows, generator=gen) < 0.05).to(device)  # rows where only ∂L/∂m' is nonzero
        bcast = (-1,) + (1,) * (len(shape) - 1)
        x["vectors"][i] = x["vectors"][i] * live.view(bcast)
        for key in ("adj_exp_avg_sqs", "adj_max_exp_avg_sqs"):
            if adj_in[key] is not None:
                adj_in[key][i] = adj_in[key][i] * live.view(bcast)
        adj_in["adj_exp_avgs"][i] = adj_in["adj_exp_avgs"][i] * (live | only_m).view(bcast)
    kw = dict(ADAM_HYPER, step=5, amsgrad=amsgrad, weight_decay=0.1, compute_params=False,
              compute_adj_params=True, compute_adj_state=True, **adj_in)
    got = ops.adam_pilot(**x, backend="extension", **kw)
    twin = ops.adam_pilot(**x, backend="torch", **kw)
    for field in ("adj_grads", "adj_params", "adj_exp_avgs", "adj_exp_avg_sqs") + (
            ("adj_max_exp_avg_sqs",) if amsgrad else ()):
        for i, (a, b) in enumerate(zip(getattr(got, field), getattr(twin, field))):
            assert bool(((a == 0) == (b == 0)).all()), (field, i)
            assert _rel_err(a, b) <= TOLERANCE[torch.float32], (field, i)
    assert any(bool((t == 0).any()) for t in got.adj_grads) and all(bool((t != 0).any()) for t in got.adj_grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_adam_pilot_point_alone_matches_twin(device, dtype, case):
    """The engine's pilot call (θ' alone; on the CPU a loop straight over memory where the state exists, the
    strips on the first step), every Adam variant, with and without state (and the amsgrad maximum), against
    the twin; and equal, value for value, to θ' of the call that computes everything."""
    _ext_or_skip(device)
    flags = ADAM_CASES[case]
    for state in (False, True):
        x = _adam_inputs(SHAPES, dtype, device, seed=23, state=state, amsgrad=flags.get("amsgrad", False))
        x["vectors"] = None
        kw = dict(ADAM_HYPER, step=4 if state else 1, **flags)
        got = ops.adam_pilot(**x, backend="extension", **kw)
        assert got.adj_grads is None and got.new_exp_avgs is None
        twin = ops.adam_pilot(**x, backend="torch", **kw)
        _assert_matches_twin(got.new_params, twin.new_params, dtype, f"{case} state={state} new_params")
        full = ops.adam_pilot(**x, backend="extension", compute_state=True, **kw)
        for a, b in zip(got.new_params, full.new_params):
            assert torch.equal(a, b) or _rel_err(a, b) <= TOLERANCE.get(dtype, 2e-6), (case, state)


@pytest.mark.parametrize("device", DEVICES)
def test_pilot_modes_many_tensors_and_partial_outputs(device):
    """Each output alone equals the same output of the full call (to the rounding of the compiler's
    FMA contractions, which differ between the per-mode instantiations: the same expressions); lists
    of 45 tensors (several CUDA launches); mixed dtypes in one call; per-parameter step counts and
    missing state."""
    _ext_or_skip(device)
    x = _adam_inputs(MANY_SHAPES, torch.float32, device, seed=13, amsgrad=True)
    kw = dict(ADAM_HYPER, step=7, amsgrad=True, weight_decay=0.1)
    full = ops.adam_pilot(**x, backend="extension", compute_state=True, **kw)
    only_params = ops.adam_pilot(**dict(x, vectors=None), backend="extension", **kw)
    only_adj = ops.adam_pilot(**x, backend="extension", compute_params=False, **kw)
    only_state = ops.adam_pilot(**dict(x, vectors=None), backend="extension", compute_params=False,
                                compute_state=True, **kw)
    assert only_params.adj_grads is None and only_params.new_exp_avgs is None
    assert only_adj.new_params is None and only_adj.new_exp_avgs is None
    assert only_state.new_params is None and only_state.adj_grads is None
    for a, b in zip(only_params.new_params, full.new_params):
        assert _rel_err(a, b) <= TOLERANCE[torch.float32]
    for a, b in zip(only_adj.adj_grads, full.adj_grads):
        assert _rel_err(a, b) <= TOLERANCE[torch.float32]
    for field in ("new_exp_avgs", "new_exp_avg_sqs", "new_max_exp_avg_sqs"):
        for a, b in zip(getattr(only_state, field), getattr(full, field)):
            assert _rel_err(a, b) <= TOLERANCE[torch.float32]
    # a reverse-sweep step (the engine's combination) against the catch-all mode
    adj_in = _adjoint_inputs(MANY_SHAPES, torch.float32, device, seed=14, amsgrad=True)
    reverse = ops.adam_pilot(**x, backend="extension", compute_params=False, compute_adj_params=True,
                             compute_adj_state=True, **adj_in, **kw)
    everything = ops.adam_pilot(**x, backend="extension", compute_state=True, compute_adj_params=True,
                                compute_adj_state=True, **adj_in, **kw)
    assert reverse.new_params is None and reverse.new_exp_avgs is None
    for field in ("adj_grads", "adj_params", "adj_exp_avgs", "adj_exp_avg_sqs", "adj_max_exp_avg_sqs"):
        for a, b in zip(getattr(reverse, field), getattr(everything, field)):
            assert _rel_err(a, b) <= TOLERANCE[torch.float32], field
    # per-parameter steps, some parameters without state, mixed dtypes: grouped calls
    n = len(MANY_SHAPES)
    steps = [1 + i % 3 for i in range(n)]
    ms = [None if i % 5 == 0 else t for i, t in enumerate(x["exp_avgs"])]
    ss = [None if i % 5 == 0 else t for i, t in enumerate(x["exp_avg_sqs"])]
    mxs = [None if i % 5 == 0 else t for i, t in enumerate(x["max_exp_avg_sqs"])]
    as64 = lambda ts: [None if t is None else (t.double() if i % 2 else t) for i, t in enumerate(ts)]  # noqa: E731
    lists = dict(params=as64(x["params"]), grads=as64(x["grads"]), exp_avgs=as64(ms), exp_avg_sqs=as64(ss),
                 max_exp_avg_sqs=as64(mxs), vectors=as64(x["vectors"]))
    kw2 = dict(kw, step=steps)
    grouped = ops.adam_pilot(**lists, backend="extension", compute_state=True, **kw2)
    for i in range(n):
        one = ops.adam_pilot(*(None if lists[k][i] is None else [lists[k][i]] for k in lists), backend="torch",
                             compute_state=True, **dict(kw, step=steps[i]))
        for field in one._fields:
            if getattr(one, field) is None:
                assert getattr(grouped, field) is None
                continue
            a, b = getattr(grouped, field)[i], getattr(one, field)[0]
            assert a.dtype == b.dtype
            tol = TOLERANCE[b.dtype]
            assert _rel_err(a, b) <= tol, (i, field)


def test_empty_lists_and_bad_arguments():
    for backend in ("torch", "auto"):
        res = ops.adam_pilot([], [], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=1, backend=backend)
        assert res.new_params == [] and res.adj_grads is None
        res = ops.sgd_pilot([], [], vectors=[], lr=0.1, backend=backend)
        assert res.new_params == [] and res.adj_grads == []
    a = [torch.zeros(3)]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    with pytest.raises(ValueError, match="step must be >= 1"):
        ops.adam_pilot(a, a, step=0, **kw)
    with pytest.raises(ValueError, match="amsgrad is False"):
        ops.adam_pilot(a, a, a, a, a, step=2, **kw)
    with pytest.raises(ValueError, match="beta1 must be in"):
        ops.adam_pilot(a, a, step=1, **dict(kw, beta1=1.0))
    with pytest.raises(ValueError, match="exp_avgs must have the length of params"):
        ops.adam_pilot(a, a, [], step=1, **kw)
    with pytest.raises(ValueError, match=r"params\[0\] and vectors\[0\] must have the same shape"):
        ops.adam_pilot(a, a, vectors=[torch.zeros(4)], step=1, **kw)
    with pytest.raises(ValueError, match="momentum is 0"):
        ops.sgd_pilot(a, a, a, lr=0.1)
    with pytest.raises(ValueError, match="backend"):
        ops.sgd_pilot(a, a, lr=0.1, backend="cuda")


def test_extension_backend_is_loud_about_ineligible_inputs():
    _ext_or_skip("cpu")
    p = torch.randn(6, 4).t()  # non-contiguous
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=1)
    with pytest.raises(RuntimeError, match="adam_pilot.*non-contiguous"):
        ops.adam_pilot([p], [p.contiguous()], backend="extension", **kw)
    with pytest.raises(RuntimeError, match="sgd_pilot.*mixed dtypes"):
        ops.sgd_pilot([torch.zeros(3)], [torch.zeros(3, dtype=torch.float64)], lr=0.1, backend="extension")
    # auto: the twin (a FallbackWarning, once per reason), same values as the contiguous extension call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ops.FallbackWarning)
        auto = ops.adam_pilot([p], [p * 0.1], backend="auto", **kw).new_params[0]
    ext = ops.adam_pilot([p.contiguous()], [p.contiguous() * 0.1], backend="extension", **kw).new_params[0]
    assert _rel_err(auto, ext) <= TOLERANCE[torch.float32]


def test_meta_kernels_give_shapes():
    _ext_or_skip("cpu")
    p = [torch.empty(3, 4, device="meta"), torch.empty(5, device="meta")]
    res = torch.ops.fastmeta.adam_pilot(p, p, p, p, p, p, p, p, p, 1e-3, 0.9, 0.999, 1e-8, 0.0, 2, False, True, False,
                                        True, 1.0, True, True, True, True)
    assert [len(r) for r in res] == [2] * 9
    assert all(t.shape == q.shape and t.device.type == "meta" for r in res for t, q in zip(r, p))
    res = torch.ops.fastmeta.adam_pilot(p, p, [], [], [], p, [], [], [], 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, False, False,
                                        False, False, 1.0, False, False, True, True)
    assert [len(r) for r in res] == [0, 2, 0, 0, 0, 2, 2, 0, 0]  # frozen Jacobian: no second-moment adjoint
    res = torch.ops.fastmeta.sgd_pilot(p, p, [], [], [], 0.1, 0.9, 0.0, 0.0, False, False, 1.0, True, False, False,
                                       False)
    assert [len(r) for r in res] == [2, 0, 0, 0, 0]
    res = torch.ops.fastmeta.sgd_pilot(p, p, p, p, p, 0.1, 0.9, 0.0, 0.0, False, False, 1.0, False, True, True, True)
    assert [len(r) for r in res] == [0, 2, 2, 2, 2]


# --------------------------------------------------------------------------- 2. θ' vs torch.optim
def _make_optimizer(kind, params, flags, lr):
    flags = dict(flags)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, foreach=False, **flags)
    decoupled = flags.pop("decoupled", False)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    if not decoupled:
        flags.setdefault("weight_decay", 0.0)
    return cls(params, lr=lr, betas=(ADAM_HYPER["beta1"], ADAM_HYPER["beta2"]), eps=ADAM_HYPER["eps"],
               foreach=False, **flags)


def _trajectory(kind, flags, theta0, warm_grads, lr):
    """Parameters and optimizer after ``len(warm_grads)`` real steps from ``theta0``."""
    params = [t.clone().requires_grad_(True) for t in theta0]
    opt = _make_optimizer(kind, params, flags, lr)
    for grads in warm_grads:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


def _real_step(params, opt, grads):
    """θ' of one more real step, on copies (the optimizer and parameters are left as they were)."""
    opt2 = copy.deepcopy(opt)  # parameters and state copied together (state keyed by the copies)
    params2 = opt2.param_groups[0]["params"]
    for p, g in zip(params2, grads):
        p.grad = g.clone()
    opt2.step()
    return [p.detach() for p in params2], opt2


def _pilot_args(kind, params, opt):
    """The pilot op's state arguments read from a real optimizer (None where it has no state)."""
    st = [opt.state.get(p, {}) for p in params]
    if kind == "sgd":
        bufs = [s.get("momentum_buffer") for s in st]
        return dict(momentum_buffers=None if all(b is None for b in bufs) else bufs)
    step = [int(s["step"]) + 1 if "step" in s else 1 for s in st]
    get = lambda key: None if not st[0] else [s.get(key) for s in st]  # noqa: E731
    return dict(exp_avgs=get("exp_avg"), exp_avg_sqs=get("exp_avg_sq"), max_exp_avg_sqs=get("max_exp_avg_sq"),
                step=step)


def _pilot(kind, flags, lr, params, grads, state_args, vectors=None, backend="torch", **kw):
    if kind == "sgd":
        return ops.sgd_pilot([p.detach() for p in params], grads, vectors=vectors, lr=lr, backend=backend,
                             **state_args, **flags, **kw)
    hyper = dict(ADAM_HYPER, **flags)
    hyper["lr"] = lr
    return ops.adam_pilot([p.detach() for p in params], grads, vectors=vectors, backend=backend, **state_args,
                          **hyper, **kw)


ALL_CASES = [("adam", c) for c in ADAM_CASES] + [("sgd", c) for c in SGD_CASES]


def _grads(shapes, seed, count, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) * 10.0 ** -(k % 3) for s in shapes]
            for k in range(count)]


@pytest.mark.parametrize("kind,case", ALL_CASES, ids=[f"{k}-{c}" for k, c in ALL_CASES])
@pytest.mark.parametrize("warm", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_pilot_step_equals_torch_optim_step(kind, case, warm, dtype):
    flags = (ADAM_CASES if kind == "adam" else SGD_CASES)[case]
    shapes = [(4, 5), (7,), (300,)]
    lr = 3e-3 if kind == "adam" else 0.05
    gens = _grads(shapes, seed=21 + warm, count=warm + 2, dtype=dtype)
    theta0, warm_grads, g = gens[0], gens[1:-1], gens[-1]
    params, opt = _trajectory(kind, flags, theta0, warm_grads, lr)
    expected, opt2 = _real_step(params, opt, g)
    state_args = _pilot_args(kind, params, opt)
    rtol = 1e-14 if dtype == torch.float64 else 2e-6
    backends = ["torch"] + (["extension"] if ops.extension_ops_available("cpu") else [])
    for backend in backends:
        res = _pilot(kind, flags, lr, params, g, state_args, backend=backend, compute_state=True)
        for got, ref, p in zip(res.new_params, expected, params):
            # relative to |θ| + |θ − θ'|: the update is computed the same way up to rounding
            scale = p.detach().double().abs() + (ref.double() - p.detach().double()).abs()
            assert torch.all((got.double() - ref.double()).abs() <= rtol * scale + 1e-300), (backend, case)
        # the new state too (what a trajectory of several steps hands on); torch.optim computes the
        # first moment with lerp_ (other roundings): bound relative to the terms, not the result
        new_state = [opt2.state[p] for p in opt2.param_groups[0]["params"]]
        old_state = [opt.state.get(p, {}) for p in params]
        if kind == "sgd":
            if flags.get("momentum"):
                for got, st, old, gi, p in zip(res.new_momentum_buffers, new_state, old_state, g, params):
                    prev = old.get("momentum_buffer")
                    terms = gi.abs() + p.detach().abs() + (0 if prev is None else prev.abs())
                    _assert_close_to_terms(got, st["momentum_buffer"], terms, rtol)
            else:
                assert res.new_momentum_buffers is None
            continue
        for got_m, got_s, st, old, gi, p in zip(res.new_exp_avgs, res.new_exp_avg_sqs, new_state, old_state, g, params):
            g_eff = gi.abs() + p.detach().abs()  # ±g (+ wd·θ)
            prev_m, prev_s = old.get("exp_avg", 0), old.get("exp_avg_sq", 0)
            _assert_close_to_terms(got_m, st["exp_avg"], g_eff + abs(prev_m), rtol)
            _assert_close_to_terms(got_s, st["exp_avg_sq"], g_eff**2 + abs(prev_s), rtol)
        if flags.get("amsgrad"):
            for got, st in zip(res.new_max_exp_avg_sqs, new_state):
                _assert_close_to_terms(got, st["max_exp_avg_sq"], st["max_exp_avg_sq"].abs(), rtol)


def _assert_close_to_terms(got, ref, terms, rtol):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    err = (got.double() - ref.double()).abs()
    assert torch.all(err <= rtol * terms.double() + 1e-300), float((err / terms.double().clamp(min=1e-300)).max())


# --------------------------------------------------------------------------- 3. the adjoint
def _fd_diagonal(params, opt, grads, h):
    """Central differences of the REAL optimizer step, (θ'(g + h) − θ'(g − h)) / (2h), elementwise
    (θ'_i depends on g_i only, so one pair of steps gives the whole diagonal), Richardson-extrapolated
    from h and 2h (truncation O(h⁴))."""
    def central(step):
        plus, _ = _real_step(params, opt, [g + hh for g, hh in zip(grads, step)])
        minus, _ = _real_step(params, opt, [g - hh for g, hh in zip(grads, step)])
        return [(a - b) / (2 * hh) for a, b, hh in zip(plus, minus, step)]

    fine, coarse = central(h), central([2 * hh for hh in h])
    return [(4 * f - c) / 3 for f, c in zip(fine, coarse)]


@pytest.mark.parametrize("kind,case", ALL_CASES, ids=[f"{k}-{c}" for k, c in ALL_CASES])
@pytest.mark.parametrize("warm", [0, 1, 3])
def test_pilot_adjoint_equals_finite_differences_of_torch_optim(kind, case, warm):
    flags = (ADAM_CASES if kind == "adam" else SGD_CASES)[case]
    shapes = [(4, 5), (7,), (300,)]
    lr = 3e-3 if kind == "adam" else 0.05
    gens = _grads(shapes, seed=31 + warm, count=warm + 3)
    theta0, warm_grads, g, v = gens[0], gens[1:-2], gens[-2], gens[-1]
    # small |θ|: the rounding of θ' = θ + Δ is what limits a finite difference of the real step
    theta0 = [1e-3 * t for t in theta0]
    if kind == "adam":  # a dead coordinate (θ = g = 0, never a gradient): r̂ = 0, D = (1−β1)/(bc1·eps)
        for t in [theta0[0]] + [wg[0] for wg in warm_grads] + [g[0]]:
            t.view(-1)[:3] = 0.0
    params, opt = _trajectory(kind, flags, theta0, warm_grads, lr)
    # steps: 1e-3 relative to |g| (smooth), 1e-16 at the dead coordinates (|h| << eps)
    h = [torch.where(gi == 0, 1e-16, 1e-3 * gi.abs()) for gi in g]
    diag = _fd_diagonal(params, opt, g, h)
    fd_adj = [d * vi for d, vi in zip(diag, v)]
    # the finite difference's own error: a few roundings of θ'(g ± h) over 2h (x 5/3: the extrapolation),
    # and 1e-7 relative truncation (measured: ~1e-10; without the extrapolation up to 1e-4)
    new, _ = _real_step(params, opt, g)
    fd_err = [8 * 2.3e-16 * (p.detach().abs() + n.abs()) / (2 * hh) * vi.abs() + 1e-7 * ref.abs()
              for p, n, hh, vi, ref in zip(params, new, h, v, fd_adj)]
    # the check must be able to fail: the reference is accurate to 1e-4 on most elements
    ratio = torch.cat([(e / r.abs().clamp(min=1e-300)).reshape(-1) for e, r in zip(fd_err, fd_adj)])
    assert float(ratio.median()) < 1e-4, float(ratio.median())
    state_args = _pilot_args(kind, params, opt)
    valid = [_differentiable_between(kind, flags, opt, p, gi, 4 * hh) for p, gi, hh in zip(params, g, h)]
    assert sum(int(m.sum()) for m in valid) >= 0.95 * sum(m.numel() for m in valid)
    backends = ["torch"] + (["extension"] if ops.extension_ops_available("cpu") else [])
    for backend in backends:
        res = _pilot(kind, flags, lr, params, g, state_args, vectors=v, backend=backend, compute_params=False)
        for i, (got, ref, e, ok) in enumerate(zip(res.adj_grads, fd_adj, fd_err, valid)):
            err = torch.where(ok, (got - ref).abs(), 0.0)
            assert torch.all(err <= 2 * e + 1e-300), (backend, case, i, float((err / e.clamp(min=1e-300)).max()))


def _differentiable_between(kind, flags, opt, p, g, reach):
    """False where amsgrad's max(s_max, s') switches branch within g ± reach (a kink: no finite
    difference there; those elements are checked against the twin and autograd instead)."""
    state = opt.state.get(p, {})
    if kind != "adam" or not flags.get("amsgrad") or "max_exp_avg_sq" not in state:
        return torch.ones_like(g, dtype=torch.bool)
    beta2, theta = ADAM_HYPER["beta2"], p.detach()
    sides = []
    for gg in (g - reach, g, g + reach):
        gg = -gg if flags.get("maximize") else gg
        if flags.get("weight_decay") and not flags.get("decoupled"):
            gg = gg + flags["weight_decay"] * theta
        sides.append(beta2 * state["exp_avg_sq"] + (1 - beta2) * gg * gg >= state["max_exp_avg_sq"])
    return (sides[0] == sides[1]) & (sides[1] == sides[2])


def _safe_sqrt(x):
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


def _functional_adam(theta, g, m, s, smax, t, lr, beta1, beta2, eps, weight_decay=0.0, decoupled=False,
                     amsgrad=False, maximize=False):
    """Adam/AdamW as written in torch.optim's single-tensor code, differentiable (safe sqrt at 0)."""
    g = -g if maximize else g
    if weight_decay and decoupled:
        theta = theta * (1 - lr * weight_decay)
    elif weight_decay:
        g = g + weight_decay * theta
    m = (1 - beta1) * g if m is None else beta1 * m + (1 - beta1) * g
    s = (1 - beta2) * g * g if s is None else beta2 * s + (1 - beta2) * g * g
    if amsgrad and smax is not None:
        s = torch.maximum(smax, s)
    denom = _safe_sqrt(s) / math.sqrt(1 - beta2**t) + eps
    return theta - lr / (1 - beta1**t) * m / denom


def _max_abs(t):
    return float(t.abs().max()) if t.numel() else 0.0


def _term_scale(x, t, flags):
    """The magnitude of the two terms of the naive derivative (what autograd adds up), over all tensors:
    max of lr/bc1·(1−β1)/denom·|v| + lr/bc1·|m'|·(1−β2)·|g'|/(bc2·r̂·denom²)·|v|."""
    hp = ADAM_HYPER
    bc1, bc2 = 1 - hp["beta1"] ** t, 1 - hp["beta2"] ** t
    worst = 0.0
    for i, theta in enumerate(x["params"]):
        if theta.numel() == 0:
            continue
        g = -x["grads"][i] if flags.get("maximize") else x["grads"][i]
        if flags.get("weight_decay") and not flags.get("decoupled"):
            g = g + flags["weight_decay"] * theta
        m = 0 if x["exp_avgs"] is None else x["exp_avgs"][i]
        s = 0 if x["exp_avg_sqs"] is None else x["exp_avg_sqs"][i]
        m_new = hp["beta1"] * m + (1 - hp["beta1"]) * g
        s_new = hp["beta2"] * s + (1 - hp["beta2"]) * g * g
        if x["max_exp_avg_sqs"] is not None:
            s_new = torch.maximum(s_new, x["max_exp_avg_sqs"][i])
        r = s_new.sqrt() / math.sqrt(bc2)
        denom = r + hp["eps"]
        first = (1 - hp["beta1"]) / denom
        second = m_new.abs() * (1 - hp["beta2"]) * g.abs() / (bc2 * r.clamp(min=1e-300) * denom**2)
        second = torch.where(r > 0, second, 0.0)
        worst = max(worst, _max_abs(hp["lr"] / bc1 * (first + second) * x["vectors"][i]))
    return worst


def _functional_sgd(theta, g, buf, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                    maximize=False):
    g = -g if maximize else g
    g = g + weight_decay * theta
    if momentum:
        buf = g if buf is None else momentum * buf + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    return theta - lr * g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,case", ALL_CASES, ids=[f"{k}-{c}" for k, c in ALL_CASES])
def test_pilot_adjoint_equals_autograd(device, kind, case):
    """float64: the op's and the twin's adjoint equal ``torch.autograd.grad(θ'(g), g, v)`` through
    the functional update above (exact and frozen-second-moment Jacobians; with and without state)."""
    flags = (ADAM_CASES if kind == "adam" else SGD_CASES)[case]
    shapes = [(3, 5), (40_001,)]
    backends = ["torch"] + (["extension"] if ops.extension_ops_available(device) else [])
    for state in (False, True):
        if kind == "adam":
            x = _adam_inputs(shapes, torch.float64, device, seed=41, state=state, amsgrad=flags.get("amsgrad"))
            t = 5 if state else 1
            refs = []
            for i in range(len(shapes)):
                g = x["grads"][i].clone().requires_grad_(True)
                pick = lambda k: None if x[k] is None else x[k][i]  # noqa: E731
                new = _functional_adam(x["params"][i], g, pick("exp_avgs"), pick("exp_avg_sqs"),
                                       pick("max_exp_avg_sqs"), t, **ADAM_HYPER, **flags)
                refs.append(torch.autograd.grad(new, g, x["vectors"][i])[0])
            # autograd adds up the naive two-term derivative, whose terms cancel (at the first step
            # down to D ~ eps/denom²): its rounding error is relative to the terms, not to D
            scale = _term_scale(x, t, flags)
            for backend in backends:
                res = ops.adam_pilot(**x, step=t, backend=backend, compute_params=False, **ADAM_HYPER, **flags)
                for got, ref in zip(res.adj_grads, refs):
                    err = _max_abs(got - ref)
                    assert err <= 1e-12 * _max_abs(ref) or err <= 1e-14 * scale, (backend, state, err, scale)
            continue
        if state is True and not flags.get("momentum"):
            continue
        x = _sgd_inputs(shapes, torch.float64, device, seed=42, state=state)
        refs = []
        for i in range(len(shapes)):
            g = x["grads"][i].clone().requires_grad_(True)
            buf = None if x["momentum_buffers"] is None else x["momentum_buffers"][i]
            new = _functional_sgd(x["params"][i], g, buf, 0.05, **flags)
            refs.append(torch.autograd.grad(new, g, x["vectors"][i])[0])
        for backend in backends:
            res = ops.sgd_pilot(**x, lr=0.05, backend=backend, compute_params=False, **flags)
            for got, ref in zip(res.adj_grads, refs):
                assert _rel_err(got, ref) <= 1e-14, (backend, state)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["adam", "amsgrad", "adamw"])
def test_frozen_second_moment_adjoint_equals_autograd_with_s_held(device, case):
    """``exact_jacobian=False``: autograd through the update with ŝ held constant (the named approximation)."""
    flags = ADAM_CASES[case]
    x = _adam_inputs([(3, 5), (301,)], torch.float64, device, seed=43, amsgrad=flags.get("amsgrad"))
    t, hp = 3, ADAM_HYPER
    backends = ["torch"] + (["extension"] if ops.extension_ops_available(device) else [])
    for i in range(2):
        g = x["grads"][i].clone().requires_grad_(True)
        with torch.no_grad():
            gg = -x["grads"][i] if flags.get("maximize") else x["grads"][i]
            if flags.get("weight_decay") and not flags.get("decoupled"):
                gg = gg + flags["weight_decay"] * x["params"][i]
            s_new = hp["beta2"] * x["exp_avg_sqs"][i] + (1 - hp["beta2"]) * gg * gg
            if flags.get("amsgrad"):
                s_new = torch.maximum(x["max_exp_avg_sqs"][i], s_new)
        gd = -g if flags.get("maximize") else g
        if flags.get("weight_decay") and not flags.get("decoupled"):
            gd = gd + flags["weight_decay"] * x["params"][i]
        m_new = hp["beta1"] * x["exp_avgs"][i] + (1 - hp["beta1"]) * gd
        denom = _safe_sqrt(s_new) / math.sqrt(1 - hp["beta2"] ** t) + hp["eps"]
        new = -hp["lr"] / (1 - hp["beta1"] ** t) * m_new / denom
        ref = torch.autograd.grad(new, g, x["vectors"][i])[0]
        for backend in backends:
            res = ops.adam_pilot(**x, step=t, exact_jacobian=False, backend=backend, compute_params=False, **hp,
                                 **flags)
            assert _rel_err(res.adj_grads[i], ref) <= 1e-14, backend


def _functional_adam_state(theta, g, m, s, smax, t, lr, beta1, beta2, eps, weight_decay=0.0, decoupled=False,
                           amsgrad=False, maximize=False):
    """``(θ', m', s', ŝ)`` of one Adam/AdamW step, differentiable in every input (state included).

    amsgrad's maximum takes ties by ``s'`` (``torch.maximum`` would split its gradient half/half at
    a tie: a dead coordinate, s' = s_max = 0), the convention the op documents."""
    g = -g if maximize else g
    if weight_decay and decoupled:
        theta = theta * (1 - lr * weight_decay)
    elif weight_decay:
        g = g + weight_decay * theta
    m = (1 - beta1) * g if m is None else beta1 * m + (1 - beta1) * g
    s = (1 - beta2) * g * g if s is None else beta2 * s + (1 - beta2) * g * g
    s_hat = torch.where(s >= smax, s, smax) if (amsgrad and smax is not None) else s
    denom = _safe_sqrt(s_hat) / math.sqrt(1 - beta2**t) + eps
    return theta - lr / (1 - beta1**t) * m / denom, m, s, s_hat


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,case", ALL_CASES, ids=[f"{k}-{c}" for k, c in ALL_CASES])
def test_chained_adjoints_equal_autograd(device, kind, case):
    """Three steps forward (``compute_state``), then the reverse sweep through them with the op's
    state adjoints handed back step by step: ∂L/∂g_j, ∂L/∂θ_0 and ∂L/∂state_0 for L = ⟨θ_3, w⟩ equal
    ``torch.autograd`` through three chained functional steps (float64), both backends."""
    flags = (ADAM_CASES if kind == "adam" else SGD_CASES)[case]
    shapes = [(3, 5), (301,)]
    gen = torch.Generator().manual_seed(61)
    backends = ["torch"] + (["extension"] if ops.extension_ops_available(device) else [])
    if kind == "adam":
        x = _adam_inputs(shapes, torch.float64, device, seed=62, amsgrad=flags.get("amsgrad"))
        state0 = [x["exp_avgs"], x["exp_avg_sqs"], x["max_exp_avg_sqs"]]
        t0 = 4
    else:
        x = _sgd_inputs(shapes, torch.float64, device, seed=62, state=bool(flags.get("momentum")))
        state0 = [x["momentum_buffers"]]
        t0 = 0
    grads = [[torch.randn(sh, generator=gen, dtype=torch.float64).to(device) * 10.0 ** -k for sh in shapes]
             for k in range(3)]
    w = [torch.randn(sh, generator=gen, dtype=torch.float64).to(device) for sh in shapes]
    # the reference: autograd through the chained functional steps
    theta0 = [p.clone().requires_grad_(True) for p in x["params"]]
    leaves = [[g.clone().requires_grad_(True) for g in gs] for gs in grads]
    st_leaves = [None if lst is None else [t.clone().requires_grad_(True) for t in lst] for lst in state0]
    refs = []
    for i in range(len(shapes)):
        theta = theta0[i]
        st = [None if lst is None else lst[i] for lst in st_leaves]
        for j in range(3):
            if kind == "adam":
                theta, m, s_, shat = _functional_adam_state(theta, leaves[j][i], st[0], st[1], st[2], t0 + j + 1,
                                                            **ADAM_HYPER, **flags)
                st = [m, s_, shat if flags.get("amsgrad") else None]
            else:
                g = -leaves[j][i] if flags.get("maximize") else leaves[j][i]
                g = g + flags.get("weight_decay", 0.0) * theta
                buf = st[0]
                if flags.get("momentum"):
                    buf = g if buf is None else flags["momentum"] * buf + (1 - flags.get("dampening", 0.0)) * g
                    g = g + flags["momentum"] * buf if flags.get("nesterov") else buf
                theta, st = theta - 0.05 * g, [buf]
        wrt = [theta0[i]] + [leaves[j][i] for j in range(3)] + [lst[i] for lst in st_leaves if lst is not None]
        refs.append(torch.autograd.grad((theta * w[i]).sum(), wrt, allow_unused=True))
    for backend in backends:
        # forward: θ_j and state_j
        thetas, states = [x["params"]], [state0]
        for j in range(3):
            if kind == "adam":
                res = ops.adam_pilot(thetas[-1], grads[j], *states[-1], step=t0 + j + 1, backend=backend,
                                     compute_state=True, **ADAM_HYPER, **flags)
                states.append([res.new_exp_avgs, res.new_exp_avg_sqs, res.new_max_exp_avg_sqs])
            else:
                res = ops.sgd_pilot(thetas[-1], grads[j], *states[-1], lr=0.05, backend=backend, compute_state=True,
                                    **flags)
                states.append([res.new_momentum_buffers])
            thetas.append(res.new_params)
        # reverse
        adj_theta, adj_state, adj_gs = w, None, [None] * 3
        for j in reversed(range(3)):
            if kind == "adam":
                incoming = {} if adj_state is None else dict(
                    adj_exp_avgs=adj_state.adj_exp_avgs, adj_exp_avg_sqs=adj_state.adj_exp_avg_sqs,
                    adj_max_exp_avg_sqs=adj_state.adj_max_exp_avg_sqs)
                adj_state = ops.adam_pilot(thetas[j], grads[j], *states[j], adj_theta, step=t0 + j + 1,
                                           backend=backend, compute_params=False, compute_adj_params=True,
                                           compute_adj_state=True, **incoming, **ADAM_HYPER, **flags)
            else:
                incoming = {} if adj_state is None else dict(adj_momentum_buffers=adj_state.adj_momentum_buffers)
                adj_state = ops.sgd_pilot(thetas[j], grads[j], *states[j], adj_theta, lr=0.05, backend=backend,
                                          compute_params=False, compute_adj_params=True, compute_adj_state=True,
                                          **incoming, **flags)
            adj_gs[j], adj_theta = adj_state.adj_grads, adj_state.adj_params
        if kind == "adam":
            adj_state0 = [adj_state.adj_exp_avgs, adj_state.adj_exp_avg_sqs, adj_state.adj_max_exp_avg_sqs]
        else:
            adj_state0 = [adj_state.adj_momentum_buffers]
        for i in range(len(shapes)):
            got = [adj_theta[i]] + [adj_gs[j][i] for j in range(3)] + [
                lst[i] for lst, st in zip(adj_state0, state0) if st is not None]
            for k, (a, b) in enumerate(zip(got, refs[i])):
                what = (backend, case, i, k)
                if b is None:  # θ_3 does not depend on that input
                    assert a is None or float(a.abs().max()) == 0.0, what
                    continue
                assert a is not None, what
                assert _rel_err(a, b) <= 1e-11, (what, _rel_err(a, b))


def test_fallback_of_the_fused_op_warns_once_and_names_the_reason():
    p = torch.randn(6, 4).t()  # non-contiguous
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=1)
    from fastmeta.ops import pilot as pilot_module

    pilot_module._WARNED.clear()
    if ops.extension_ops_available("cpu"):
        with pytest.warns(ops.FallbackWarning, match="adam_pilot: a non-contiguous tensor"):
            ops.adam_pilot([p], [p * 0.1], backend="auto", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.adam_pilot([p], [p * 0.1], backend="auto", **kw)  # once per reason
        ops.adam_pilot([p], [p * 0.1], backend="torch", **kw)  # asked for: no warning
