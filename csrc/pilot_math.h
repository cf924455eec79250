// The elementwise math of fastmeta's pilot ops (adam_pilot, sgd_pilot): ONE student
// optimizer update and its exact Jacobian-vector product, shared by the CPU kernels
// (csrc/fastmeta_ops.cpp) and the CUDA kernels (csrc/cuda/multi_tensor_kernels.cu),
// so that both devices compute the same expressions in the same order.
//
// No torch header, no CUDA header: plain C++17 (host) or CUDA (__host__ __device__).
// The reference is the plain-PyTorch twin in fastmeta/ops.py (_adam_pilot_twin,
// _sgd_pilot_twin), a transcription of fastmeta.engine.optimizer.OptimizerUpdate's
// step and vjp (at the last step of a trajectory: no adjoint of the new state).
//
// Adam / AdamW, per element (M = float for fp16/bf16/fp32 storage, double for fp64):
//   g  = ±grad (+ wd·θ for L2)           m' = β1·m + (1−β1)·g        s' = β2·s + (1−β2)·g·g
//   ŝ  = max(s_max, s') (amsgrad) or s'  r̂ = sqrt(ŝ)/sqrt(bc2)      denom = r̂ + eps
//   θ' = θ·(1 − η·wd if decoupled) − (η/bc1)·(m'/denom)             bcK = 1 − βK^t
//   D  = ([(1−β1)β2·s − β1(1−β2)·m·g] / (bc1·bc2·r̂) + (1−β1)·eps/bc1) / denom²   (exact;
//        the bracket's first term is 0 where r̂ = 0)
//   D  = (1−β1)/bc1 / denom   (frozen second moment; amsgrad where the old maximum is used)
//   adj = ((−η·D)·v)·(±adj_scale)   (± : maximize; the adjoint of the raw gradient)
// Absent state (first step) is read as zeros: the same values as the draft's "None" state.
//
// SGD, per element:
//   g = ±grad (+ wd·θ)    buf' = g (first step) or μ·buf + (1−d)·g
//   θ' = θ − η·(nesterov ? g + μ·buf' : buf')   (θ − η·g without momentum)
//   adj = (−η·v) · [1 | (1−d) | nesterov: 1 + μ·(1 | (1−d))] · (±adj_scale), in the draft's order
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
  double c_s;           // (1−β1)·β2
  double c_mg;          // β1·(1−β2)
  double bc12;          // bc1·bc2
  double c_eps;         // (1−β1)·eps / bc1
  double plain;         // (1−β1) / bc1
  double neg_lr;        // −η
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
  c.c_s = (1.0 - h.beta1) * h.beta2;
  c.c_mg = h.beta1 * (1.0 - h.beta2);
  c.bc12 = bc1 * bc2;
  c.c_eps = (1.0 - h.beta1) * h.eps / bc1;
  c.plain = (1.0 - h.beta1) / bc1;
  c.neg_lr = -h.lr;
  c.adj_scale = h.maximize ? -h.adj_scale : h.adj_scale;
  c.amsgrad = h.amsgrad;
  c.exact = h.exact;
  return c;
}

// The same constants in the math type M.
template <typename M>
struct AdamConstsM {
  M sign, l2, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, step_size, c_s, c_mg, bc12,
      c_eps, plain, neg_lr, adj_scale;
  bool amsgrad, exact;
  FASTMETA_HD explicit AdamConstsM(const AdamConsts& c)
      : sign(static_cast<M>(c.sign)), l2(static_cast<M>(c.l2)), decay(static_cast<M>(c.decay)),
        beta1(static_cast<M>(c.beta1)), one_minus_beta1(static_cast<M>(c.one_minus_beta1)),
        beta2(static_cast<M>(c.beta2)), one_minus_beta2(static_cast<M>(c.one_minus_beta2)),
        sqrt_bc2(static_cast<M>(c.sqrt_bc2)), eps(static_cast<M>(c.eps)), step_size(static_cast<M>(c.step_size)),
        c_s(static_cast<M>(c.c_s)), c_mg(static_cast<M>(c.c_mg)), bc12(static_cast<M>(c.bc12)),
        c_eps(static_cast<M>(c.c_eps)), plain(static_cast<M>(c.plain)), neg_lr(static_cast<M>(c.neg_lr)),
        adj_scale(static_cast<M>(c.adj_scale)), amsgrad(c.amsgrad), exact(c.exact) {}
};

// One element of the Adam pilot.  Inputs: theta, grad, m, s (0 when absent), smax (read only
// when amsgrad; 0 when absent: max(0, s') = s'), v (0 when absent).  Outputs: θ', adj, m', s', ŝ.
template <typename M>
FASTMETA_HD void adam_element(const AdamConstsM<M>& c, M theta, M grad, M m, M s, M smax, M v, M& theta_new,
                              M& adj, M& m_new, M& s_new, M& s_hat) {
  const M g = c.sign * grad + c.l2 * theta;
  m_new = c.beta1 * m + c.one_minus_beta1 * g;
  s_new = c.beta2 * s + (c.one_minus_beta2 * g) * g;
  // non-short-circuit logic and selects only (no branches): the CPU loop vectorises
  const bool from_s = (!c.amsgrad) | (s_new >= smax);  // torch.maximum's ties are taken by s'
  s_hat = from_s ? s_new : smax;
  const M r = pilot_sqrt(s_hat) / c.sqrt_bc2;
  const M denom = r + c.eps;
  theta_new = c.decay * theta - c.step_size * (m_new / denom);
  const M inv_denom = M(1) / denom;  // one division for both forms of D
  const M plain = c.plain * inv_denom;
  const M numerator = c.c_s * s - (c.c_mg * m) * g;
  const M quotient = numerator / (c.bc12 * r);  // inf/nan where r = 0: not selected
  const M second = r > M(0) ? quotient : M(0);
  const M exact = (second + c.c_eps) * inv_denom * inv_denom;
  const M d = (c.exact & from_s) ? exact : plain;
  adj = ((c.neg_lr * d) * v) * c.adj_scale;
}

// SGD (with or without momentum) ------------------------------------------------------------
struct SgdHyper {
  double lr, momentum, dampening, weight_decay, adj_scale;
  bool nesterov, maximize, first;  // first: no momentum buffer yet (buf' = g)
};

template <typename M>
struct SgdConstsM {
  M sign, l2, lr, neg_lr, momentum, one_minus_dampening, adj_scale;
  bool has_momentum, nesterov, first;
  FASTMETA_HD explicit SgdConstsM(const SgdHyper& h)
      : sign(static_cast<M>(h.maximize ? -1.0 : 1.0)), l2(static_cast<M>(h.weight_decay)),
        lr(static_cast<M>(h.lr)), neg_lr(static_cast<M>(-h.lr)), momentum(static_cast<M>(h.momentum)),
        one_minus_dampening(static_cast<M>(1.0 - h.dampening)),
        adj_scale(static_cast<M>(h.maximize ? -h.adj_scale : h.adj_scale)), has_momentum(h.momentum != 0.0),
        nesterov(h.nesterov), first(h.first) {}
};

// One element of the SGD pilot.  Inputs: theta, grad, buf (0 when absent), v.  Outputs: θ', adj, buf'.
template <typename M>
FASTMETA_HD void sgd_element(const SgdConstsM<M>& c, M theta, M grad, M buf, M v, M& theta_new, M& adj,
                             M& buf_new) {
  const M g = c.sign * grad + c.l2 * theta;
  const M a = c.neg_lr * v;  // the adjoint of the update, −η·v
  // branch-free on the element (the flags are the same for every element)
  const M accumulated = c.first ? g : c.momentum * buf + c.one_minus_dampening * g;
  buf_new = c.has_momentum ? accumulated : M(0);
  const M update = !c.has_momentum ? g : (c.nesterov ? g + c.momentum * buf_new : buf_new);
  theta_new = theta - c.lr * update;
  const M b = c.nesterov ? a * c.momentum : a;
  const M through_buffer = c.first ? b : c.one_minus_dampening * b;
  const M adj_g = !c.has_momentum ? a : (c.nesterov ? a + through_buffer : through_buffer);
  adj = adj_g * c.adj_scale;
}

}  // namespace fastmeta_pilot
