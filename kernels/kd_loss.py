"""Fused temperature-softmax KD loss: Triton forward and backward kernels.

Plain-PyTorch twin: ``kernels/kd_loss_reference.py`` (same math, tests compare
them).  Called by ``fastmeta.kd_loss`` through the ``fastmeta_kernels::kd_loss_rows``
custom op on CUDA tensors (or on CPU tensors under ``TRITON_INTERPRET=1``).

Rows ``[N, V]`` (unit stride along V, any row stride), one program per row,
the vocabulary walked in blocks of ``BLOCK_V``; everything accumulates in fp32
whatever the input dtype (fp16/bf16/fp32).  Notation: ``s = zs/τ``, ``t = zt/τ``,
``a = τ²`` or 1.

Forward (``kd_loss_forward``): per-row loss and 4 fp32 statistics per row.

* kl — ONE pass with an online (running max, rescaled sum) softmax for both
  rows.  With running maxima ``ms, mt`` and sums ``Ss = Σ e^{s−ms}``,
  ``St = Σ e^{t−mt}`` it also carries ``W = Σ e^{t−mt} ((t − mt) − (s − ms))``;
  when the maxima move by ``Δs, Δt`` the old part is rescaled by ``e^{−Δt}``
  and corrected by ``−St_old (Δt − Δs)`` so every term stays max-subtracted
  (no overflow for logits of ±1e4 and no cancellation against ``mt − ms``).
  At the end ``KL = E − (log St − log Ss)`` with ``E = W/St``.
* reverse_kl — the kl kernels with the two logit tensors swapped
  (``KL(ps‖pt)`` is kl with the roles exchanged); the host swaps the
  gradients back.  Its saved stats are therefore in swapped order.
* softmax_mse — two passes: (1) online max/sum, (2) with the final
  log-sum-exps, ``Σ d²``, ``⟨ps, d⟩``, ``⟨pt, d⟩`` directly from ``d = ps − pt``
  (no ``Σps² − 2Σps·pt + Σpt²`` cancellation when the student matches the teacher).
* logit_mse — one pass, ``Σ (zs − zt)²`` times ``a/(τ²V)``.

Saved per row (fp32 ``stats[N, 6]``), in the units of the computation below: the
maxima ``mzs, mzt`` of the raw logits, ``log2 Ss``, ``log2 St`` and ``E = E_pt[(t − mt) −
(s − ms)]`` in log2 units (kl / reverse_kl; then ``log pt − log ps − KL = ((t − mt) −
(s − ms)) − E`` in the backward, with no large log-sum-exp terms to cancel) or
``⟨ps, d⟩, ⟨pt, d⟩`` (softmax_mse).

How the kernels compute it (instruction count, checked in SASS for sm_90: the bf16
forward was instruction-bound, 60% of the copy bandwidth at 4096x8 on an H200
while fp32 reached 94%):

* base-2 exponentials: ``e^{s − ms} = 2^{(zs − mzs)·k2}`` with ``k2 = log2(e)/τ``:
  ``tl.exp2`` is one ``ex2.approx.ftz.f32``, where ``tl.exp`` adds a multiply and a
  3-instruction subnormal fix-up.  The maxima are those of the RAW logits (``mzs``,
  ``mzt``; ``τ > 0`` keeps the argmax), the difference is taken before the scale
  (``z − m`` is exact where the terms matter, so ±1e4 logits stay at fp32 rounding for any τ;
  ``zs·k2 − m`` would round at ``|z|·k2``), and
  ``log S``, ``E`` are in log2 units (the loss and the teacher gradient times ln 2).
  The backward recomputes ``(z − m)·k2`` exactly as the forward did (bitwise the
  same values).  ``online_terms`` is this step, shared with ``kd_second_order``.
* the online pass walks the row's full blocks without masks and its last, partial
  block with them (``_online_block``): no selects in the hot loop.
* ``kd_second_order`` computes its statistics the same way.

The forward's loop went from 38 to 24 SASS instructions per element (bf16,
BLOCK_V=4096, 8 warps, triton 3.6), the backward's from 31 to 23
(``python -m bench.kernel_sass``).

Backward (``kd_loss_backward``): ONE pass over V per row using the saved stats
(no recomputation of the softmax statistics): reads ``zs, zt``, writes the
requested gradients in the logits' dtype, multiplied by the incoming per-row
``grad_rows`` (autograd gives a broadcast scalar for batchmean/sum)::

    kl           ∂/∂zs = g (a/τ) (ps − pt),  ∂/∂zt = g (a/τ) pt ⊙ (log pt − log ps − KL)
    softmax_mse  ∂/∂zs = g (2a/(τV)) ps ⊙ (d − ⟨ps, d⟩),  ∂/∂zt = −g (2a/(τV)) pt ⊙ (d − ⟨pt, d⟩)
    logit_mse    ∂/∂zs = g (2a/(τ²V)) (zs − zt) = −∂/∂zt

Memory: no ``[N, V]`` temporary at all; beyond the gradient outputs the
forward keeps ``N·4`` fp32 stats for the backward.  Masked rows do no loads
in the forward (zero loop trips) and write zero loss / zero gradients.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

KIND_IDS = {"kl": 0, "reverse_kl": 0, "softmax_mse": 2, "logit_mse": 3}
STATS_PER_ROW = 6  # ms, mt, log Ss, log St, aux0, aux1 (fp32)


def block_size(vocab: int, device: torch.device) -> int:
    """Vocabulary block: the next power of two of V, capped (4096 on GPU; larger
    when interpreted, where big numpy blocks are cheaper than many iterations)."""
    cap = 4096 if device.type == "cuda" else 16384
    return max(16, min(triton.next_power_of_2(vocab), cap))


def num_warps_for(block: int) -> int:
    return 4 if block <= 1024 else 8


LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2)


@triton.jit
def online_terms(zs, zt, k2, ms, mt):
    """The online softmax step of both rows for one block of raw logits ``zs``, ``zt`` (fp32), shared by
    this forward and ``kd_second_order``'s pass 1: ``(ms', mt', αs, αt, ds, dt, 2^ds, 2^dt)`` with the new
    maxima of the RAW logits, the rescale factors of the old sums ``αs = 2^((ms − ms')·k2)`` and the
    exponents ``d = (z − m')·k2`` (the difference before the scale; ``k2 = log2(e)/τ``)."""
    ms_new = tl.maximum(ms, tl.max(zs, axis=0))
    mt_new = tl.maximum(mt, tl.max(zt, axis=0))
    alpha_s = tl.exp2((ms - ms_new) * k2)
    alpha_t = tl.exp2((mt - mt_new) * k2)
    ds = (zs - ms_new) * k2  # the difference first, then the scale (±1e4 logits at any τ: see the docstring)
    dt = (zt - mt_new) * k2
    return ms_new, mt_new, alpha_s, alpha_t, ds, dt, tl.exp2(ds), tl.exp2(dt)


@triton.jit
def _online_block(zs_row, zt_row, idx, V, k2, ms, mt, ss, st, w, WITH_GAP: tl.constexpr, MASKED: tl.constexpr):
    """One block of the forward's online pass: ``(ms, mt, Ss, St, W)`` updated (module docstring):
    maxima of the raw logits, sums of ``2^((z − m)·k2)`` with ``k2 = log2(e)/τ``, W in log2 units.

    ``MASKED``: the row's last, partial block (out-of-range entries load as -inf, so they add
    nothing to the maxima and sums; W's gap is masked), else a full block, loaded without masks.
    """
    if MASKED:
        inb = idx < V
        zs = tl.load(zs_row + idx, mask=inb, other=float("-inf")).to(tl.float32)
        zt = tl.load(zt_row + idx, mask=inb, other=float("-inf")).to(tl.float32)
    else:
        zs = tl.load(zs_row + idx).to(tl.float32)
        zt = tl.load(zt_row + idx).to(tl.float32)
    ms_new, mt_new, alpha_s, alpha_t, ds, dt, es, et = online_terms(zs, zt, k2, ms, mt)
    if WITH_GAP:
        # keep W = Σ 2^dt (dt - ds) relative to the CURRENT maxima
        # (first block: st == 0, nothing to correct; avoid inf - inf)
        shift = ((mt_new - tl.where(st > 0.0, mt, mt_new)) - (ms_new - tl.where(st > 0.0, ms, ms_new))) * k2
        correction = st * shift
        if MASKED:  # out-of-range lanes: 0 - 0, not -inf - -inf
            gap = tl.where(inb, dt, 0.0) - tl.where(inb, ds, 0.0)
        else:
            gap = dt - ds
        w = alpha_t * (w - correction) + tl.sum(et * gap, axis=0)
    ss = ss * alpha_s + tl.sum(es, axis=0)
    st = st * alpha_t + tl.sum(et, axis=0)
    return ms_new, mt_new, ss, st, w


@triton.jit
def _kd_loss_forward_kernel(
    zs_ptr, zt_ptr, mask_ptr, loss_ptr, stats_ptr,
    stride_zs, stride_zt, V, k2, loss_scale,
    KIND: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride_zs
    zt_row = zt_ptr + row * stride_zt
    keep = (row >= 0).to(tl.int32)  # scalar tensor (1) so that masked and unmasked code paths type-check alike
    if HAS_MASK:
        keep = (tl.load(mask_ptr + row) != 0).to(tl.int32)
    v_end = V * keep  # masked rows: zero loop trips, no loads
    offs = tl.arange(0, BLOCK_V)
    aux0 = 0.0
    aux1 = 0.0
    ms = 0.0
    mt = 0.0
    log_ss = 0.0
    log_st = 0.0
    if KIND == 3:  # logit_mse
        acc = 0.0
        for start in range(0, v_end, BLOCK_V):
            idx = start + offs
            inb = idx < V
            s = tl.load(zs_row + idx, mask=inb, other=0.0).to(tl.float32)
            t = tl.load(zt_row + idx, mask=inb, other=0.0).to(tl.float32)
            diff = s - t
            acc += tl.sum(diff * diff, axis=0)
        loss = acc * loss_scale
    else:
        ms = float("-inf")
        mt = float("-inf")
        ss = 0.0
        st = 0.0
        w = 0.0
        # full blocks without masks (fewer instructions per element), then the row's partial last block
        full_end = (v_end // BLOCK_V) * BLOCK_V
        for start in range(0, full_end, BLOCK_V):
            ms, mt, ss, st, w = _online_block(zs_row, zt_row, start + offs, V, k2, ms, mt, ss, st, w,
                                              KIND == 0, False)
        if full_end < v_end:
            ms, mt, ss, st, w = _online_block(zs_row, zt_row, full_end + offs, V, k2, ms, mt, ss, st, w,
                                              KIND == 0, True)
        log_ss = tl.log2(tl.where(keep != 0, ss, 1.0))  # masked rows: ss = st = 0
        log_st = tl.log2(tl.where(keep != 0, st, 1.0))
        ms = tl.where(keep != 0, ms, 0.0)
        mt = tl.where(keep != 0, mt, 0.0)
        if KIND == 0:
            # E = E_pt[(t - mt) - (s - ms)];  KL = E - (log St - log Ss) (log2 units, times ln 2).
            # The backward uses E itself: log pt - log ps - KL = ((t - mt) - (s - ms)) - E,
            # exactly consistent with the forward's rounding (no large lse terms to cancel).
            mean_gap = w / tl.where(keep != 0, st, 1.0)
            aux0 = mean_gap
            loss = (mean_gap - (log_st - log_ss)) * (loss_scale * LN2)
        else:  # softmax_mse: second pass with the final statistics
            sq = 0.0
            psd = 0.0
            ptd = 0.0
            for start in range(0, v_end, BLOCK_V):
                idx = start + offs
                inb = idx < V
                zs = tl.load(zs_row + idx, mask=inb, other=0.0).to(tl.float32)
                zt = tl.load(zt_row + idx, mask=inb, other=0.0).to(tl.float32)
                ps = tl.where(inb, tl.exp2((zs - ms) * k2 - log_ss), 0.0)
                pt = tl.where(inb, tl.exp2((zt - mt) * k2 - log_st), 0.0)
                d = ps - pt
                sq += tl.sum(d * d, axis=0)
                psd += tl.sum(ps * d, axis=0)
                ptd += tl.sum(pt * d, axis=0)
            aux0 = psd
            aux1 = ptd
            loss = sq * loss_scale
    kept = keep != 0
    tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))
    tl.store(stats_ptr + row * 6 + 0, tl.where(kept, ms, 0.0))
    tl.store(stats_ptr + row * 6 + 1, tl.where(kept, mt, 0.0))
    tl.store(stats_ptr + row * 6 + 2, tl.where(kept, log_ss, 0.0))
    tl.store(stats_ptr + row * 6 + 3, tl.where(kept, log_st, 0.0))
    tl.store(stats_ptr + row * 6 + 4, tl.where(kept, aux0, 0.0))
    tl.store(stats_ptr + row * 6 + 5, tl.where(kept, aux1, 0.0))


@triton.jit
def _kd_loss_backward_kernel(
    zs_ptr, zt_ptr, stats_ptr, grad_rows_ptr, mask_ptr, gs_ptr, gt_ptr,
    stride_zs, stride_zt, stride_gs, stride_gt, V, k2, grad_scale,
    KIND: tl.constexpr, HAS_MASK: tl.constexpr, NEED_S: tl.constexpr, NEED_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride_zs
    zt_row = zt_ptr + row * stride_zt
    gs_row = gs_ptr + row * stride_gs
    gt_row = gt_ptr + row * stride_gt
    g = tl.load(grad_rows_ptr + row).to(tl.float32) * grad_scale
    kept = (row >= 0).to(tl.int32)  # scalar tensor (1)
    if HAS_MASK:
        kept = (tl.load(mask_ptr + row) != 0).to(tl.int32)
        g = tl.where(kept != 0, g, 0.0)
    v_load_end = V * kept  # masked rows: no loads, zeros written
    ms = tl.load(stats_ptr + row * 6 + 0)
    mt = tl.load(stats_ptr + row * 6 + 1)
    log_ss = tl.load(stats_ptr + row * 6 + 2)
    log_st = tl.load(stats_ptr + row * 6 + 3)
    aux0 = tl.load(stats_ptr + row * 6 + 4)
    aux1 = tl.load(stats_ptr + row * 6 + 5)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        inb = idx < V
        ld = idx < v_load_end
        zs = tl.load(zs_row + idx, mask=ld, other=0.0).to(tl.float32)
        zt = tl.load(zt_row + idx, mask=ld, other=0.0).to(tl.float32)
        if KIND == 3:
            grad_s = g * (zs - zt)
            grad_t = -grad_s
        else:
            ds = (zs - ms) * k2  # log2 units, computed as in the forward
            dt = (zt - mt) * k2
            ps = tl.exp2(ds - log_ss)
            pt = tl.exp2(dt - log_st)
            if KIND == 0:
                # log pt - log ps - KL = ((dt - ds) - E)·ln 2   (aux0 = E, see forward)
                grad_s = g * (ps - pt)
                grad_t = (g * LN2) * (pt * ((dt - ds) - aux0))
            else:
                d = ps - pt
                grad_s = g * (ps * (d - aux0))
                grad_t = -g * (pt * (d - aux1))
        grad_s = tl.where(ld, grad_s, 0.0)
        grad_t = tl.where(ld, grad_t, 0.0)
        if NEED_S:
            tl.store(gs_row + idx, grad_s.to(gs_ptr.dtype.element_ty), mask=inb)
        if NEED_T:
            tl.store(gt_row + idx, grad_t.to(gt_ptr.dtype.element_ty), mask=inb)


def _mask_arg(row_mask: Optional[torch.Tensor], fallback: torch.Tensor):
    if row_mask is None:
        return fallback, False
    return row_mask.to(torch.int8).contiguous(), True


def kd_loss_forward(
    zs: torch.Tensor,
    zt: torch.Tensor,
    row_mask: Optional[torch.Tensor],
    temperature: float,
    kind: str,
    scale_by_temperature_squared: bool = True,
    block_v: Optional[int] = None,
    num_warps: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses ``[N]`` (fp32) and stats ``[N, 6]`` (fp32) of ``[N, V]`` logits.

    ``zs``/``zt`` need unit stride along V (any row stride).  For reverse_kl the
    stats are those of the swapped call (see module docstring).  ``block_v`` /
    ``num_warps``: the launch configuration (default :func:`block_size` /
    :func:`num_warps_for`; ``bench.kernels --sweep`` times others).
    """
    if kind == "reverse_kl":
        return kd_loss_forward(zt, zs, row_mask, temperature, "kl", scale_by_temperature_squared, block_v, num_warps)
    assert zs.dim() == 2 and zs.shape == zt.shape and zs.stride(-1) == 1 and zt.stride(-1) == 1
    n, v = zs.shape
    tau = float(temperature)
    a = tau * tau if scale_by_temperature_squared else 1.0
    loss = torch.empty(n, device=zs.device, dtype=torch.float32)
    stats = torch.empty(n, STATS_PER_ROW, device=zs.device, dtype=torch.float32)
    if n == 0:
        return loss, stats
    kind_id = KIND_IDS[kind]
    if kind_id == 0:
        loss_scale = a
    elif kind_id == 2:
        loss_scale = a / v
    else:
        loss_scale = a / (tau * tau * v)
    mask_arg, has_mask = _mask_arg(row_mask, loss)
    block = block_v or block_size(v, zs.device)
    _kd_loss_forward_kernel[(n,)](
        zs, zt, mask_arg, loss, stats, zs.stride(0), zt.stride(0), v, LOG2E.value / tau, loss_scale,
        KIND=kind_id, HAS_MASK=has_mask, BLOCK_V=block, num_warps=num_warps or num_warps_for(block),
    )
    return loss, stats


def kd_loss_backward(
    grad_rows: torch.Tensor,
    zs: torch.Tensor,
    zt: torch.Tensor,
    stats: torch.Tensor,
    row_mask: Optional[torch.Tensor],
    temperature: float,
    kind: str,
    scale_by_temperature_squared: bool = True,
    need_student: bool = True,
    need_teacher: bool = True,
    block_v: Optional[int] = None,
    num_warps: Optional[int] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(grad_rows_i · ∂ℓ_i/∂zs_i, grad_rows_i · ∂ℓ_i/∂zt_i)`` from the saved stats; one pass.

    Gradients come back in the logits' dtype (None where not requested);
    masked rows get zeros.  ``block_v`` / ``num_warps``: as in :func:`kd_loss_forward`.
    """
    if kind == "reverse_kl":
        gt, gs = kd_loss_backward(
            grad_rows, zt, zs, stats, row_mask, temperature, "kl", scale_by_temperature_squared,
            need_teacher, need_student, block_v, num_warps,
        )
        return gs, gt
    n, v = zs.shape
    tau = float(temperature)
    a = tau * tau if scale_by_temperature_squared else 1.0
    kind_id = KIND_IDS[kind]
    if kind_id == 0:
        grad_scale = a / tau
    elif kind_id == 2:
        grad_scale = 2.0 * a / (tau * v)
    else:
        grad_scale = 2.0 * a / (tau * tau * v)
    gs = torch.empty_like(zs, memory_format=torch.contiguous_format) if need_student else None
    gt = torch.empty_like(zt, memory_format=torch.contiguous_format) if need_teacher else None
    if n == 0 or not (need_student or need_teacher):
        return gs, gt
    grad_rows = grad_rows.to(torch.float32).contiguous()
    mask_arg, has_mask = _mask_arg(row_mask, grad_rows)
    dummy = gs if gs is not None else gt
    gs_arg = gs if gs is not None else dummy
    gt_arg = gt if gt is not None else dummy
    block = block_v or block_size(v, zs.device)
    _kd_loss_backward_kernel[(n,)](
        zs, zt, stats, grad_rows, mask_arg, gs_arg, gt_arg,
        zs.stride(0), zt.stride(0), gs_arg.stride(0), gt_arg.stride(0), v, LOG2E.value / tau, grad_scale,
        KIND=kind_id, HAS_MASK=has_mask, NEED_S=need_student, NEED_T=need_teacher,
        BLOCK_V=block, num_warps=num_warps or num_warps_for(block),
    )
    return gs, gt
