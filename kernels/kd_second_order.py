"""KD second-order product: teacher-logit cotangent and per-row influence dots (Triton).

Plain-PyTorch twin: ``kernels/kd_second_order_reference.py``.  Called by
``fastmeta.kd_teacher_cotangent`` / ``fastmeta.kd_influence`` through the
``fastmeta_kernels::kd_second_order_rows`` custom op.

Per row, with ``s = zs/τ``, ``t = zt/τ``, ``ps``, ``pt`` their softmaxes,
``a = τ²`` or 1, tangent ``u`` and the reduction's row scale ``ρ``::

    kl           c = −ρ (a/τ²) pt ⊙ (u − ⟨pt, u⟩)             w = (a/τ) (⟨ps, u⟩ − ⟨pt, u⟩)
    reverse_kl   c = −ρ (a/τ²) ps ⊙ (u − ⟨ps, u⟩)             w = (a/τ) (⟨ps ⊙ g, u⟩ − RKL ⟨ps, u⟩)
    softmax_mse  c = −ρ (2a/(τ²V)) pt ⊙ (r − ⟨pt, r⟩)         w = (2a/(τV)) ⟨ps − pt, r⟩
                 with r = ps ⊙ (u − ⟨ps, u⟩)
    logit_mse    c = −ρ (2a/(τ²V)) u                          w = (2a/(τ²V)) ⟨zs − zt, u⟩

One program per row, the vocabulary in blocks, fp32 accumulation, base-2 exponentials of
``(z − max z)·log2(e)/τ`` as in ``kd_loss`` (its module docstring: one ``ex2`` each, the
difference before the scale; sums, ``log S``, ``R`` and ``G`` in log2 units):

* pass 1 (all kinds but logit_mse): online max-subtracted softmax statistics
  of both rows plus ``Σ e^{s−ms} u`` and ``Σ e^{t−mt} u``; for reverse_kl also
  ``R = Σ e^{s−ms} g'`` and ``G = Σ e^{s−ms} u g'`` with
  ``g' = (s − ms) − (t − mt)``, kept relative to the current maxima (rescale by
  ``e^{−Δs}``, correct by ``−(Δs − Δt)·(old sum)``) so ±1e4 logits neither
  overflow nor cancel.  Then ``w_rkl = (a/τ)(G − ⟨ps, u⟩ R)/Ss`` (the
  log-normaliser terms cancel exactly).
* softmax_mse only: pass 2 accumulates ``⟨d, r⟩`` and ``⟨pt, r⟩`` directly
  from the final probabilities (no difference-of-sums cancellation).
* last pass (only when the cotangent is requested): write ``c`` in the teacher
  logits' dtype.

So the influences alone cost one read of ``zs, zt, u`` (kl, reverse_kl,
logit_mse; two for softmax_mse), the cotangent one more read and one write.
No ``[N, V]`` temporary.  Masked rows: no loads, zero ``c`` and ``w``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .kd_loss import LN2, LOG2E, block_size, num_warps_for, online_terms

KIND_IDS = {"kl": 0, "reverse_kl": 1, "softmax_mse": 2, "logit_mse": 3}


@triton.jit
def _pass1_block(zs_row, zt_row, u_row, idx, V, k2, ms, mt, ss, st, us, ut, rr, gg, REVERSE: tl.constexpr):
    """One block of pass 1 (module docstring), in log2 units as ``kd_loss``'s forward: maxima of the
    raw logits, sums of ``2^((z − m)·k2)`` with ``k2 = log2(e)/τ`` (the difference before the scale),
    ``R``, ``G`` with the gap in log2 units.  Out-of-range logits load as -inf (they add nothing),
    ``u`` as 0."""
    inb = idx < V
    zs = tl.load(zs_row + idx, mask=inb, other=float("-inf")).to(tl.float32)
    zt = tl.load(zt_row + idx, mask=inb, other=float("-inf")).to(tl.float32)
    u = tl.load(u_row + idx, mask=inb, other=0.0).to(tl.float32)
    ms_new, mt_new, alpha_s, alpha_t, ds, dt, es, et = online_terms(zs, zt, k2, ms, mt)
    if REVERSE:
        started = ss > 0.0
        shift = ((ms_new - tl.where(started, ms, ms_new)) - (mt_new - tl.where(started, mt, mt_new))) * k2
        gap = tl.where(inb, ds, 0.0) - tl.where(inb, dt, 0.0)  # out-of-range lanes: 0 - 0, not -inf - -inf
        rr = alpha_s * (rr - ss * shift) + tl.sum(es * gap, axis=0)
        gg = alpha_s * (gg - us * shift) + tl.sum(es * u * gap, axis=0)
    ss = ss * alpha_s + tl.sum(es, axis=0)
    st = st * alpha_t + tl.sum(et, axis=0)
    us = us * alpha_s + tl.sum(es * u, axis=0)
    ut = ut * alpha_t + tl.sum(et * u, axis=0)
    return ms_new, mt_new, ss, st, us, ut, rr, gg


@triton.jit
def _kd_second_order_kernel(
    zs_ptr, zt_ptr, u_ptr, mask_ptr, c_ptr, w_ptr,
    stride_zs, stride_zt, stride_u, stride_c, V, k2, c_scale, w_scale,
    KIND: tl.constexpr, HAS_MASK: tl.constexpr, NEED_C: tl.constexpr, NEED_W: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride_zs
    zt_row = zt_ptr + row * stride_zt
    u_row = u_ptr + row * stride_u
    c_row = c_ptr + row * stride_c
    keep = (row >= 0).to(tl.int32)  # scalar tensor (1) so that masked and unmasked code paths type-check alike
    if HAS_MASK:
        keep = (tl.load(mask_ptr + row) != 0).to(tl.int32)
    kept = keep != 0
    v_end = V * keep  # masked rows: no loads
    offs = tl.arange(0, BLOCK_V)
    w = 0.0
    if KIND == 3:  # logit_mse: c = -c_scale * u, w = w_scale * <zs - zt, u>
        acc = 0.0
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            inb = idx < V
            ld = idx < v_end
            u = tl.load(u_row + idx, mask=ld, other=0.0).to(tl.float32)
            if NEED_W:
                zs = tl.load(zs_row + idx, mask=ld, other=0.0).to(tl.float32)
                zt = tl.load(zt_row + idx, mask=ld, other=0.0).to(tl.float32)
                acc += tl.sum((zs - zt) * u, axis=0)
            if NEED_C:
                tl.store(c_row + idx, (-c_scale * u).to(c_ptr.dtype.element_ty), mask=inb)
        w = acc * w_scale
    else:
        ms = float("-inf")
        mt = float("-inf")
        ss = 0.0
        st = 0.0
        us = 0.0  # Σ e^{s-ms} u
        ut = 0.0  # Σ e^{t-mt} u
        rr = 0.0  # reverse_kl: Σ e^{s-ms} g'
        gg = 0.0  # reverse_kl: Σ e^{s-ms} u g'
        # every block masked: splitting off the unmasked full blocks (as kd_loss's forward does) took the
        # fp32 kernel from 73 to 92 registers per thread (3 -> 2 programs per SM) for a loop that is
        # memory-bound (fp32: 12 bytes per position, ~41 of the 128 instructions an SM issues per cycle at
        # the copy bandwidth; bf16: ~89)
        for start in range(0, v_end, BLOCK_V):
            ms, mt, ss, st, us, ut, rr, gg = _pass1_block(zs_row, zt_row, u_row, start + offs, V, k2,
                                                          ms, mt, ss, st, us, ut, rr, gg, KIND == 1)
        ss_safe = tl.where(kept, ss, 1.0)
        st_safe = tl.where(kept, st, 1.0)
        # p = 2^((z − m)·k2 − log2 S): max and log-normaliser kept apart (m + log S rounded to
        # fp32 would move every probability by ~eps32·|m|, 1e-3 at |m| = 2e4); masked rows: finite dummies
        ms = tl.where(kept, ms, 0.0)
        mt = tl.where(kept, mt, 0.0)
        log_ss = tl.log2(ss_safe)  # log2 units, as the exponents
        log_st = tl.log2(st_safe)
        ps_u = us / ss_safe
        pt_u = ut / st_safe
        pt_r = 0.0
        if KIND == 0:
            w = (ps_u - pt_u) * w_scale
        elif KIND == 1:
            w = (gg - ps_u * rr) / ss_safe * (w_scale * LN2)  # R, G in log2 units
        else:  # softmax_mse: <d, r> and <pt, r> from the final probabilities
            d_r = 0.0
            for start in range(0, v_end, BLOCK_V):
                idx = start + offs
                inb = idx < V
                zs = tl.load(zs_row + idx, mask=inb, other=0.0).to(tl.float32)
                zt = tl.load(zt_row + idx, mask=inb, other=0.0).to(tl.float32)
                u = tl.load(u_row + idx, mask=inb, other=0.0).to(tl.float32)
                ps = tl.where(inb, tl.exp2((zs - ms) * k2 - log_ss), 0.0)
                pt = tl.where(inb, tl.exp2((zt - mt) * k2 - log_st), 0.0)
                r = ps * (u - ps_u)
                d_r += tl.sum((ps - pt) * r, axis=0)
                pt_r += tl.sum(pt * r, axis=0)
            w = d_r * w_scale
        if NEED_C:
            for start in range(0, V, BLOCK_V):
                idx = start + offs
                inb = idx < V
                ld = idx < v_end
                u = tl.load(u_row + idx, mask=ld, other=0.0).to(tl.float32)
                if KIND == 0:
                    zt = tl.load(zt_row + idx, mask=ld, other=0.0).to(tl.float32)
                    pt = tl.exp2((zt - mt) * k2 - log_st)
                    c = -c_scale * (pt * (u - pt_u))
                elif KIND == 1:
                    zs = tl.load(zs_row + idx, mask=ld, other=0.0).to(tl.float32)
                    ps = tl.exp2((zs - ms) * k2 - log_ss)
                    c = -c_scale * (ps * (u - ps_u))
                else:
                    zs = tl.load(zs_row + idx, mask=ld, other=0.0).to(tl.float32)
                    zt = tl.load(zt_row + idx, mask=ld, other=0.0).to(tl.float32)
                    ps = tl.exp2((zs - ms) * k2 - log_ss)
                    pt = tl.exp2((zt - mt) * k2 - log_st)
                    r = ps * (u - ps_u)
                    c = -c_scale * (pt * (r - pt_r))
                c = tl.where(ld, c, 0.0)
                tl.store(c_row + idx, c.to(c_ptr.dtype.element_ty), mask=inb)
    if NEED_W:
        tl.store(w_ptr + row, tl.where(kept, w, 0.0))


def kd_second_order(
    zs: torch.Tensor,
    zt: torch.Tensor,
    u: torch.Tensor,
    row_mask: Optional[torch.Tensor],
    temperature: float,
    kind: str,
    scale_by_temperature_squared: bool = True,
    cotangent_scale: float = 1.0,
    need_cotangent: bool = True,
    need_influence: bool = True,
    block_v: Optional[int] = None,
    num_warps: Optional[int] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(c [N, V] in zt's dtype, w [N] fp32)`` for ``[N, V]`` rows (unit stride along V).

    ``cotangent_scale`` is the reduction's row scale ρ (1/n_counted for
    batchmean).  Outputs not requested come back as None.  ``block_v`` /
    ``num_warps``: the launch configuration (default ``block_size`` / ``num_warps_for``).
    """
    assert zs.dim() == 2 and zs.shape == zt.shape == u.shape
    assert zs.stride(-1) == 1 and zt.stride(-1) == 1 and u.stride(-1) == 1
    n, v = zs.shape
    tau = float(temperature)
    a = tau * tau if scale_by_temperature_squared else 1.0
    kind_id = KIND_IDS[kind]
    if kind_id in (0, 1):
        c_scale, w_scale = a / (tau * tau), a / tau
    elif kind_id == 2:
        c_scale, w_scale = 2.0 * a / (tau * tau * v), 2.0 * a / (tau * v)
    else:
        c_scale, w_scale = 2.0 * a / (tau * tau * v), 2.0 * a / (tau * tau * v)
    c_scale *= float(cotangent_scale)
    c = torch.empty_like(zt, memory_format=torch.contiguous_format) if need_cotangent else None
    w = torch.empty(n, device=zs.device, dtype=torch.float32) if need_influence else None
    if n == 0 or not (need_cotangent or need_influence):
        return c, w
    c_arg = c if c is not None else zt
    w_arg = w if w is not None else torch.empty(1, device=zs.device, dtype=torch.float32)
    if row_mask is None:
        mask_arg, has_mask = w_arg, False
    else:
        mask_arg, has_mask = row_mask.to(torch.int8).contiguous(), True
    block = block_v or block_size(v, zs.device)
    _kd_second_order_kernel[(n,)](
        zs, zt, u, mask_arg, c_arg, w_arg,
        zs.stride(0), zt.stride(0), u.stride(0), c_arg.stride(0), v, LOG2E.value / tau, c_scale, w_scale,
        KIND=kind_id, HAS_MASK=has_mask, NEED_C=need_cotangent, NEED_W=need_influence,
        BLOCK_V=block, num_warps=num_warps or num_warps_for(block),
    )
    return c, w
