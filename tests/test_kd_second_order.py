"""kd_teacher_cotangent / kd_influence against float64 autograd applied twice.

Oracle: ``L`` = the fp64 loss written out here from the definitions (``_kd_rows_fp64``,
``torch.nn.functional`` only, none of fastmeta's code; masked, reduced), ``gs = ∂L/∂zs``
with ``create_graph=True``, ``c = ∂/∂zt ⟨gs, u⟩`` by a second ``torch.autograd.grad``;
influences ``w_i = ⟨∂ℓ_i/∂zs_i, u_i⟩`` from the gradient of the unreduced rows.
Error metric and the kernels' acceptance rule as in test_kd_loss.py.
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
import torch.nn.functional as F

from fastmeta.kernels.kd_loss_reference import KINDS
from fastmeta.kernels.kd_second_order_reference import kd_second_order_rows_reference
from fastmeta.losses import kd_influence, kd_teacher_cotangent, kd_teacher_cotangent_and_influence

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_RUNNABLE = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(
    not TRITON_RUNNABLE, reason="Triton kernels need triton and either CUDA or TRITON_INTERPRET=1"
)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
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
    u = torch.randn(*lead_shape, vocab, generator=gen, dtype=torch.float64).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(*lead_shape, generator=gen) < 0.6
        mask.view(-1)[-1] = False
        mask.view(-1)[0] = True
    return zs.to(device), zt.to(device), u.to(device), (None if mask is None else mask.to(device))


def _kd_rows_fp64(zs, zt, tau, kind, scale=True):
    """Per-row KD losses in float64 from the definitions (as in test_kd_loss.py; independent
    of ``kernels/``): kl ``a·KL(pt‖ps)``, reverse_kl ``a·KL(ps‖pt)``, softmax_mse
    ``(a/V)·‖ps − pt‖²``, logit_mse ``(a/(τ²V))·‖zs − zt‖²``, ``a = τ²`` or 1."""
    zs, zt = zs.double(), zt.double()
    a = tau * tau if scale else 1.0
    if kind == "logit_mse":
        return (a / (tau * tau)) * F.mse_loss(zs, zt, reduction="none").mean(-1)
    log_ps, log_pt = F.log_softmax(zs / tau, dim=-1), F.log_softmax(zt / tau, dim=-1)
    if kind == "kl":  # kl_div(input, target) = Σ target·(log target − input): KL(target ‖ input)
        return a * F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    if kind == "reverse_kl":
        return a * F.kl_div(log_pt, log_ps, reduction="none", log_target=True).sum(-1)
    if kind == "softmax_mse":
        return a * F.mse_loss(F.softmax(zs / tau, -1), F.softmax(zt / tau, -1), reduction="none").mean(-1)
    raise ValueError(kind)


def _oracle(zs, zt, u, tau, kind, reduction, mask, scale=True):
    v = zs.shape[-1]
    zs64 = zs.detach().double().reshape(-1, v).requires_grad_(True)
    zt64 = zt.detach().double().reshape(-1, v).requires_grad_(True)
    u64 = u.detach().double().reshape(-1, v)
    rows = _kd_rows_fp64(zs64, zt64, tau, kind, scale)
    m = torch.ones_like(rows) if mask is None else mask.reshape(-1).double()
    rows = rows * m
    if reduction == "batchmean":
        loss = rows.sum() / m.sum()
    else:  # sum; for "none" the cotangent of row i is that of ℓ_i, i.e. of the sum
        loss = rows.sum()
    (gs,) = torch.autograd.grad(loss, zs64, create_graph=True)
    (c,) = torch.autograd.grad((gs * u64).sum(), zt64)
    (gs_rows,) = torch.autograd.grad(rows.sum(), zs64)
    w = (gs_rows * u64).sum(-1)
    return c.reshape(zs.shape), w.reshape(zs.shape[:-1])


def _rel(x, ref):
    """Normwise relative error, discounting differences below the dtype's resolution
    (fp16 subnormal spacing 2^-24, else the smallest normal number)."""
    floor = 2.0**-24 if x.dtype == torch.float16 else torch.finfo(x.dtype).tiny
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert torch.isfinite(x).all(), "non-finite values"
    denom = ref.abs().max().item()
    diff = ((x - ref).abs() - floor).clamp_min(0).max().item()
    return diff / (denom if denom > 0 else 1.0)


def _errors(zs, zt, u, tau, kind, reduction, mask, backend, scale=True):
    ref_c, ref_w = _oracle(zs, zt, u, tau, kind, reduction, mask, scale)
    c = kd_teacher_cotangent(zs, zt, u, tau, kind=kind, reduction=reduction, mask=mask, backend=backend,
                             scale_by_temperature_squared=scale)
    w = kd_influence(zs, zt, u, tau, kind=kind, mask=mask, backend=backend, scale_by_temperature_squared=scale)
    assert c.shape == zt.shape and c.dtype == zt.dtype
    assert w.shape == zs.shape[:-1] and w.dtype == zs.dtype
    if mask is not None:
        assert (c[~mask] == 0).all() and (w[~mask] == 0).all()
    return _rel(c, ref_c), _rel(w, ref_w)


# ----------------------------------------------------------------------------- PyTorch path
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_torch_path_matches_double_autograd(kind, reduction, dtype, vocab):
    lead = (2,) if vocab > 1000 else (2, 3)  # the double-autograd oracle at V=4099 is the slow part
    # one τ and one mask setting per case, cycled over the grid (keeps the suite CI-sized):
    # for each kind x reduction x dtype the 5 vocab sizes alternate masked / unmasked and
    # run through all four temperatures.
    vi, di = VOCABS.index(vocab), DTYPES.index(dtype)
    masked = (vi + di) % 2 == 1
    i = (REDUCTIONS.index(reduction) + vi + di) % len(TAUS)
    for tau in (TAUS[i],):
        zs, zt, u, mask = _make_inputs(lead, vocab, dtype, masked=masked, seed=31 * i + vocab)
        errs = _errors(zs, zt, u, tau, kind, reduction, mask, "torch")
        assert max(errs) <= TOL[dtype], (tau, errs)


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_closed_forms_fp64_with_and_without_tau_scaling(kind, scale):
    for tau in TAUS:
        zs, zt, u, _ = _make_inputs((5,), 11, torch.float64, seed=7, device="cpu")
        ref_c, ref_w = _oracle(zs, zt, u, tau, kind, "sum", None, scale)
        c, w = kd_second_order_rows_reference(zs, zt, u, tau, kind, scale)
        assert _rel(c, ref_c) < 1e-12 and _rel(w, ref_w) < 1e-12


def test_design_note_kl_cotangent():
    """docs/meta-gradient.md: c = −(pt ⊙ u − pt ⟨pt, u⟩)/B, and w_i = τ⟨ps − pt, u⟩."""
    zs, zt, u, _ = _make_inputs((4,), 6, torch.float64, device="cpu")
    tau = 3.0
    pt = torch.softmax(zt / tau, -1)
    ps = torch.softmax(zs / tau, -1)
    expected = -(pt * u - pt * (pt * u).sum(-1, keepdim=True)) / 4
    torch.testing.assert_close(kd_teacher_cotangent(zs, zt, u, tau), expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(kd_influence(zs, zt, u, tau), tau * ((ps - pt) * u).sum(-1), rtol=1e-12, atol=1e-15)


def test_per_sample_sums_and_combined_call():
    zs, zt, u, mask = _make_inputs((3, 5), 7, torch.float64, masked=True, device="cpu")
    rows = kd_influence(zs, zt, u, 2.0, mask=mask)
    assert rows.shape == (3, 5)
    torch.testing.assert_close(kd_influence(zs, zt, u, 2.0, mask=mask, per_sample=True), rows.sum(-1))
    c, w = kd_teacher_cotangent_and_influence(zs, zt, u, 2.0, kind="softmax_mse", mask=mask, per_sample=True)
    torch.testing.assert_close(c, kd_teacher_cotangent(zs, zt, u, 2.0, kind="softmax_mse", mask=mask))
    torch.testing.assert_close(w, kd_influence(zs, zt, u, 2.0, kind="softmax_mse", mask=mask).sum(-1))


# Large logits (as in test_kd_loss.py): a big offset per row (+/- LARGE_SHIFT, different for
# student and teacher) plus z/τ uniform over ±4, so |z|/τ is 100..2e4 (a naive fp32 softmax
# overflows beyond 88.7) while the softmaxes, the cotangents and the influences stay far from
# 0 / one-hot (_assert_non_degenerate).  ulp(1e4) = 2^-10 in fp32, ulp(1500) = 1 in fp16,
# ulp(200) = 1 in bf16; power-of-two τ keep z/τ and s − max(s) exact in fp32 (with τ = 5 the
# rounding of z/τ ≈ 2e3 alone moves each probability by ~1e-4, in any fp32 evaluation).
LARGE_SHIFT = {torch.float32: 1e4, torch.float16: 1500.0, torch.bfloat16: 200.0}
LARGE_TAUS = [0.5, 1.0, 2.0]
LARGE_V = 257


def _large_logit_inputs(dtype, tau, kind, seed, n_rows=5, vocab=LARGE_V, device=None):
    """Rows 0..n-2 counted, the last one masked; logit_mse gets equal offsets."""
    device = device or _device()
    gen = torch.Generator().manual_seed(seed)
    signs_s = torch.tensor([1.0, -1.0, 1.0, -1.0] * n_rows, dtype=torch.float64)[:n_rows, None]
    signs_t = signs_s if kind == "logit_mse" else torch.tensor([1.0, 1.0, -1.0, -1.0] * n_rows,
                                                               dtype=torch.float64)[:n_rows, None]
    spread = 8.0 * tau
    zs = LARGE_SHIFT[dtype] * signs_s + spread * (torch.rand(n_rows, vocab, generator=gen, dtype=torch.float64) - 0.5)
    zt = LARGE_SHIFT[dtype] * signs_t + spread * (torch.rand(n_rows, vocab, generator=gen, dtype=torch.float64) - 0.5)
    u = torch.randn(n_rows, vocab, generator=gen, dtype=torch.float64)
    mask = torch.ones(n_rows, dtype=torch.bool)
    mask[-1] = False
    return zs.to(dtype).to(device), zt.to(dtype).to(device), u.to(dtype).to(device), mask.to(device)


def _assert_non_degenerate(zs, zt, u, tau, kind, mask):
    """Every counted row: |z|/τ > 88.8 somewhere, fp64 softmaxes with largest probability
    <= 0.5 and >= 10 entries above 1e-3, and a nonzero reference cotangent and influence."""
    counted = mask.reshape(-1).cpu()
    for z in (zs, zt):
        z64 = z.detach().double().cpu().reshape(-1, z.shape[-1])[counted]
        assert (z64.abs().max(-1).values / tau > 88.8).all()
        p = torch.softmax(z64 / tau, -1)
        assert (p.max(-1).values <= 0.5).all() and ((p > 1e-3).sum(-1) >= 10).all()
    c, w = _oracle(zs.cpu(), zt.cpu(), u.cpu(), tau, kind, "sum", None)
    assert (c.reshape(-1, c.shape[-1])[counted].abs().amax(-1) > 1e-3 * c.abs().max()).all()
    assert (w.reshape(-1)[counted].abs() > 1e-3 * w.abs().max()).all() and w.abs().max() > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_torch_path_large_logits_finite(kind, dtype):
    for tau in LARGE_TAUS:
        zs, zt, u, mask = _large_logit_inputs(dtype, tau, kind, seed=9)
        _assert_non_degenerate(zs, zt, u, tau, kind, mask)
        errs = _errors(zs, zt, u, tau, kind, "batchmean", mask, "torch")
        assert max(errs) <= TOL[dtype], (tau, errs)


def test_error_messages():
    zs, zt, u = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match="student_tangent shape"):
        kd_teacher_cotangent(zs, zt, torch.randn(3, 4))
    with pytest.raises(TypeError, match="student_tangent must be a floating"):
        kd_influence(zs, zt, torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="student_tangent must be a torch.Tensor"):
        kd_influence(zs, zt, None)
    bad = u.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="student_tangent contains non-finite"):
        kd_teacher_cotangent(zs, zt, bad)
    with pytest.raises(ValueError, match="temperature"):
        kd_influence(zs, zt, u, -2.0)
    with pytest.raises(ValueError, match="empty batch"):
        kd_teacher_cotangent(zs, zt, u, mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="teacher_logits shape"):
        kd_influence(zs, torch.randn(3, 6), u)


# ----------------------------------------------------------------------------- Triton kernels
def _floor(dtype, vocab):
    # absolute floor of the acceptance rule: a couple of units of rounding in the
    # output dtype plus fp32 accumulation of V terms.
    return 2 * EPS[dtype] + 4 * EPS[torch.float32] * math.sqrt(vocab)


def _divergence_floor(zs, zt, u, tau, kind, reduction, mask, scale=True):
    """Relative floors (cotangent, influence) from fp32 conditioning, reverse_kl only.

    reverse_kl's influence w = (a/τ)(⟨ps ⊙ g, u⟩ − RKL ⟨ps, u⟩) is a difference of
    O(|g|·|u|) numbers that can be far smaller than either: any fp32 evaluation has
    an absolute error of a few eps32 (a/τ) Σ_j ps_j |g_j| |u_j| (+ RKL |⟨ps,u⟩|).
    The floor is 4 eps32 (a/τ) max_row [Σ ps|g||u| + Σ ps|g| · Σ ps|u|], relative to
    the largest |w|.  (kl's w = (a/τ)⟨ps − pt, u⟩ has no large intermediates; the
    cotangents are products of p with O(|u|) terms: no extra floor.)
    """
    if kind != "reverse_kl":
        return 0.0, 0.0
    v = zs.shape[-1]
    s64 = zs.detach().double().reshape(-1, v).cpu() / tau
    t64 = zt.detach().double().reshape(-1, v).cpu() / tau
    u64 = u.detach().double().reshape(-1, v).cpu().abs()
    log_ps, log_pt = torch.log_softmax(s64, -1), torch.log_softmax(t64, -1)
    ps, g = log_ps.exp(), (log_ps - log_pt).abs()
    mass = (ps * g * u64).sum(-1) + (ps * g).sum(-1) * (ps * u64).sum(-1)
    counted = torch.ones_like(mass, dtype=torch.bool) if mask is None else mask.reshape(-1).cpu()
    a = tau * tau if scale else 1.0
    abs_floor = 4 * EPS[torch.float32] * (a / tau) * mass[counted].max().item()
    _, ref_w = _oracle(zs.cpu(), zt.cpu(), u.cpu(), tau, kind, reduction, None if mask is None else mask.cpu(), scale)
    return 0.0, abs_floor / max(ref_w.abs().max().item(), torch.finfo(torch.float64).tiny)


def _tau_for(*keys):
    """Cycle τ over the interpreted grid (see test_kd_loss.py)."""
    return TAUS[sum(len(str(k)) for k in keys) % len(TAUS)]


INTERPRET_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@needs_triton
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", INTERPRET_DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_triton_within_2x_of_torch_error(kind, dtype, vocab):
    # reduction and τ cycle over the grid (host-side row scaling is shared with the
    # PyTorch path, which is tested over every combination above)
    reduction = REDUCTIONS[(VOCABS.index(vocab) + INTERPRET_DTYPES.index(dtype)) % 3]
    lead = (2,) if vocab > 1000 else (2, 3)
    tau = _tau_for(kind, reduction, dtype, vocab)
    zs, zt, u, mask = _make_inputs(lead, vocab, dtype, masked=reduction != "sum" or vocab < 10, seed=vocab + 2)
    ref_errs = _errors(zs, zt, u, tau, kind, reduction, mask, "torch")
    tri_errs = _errors(zs, zt, u, tau, kind, reduction, mask, "triton")
    cond = _divergence_floor(zs, zt, u, tau, kind, reduction, mask)
    for name, e_tri, e_ref, e_cond in zip(("cotangent", "influence"), tri_errs, ref_errs, cond):
        floor = _floor(dtype, vocab) + e_cond
        assert e_tri <= 2 * e_ref + floor, (name, tau, e_tri, e_ref, floor)


@needs_triton
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_kernel_multi_block(kind, scale):
    """Small BLOCK_V: online rescaling over many blocks, maxima late/early/drifting,
    a masked row, and each output requested alone."""
    from fastmeta.kernels.kd_second_order import kd_second_order

    v = 300
    zs, zt, u, _ = _make_inputs((4,), v, torch.float32, seed=13)
    zs[0] = zs[0].sort().values
    zt[1] = zt[1].sort(descending=True).values
    zs[2] = zs[2] + 30.0 * torch.linspace(-1, 1, v, device=zs.device)
    zt[2] = zt[2] - 20.0 * torch.linspace(-1, 1, v, device=zs.device)
    mask = torch.tensor([True, True, True, False], device=zs.device)
    m = mask.double()
    for tau in TAUS:
        # fp64 reference: double autograd of the independent losses (per row: reduction "sum");
        # same-dtype yardstick: the fp32 PyTorch path (the closed forms the kernel implements)
        c64, w64 = _oracle(zs, zt, u, tau, kind, "sum", None, scale)
        c32, w32 = kd_second_order_rows_reference(zs, zt, u, tau, kind, scale)
        c64, w64, c32, w32 = 0.25 * c64 * m[:, None], w64 * m, 0.25 * c32 * m[:, None], w32 * m
        c, w = kd_second_order(zs, zt, u, mask, tau, kind, scale, 0.25, True, True, block_v=32)
        if tau == TAUS[0]:
            c_only, none_w = kd_second_order(zs, zt, u, mask, tau, kind, scale, 0.25, True, False, block_v=32)
            none_c, w_only = kd_second_order(zs, zt, u, mask, tau, kind, scale, 0.25, False, True, block_v=32)
            assert none_w is None and none_c is None
            assert torch.equal(c, c_only) and torch.equal(w, w_only)
        assert (c[3] == 0).all() and w[3] == 0
        floor = _floor(torch.float32, v) + _divergence_floor(zs, zt, u, tau, kind, "sum", mask, scale)[1]
        assert _rel(c, c64) <= 2 * _rel(c32, c64) + _floor(torch.float32, v)
        assert _rel(w, w64) <= 2 * _rel(w32, w64) + floor


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", INTERPRET_DTYPES, ids=str)
def test_triton_large_logits_finite(kind, dtype, monkeypatch):
    """Large logits (LARGE_SHIFT) in one block and, with the block size forced to 64, in 5."""
    from fastmeta.kernels import kd_second_order as kernel_module

    tau = LARGE_TAUS[(KINDS.index(kind) + INTERPRET_DTYPES.index(dtype)) % len(LARGE_TAUS)]
    zs, zt, u, mask = _large_logit_inputs(dtype, tau, kind, seed=9)
    _assert_non_degenerate(zs, zt, u, tau, kind, mask)
    ref_errs = _errors(zs, zt, u, tau, kind, "batchmean", mask, "torch")
    floor = _floor(dtype, LARGE_V)
    for block in (None, 64):
        if block is not None:
            monkeypatch.setattr(kernel_module, "block_size", lambda vocab, device, block=block: block)
        tri_errs = _errors(zs, zt, u, tau, kind, "batchmean", mask, "triton")
        for e_tri, e_ref in zip(tri_errs, ref_errs):
            assert e_tri <= 2 * e_ref + floor, (tau, block, tri_errs, ref_errs, floor)


@needs_triton
@pytest.mark.parametrize("tau", [3.0, 0.7])
@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "softmax_mse"])
def test_triton_large_logits_at_any_temperature(kind, tau, monkeypatch):
    """Logits of ±1e4 at temperatures whose inverse is not a power of two: pass 1 takes ``z − max``
    before scaling by ``log2(e)/τ``, so the cotangent and the influences stay within 1e-5 of float64.
    Scaling first (``z/τ − m``, the kernel until d1f7853) rounds at ``|z|/τ``: 1e-4 here."""
    from fastmeta.kernels import kd_second_order as kernel_module

    zs, zt, u, mask = _large_logit_inputs(torch.float32, tau, kind, seed=11)
    _assert_non_degenerate(zs, zt, u, tau, kind, mask)
    for block in (None, 64):  # the row in one block, then in 5 (online rescaling)
        if block is not None:
            monkeypatch.setattr(kernel_module, "block_size", lambda vocab, device, block=block: block)
        errors = _errors(zs, zt, u, tau, kind, "batchmean", mask, "triton")
        assert max(errors) < 1e-5, (tau, block, errors)


# ----------------------------------------------------------------------------- native CUDA, LLM vocabularies
NATIVE_VOCABS = [32000, 128256]
NATIVE_DEVICE = "cuda"


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("vocab", NATIVE_VOCABS)
@pytest.mark.parametrize("kind", KINDS)
def test_triton_native_cuda_bf16_llm_vocab(kind, vocab):
    """The compiled kernel on the GPU with bf16 logits and tangent at LLM vocabulary sizes
    (8 / 32 blocks of 4096 per row), 16 rows (some masked).
    Flash-attention's rule against the fp64 double-autograd oracle (on the GPU in float64):
    kernel error <= 2x the bf16 PyTorch path's error + a floor: fp32 accumulation of V terms
    for the [16, V] cotangent, half an ulp of bf16 (2^-8) for the 16 influences (few values:
    the PyTorch path may round luckily close)."""
    tau = 2.0 if vocab == NATIVE_VOCABS[0] else 1.0
    reduction = "batchmean" if vocab == NATIVE_VOCABS[0] else "sum"
    zs, zt, u, mask = _make_inputs((16,), vocab, torch.bfloat16, masked=True, seed=vocab + KINDS.index(kind),
                                   device=NATIVE_DEVICE)
    assert zs.device.type == NATIVE_DEVICE and zs.dtype == torch.bfloat16
    ref_errs = _errors(zs, zt, u, tau, kind, reduction, mask, "torch")
    tri_errs = _errors(zs, zt, u, tau, kind, reduction, mask, "triton")
    floors = (4 * EPS[torch.float32] * math.sqrt(vocab), EPS[torch.bfloat16])
    for name, e_tri, e_ref, floor in zip(("cotangent", "influence"), tri_errs, ref_errs, floors):
        assert e_ref <= TOL[torch.bfloat16], (name, e_ref)
        assert e_tri <= 2 * e_ref + floor, (name, tau, e_tri, e_ref, floor)


@needs_triton
def test_triton_per_sample_and_non_contiguous():
    zs, zt, u, mask = _make_inputs((5, 3), 17, torch.float32, masked=True)
    zs_nc, zt_nc, u_nc = zs.transpose(0, 1), zt.transpose(0, 1), u.transpose(0, 1)  # [3, 5, 17]
    mask_nc = mask.transpose(0, 1)
    c, w = kd_teacher_cotangent_and_influence(zs_nc, zt_nc, u_nc, 2.0, mask=mask_nc, per_sample=True,
                                              backend="triton")
    c_ref, w_ref = kd_teacher_cotangent_and_influence(zs_nc, zt_nc, u_nc, 2.0, mask=mask_nc, per_sample=True,
                                                      backend="torch")
    assert w.shape == (3,)
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
