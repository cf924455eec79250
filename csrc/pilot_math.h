// The elementwise math of fastmeta's pilot ops (adam_pilot, sgd_pilot): ONE student
// optimizer update, its new state, and the exact adjoint of that update (the reverse sweep
// of a trajectory of several updates included), shared by the CPU kernels
// (csrc/fastmeta_ops.cpp) and the CUDA kernels (csrc/cuda/multi_tensor_kernels.cu), so
// that both devices compute the same expressions in the same order.  This file and its
// plain-PyTorch twin (fastmeta/ops/pilot_twin.py) are the ONE home of the optimizer math:
// the meta-gradient engine (fastmeta.engine.optimizer) calls the ops, never a copy.
//
// No torch header, no CUDA header: plain C++17 (host) or CUDA (__host__ __device__).
//
// Adam / AdamW, per element (M = float for fp16/bf16/fp32 storage, double for fp64):
//   g  = ±grad (+ wd·θ for L2)           m' = β1·m + (1−β1)·g        s' = β2·s + (1−β2)·g·g
//   ŝ  = max(s_max, s') (amsgrad) or s'  r̂ = sqrt(ŝ)/sqrt(bc2)      denom = r̂ + eps
//   θ' = θ·(1 − η·wd if decoupled) − (η/bc1)·(m'/denom)             bcK = 1 − βK^t
// Its adjoint, given a = ∂L/∂θ' (vectors) and the adjoints of the state handed to the next
// step Am = ∂L/∂m', As = ∂L/∂s', Ax = ∂L/∂ŝ (ŝ is the next s_max; all 0 at the last step):
//   D   = ([(1−β1)β2·s − β1(1−β2)·m·g] / (bc1·bc2·r̂) + (1−β1)·eps/bc1) / denom²   (exact: the
//         g² terms of the two-term derivative cancelled analytically; the bracket's first term
//         is 0 where r̂ = 0) or (1−β1)/bc1 / denom (frozen second moment; amsgrad where the
//         old maximum is used)
//   Aŝ  = a·(η/bc1)·m'/(denom²·2·sqrt(bc2)·sqrt(ŝ)) + Ax        (0 where ŝ = 0)    [exact]
//   Ag  = −η·D·a + (1−β1)·Am + 2(1−β2)·g·(As + [s' used]·Ax)                         [2nd term: exact]
//   adj_grad     = ±Ag · adj_scale              (± : maximize; the engine's adj_scale = −1/η_ref)
//   adj_theta    = a·(1 − η·wd if decoupled) + wd·Ag (L2)  (∂L/∂θ through θ itself, not through grad)
//   adj_m        = β1·(−(η/bc1)·a/denom + Am)
//   adj_s        = β2·([s' used]·Aŝ + As)                                          [exact; else 0]
//   adj_smax     = [old maximum used]·Aŝ                                            [exact; else 0]
// Absent state (first step) and absent incoming adjoints are read as zeros: the same values as
// "no state" / "last step" (without amsgrad s_max is absent: ŝ = s').  The per-call flags enter the
// element functions as 1/0 values compared per element, so the CPU loops vectorise.
//
// SGD, per element:
//   g = ±grad (+ wd·θ)    buf' = g (first step) or μ·buf + (1−d)·g
//   θ' = θ − η·(nesterov ? g + μ·buf' : buf')   (θ − η·g without momentum)
// adjoint, with a = ∂L/∂θ' and Ab = ∂L/∂buf' (0 at the last step):
//   u = −η·a;  b = (nesterov ? μ·u : u) + Ab;  Ag = [no momentum: u | nesterov: u + c·b | c·b],
//   c = 1 (first step) or 1 − d;  adj_grad = ±Ag·adj_scale;  adj_theta = a + wd·Ag;
//   adj_buf = μ·b (0 on the first step: there is no previous buffer)
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTMETA_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FASTMETA_HD __attribute__((always_inline)) inline  // inlined into the CPU kernels' vector loops
#else
#define FASTMETA_HD inline
#endif

namespace fastmeta_pilot {

FASTMETA_HD float pilot_sqrt(float x) { return sqrtf(x); }
FASTMETA_HD double pilot_sqrt(double x) { return sqrt(x); }

// Hyper-parameters of one Adam pilot call, as given (double, host side).
struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay, adj_scale;
  int64_t step;  // the step count of the step being taken (>= 1)
  bool decoupled, amsgrad, maximize, exact;
};

// The per-call constants the elementwise function uses (computed once, in double).
struct AdamConsts {
  double sign;          // −1 (maximize) or +1
  double l2;            // wd (L2 weight decay) or 0
  double decay;         // 1 − η·wd (decoupled) or 1
  double beta1, one_minus_beta1, beta2, one_minus_beta2;
  double sqrt_bc2, eps, step_size;  // step_size = η / bc1
  double neg_step_size;  // −η / bc1
  double c_s;           // (1−β1)·β2
  double c_mg;          // β1·(1−β2)
  double bc12;          // bc1·bc2
  double c_eps;         // (1−β1)·eps / bc1
  double plain;         // (1−β1) / bc1
  double neg_lr;        // −η
  double two_one_minus_beta2;  // 2·(1−β2)
  double two_sqrt_bc2;  // 2·sqrt(bc2)
  double adj_scale;     // ±adj_scale (the maximize sign folded in)
  bool amsgrad, exact;
};

inline AdamConsts adam_consts(const AdamHyper& h) {
  AdamConsts c{};
  const double t = static_cast<double>(h.step);
  const double bc1 = 1.0 - std::pow(h.beta1, t);
  const double bc2 = 1.0 - std::pow(h.beta2, t);
  const bool l2 = h.weight_decay != 0.0 && !h.decoupled;
  c.sign = h.maximize ? -1.0 : 1.0;
  c.l2 = l2 ? h.weight_decay : 0.0;
  c.decay = (h.decoupled && h.weight_decay != 0.0) ? 1.0 - h.lr * h.weight_decay : 1.0;
  c.beta1 = h.beta1;
  c.one_minus_beta1 = 1.0 - h.beta1;
  c.beta2 = h.beta2;
  c.one_minus_beta2 = 1.0 - h.beta2;
  c.sqrt_bc2 = std::sqrt(bc2);
  c.eps = h.eps;
  c.step_size = h.lr / bc1;
  c.neg_step_size = -(h.lr / bc1);
  c.c_s = (1.0 - h.beta1) * h.beta2;
  c.c_mg = h.beta1 * (1.0 - h.beta2);
  c.bc12 = bc1 * bc2;
  c.c_eps = (1.0 - h.beta1) * h.eps / bc1;
  c.plain = (1.0 - h.beta1) / bc1;
  c.neg_lr = -h.lr;
  c.two_one_minus_beta2 = 2.0 * (1.0 - h.beta2);
  c.two_sqrt_bc2 = 2.0 * std::sqrt(bc2);
  c.adj_scale = h.maximize ? -h.adj_scale : h.adj_scale;
  c.amsgrad = h.amsgrad;
  c.exact = h.exact;
  return c;
}

// The same constants in the math type M.
template <typename M>
struct AdamConstsM {
  M sign, l2, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, step_size, neg_step_size, c_s,
      c_mg, bc12, c_eps, plain, neg_lr, two_one_minus_beta2, two_sqrt_bc2, adj_scale;
  M exact_m;  // 1 (exact Jacobian) or 0 (frozen second moment)
  FASTMETA_HD explicit AdamConstsM(const AdamConsts& c)
      : sign(static_cast<M>(c.sign)), l2(static_cast<M>(c.l2)), decay(static_cast<M>(c.decay)),
        beta1(static_cast<M>(c.beta1)), one_minus_beta1(static_cast<M>(c.one_minus_beta1)),
        beta2(static_cast<M>(c.beta2)), one_minus_beta2(static_cast<M>(c.one_minus_beta2)),
        sqrt_bc2(static_cast<M>(c.sqrt_bc2)), eps(static_cast<M>(c.eps)), step_size(static_cast<M>(c.step_size)),
        neg_step_size(static_cast<M>(c.neg_step_size)), c_s(static_cast<M>(c.c_s)), c_mg(static_cast<M>(c.c_mg)),
        bc12(static_cast<M>(c.bc12)), c_eps(static_cast<M>(c.c_eps)), plain(static_cast<M>(c.plain)),
        neg_lr(static_cast<M>(c.neg_lr)), two_one_minus_beta2(static_cast<M>(c.two_one_minus_beta2)),
        two_sqrt_bc2(static_cast<M>(c.two_sqrt_bc2)), adj_scale(static_cast<M>(c.adj_scale)),
        exact_m(c.exact ? M(1) : M(0)) {}
};

// One element's inputs (absent ones: 0) and outputs.
template <typename M>
struct AdamIn {
  M theta, grad, m, s, smax;     // the update's inputs (smax read only with amsgrad: max(0, s') = s')
  M v, adj_m, adj_s, adj_smax;   // ∂L/∂θ', and the incoming adjoints of m', s', ŝ (the next s_max)
};

template <typename M>
struct AdamOut {
  M theta_new, m_new, s_new, s_hat;                      // the update (ŝ: the next s_max with amsgrad)
  M adj_grad, adj_theta, adj_m, adj_s, adj_smax;          // its adjoints
};

// One element of the Adam pilot: the update and (the outputs the caller stores) its adjoint.
template <typename M>
FASTMETA_HD void adam_element(const AdamConstsM<M>& c, const AdamIn<M>& in, AdamOut<M>& o) {
  const M g = c.sign * in.grad + c.l2 * in.theta;
  o.m_new = c.beta1 * in.m + c.one_minus_beta1 * g;
  o.s_new = c.beta2 * in.s + (c.one_minus_beta2 * g) * g;
  // non-short-circuit logic and selects only (no branches): the CPU loop vectorises
  // without amsgrad smax is absent (0 <= s'); ties go to s' and a NaN s' is kept (as torch.maximum does)
  const bool from_s = !(o.s_new < in.smax);
  o.s_hat = from_s ? o.s_new : in.smax;
  const M root = pilot_sqrt(o.s_hat);
  const M r = root / c.sqrt_bc2;
  const M denom = r + c.eps;
  o.theta_new = c.decay * in.theta - c.step_size * (o.m_new / denom);
  const M inv_denom = M(1) / denom;  // one division for both forms of D
  const M plain = c.plain * inv_denom;
  const M numerator = c.c_s * in.s - (c.c_mg * in.m) * g;
  const M quotient = numerator / (c.bc12 * r);  // inf/nan where r = 0: not selected
  const M second = r > M(0) ? quotient : M(0);
  const M exact = (second + c.c_eps) * inv_denom * inv_denom;
  const bool use_exact = c.exact_m > M(0);  // a uniform flag as a vector mask (a bool member does not vectorise)
  const M d = (from_s & use_exact) ? exact : plain;
  // the adjoint
  const M a = in.v;
  const M through_root = ((a * c.step_size) * o.m_new) * inv_denom * inv_denom / (c.two_sqrt_bc2 * root);
  const M adj_s_hat = (root > M(0) ? through_root : M(0)) + in.adj_smax;  // inf/nan where root = 0: not selected
  const M adj_g_s = in.adj_s + (from_s ? in.adj_smax : M(0));
  M adj_g = (c.neg_lr * d) * a;
  adj_g = adj_g + c.one_minus_beta1 * in.adj_m;
  adj_g = use_exact ? adj_g + (c.two_one_minus_beta2 * g) * adj_g_s : adj_g;
  o.adj_grad = adj_g * c.adj_scale;
  o.adj_theta = c.decay * a + c.l2 * adj_g;
  o.adj_m = c.beta1 * ((c.neg_step_size * a) * inv_denom + in.adj_m);
  o.adj_s = use_exact ? c.beta2 * ((from_s ? adj_s_hat : M(0)) + in.adj_s) : M(0);
  o.adj_smax = (use_exact & !from_s) ? adj_s_hat : M(0);
}

// SGD (with or without momentum) ------------------------------------------------------------
struct SgdHyper {
  double lr, momentum, dampening, weight_decay, adj_scale;
  bool nesterov, maximize, first;  // first: no momentum buffer yet (buf' = g)
};

// The flags enter as coefficients (1/0 or μ, 1 − d): uniform selects inside the element loop keep GCC from
// vectorising it; for finite inputs the coefficient forms give the same values (x·1 = x, x + 0·y = x).
template <typename M>
struct SgdConstsM {
  M sign, l2, lr, neg_lr, adj_scale;
  M acc_buf, acc_g;    // buf' = acc_buf·buf + acc_g·g   (first step: 0, 1; momentum: μ, 1 − d; none: 0, 0)
  M upd_g, upd_buf;    // update = upd_g·g + upd_buf·buf' (none: 1, 0; nesterov: 1, μ; momentum: 0, 1)
  M adj_b_u;           // b = adj_b_u·u + Ab            (nesterov: μ; else 1)
  M adj_t_b;           // through = adj_t_b·b           (first step: 1; else 1 − d)
  M adj_u, adj_t;      // Ag = adj_u·u + adj_t·through  (none: 1, 0; nesterov: 1, 1; momentum: 0, 1)
  M adj_buf_b;         // adj_buf = adj_buf_b·b         (momentum after the first step: μ; else 0)
  FASTMETA_HD explicit SgdConstsM(const SgdHyper& h) {
    const bool momentum = h.momentum != 0.0;
    sign = static_cast<M>(h.maximize ? -1.0 : 1.0);
    l2 = static_cast<M>(h.weight_decay);
    lr = static_cast<M>(h.lr);
    neg_lr = static_cast<M>(-h.lr);
    adj_scale = static_cast<M>(h.maximize ? -h.adj_scale : h.adj_scale);
    acc_buf = static_cast<M>(momentum && !h.first ? h.momentum : 0.0);
    acc_g = static_cast<M>(!momentum ? 0.0 : (h.first ? 1.0 : 1.0 - h.dampening));
    upd_g = static_cast<M>(!momentum || h.nesterov ? 1.0 : 0.0);
    upd_buf = static_cast<M>(!momentum ? 0.0 : (h.nesterov ? h.momentum : 1.0));
    adj_b_u = static_cast<M>(momentum && h.nesterov ? h.momentum : 1.0);
    adj_t_b = static_cast<M>(h.first ? 1.0 : 1.0 - h.dampening);
    adj_u = static_cast<M>(!momentum || h.nesterov ? 1.0 : 0.0);
    adj_t = static_cast<M>(momentum ? 1.0 : 0.0);
    adj_buf_b = static_cast<M>(momentum && !h.first ? h.momentum : 0.0);
  }
};

template <typename M>
struct SgdIn {
  M theta, grad, buf, v, adj_buf;  // adj_buf: the incoming adjoint of buf' (0 at the last step)
};

template <typename M>
struct SgdOut {
  M theta_new, buf_new, adj_grad, adj_theta, adj_buf;
};

// One element of the SGD pilot (branch-free on the element: the flags are the same for every element).
template <typename M>
FASTMETA_HD void sgd_element(const SgdConstsM<M>& c, const SgdIn<M>& in, SgdOut<M>& o) {
  const M g = c.sign * in.grad + c.l2 * in.theta;
  o.buf_new = c.acc_buf * in.buf + c.acc_g * g;
  const M update = c.upd_g * g + c.upd_buf * o.buf_new;
  o.theta_new = in.theta - c.lr * update;
  const M u = c.neg_lr * in.v;                // the adjoint of the update, −η·a
  const M b = c.adj_b_u * u + in.adj_buf;     // the adjoint of buf'
  const M through_buffer = c.adj_t_b * b;
  const M adj_g = c.adj_u * u + c.adj_t * through_buffer;
  o.adj_grad = adj_g * c.adj_scale;
  o.adj_theta = in.v + c.l2 * adj_g;
  o.adj_buf = c.adj_buf_b * b;
}

}  // namespace fastmeta_pilot
