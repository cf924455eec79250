// fastmeta: multi-tensor primitives for Hessian-vector / meta-gradient products.
//
// This file holds the op schemas (TORCH_LIBRARY(fastmeta, m)), the CPU kernels and
// the Meta (fake) kernels used by torch.compile / FakeTensor tracing.  The CUDA
// kernels live in csrc/cuda/ (raw kernels in a torch-free .cu, binding in a .cpp).
//
// Ops (Python API and plain-PyTorch twins: fastmeta/ops.py):
//   add_scaled_(Tensor(a!)[] tensors, Tensor[] vectors, float alpha) -> ()
//       tensors[i] += alpha * vectors[i]   (fp32 math for fp16/bf16 storage)
//   dot(Tensor[] xs, Tensor[] ys, ScalarType dtype) -> Tensor
//       sum_i <xs[i], ys[i]>, accumulated in dtype (float32 / float64)
//   norm(Tensor[] xs, ScalarType dtype) -> Tensor
//       sqrt(sum_i ||xs[i]||^2), accumulated in dtype
//   central_difference(Tensor[] g_plus, Tensor[] g_minus, float eps) -> Tensor[]
//       (g_plus[i] - g_minus[i]) * (1 / (2 eps))
//   central_difference_(Tensor(a!)[] g_plus, Tensor[] g_minus, float eps) -> ()
//       the same, written into g_plus (saves one gradient-sized list)
//   adam_preconditioner(Tensor[] vectors, Tensor[] exp_avg_sqs, Tensor[] grads,
//                       float beta2, float bias_correction2, float eps, float scale) -> Tensor[]
//       s = exp_avg_sqs[i]  (or beta2*s + (1-beta2)*grads[i]^2 when grads is non-empty)
//       out = (vectors[i] * scale) / (sqrt(s / bias_correction2) + eps)
//   adam_pilot(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, vectors, adj_exp_avgs, adj_exp_avg_sqs,
//              adj_max_exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step, decoupled, amsgrad, maximize,
//              exact_jacobian, adj_scale, compute_params, compute_state, compute_adj_params, compute_adj_state)
//       -> (new_params, adj_grads, new_exp_avgs, new_exp_avg_sqs, new_max_exp_avg_sqs,
//           adj_params, adj_exp_avgs, adj_exp_avg_sqs, adj_max_exp_avg_sqs)
//       ONE Adam/AdamW update (θ', and m', s', ŝ when compute_state) and its exact adjoint for
//       ∂L/∂θ' = vectors[i] and the incoming state adjoints adj_* (a reverse-sweep step): the raw
//       gradient's (scaled by adj_scale), θ's direct one and the old state's, in one pass; the math
//       is csrc/pilot_math.h.  Empty lists: no state yet (first step) / no adjoint / no incoming
//       state adjoint (the last step) / outputs not asked for.
//   sgd_pilot(params, grads, momentum_buffers, vectors, adj_momentum_buffers, lr, momentum, dampening,
//             weight_decay, nesterov, maximize, adj_scale, compute_params, compute_state, compute_adj_params,
//             compute_adj_state)
//       -> (new_params, adj_grads, new_momentum_buffers, adj_params, adj_momentum_buffers): the same for
//       torch.optim.SGD.
//
// Determinism of the reductions: every tensor is cut into fixed chunks of
// kChunk elements; each chunk is summed with kLanes interleaved accumulators that
// are combined in a fixed order; the chunk partials are then added in (tensor,
// chunk) order.  The result does not depend on the number of threads.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "list_checks.h"
#include "pilot_math.h"

namespace fastmeta {
namespace {

using lists::check_lists;
using lists::check_optional;
using lists::outputs_like;

constexpr int64_t kChunk = 1 << 15;  // elements per work item (fixed: determinism)
constexpr int kLanes = 8;            // interleaved accumulators per chunk

// math type for a storage type: fp32 for fp16/bf16/fp32, fp64 for fp64
template <typename T> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };

template <typename T, typename A> inline A load_as(const T* p, int64_t i) {
  return static_cast<A>(static_cast<typename OpMath<T>::type>(p[i]));
}

// (tensor index, start element, length) for every chunk of every tensor, in order
struct Item { int64_t tensor; int64_t begin; int64_t length; };

std::vector<Item> make_items(at::TensorList tensors) {
  std::vector<Item> items;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) items.push_back({t, b, std::min(kChunk, n - b)});
  }
  return items;
}

void check_cpu_floating(const char* op, const char* name, at::TensorList a) {
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].device().is_cpu(), "fastmeta::", op, ": ", name, "[", i, "] must be a CPU tensor");
    const auto st = a[i].scalar_type();
    TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
                "fastmeta::", op, ": ", name, "[", i, "] must be float16/bfloat16/float32/float64, got ", st);
  }
}

// ------------------------------------------------------------------------- //
// add_scaled_
// ------------------------------------------------------------------------- //
template <typename T>
void add_scaled_chunk(T* __restrict__ p, const T* __restrict__ v, int64_t n, double alpha_d) {
  using M = typename OpMath<T>::type;
  const M alpha = static_cast<M>(alpha_d);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    p[i] = static_cast<T>(static_cast<M>(p[i]) + alpha * static_cast<M>(v[i]));
  }
}

void add_scaled_cpu(at::TensorList tensors, at::TensorList vectors, double alpha) {
  check_lists("add_scaled_", "tensors", tensors, "vectors", vectors);
  check_cpu_floating("add_scaled_", "tensors", tensors);
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].is_contiguous(), "fastmeta::add_scaled_: tensors[", i, "] must be contiguous");
  }
  std::vector<at::Tensor> vecs;
  vecs.reserve(vectors.size());
  for (const auto& v : vectors) vecs.push_back(v.contiguous());
  const auto items = make_items(tensors);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Item& it = items[k];
      const at::Tensor& p = tensors[it.tensor];
      const at::Tensor& v = vecs[it.tensor];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "fastmeta::add_scaled_", [&] {
        add_scaled_chunk<scalar_t>(p.data_ptr<scalar_t>() + it.begin, v.data_ptr<scalar_t>() + it.begin,
                                   it.length, alpha);
      });
    }
  });
}

// ------------------------------------------------------------------------- //
// dot / norm
// ------------------------------------------------------------------------- //
template <typename T, typename A>
A dot_chunk(const T* __restrict__ x, const T* __restrict__ y, int64_t n) {
  A acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = A(0);
  const int64_t body = n - n % kLanes;
  for (int64_t i = 0; i < body; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += load_as<T, A>(x, i + l) * load_as<T, A>(y, i + l);
  }
  for (int64_t i = body; i < n; ++i) acc[i - body] += load_as<T, A>(x, i) * load_as<T, A>(y, i);
  // fixed pairwise combination of the lanes
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

template <typename A>
A dot_lists(at::TensorList xs, const std::vector<at::Tensor>& ys) {
  std::vector<at::Tensor> xc;
  xc.reserve(xs.size());
  for (const auto& x : xs) xc.push_back(x.contiguous());
  const auto items = make_items(xs);
  std::vector<A> partial(items.size(), A(0));
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Item& it = items[k];
      const at::Tensor& x = xc[it.tensor];
      const at::Tensor& y = ys[it.tensor];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastmeta::dot", [&] {
        partial[k] = dot_chunk<scalar_t, A>(x.data_ptr<scalar_t>() + it.begin, y.data_ptr<scalar_t>() + it.begin,
                                            it.length);
      });
    }
  });
  A total = A(0);
  for (const A& p : partial) total += p;  // ordered final sum
  return total;
}

at::Tensor dot_cpu(at::TensorList xs, at::TensorList ys, at::ScalarType dtype) {
  check_lists("dot", "xs", xs, "ys", ys);
  check_cpu_floating("dot", "xs", xs);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "fastmeta::dot: dtype must be float32 or float64, got ", dtype);
  std::vector<at::Tensor> yc;
  yc.reserve(ys.size());
  for (const auto& y : ys) yc.push_back(y.contiguous());
  auto out = at::empty({}, at::TensorOptions().dtype(dtype).device(at::kCPU));
  if (dtype == at::kFloat) {
    out.fill_(static_cast<double>(dot_lists<float>(xs, yc)));
  } else {
    out.fill_(dot_lists<double>(xs, yc));
  }
  return out;
}

at::Tensor norm_cpu(at::TensorList xs, at::ScalarType dtype) {
  check_cpu_floating("norm", "xs", xs);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "fastmeta::norm: dtype must be float32 or float64, got ", dtype);
  std::vector<at::Tensor> xc;
  xc.reserve(xs.size());
  for (const auto& x : xs) xc.push_back(x.contiguous());
  auto out = at::empty({}, at::TensorOptions().dtype(dtype).device(at::kCPU));
  if (dtype == at::kFloat) {
    out.fill_(static_cast<double>(std::sqrt(dot_lists<float>(xs, xc))));
  } else {
    out.fill_(std::sqrt(dot_lists<double>(xs, xc)));
  }
  return out;
}

// ------------------------------------------------------------------------- //
// central_difference
// ------------------------------------------------------------------------- //
// `out` may alias `gp` (the in-place variant): no __restrict__ on those two
template <typename T>
void central_difference_chunk(const T* gp, const T* __restrict__ gm, T* out, int64_t n,
                              double inv_two_eps_d) {
  using M = typename OpMath<T>::type;
  const M inv = static_cast<M>(inv_two_eps_d);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<T>((static_cast<M>(gp[i]) - static_cast<M>(gm[i])) * inv);
  }
}

std::vector<at::Tensor> central_difference_cpu(at::TensorList g_plus, at::TensorList g_minus, double eps) {
  check_lists("central_difference", "g_plus", g_plus, "g_minus", g_minus);
  check_cpu_floating("central_difference", "g_plus", g_plus);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "fastmeta::central_difference: eps must be finite and > 0, got ", eps);
  std::vector<at::Tensor> gp, gm, out;
  for (size_t i = 0; i < g_plus.size(); ++i) {
    gp.push_back(g_plus[i].contiguous());
    gm.push_back(g_minus[i].contiguous());
    out.push_back(at::empty_like(g_plus[i], at::MemoryFormat::Contiguous));
  }
  const double inv = 1.0 / (2.0 * eps);
  const auto items = make_items(g_plus);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Item& it = items[k];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gp[it.tensor].scalar_type(),
                                      "fastmeta::central_difference", [&] {
        central_difference_chunk<scalar_t>(gp[it.tensor].data_ptr<scalar_t>() + it.begin,
                                           gm[it.tensor].data_ptr<scalar_t>() + it.begin,
                                           out[it.tensor].data_ptr<scalar_t>() + it.begin, it.length, inv);
      });
    }
  });
  return out;
}

void central_difference_inplace_cpu(at::TensorList g_plus, at::TensorList g_minus, double eps) {
  check_lists("central_difference_", "g_plus", g_plus, "g_minus", g_minus);
  check_cpu_floating("central_difference_", "g_plus", g_plus);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "fastmeta::central_difference_: eps must be finite and > 0, got ", eps);
  std::vector<at::Tensor> gm;
  for (size_t i = 0; i < g_plus.size(); ++i) {
    TORCH_CHECK(g_plus[i].is_contiguous(), "fastmeta::central_difference_: g_plus[", i, "] must be contiguous");
    gm.push_back(g_minus[i].contiguous());
  }
  const double inv = 1.0 / (2.0 * eps);
  const auto items = make_items(g_plus);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Item& it = items[k];
      const at::Tensor& gp = g_plus[it.tensor];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gp.scalar_type(), "fastmeta::central_difference_", [&] {
        scalar_t* p = gp.data_ptr<scalar_t>() + it.begin;
        central_difference_chunk<scalar_t>(p, gm[it.tensor].data_ptr<scalar_t>() + it.begin, p, it.length, inv);
      });
    }
  });
}

// ------------------------------------------------------------------------- //
// adam_preconditioner
// ------------------------------------------------------------------------- //
template <typename T>
void adam_chunk(const T* __restrict__ v, const T* __restrict__ s, const T* __restrict__ g, T* __restrict__ out,
                int64_t n, double beta2_d, double bc2_d, double eps_d, double scale_d) {
  using M = typename OpMath<T>::type;
  const M beta2 = static_cast<M>(beta2_d), one_minus_beta2 = static_cast<M>(1.0 - beta2_d);
  const M bc2 = static_cast<M>(bc2_d), eps = static_cast<M>(eps_d), scale = static_cast<M>(scale_d);
  if (g != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const M gi = static_cast<M>(g[i]);
      const M si = static_cast<M>(s[i]) * beta2 + (gi * gi) * one_minus_beta2;
      out[i] = static_cast<T>((static_cast<M>(v[i]) * scale) / (std::sqrt(si / bc2) + eps));
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      out[i] = static_cast<T>((static_cast<M>(v[i]) * scale) / (std::sqrt(static_cast<M>(s[i]) / bc2) + eps));
    }
  }
}

std::vector<at::Tensor> adam_preconditioner_cpu(at::TensorList vectors, at::TensorList exp_avg_sqs,
                                                at::TensorList grads, double beta2, double bias_correction2,
                                                double eps, double scale) {
  check_lists("adam_preconditioner", "vectors", vectors, "exp_avg_sqs", exp_avg_sqs);
  check_cpu_floating("adam_preconditioner", "vectors", vectors);
  const bool with_grads = !grads.empty();
  if (with_grads) check_lists("adam_preconditioner", "vectors", vectors, "grads", grads);
  TORCH_CHECK(bias_correction2 > 0, "fastmeta::adam_preconditioner: bias_correction2 must be > 0, got ",
              bias_correction2);
  std::vector<at::Tensor> v, s, g, out;
  for (size_t i = 0; i < vectors.size(); ++i) {
    v.push_back(vectors[i].contiguous());
    s.push_back(exp_avg_sqs[i].contiguous());
    if (with_grads) g.push_back(grads[i].contiguous());
    out.push_back(at::empty_like(vectors[i], at::MemoryFormat::Contiguous));
  }
  const auto items = make_items(vectors);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Item& it = items[k];
      const int64_t t = it.tensor;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v[t].scalar_type(),
                                      "fastmeta::adam_preconditioner", [&] {
        adam_chunk<scalar_t>(v[t].data_ptr<scalar_t>() + it.begin, s[t].data_ptr<scalar_t>() + it.begin,
                             with_grads ? g[t].data_ptr<scalar_t>() + it.begin : nullptr,
                             out[t].data_ptr<scalar_t>() + it.begin, it.length, beta2, bias_correction2, eps,
                             scale);
      });
    }
  });
  return out;
}

// ------------------------------------------------------------------------- //
// adam_pilot / sgd_pilot: one optimizer update, its new state and its exact adjoint
// ------------------------------------------------------------------------- //
// Each chunk is processed in strips of kStrip elements: the inputs are loaded
// (converted to the math type; absent ones read as 0) into small stack arrays, the
// elementwise math (pilot_math.h) runs branch-free over the strip (vectorised), and
// the wanted outputs are stored.  Every input element is read once from memory and
// every output element written once; the strips stay in L1.
constexpr int64_t kStrip = 256;

#if defined(__GNUC__)
#define FASTMETA_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define FASTMETA_ALWAYS_INLINE inline
#endif

template <typename T, typename M>
FASTMETA_ALWAYS_INLINE void load_strip(const T* __restrict__ p, int64_t n, M* __restrict__ out) {
  if (p == nullptr) {
    for (int64_t i = 0; i < n; ++i) out[i] = M(0);
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<M>(p[i]);
}

template <typename T, typename M>
FASTMETA_ALWAYS_INLINE void store_strip(T* __restrict__ p, int64_t n, const M* __restrict__ in) {
  if (p == nullptr) return;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(in[i]);
}

template <typename P>
FASTMETA_ALWAYS_INLINE P* offset(P* p, int64_t b) {
  return p == nullptr ? nullptr : p + b;
}

// True when every x[i] == 0 (a NaN is not 0).
template <typename M>
FASTMETA_ALWAYS_INLINE bool all_zero(const M* __restrict__ x, int64_t n) {
  bool nonzero = false;
#pragma omp simd reduction(| : nonzero)
  for (int64_t i = 0; i < n; ++i) nonzero |= (x[i] != M(0));
  return !nonzero;
}

template <typename T>
FASTMETA_ALWAYS_INLINE void zero_strip(T* __restrict__ p, int64_t n) {
  if (p == nullptr) return;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) p[i] = T(0);
}

// The op's list arguments, in schema order (inputs, then outputs).
enum AdamIn { kATheta, kAGrad, kAM, kAS, kASmax, kAV, kAAdjM, kAAdjS, kAAdjSmax, kAdamInputs };
enum AdamOut {
  kAThetaNew, kAAdjGrad, kAMNew, kASNew, kASHat, kAAdjTheta, kAAdjMOut, kAAdjSOut, kAAdjSmaxOut, kAdamOutputs
};
enum SgdIn { kSTheta, kSGrad, kSBuf, kSV, kSAdjBuf, kSgdInputs };
enum SgdOut { kSThetaNew, kSAdjGrad, kSBufNew, kSAdjTheta, kSAdjBufOut, kSgdOutputs };

// Pointers of one chunk (nullptr: absent input / unwanted output), already offset.
template <typename T, int NIn, int NOut>
struct PilotPtrs {
  const T* in[NIn];
  T* out[NOut];
};

// Which outputs a call wants (bits): the math of the others is dropped at compile time.
constexpr int kWantParams = 1, kWantAdj = 2, kWantState = 4, kWantAdjParams = 8, kWantAdjState = 16;

// The pilot point alone (the engine's pilot call, every step) with the optimizer state present: one loop
// straight over memory, the adjoint inputs constant 0 (θ' does not read them) and the maximum (amsgrad)
// read only where given.  The same element function as the strips below, so the same values.  The strips
// load all nine inputs (five of them absent, zero-filled per strip) into stack arrays and store the
// output twice: bench.updates' "pilot: θ'" row (MiniLM student, fp32, 1 thread, AMD EPYC) took 89 ms
// with them and 43 ms with this loop, much of the rest the fresh output's first touch.
template <typename T, bool HasMax>
FASTMETA_ALWAYS_INLINE void adam_pilot_params_direct(const PilotPtrs<T, kAdamInputs, kAdamOutputs>& p, int64_t n,
                                                     const fastmeta_pilot::AdamConstsM<typename OpMath<T>::type>& c) {
  using M = typename OpMath<T>::type;
  const T* __restrict__ theta = p.in[kATheta];
  const T* __restrict__ grad = p.in[kAGrad];
  const T* __restrict__ m = p.in[kAM];
  const T* __restrict__ s = p.in[kAS];
  const T* __restrict__ smax = p.in[kASmax];
  T* __restrict__ out = p.out[kAThetaNew];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const fastmeta_pilot::AdamIn<M> in{static_cast<M>(theta[i]), static_cast<M>(grad[i]), static_cast<M>(m[i]),
                                       static_cast<M>(s[i]),     HasMax ? static_cast<M>(smax[i]) : M(0),
                                       M(0),                     M(0),
                                       M(0),                     M(0)};
    fastmeta_pilot::AdamOut<M> o;
    fastmeta_pilot::adam_element<M>(c, in, o);
    out[i] = static_cast<T>(o.theta_new);
  }
}

template <typename T, int Want>
FASTMETA_ALWAYS_INLINE void adam_pilot_chunk(const PilotPtrs<T, kAdamInputs, kAdamOutputs>& p, int64_t n,
                                             const fastmeta_pilot::AdamConsts& consts) {
  using M = typename OpMath<T>::type;
  const fastmeta_pilot::AdamConstsM<M> c(consts);
  if constexpr (Want == kWantParams) {
    // (the first step, without state, takes the strips: m and s are absent there)
    if (p.in[kATheta] != nullptr && p.in[kAM] != nullptr && p.in[kAS] != nullptr && p.out[kAThetaNew] != nullptr) {
      if (p.in[kASmax] != nullptr) {
        adam_pilot_params_direct<T, true>(p, n, c);
      } else {
        adam_pilot_params_direct<T, false>(p, n, c);
      }
      return;
    }
  }
  alignas(64) M x[kAdamInputs][kStrip];
  alignas(64) M y[kAdamOutputs][kStrip];
  // A reverse-sweep call (adjoints only) skips the strips whose adjoint inputs are all exactly 0:
  // their adjoints are exactly 0 (the Jacobian is finite: eps > 0 and a finite state), and θ, g and
  // the state need not be read there.  The quiz gradient of a word embedding is 0 on every row no
  // quiz token touched: most of the rows.
  constexpr bool kAdjointsOnly = (Want & (kWantParams | kWantState)) == 0;
  const bool skip_zero = kAdjointsOnly && consts.eps > 0.0;
  constexpr int kAdjointInputs[] = {kAV, kAAdjM, kAAdjS, kAAdjSmax};
  for (int64_t b = 0; b < n; b += kStrip) {
    const int64_t len = std::min(kStrip, n - b);
    if (skip_zero) {
      bool nonzero = false;
      for (int k : kAdjointInputs) {
        if (p.in[k] == nullptr) continue;
        load_strip<T, M>(p.in[k] + b, len, x[k]);
        nonzero = nonzero || !all_zero(x[k], len);
      }
      if (!nonzero) {
        for (int k = 0; k < kAdamOutputs; ++k) zero_strip<T>(offset(p.out[k], b), len);
        continue;
      }
      for (int k = 0; k < kAdamInputs; ++k) {
        const bool adjoint = k == kAV || k == kAAdjM || k == kAAdjS || k == kAAdjSmax;
        if (!adjoint || p.in[k] == nullptr) load_strip<T, M>(offset(p.in[k], b), len, x[k]);
      }
    } else {
      for (int k = 0; k < kAdamInputs; ++k) load_strip<T, M>(offset(p.in[k], b), len, x[k]);
    }
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const fastmeta_pilot::AdamIn<M> in{x[kATheta][i], x[kAGrad][i], x[kAM][i],    x[kAS][i],      x[kASmax][i],
                                         x[kAV][i],     x[kAAdjM][i], x[kAAdjS][i], x[kAAdjSmax][i]};
      fastmeta_pilot::AdamOut<M> o;
      fastmeta_pilot::adam_element<M>(c, in, o);
      if (Want & kWantParams) y[kAThetaNew][i] = o.theta_new;
      if (Want & kWantAdj) y[kAAdjGrad][i] = o.adj_grad;
      if (Want & kWantState) {
        y[kAMNew][i] = o.m_new;
        y[kASNew][i] = o.s_new;
        y[kASHat][i] = o.s_hat;
      }
      if (Want & kWantAdjParams) y[kAAdjTheta][i] = o.adj_theta;
      if (Want & kWantAdjState) {
        y[kAAdjMOut][i] = o.adj_m;
        y[kAAdjSOut][i] = o.adj_s;
        y[kAAdjSmaxOut][i] = o.adj_smax;
      }
    }
    // (absent outputs have null pointers: the catch-all mode may hold unwanted ones)
    if (Want & kWantParams) store_strip<T, M>(offset(p.out[kAThetaNew], b), len, y[kAThetaNew]);
    if (Want & kWantAdj) store_strip<T, M>(offset(p.out[kAAdjGrad], b), len, y[kAAdjGrad]);
    if (Want & kWantState) {
      for (int k : {kAMNew, kASNew, kASHat}) store_strip<T, M>(offset(p.out[k], b), len, y[k]);
    }
    if (Want & kWantAdjParams) store_strip<T, M>(offset(p.out[kAAdjTheta], b), len, y[kAAdjTheta]);
    if (Want & kWantAdjState) {
      for (int k : {kAAdjMOut, kAAdjSOut, kAAdjSmaxOut}) store_strip<T, M>(offset(p.out[k], b), len, y[k]);
    }
  }
}

template <typename T>
FASTMETA_ALWAYS_INLINE void sgd_pilot_chunk(const PilotPtrs<T, kSgdInputs, kSgdOutputs>& p, int64_t n,
                                            const fastmeta_pilot::SgdHyper& hyper) {
  using M = typename OpMath<T>::type;
  const fastmeta_pilot::SgdConstsM<M> c(hyper);
  alignas(64) M x[kSgdInputs][kStrip];
  alignas(64) M y[kSgdOutputs][kStrip];
  for (int64_t b = 0; b < n; b += kStrip) {
    const int64_t len = std::min(kStrip, n - b);
    for (int k = 0; k < kSgdInputs; ++k) load_strip<T, M>(offset(p.in[k], b), len, x[k]);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const fastmeta_pilot::SgdIn<M> in{x[kSTheta][i], x[kSGrad][i], x[kSBuf][i], x[kSV][i], x[kSAdjBuf][i]};
      fastmeta_pilot::SgdOut<M> o;
      fastmeta_pilot::sgd_element<M>(c, in, o);
      y[kSThetaNew][i] = o.theta_new;
      y[kSAdjGrad][i] = o.adj_grad;
      y[kSBufNew][i] = o.buf_new;
      y[kSAdjTheta][i] = o.adj_theta;
      y[kSAdjBufOut][i] = o.adj_buf;
    }
    for (int k = 0; k < kSgdOutputs; ++k) store_strip<T, M>(offset(p.out[k], b), len, y[k]);
  }
}

// The chunk functions, compiled for AVX-512, AVX2 and the baseline and picked at load
// time for the CPU (GCC function multiversioning, x86-64 Linux; the baseline elsewhere).
// fp64 (reference precision, not a speed path) is compiled for the baseline only.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTMETA_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTMETA_SIMD_CLONES
#endif

template <typename T>
FASTMETA_ALWAYS_INLINE void adam_pilot_dispatch(const PilotPtrs<T, kAdamInputs, kAdamOutputs>& p, int64_t n,
                                                const fastmeta_pilot::AdamConsts& c, int want) {
  constexpr int kReverse = kWantAdj | kWantAdjParams | kWantAdjState;  // a reverse-sweep step
  switch (want) {  // the combinations the engine asks for; anything else computes everything
    case kWantParams: adam_pilot_chunk<T, kWantParams>(p, n, c); break;
    case kWantAdj: adam_pilot_chunk<T, kWantAdj>(p, n, c); break;
    case kWantParams | kWantAdj: adam_pilot_chunk<T, kWantParams | kWantAdj>(p, n, c); break;
    case kWantParams | kWantState: adam_pilot_chunk<T, kWantParams | kWantState>(p, n, c); break;
    case kReverse: adam_pilot_chunk<T, kReverse>(p, n, c); break;
    default: adam_pilot_chunk<T, kWantParams | kWantState | kReverse>(p, n, c); break;
  }
}

#define FASTMETA_PILOT_CHUNKS(T, ATTRIBUTES)                                                                   \
  ATTRIBUTES void adam_pilot_chunk_any(const PilotPtrs<T, kAdamInputs, kAdamOutputs>& p, int64_t n,          \
                                       const fastmeta_pilot::AdamConsts& c, int want) {                       \
    adam_pilot_dispatch<T>(p, n, c, want);                                                                     \
  }                                                                                                            \
  ATTRIBUTES void sgd_pilot_chunk_any(const PilotPtrs<T, kSgdInputs, kSgdOutputs>& p, int64_t n,             \
                                      const fastmeta_pilot::SgdHyper& h) {                                    \
    sgd_pilot_chunk<T>(p, n, h);                                                                               \
  }
FASTMETA_PILOT_CHUNKS(float, FASTMETA_SIMD_CLONES)
FASTMETA_PILOT_CHUNKS(at::Half, FASTMETA_SIMD_CLONES)
FASTMETA_PILOT_CHUNKS(at::BFloat16, FASTMETA_SIMD_CLONES)
FASTMETA_PILOT_CHUNKS(double, )
#undef FASTMETA_PILOT_CHUNKS

std::vector<at::Tensor> contiguous_list(at::TensorList a) {
  std::vector<at::Tensor> out;
  out.reserve(a.size());
  for (const auto& t : a) out.push_back(t.contiguous());
  return out;
}

template <typename T>
const T* ptr_or_null(const std::vector<at::Tensor>& list, int64_t t, int64_t begin) {
  return list.empty() ? nullptr : list[t].data_ptr<T>() + begin;
}

template <typename T>
T* mut_ptr_or_null(std::vector<at::Tensor>& list, int64_t t, int64_t begin) {
  return list.empty() ? nullptr : list[t].data_ptr<T>() + begin;
}

using AdamPilotResult = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                   std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                   std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;
using SgdPilotResult = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                  std::vector<at::Tensor>, std::vector<at::Tensor>>;

void check_adam_pilot_args(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList vectors,
                           at::TensorList adj_exp_avgs, at::TensorList adj_exp_avg_sqs,
                           at::TensorList adj_max_exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                           int64_t step, bool amsgrad, bool compute_adj_params, bool compute_adj_state) {
  check_lists(op, "params", params, "grads", grads);
  check_optional(op, params, "exp_avgs", exp_avgs);
  check_optional(op, params, "exp_avg_sqs", exp_avg_sqs);
  check_optional(op, params, "max_exp_avg_sqs", max_exp_avg_sqs);
  check_optional(op, params, "vectors", vectors);
  check_optional(op, params, "adj_exp_avgs", adj_exp_avgs);
  check_optional(op, params, "adj_exp_avg_sqs", adj_exp_avg_sqs);
  check_optional(op, params, "adj_max_exp_avg_sqs", adj_max_exp_avg_sqs);
  TORCH_CHECK(amsgrad || (max_exp_avg_sqs.empty() && adj_max_exp_avg_sqs.empty()), "fastmeta::", op,
              ": max_exp_avg_sqs / adj_max_exp_avg_sqs given but amsgrad is false");
  TORCH_CHECK(!vectors.empty() || (adj_exp_avgs.empty() && adj_exp_avg_sqs.empty() && adj_max_exp_avg_sqs.empty() &&
                                   !compute_adj_params && !compute_adj_state),
              "fastmeta::", op, ": adjoints (incoming state adjoints, compute_adj_params, compute_adj_state) need "
              "vectors");
  TORCH_CHECK(step >= 1, "fastmeta::", op, ": step (the step count of the step being taken) must be >= 1, got ",
              step);
  TORCH_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "fastmeta::", op,
              ": beta1 and beta2 must be in [0, 1), got ", beta1, " and ", beta2);
  TORCH_CHECK(std::isfinite(lr) && std::isfinite(eps) && eps >= 0, "fastmeta::", op,
              ": lr must be finite and eps finite and >= 0, got ", lr, " and ", eps);
}

// Which outputs adam_pilot returns (shared by the CPU, Meta and CUDA kernels' shapes).
struct AdamWanted {
  bool params, adj, state, smax, adj_params, adj_m, adj_s, adj_smax;
};

AdamWanted adam_wanted(bool want_adj, bool amsgrad, bool exact, bool has_smax, bool compute_params,
                       bool compute_state, bool compute_adj_params, bool compute_adj_state) {
  return {compute_params, want_adj, compute_state, compute_state && amsgrad, want_adj && compute_adj_params,
          want_adj && compute_adj_state, want_adj && compute_adj_state && exact,
          want_adj && compute_adj_state && exact && amsgrad && has_smax};
}

AdamPilotResult adam_pilot_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList vectors,
                               at::TensorList adj_exp_avgs, at::TensorList adj_exp_avg_sqs,
                               at::TensorList adj_max_exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                               double weight_decay, int64_t step, bool decoupled, bool amsgrad, bool maximize,
                               bool exact_jacobian, double adj_scale, bool compute_params, bool compute_state,
                               bool compute_adj_params, bool compute_adj_state) {
  const char* op = "adam_pilot";
  check_adam_pilot_args(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, vectors, adj_exp_avgs,
                        adj_exp_avg_sqs, adj_max_exp_avg_sqs, lr, beta1, beta2, eps, step, amsgrad,
                        compute_adj_params, compute_adj_state);
  check_cpu_floating(op, "params", params);
  const fastmeta_pilot::AdamConsts consts = fastmeta_pilot::adam_consts(
      {lr, beta1, beta2, eps, weight_decay, adj_scale, step, decoupled, amsgrad, maximize, exact_jacobian});
  const bool want_adj = !vectors.empty();
  const AdamWanted w = adam_wanted(want_adj, amsgrad, exact_jacobian, !max_exp_avg_sqs.empty(), compute_params,
                                   compute_state, compute_adj_params, compute_adj_state);
  // θ is read for θ' and for L2 weight decay (g' = ±g + wd·θ) only; m for m' and the exact D
  const bool need_theta = compute_params || consts.l2 != 0.0;
  const bool need_m = compute_params || compute_state || (want_adj && exact_jacobian);
  const std::vector<at::Tensor> empty;
  const std::vector<at::Tensor> in[kAdamInputs] = {
      need_theta ? contiguous_list(params) : empty, contiguous_list(grads),
      need_m ? contiguous_list(exp_avgs) : empty,   contiguous_list(exp_avg_sqs),
      contiguous_list(max_exp_avg_sqs),             contiguous_list(vectors),
      contiguous_list(adj_exp_avgs),                exact_jacobian ? contiguous_list(adj_exp_avg_sqs) : empty,
      exact_jacobian ? contiguous_list(adj_max_exp_avg_sqs) : empty};
  std::vector<at::Tensor> out[kAdamOutputs] = {
      outputs_like(params, w.params),     outputs_like(params, w.adj),   outputs_like(params, w.state),
      outputs_like(params, w.state),      outputs_like(params, w.smax),  outputs_like(params, w.adj_params),
      outputs_like(params, w.adj_m),      outputs_like(params, w.adj_s), outputs_like(params, w.adj_smax)};
  const int want = (w.params ? kWantParams : 0) | (w.adj ? kWantAdj : 0) | (w.state ? kWantState : 0) |
                   (w.adj_params ? kWantAdjParams : 0) | (w.adj_m ? kWantAdjState : 0);
  const auto items = make_items(params);
  if (want != 0) {
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const Item& it = items[k];
        const int64_t t = it.tensor, b = it.begin;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[t].scalar_type(), "fastmeta::adam_pilot",
                                        [&] {
          PilotPtrs<scalar_t, kAdamInputs, kAdamOutputs> p;
          for (int j = 0; j < kAdamInputs; ++j) p.in[j] = ptr_or_null<scalar_t>(in[j], t, b);
          for (int j = 0; j < kAdamOutputs; ++j) p.out[j] = mut_ptr_or_null<scalar_t>(out[j], t, b);
          adam_pilot_chunk_any(p, it.length, consts, want);
        });
      }
    });
  }
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8]};
}

void check_sgd_pilot_args(const char* op, at::TensorList params, at::TensorList grads,
                          at::TensorList momentum_buffers, at::TensorList vectors, at::TensorList adj_momentum_buffers,
                          double lr, double momentum, bool compute_adj_params, bool compute_adj_state) {
  check_lists(op, "params", params, "grads", grads);
  check_optional(op, params, "momentum_buffers", momentum_buffers);
  check_optional(op, params, "vectors", vectors);
  check_optional(op, params, "adj_momentum_buffers", adj_momentum_buffers);
  TORCH_CHECK(momentum != 0.0 || (momentum_buffers.empty() && adj_momentum_buffers.empty()), "fastmeta::", op,
              ": momentum_buffers / adj_momentum_buffers given but momentum is 0");
  TORCH_CHECK(!vectors.empty() || (adj_momentum_buffers.empty() && !compute_adj_params && !compute_adj_state),
              "fastmeta::", op, ": adjoints (adj_momentum_buffers, compute_adj_params, compute_adj_state) need vectors");
  TORCH_CHECK(std::isfinite(lr) && std::isfinite(momentum), "fastmeta::", op,
              ": lr and momentum must be finite, got ", lr, " and ", momentum);
}

struct SgdWanted {
  bool params, adj, state, adj_params, adj_buf;
};

SgdWanted sgd_wanted(bool want_adj, double momentum, bool first, bool compute_params, bool compute_state,
                     bool compute_adj_params, bool compute_adj_state) {
  const bool has_momentum = momentum != 0.0;
  return {compute_params, want_adj, compute_state && has_momentum, want_adj && compute_adj_params,
          want_adj && compute_adj_state && has_momentum && !first};
}

SgdPilotResult sgd_pilot_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                             at::TensorList vectors, at::TensorList adj_momentum_buffers, double lr, double momentum,
                             double dampening, double weight_decay, bool nesterov, bool maximize, double adj_scale,
                             bool compute_params, bool compute_state, bool compute_adj_params,
                             bool compute_adj_state) {
  const char* op = "sgd_pilot";
  check_sgd_pilot_args(op, params, grads, momentum_buffers, vectors, adj_momentum_buffers, lr, momentum,
                       compute_adj_params, compute_adj_state);
  check_cpu_floating(op, "params", params);
  const bool first = momentum_buffers.empty();
  const fastmeta_pilot::SgdHyper hyper{lr, momentum, dampening, weight_decay, adj_scale, nesterov, maximize, first};
  const bool want_adj = !vectors.empty();
  const SgdWanted w = sgd_wanted(want_adj, momentum, first, compute_params, compute_state, compute_adj_params,
                                 compute_adj_state);
  const bool need_update = w.params || w.state;
  // the adjoint reads θ and g only through L2 weight decay's g (never): only a, Ab
  const std::vector<at::Tensor> empty;
  const std::vector<at::Tensor> in[kSgdInputs] = {
      (w.params || (need_update && weight_decay != 0.0)) ? contiguous_list(params) : empty,
      need_update ? contiguous_list(grads) : empty, need_update ? contiguous_list(momentum_buffers) : empty,
      contiguous_list(vectors), contiguous_list(adj_momentum_buffers)};
  std::vector<at::Tensor> out[kSgdOutputs] = {outputs_like(params, w.params), outputs_like(params, w.adj),
                                              outputs_like(params, w.state), outputs_like(params, w.adj_params),
                                              outputs_like(params, w.adj_buf)};
  const auto items = make_items(params);
  if (w.params || w.adj || w.state) {
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const Item& it = items[k];
        const int64_t t = it.tensor, b = it.begin;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[t].scalar_type(), "fastmeta::sgd_pilot",
                                        [&] {
          PilotPtrs<scalar_t, kSgdInputs, kSgdOutputs> p;
          for (int j = 0; j < kSgdInputs; ++j) p.in[j] = ptr_or_null<scalar_t>(in[j], t, b);
          for (int j = 0; j < kSgdOutputs; ++j) p.out[j] = mut_ptr_or_null<scalar_t>(out[j], t, b);
          sgd_pilot_chunk_any(p, it.length, hyper);
        });
      }
    });
  }
  return {out[0], out[1], out[2], out[3], out[4]};
}

// ------------------------------------------------------------------------- //
// Meta (fake) kernels: shapes/dtypes only, for torch.compile / FakeTensor
// ------------------------------------------------------------------------- //
void add_scaled_meta(at::TensorList tensors, at::TensorList vectors, double /*alpha*/) {
  check_lists("add_scaled_", "tensors", tensors, "vectors", vectors);
}

at::Tensor dot_meta(at::TensorList xs, at::TensorList ys, at::ScalarType dtype) {
  check_lists("dot", "xs", xs, "ys", ys);
  const auto device = xs.empty() ? at::Device(at::kMeta) : xs[0].device();
  return at::empty({}, at::TensorOptions().dtype(dtype).device(device));
}

at::Tensor norm_meta(at::TensorList xs, at::ScalarType dtype) {
  const auto device = xs.empty() ? at::Device(at::kMeta) : xs[0].device();
  return at::empty({}, at::TensorOptions().dtype(dtype).device(device));
}

std::vector<at::Tensor> like_list(at::TensorList a) {
  std::vector<at::Tensor> out;
  out.reserve(a.size());
  for (const auto& t : a) out.push_back(at::empty_like(t, at::MemoryFormat::Contiguous));
  return out;
}

std::vector<at::Tensor> central_difference_meta(at::TensorList g_plus, at::TensorList g_minus, double /*eps*/) {
  check_lists("central_difference", "g_plus", g_plus, "g_minus", g_minus);
  return like_list(g_plus);
}

void central_difference_inplace_meta(at::TensorList g_plus, at::TensorList g_minus, double /*eps*/) {
  check_lists("central_difference_", "g_plus", g_plus, "g_minus", g_minus);
}

std::vector<at::Tensor> adam_preconditioner_meta(at::TensorList vectors, at::TensorList exp_avg_sqs,
                                                 at::TensorList /*grads*/, double, double, double, double) {
  check_lists("adam_preconditioner", "vectors", vectors, "exp_avg_sqs", exp_avg_sqs);
  return like_list(vectors);
}

AdamPilotResult adam_pilot_meta(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList vectors,
                                at::TensorList adj_exp_avgs, at::TensorList adj_exp_avg_sqs,
                                at::TensorList adj_max_exp_avg_sqs, double lr, double beta1, double beta2,
                                double eps, double /*weight_decay*/, int64_t step, bool /*decoupled*/, bool amsgrad,
                                bool /*maximize*/, bool exact_jacobian, double /*adj_scale*/, bool compute_params,
                                bool compute_state, bool compute_adj_params, bool compute_adj_state) {
  check_adam_pilot_args("adam_pilot", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, vectors, adj_exp_avgs,
                        adj_exp_avg_sqs, adj_max_exp_avg_sqs, lr, beta1, beta2, eps, step, amsgrad,
                        compute_adj_params, compute_adj_state);
  const AdamWanted w = adam_wanted(!vectors.empty(), amsgrad, exact_jacobian, !max_exp_avg_sqs.empty(),
                                   compute_params, compute_state, compute_adj_params, compute_adj_state);
  return {outputs_like(params, w.params),     outputs_like(params, w.adj),   outputs_like(params, w.state),
          outputs_like(params, w.state),      outputs_like(params, w.smax),  outputs_like(params, w.adj_params),
          outputs_like(params, w.adj_m),      outputs_like(params, w.adj_s), outputs_like(params, w.adj_smax)};
}

SgdPilotResult sgd_pilot_meta(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                              at::TensorList vectors, at::TensorList adj_momentum_buffers, double lr, double momentum,
                              double /*dampening*/, double /*weight_decay*/, bool /*nesterov*/, bool /*maximize*/,
                              double /*adj_scale*/, bool compute_params, bool compute_state, bool compute_adj_params,
                              bool compute_adj_state) {
  check_sgd_pilot_args("sgd_pilot", params, grads, momentum_buffers, vectors, adj_momentum_buffers, lr, momentum,
                       compute_adj_params, compute_adj_state);
  const SgdWanted w = sgd_wanted(!vectors.empty(), momentum, momentum_buffers.empty(), compute_params, compute_state,
                                 compute_adj_params, compute_adj_state);
  return {outputs_like(params, w.params), outputs_like(params, w.adj), outputs_like(params, w.state),
          outputs_like(params, w.adj_params), outputs_like(params, w.adj_buf)};
}

}  // namespace

TORCH_LIBRARY(fastmeta, m) {
  m.def("add_scaled_(Tensor(a!)[] tensors, Tensor[] vectors, float alpha) -> ()");
  m.def("dot(Tensor[] xs, Tensor[] ys, ScalarType dtype) -> Tensor");
  m.def("norm(Tensor[] xs, ScalarType dtype) -> Tensor");
  m.def("central_difference(Tensor[] g_plus, Tensor[] g_minus, float eps) -> Tensor[]");
  m.def("central_difference_(Tensor(a!)[] g_plus, Tensor[] g_minus, float eps) -> ()");
  m.def(
      "adam_preconditioner(Tensor[] vectors, Tensor[] exp_avg_sqs, Tensor[] grads, float beta2, "
      "float bias_correction2, float eps, float scale) -> Tensor[]");
  m.def(
      "adam_pilot(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
      "Tensor[] max_exp_avg_sqs, Tensor[] vectors, Tensor[] adj_exp_avgs, Tensor[] adj_exp_avg_sqs, "
      "Tensor[] adj_max_exp_avg_sqs, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int step, bool decoupled, bool amsgrad, bool maximize, bool exact_jacobian, "
      "float adj_scale, bool compute_params, bool compute_state, bool compute_adj_params, bool compute_adj_state) "
      "-> (Tensor[] new_params, Tensor[] adj_grads, Tensor[] new_exp_avgs, Tensor[] new_exp_avg_sqs, "
      "Tensor[] new_max_exp_avg_sqs, Tensor[] adj_params, Tensor[] adj_exp_avgs, Tensor[] adj_exp_avg_sqs, "
      "Tensor[] adj_max_exp_avg_sqs)");
  m.def(
      "sgd_pilot(Tensor[] params, Tensor[] grads, Tensor[] momentum_buffers, Tensor[] vectors, "
      "Tensor[] adj_momentum_buffers, float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize, float adj_scale, bool compute_params, bool compute_state, bool compute_adj_params, "
      "bool compute_adj_state) -> (Tensor[] new_params, Tensor[] adj_grads, Tensor[] new_momentum_buffers, "
      "Tensor[] adj_params, Tensor[] adj_momentum_buffers)");
}

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("add_scaled_", &add_scaled_cpu);
  m.impl("dot", &dot_cpu);
  m.impl("norm", &norm_cpu);
  m.impl("central_difference", &central_difference_cpu);
  m.impl("central_difference_", &central_difference_inplace_cpu);
  m.impl("adam_preconditioner", &adam_preconditioner_cpu);
  m.impl("adam_pilot", &adam_pilot_cpu);
  m.impl("sgd_pilot", &sgd_pilot_cpu);
}

TORCH_LIBRARY_IMPL(fastmeta, Meta, m) {
  m.impl("add_scaled_", &add_scaled_meta);
  m.impl("dot", &dot_meta);
  m.impl("norm", &norm_meta);
  m.impl("central_difference", &central_difference_meta);
  m.impl("central_difference_", &central_difference_inplace_meta);
  m.impl("adam_preconditioner", &adam_preconditioner_meta);
  m.impl("adam_pilot", &adam_pilot_meta);
  m.impl("sgd_pilot", &sgd_pilot_meta);
}

}  // namespace fastmeta
