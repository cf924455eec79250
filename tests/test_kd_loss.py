"""fastmeta.kd_loss against a float64 autograd oracle (PyTorch path and Triton kernels).

The oracle is ``kd_loss_rows_reference`` evaluated in float64 on the SAME
(already rounded) inputs, masked and reduced here by hand, differentiated by
``torch.autograd.grad``.  Errors are normwise relative:
``max|x − ref| / max|ref|``.

The Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1`` (set
below before anything imports triton, and by tests/conftest.py when no GPU is
present).  Acceptance rule for the kernels: their error vs fp64 is at most 2x
the error of the same-dtype PyTorch path, plus a small absolute floor
(``_floor``) for the cases where the PyTorch path happens to round exactly
(error 0): one unit of rounding of the output dtype at the size of the values.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except Exception:  # pragma: no cover
        pass

import importlib.util
import math

import pytest
import torch

import fastmeta
from fastmeta.kernels.kd_loss_reference import KINDS, kd_loss_grads_reference, kd_loss_rows_reference
from fastmeta.losses import kd_loss

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_RUNNABLE = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(
    not TRITON_RUNNABLE, reason="Triton kernels need triton and either CUDA or TRITON_INTERPRET=1"
)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Normwise relative tolerances of the PyTorch path (results rounded to the dtype).
# Tiny gradients (softmax_mse at V=1000: ~2τ/(V·n)·p·d ~ 1e-9) are below fp16's
# smallest subnormal: errors up to fp16's subnormal spacing (2^-24) are representation
# limits, not computation errors, and are discounted in _rel.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}
TAUS = [0.5, 1.0, 2.0, 5.0]
VOCABS = [2, 3, 7, 1000, 4099]
REDUCTIONS = ["batchmean", "sum", "none"]


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _make_inputs(lead_shape, vocab, dtype, *, scale=3.0, masked=False, seed=0, device=None):
    device = device or _device()
    gen = torch.Generator().manual_seed(seed)
    zs = (torch.randn(*lead_shape, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    zt = (torch.randn(*lead_shape, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(*lead_shape, generator=gen) < 0.6
        mask.view(-1)[0] = True  # at least one counted row
        mask.view(-1)[-1] = False  # at least one masked row when there are 2+
        if mask.numel() == 1:
            mask.view(-1)[0] = True
    zs, zt = zs.to(device), zt.to(device)
    mask = None if mask is None else mask.to(device)
    return zs, zt, mask


def _oracle(zs, zt, tau, kind, reduction, mask, grad_out, scale=True):
    """fp64 loss and autograd gradients of the masked, reduced loss."""
    zs64 = zs.detach().double().requires_grad_(True)
    zt64 = zt.detach().double().requires_grad_(True)
    v = zs.shape[-1]
    rows, _ = kd_loss_rows_reference(zs64.reshape(-1, v), zt64.reshape(-1, v), tau, kind, scale)
    if mask is not None:
        rows = rows * mask.reshape(-1).double()
    if reduction == "none":
        loss = rows.reshape(zs.shape[:-1])
    elif reduction == "sum":
        loss = rows.sum()
    else:
        n = rows.numel() if mask is None else int(mask.sum())
        loss = rows.sum() / n
    gs, gt = torch.autograd.grad(loss, (zs64, zt64), grad_outputs=grad_out.double())
    return loss.detach(), gs, gt


def _rel(x, ref):
    """Normwise relative error.  Differences below what the result dtype can represent
    are not counted: fp16's subnormal spacing 2^-24, else the smallest normal number
    (e.g. a KL teacher gradient of 1e-228 with ±1e4 logits is 0 in fp32)."""
    floor = 2.0**-24 if x.dtype == torch.float16 else torch.finfo(x.dtype).tiny
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert torch.isfinite(x).all(), "non-finite values"
    denom = ref.abs().max().item()
    diff = ((x - ref).abs() - floor).clamp_min(0).max().item()
    return diff / (denom if denom > 0 else 1.0)


def _run(zs, zt, tau, kind, reduction, mask, grad_out, backend, scale=True):
    zs = zs.detach().clone().requires_grad_(True)
    zt = zt.detach().clone().requires_grad_(True)
    loss = kd_loss(zs, zt, tau, kind=kind, reduction=reduction, mask=mask, backend=backend,
                   scale_by_temperature_squared=scale)
    assert loss.dtype == zs.dtype
    gs, gt = torch.autograd.grad(loss, (zs, zt), grad_outputs=grad_out.to(loss.dtype))
    assert gs.dtype == zs.dtype and gt.dtype == zt.dtype
    assert gs.shape == zs.shape and gt.shape == zt.shape
    return loss, gs, gt


def _grad_out(reduction, lead_shape, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if reduction == "none":
        return torch.randn(*lead_shape, generator=gen, dtype=torch.float64).to(device)
    return (torch.rand((), generator=gen, dtype=torch.float64) + 0.5).to(device)


def _errors(zs, zt, tau, kind, reduction, mask, backend, scale=True):
    g = _grad_out(reduction, zs.shape[:-1], zs.device)
    ref_loss, ref_gs, ref_gt = _oracle(zs, zt, tau, kind, reduction, mask, g, scale)
    loss, gs, gt = _run(zs, zt, tau, kind, reduction, mask, g, backend, scale)
    if mask is not None:
        zero_rows = ~mask
        assert (gs[zero_rows] == 0).all() and (gt[zero_rows] == 0).all()
        if reduction == "none":
            assert (loss[zero_rows] == 0).all()
    return _rel(loss, ref_loss), _rel(gs, ref_gs), _rel(gt, ref_gt)


# ----------------------------------------------------------------------------- PyTorch path
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_torch_path_matches_fp64_autograd(kind, reduction, dtype, vocab):
    # one τ and one mask setting per case, cycled over the grid (keeps the suite CI-sized):
    # for each kind x reduction x dtype the 5 vocab sizes alternate masked / unmasked and
    # run through all four temperatures.
    vi, di = VOCABS.index(vocab), DTYPES.index(dtype)
    masked = (vi + di) % 2 == 1
    i = (REDUCTIONS.index(reduction) + vi + di) % len(TAUS)
    lead = (2,) if vocab > 1000 else (2, 3)
    for tau in (TAUS[i],):
        zs, zt, mask = _make_inputs(lead, vocab, dtype, masked=masked, seed=17 * i + vocab)
        errs = _errors(zs, zt, tau, kind, reduction, mask, "torch")
        assert max(errs) <= TOL[dtype], (tau, errs)


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_closed_form_gradients_match_autograd_fp64(kind, scale):
    """The hand-derived gradients (the Triton backward's math) vs fp64 autograd."""
    for tau in TAUS:
        zs, zt, _ = _make_inputs((5,), 11, torch.float64, seed=3, device="cpu")
        zs.requires_grad_(True)
        zt.requires_grad_(True)
        rows, _ = kd_loss_rows_reference(zs, zt, tau, kind, scale)
        weights = torch.randn(5, dtype=torch.float64)
        ags, agt = torch.autograd.grad((rows * weights).sum(), (zs, zt))
        gs, gt = kd_loss_grads_reference(zs.detach(), zt.detach(), tau, kind, scale)
        assert _rel(weights[:, None] * gs, ags) < 1e-12
        assert _rel(weights[:, None] * gt, agt) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_scaling_off_divides_by_tau_squared(kind):
    zs, zt, _ = _make_inputs((4,), 9, torch.float64, device="cpu")
    for tau in TAUS:
        on = kd_loss(zs, zt, tau, kind=kind, reduction="none")
        off = kd_loss(zs, zt, tau, kind=kind, reduction="none", scale_by_temperature_squared=False)
        torch.testing.assert_close(on, off * tau**2, rtol=1e-12, atol=0)


def test_kl_batchmean_equals_torch_kl_div():
    zs, zt, _ = _make_inputs((6,), 13, torch.float64, device="cpu")
    tau = 2.0
    expected = tau**2 * torch.nn.functional.kl_div(
        torch.log_softmax(zs / tau, -1), torch.log_softmax(zt / tau, -1), reduction="batchmean", log_target=True
    )
    torch.testing.assert_close(kd_loss(zs, zt, tau), expected, rtol=1e-12, atol=0)


def test_softmax_mse_batchmean_equals_metadistil_formula():
    zs, zt, _ = _make_inputs((6,), 13, torch.float64, device="cpu")
    tau = 2.0
    expected = torch.nn.functional.mse_loss(torch.softmax(zs / tau, -1), torch.softmax(zt / tau, -1)) * tau**2
    torch.testing.assert_close(kd_loss(zs, zt, tau, kind="softmax_mse"), expected, rtol=1e-12, atol=0)


def test_logit_mse_scaled_is_plain_mse():
    zs, zt, _ = _make_inputs((6,), 13, torch.float64, device="cpu")
    expected = torch.nn.functional.mse_loss(zs, zt)
    torch.testing.assert_close(kd_loss(zs, zt, 3.0, kind="logit_mse"), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_torch_path_large_logits_finite(kind, dtype):
    # logit_mse of ±1e4 logits is ~1e8: not representable in fp16 (max 65504), so the
    # fp16 logit_mse case uses ±100 logits (its loss then stays below 4e4).
    amplitude = 100.0 if (dtype == torch.float16 and kind == "logit_mse") else 1e4
    for tau in TAUS:
        zs, zt, mask = _make_inputs((3,), 257, dtype, scale=amplitude / 4, masked=True, seed=5)
        zs = zs.clamp(-amplitude, amplitude)
        zt = zt.clamp(-amplitude, amplitude)
        errs = _errors(zs, zt, tau, kind, "batchmean", mask, "torch")
        assert max(errs) <= TOL[dtype], (tau, errs)


def test_mask_from_ignore_index_labels():
    zs, zt, _ = _make_inputs((2, 5), 7, torch.float64, device="cpu")
    labels = torch.tensor([[1, 2, -100, 3, -100], [-100, 0, 0, 1, 2]])
    loss = kd_loss(zs, zt, 2.0, mask=labels != -100)
    keep = (labels != -100).reshape(-1)
    expected = kd_loss(zs.reshape(-1, 7)[keep], zt.reshape(-1, 7)[keep], 2.0)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_non_contiguous_inputs():
    base_s, base_t, _ = _make_inputs((7, 4), 10, torch.float64, device="cpu")
    zs = base_s.transpose(0, 1)  # [4, 7, 10], non-contiguous rows
    zt = base_t[:, :, :].transpose(0, 1)
    expected = kd_loss(zs.contiguous(), zt.contiguous(), 1.5, reduction="none")
    torch.testing.assert_close(kd_loss(zs, zt, 1.5, reduction="none"), expected, rtol=0, atol=0)
    wide = torch.randn(5, 20, dtype=torch.float64)[:, ::2]  # stride 2 along V
    wide_t = torch.randn(5, 10, dtype=torch.float64)
    torch.testing.assert_close(
        kd_loss(wide, wide_t, reduction="none"), kd_loss(wide.contiguous(), wide_t, reduction="none")
    )


def test_public_names_exported():
    assert fastmeta.kd_loss is kd_loss
    assert callable(fastmeta.kd_teacher_cotangent) and callable(fastmeta.kd_influence)


def test_double_backward_on_torch_path():
    """The PyTorch path is plain autograd: second derivatives work (used by reference code)."""
    zs, zt, _ = _make_inputs((3,), 5, torch.float64, device="cpu")
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    (gs,) = torch.autograd.grad(kd_loss(zs, zt, 2.0), zs, create_graph=True)
    u = torch.randn_like(zs)
    (c,) = torch.autograd.grad((gs * u).sum(), zt)
    pt = torch.softmax(zt.detach() / 2.0, -1)
    torch.testing.assert_close(c, -(pt * u - pt * (pt * u).sum(-1, keepdim=True)) / 3, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- bad input
def test_error_messages():
    zs = torch.randn(3, 5)
    zt = torch.randn(3, 5)
    with pytest.raises(ValueError, match="teacher_logits shape"):
        kd_loss(zs, torch.randn(3, 6))
    with pytest.raises(TypeError, match="teacher_logits dtype"):
        kd_loss(zs, zt.double())
    with pytest.raises(TypeError, match="student_logits must be a floating"):
        kd_loss(torch.ones(3, 5, dtype=torch.long), torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="student_logits must be a torch.Tensor"):
        kd_loss([1.0, 2.0], zt)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            kd_loss(zs, zt, bad)
    with pytest.raises(ValueError, match="kind"):
        kd_loss(zs, zt, kind="js")
    with pytest.raises(ValueError, match="reduction"):
        kd_loss(zs, zt, reduction="mean")
    with pytest.raises(ValueError, match="backend"):
        kd_loss(zs, zt, backend="cuda")
    with pytest.raises(ValueError, match="empty batch"):
        kd_loss(torch.randn(0, 5), torch.randn(0, 5))
    with pytest.raises(ValueError, match="empty last"):
        kd_loss(torch.randn(3, 0), torch.randn(3, 0))
    with pytest.raises(ValueError, match="empty batch: every row is masked"):
        kd_loss(zs, zt, mask=torch.zeros(3, dtype=torch.bool))
    # all rows masked is fine for sum / none
    assert kd_loss(zs, zt, reduction="sum", mask=torch.zeros(3, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="mask shape"):
        kd_loss(zs, zt, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool"):
        kd_loss(zs, zt, mask=torch.ones(3))
    bad = zs.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="student_logits contains non-finite"):
        kd_loss(bad, zt)
    bad_t = zt.clone()
    bad_t[0, 0] = float("inf")
    with pytest.raises(ValueError, match="teacher_logits contains non-finite"):
        kd_loss(zs, bad_t)
    assert not torch.isfinite(kd_loss(zs, bad_t, check_finite=False)) or True  # no error raised
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="same device"):
            kd_loss(zs, zt.cuda())


def test_torch_compile_reference_path():
    """kd_loss (and its backward) under torch.compile on the PyTorch path."""
    zs, zt, mask = _make_inputs((4,), 9, torch.float32, masked=True, device="cpu")

    def step(a, b):
        return kd_loss(a, b, 2.0, mask=mask, check_finite=False)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=False)
    a = zs.clone().requires_grad_(True)
    b = zt.clone().requires_grad_(True)
    out = compiled(a, b)
    out.backward()
    a2 = zs.clone().requires_grad_(True)
    b2 = zt.clone().requires_grad_(True)
    ref = step(a2, b2)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


# ----------------------------------------------------------------------------- Triton kernels
def _floor(dtype, vocab):
    # absolute floor of the acceptance rule: a couple of units of rounding in the
    # output dtype (results are rounded to it) plus fp32 accumulation of V terms.
    return 2 * EPS[dtype] + 4 * EPS[torch.float32] * math.sqrt(vocab)


def _divergence_floor(zs, zt, tau, kind, reduction, mask, scale=True):
    """Relative error floors (loss, grad_student, grad_teacher) from the conditioning
    of kl / reverse_kl in fp32 (0 for the other kinds).

    Their gradients are p ⊙ (g − Σ p g) with g = log ps − log pt: a difference of
    O(|g|) numbers.  ANY fp32 evaluation carries an absolute error of a few
    eps32 · p_j (|g_j| + Σ_k p_k |g_k|), and the result can be orders of magnitude
    smaller than |g| (e.g. 0.1 vs 5 for a peaked row), so the same-dtype PyTorch
    path's error, which is sometimes luckily below one ulp of the intermediates,
    is not a fair yardstick there.  Floor = 4 eps32 (a/τ) max_row Σ_j (ps+pt)_j |g_j|
    times the largest row weight, relative to the largest gradient entry.
    """
    if kind not in ("kl", "reverse_kl"):
        return 0.0, 0.0, 0.0
    v = zs.shape[-1]
    s64 = zs.detach().double().reshape(-1, v) / tau
    t64 = zt.detach().double().reshape(-1, v) / tau
    log_ps, log_pt = torch.log_softmax(s64, -1), torch.log_softmax(t64, -1)
    g_abs = (log_ps - log_pt).abs()
    mass = ((log_ps.exp() + log_pt.exp()) * g_abs).sum(-1)
    counted = torch.ones_like(mass, dtype=torch.bool) if mask is None else mask.reshape(-1).cpu()
    m = mass.cpu()[counted].max().item()
    a = tau * tau if scale else 1.0
    row_weight = 1.0 / int(counted.sum()) if reduction == "batchmean" else 1.0
    row_weight *= 1.5 if reduction != "none" else 2.5  # |grad_out| bounds of _grad_out
    g = _grad_out(reduction, zs.shape[:-1], "cpu")
    ref_gs, ref_gt = _oracle(zs.cpu(), zt.cpu(), tau, kind, reduction, None if mask is None else mask.cpu(), g,
                             scale)[1:]
    abs_floor = 4 * EPS[torch.float32] * (a / tau) * m * row_weight * max(1.0, g.abs().max().item())
    tiny = torch.finfo(torch.float64).tiny
    return 0.0, abs_floor / max(ref_gs.abs().max().item(), tiny), abs_floor / max(ref_gt.abs().max().item(), tiny)


def _tau_for(*keys):
    """Cycle τ over the interpreted grid (every τ meets every kind and dtype) instead
    of looping over all four per case: keeps the interpreter tests CI-sized."""
    return TAUS[sum(len(str(k)) for k in keys) % len(TAUS)]


INTERPRET_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@needs_triton
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", INTERPRET_DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_triton_within_2x_of_torch_error(kind, dtype, vocab):
    # reduction and τ cycle over the grid (each kind x dtype meets every reduction and
    # several τ) to keep the interpreter CI-sized; the reductions are host-side code
    # shared with the PyTorch path, tested exhaustively above.
    reduction = REDUCTIONS[(VOCABS.index(vocab) + INTERPRET_DTYPES.index(dtype)) % 3]
    lead = (2,) if vocab > 1000 else (2, 3)
    tau = _tau_for(kind, reduction, dtype, vocab)
    zs, zt, mask = _make_inputs(lead, vocab, dtype, masked=reduction != "sum" or vocab < 10, seed=vocab + 1)
    ref_errs = _errors(zs, zt, tau, kind, reduction, mask, "torch")
    tri_errs = _errors(zs, zt, tau, kind, reduction, mask, "triton")
    cond = _divergence_floor(zs, zt, tau, kind, reduction, mask)
    for name, e_tri, e_ref, e_cond in zip(("loss", "grad_student", "grad_teacher"), tri_errs, ref_errs, cond):
        floor = _floor(dtype, vocab) + e_cond
        assert e_tri <= 2 * e_ref + floor, (name, tau, e_tri, e_ref, floor)


@needs_triton
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_kernels_multi_block_online_softmax(kind, scale):
    """Small BLOCK_V so the online max/sum rescaling runs over many blocks, with the
    row maxima appearing late (ascending logits) and early (descending)."""
    from fastmeta.kernels.kd_loss import kd_loss_backward, kd_loss_forward

    v = 300
    zs, zt, _ = _make_inputs((4,), v, torch.float32, seed=11, device=_device())
    zs[0] = zs[0].sort().values  # max at the end
    zt[1] = zt[1].sort(descending=True).values  # max at the start
    zs[2] = zs[2] + 30.0 * torch.linspace(-1, 1, v, device=zs.device)  # drifting maximum
    mask = torch.tensor([True, True, True, False], device=zs.device)
    for tau in TAUS:
        rows64, _ = kd_loss_rows_reference(zs.double(), zt.double(), tau, kind, scale)
        gs64, gt64 = kd_loss_grads_reference(zs.double(), zt.double(), tau, kind, scale)
        rows32, _ = kd_loss_rows_reference(zs, zt, tau, kind, scale)
        gs32, gt32 = kd_loss_grads_reference(zs, zt, tau, kind, scale)
        loss, stats = kd_loss_forward(zs, zt, mask, tau, kind, scale, block_v=32)
        grad_rows = torch.tensor([0.5, -1.0, 2.0, 3.0], device=zs.device)
        gs, gt = kd_loss_backward(grad_rows, zs, zt, stats, mask, tau, kind, scale, True, True, block_v=32)
        m = mask.double()
        w = (grad_rows.double() * m)[:, None]
        floor = _floor(torch.float32, v)
        assert loss[3] == 0 and (gs[3] == 0).all() and (gt[3] == 0).all()
        assert _rel(loss, rows64 * m) <= 2 * _rel(rows32 * m, rows64 * m) + floor
        assert _rel(gs, gs64 * w) <= 2 * _rel(gs32 * w, gs64 * w) + floor
        assert _rel(gt, gt64 * w) <= 2 * _rel(gt32 * w, gt64 * w) + floor


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", INTERPRET_DTYPES, ids=str)
def test_triton_large_logits_finite(kind, dtype):
    from fastmeta.kernels.kd_loss import kd_loss_backward, kd_loss_forward  # noqa: F401

    amplitude = 100.0 if (dtype == torch.float16 and kind == "logit_mse") else 1e4  # see torch-path test
    tau = _tau_for(kind, dtype, "large")
    zs, zt, mask = _make_inputs((3,), 257, dtype, scale=amplitude / 4, masked=True, seed=5)
    zs, zt = zs.clamp(-amplitude, amplitude), zt.clamp(-amplitude, amplitude)
    ref_errs = _errors(zs, zt, tau, kind, "batchmean", mask, "torch")
    tri_errs = _errors(zs, zt, tau, kind, "batchmean", mask, "triton")
    cond = _divergence_floor(zs, zt, tau, kind, "batchmean", mask)
    for e_tri, e_ref, e_cond in zip(tri_errs, ref_errs, cond):
        assert e_tri <= 2 * e_ref + _floor(dtype, 257) + e_cond, (tau, tri_errs, ref_errs, cond)


@needs_triton
def test_triton_non_contiguous_student_only_grad_and_all_masked():
    base_s, base_t, _ = _make_inputs((5, 2), 33, torch.float32, device=_device())
    zs = base_s.transpose(0, 1).requires_grad_(True)  # non-contiguous rows
    zt = base_t.transpose(0, 1)  # teacher detached: only the student gradient is computed
    out = kd_loss(zs, zt, 2.0, backend="triton")
    (gs,) = torch.autograd.grad(out, zs)
    zs2 = zs.detach().contiguous().requires_grad_(True)
    ref = kd_loss(zs2, zt.contiguous(), 2.0, backend="torch")
    (gs2,) = torch.autograd.grad(ref, zs2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs, gs2, rtol=1e-5, atol=1e-7)
    none_mask = torch.zeros(2, 5, dtype=torch.bool, device=zs.device)
    assert kd_loss(zs, zt, reduction="sum", mask=none_mask, backend="triton").item() == 0.0
    assert (kd_loss(zs, zt, reduction="none", mask=none_mask, backend="triton") == 0).all()


@needs_triton
def test_triton_path_under_torch_compile():
    zs, zt, mask = _make_inputs((4,), 9, torch.float32, masked=True)

    def step(a, b):
        return kd_loss(a, b, 2.0, mask=mask, check_finite=False, backend="triton")

    compiled = torch.compile(step, backend="aot_eager")
    a = zs.clone().requires_grad_(True)
    b = zt.clone().requires_grad_(True)
    compiled(a, b).backward()
    a2 = zs.clone().requires_grad_(True)
    b2 = zt.clone().requires_grad_(True)
    step(a2, b2).backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_backend_triton_rejects_float64():
    zs = torch.randn(2, 3, dtype=torch.float64)
    if HAS_TRITON:
        with pytest.raises(TypeError, match="float64"):
            kd_loss(zs, zs.clone(), backend="triton")


# ----------------------------------------------------------------------------- bench/kernels.py plumbing
def test_bench_kernels_refuses_without_cuda_and_smoke_runs_on_cpu(tmp_path):
    import json

    from bench import kernels as bench_kernels

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as info:
            bench_kernels.main(["--device", "cuda", "--sizes", "tiny"])
        assert "torch.cuda.is_available() is False" in str(info.value.code)
    with pytest.raises(SystemExit):  # cpu is a smoke run only
        bench_kernels.main(["--device", "cpu", "--sizes", "full"])
    assert bench_kernels.main(["--device", "cpu", "--sizes", "tiny", "--repeats", "1", "--warmup", "0",
                               "--dtypes", "fp32", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "kernels_cpu.json").read_text())
    modes = {(r["impl"], r["mode"]) for r in data["results"]}
    assert modes == {(i, m) for i in ("fastmeta", "eager") for m in ("fwd", "bwd", "fwd+bwd")}
    assert all(r["median_ms"] > 0 for r in data["results"])
    assert "SMOKE" in (tmp_path / "kernels_cpu.md").read_text()


# ----------------------------------------------------------------------------- real compilation (no GPU needed)
_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fastmeta
from fastmeta.kernels import kd_loss as K, kd_second_order as S

def build(fn, sig, const):
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
    assert "cubin" in k.asm, fn.__name__

fwd = {"zs_ptr": "*bf16", "zt_ptr": "*bf16", "mask_ptr": "*i8", "loss_ptr": "*fp32", "stats_ptr": "*fp32",
       "stride_zs": "i64", "stride_zt": "i64", "V": "i32", "inv_tau": "fp32", "loss_scale": "fp32",
       "KIND": "constexpr", "HAS_MASK": "constexpr", "BLOCK_V": "constexpr"}
bwd = {"zs_ptr": "*bf16", "zt_ptr": "*bf16", "stats_ptr": "*fp32", "grad_rows_ptr": "*fp32",
       "mask_ptr": "*i8", "gs_ptr": "*bf16", "gt_ptr": "*bf16", "stride_zs": "i64", "stride_zt": "i64",
       "stride_gs": "i64", "stride_gt": "i64", "V": "i32", "inv_tau": "fp32", "grad_scale": "fp32",
       "KIND": "constexpr", "HAS_MASK": "constexpr", "NEED_S": "constexpr", "NEED_T": "constexpr",
       "BLOCK_V": "constexpr"}
so = {"zs_ptr": "*fp16", "zt_ptr": "*fp16", "u_ptr": "*fp32", "mask_ptr": "*i8", "c_ptr": "*fp16",
      "w_ptr": "*fp32", "stride_zs": "i64", "stride_zt": "i64", "stride_u": "i64", "stride_c": "i64",
      "V": "i32", "inv_tau": "fp32", "c_scale": "fp32", "w_scale": "fp32", "KIND": "constexpr",
      "HAS_MASK": "constexpr", "NEED_C": "constexpr", "NEED_W": "constexpr", "BLOCK_V": "constexpr"}
for kind in (0, 2, 3):
    build(K._kd_loss_forward_kernel, fwd, {"KIND": kind, "HAS_MASK": kind != 2, "BLOCK_V": 4096})
    build(K._kd_loss_backward_kernel, bwd, {"KIND": kind, "HAS_MASK": kind != 3, "NEED_S": True,
                                            "NEED_T": kind != 0, "BLOCK_V": 4096})
for kind in (0, 1, 2, 3):
    build(S._kd_second_order_kernel, so, {"KIND": kind, "HAS_MASK": kind % 2 == 0, "NEED_C": kind != 1,
                                          "NEED_W": True, "BLOCK_V": 2048})
print("compiled")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernels_compile_to_cubin_for_sm90():
    """The interpreter does not type-check like the compiler: compile the kernels for an
    H100 target (ttir -> ptx -> cubin with Triton's bundled ptxas; no GPU needed), in a
    subprocess without TRITON_INTERPRET (under it @triton.jit functions are interpreted)."""
    import subprocess
    import sys
    from pathlib import Path

    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"triton's NVIDIA backend is unavailable: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=str(root),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
