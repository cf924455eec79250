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
//   adam_pilot(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, vectors, lr, beta1, beta2, eps,
//              weight_decay, step, decoupled, amsgrad, maximize, exact_jacobian, adj_scale,
//              compute_params, compute_state)
//       -> (new_params, adj_grads, new_exp_avgs, new_exp_avg_sqs, new_max_exp_avg_sqs)
//       ONE Adam/AdamW update (θ', and m', s', ŝ when compute_state) and the exact adjoint of the
//       raw gradient for ∂L/∂θ' = vectors[i] (adj_scale · ±(−lr·D⊙v)), in one pass; the math is
//       csrc/pilot_math.h.  Empty state lists: no state yet (first step); empty vectors: no adjoint.
//   sgd_pilot(params, grads, momentum_buffers, vectors, lr, momentum, dampening, weight_decay,
//             nesterov, maximize, adj_scale, compute_params, compute_state)
//       -> (new_params, adj_grads, new_momentum_buffers): the same for torch.optim.SGD.
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

#include "pilot_math.h"

namespace fastmeta {
namespace {

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

void check_lists(const char* op, const char* na, at::TensorList a, const char* nb, at::TensorList b,
                 bool same_dtype = true) {
  TORCH_CHECK(a.size() == b.size(), "fastmeta::", op, ": ", na, " and ", nb,
              " must have the same length, got ", a.size(), " and ", b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].numel() == b[i].numel(), "fastmeta::", op, ": ", na, "[", i, "] and ", nb, "[", i,
                "] must have the same number of elements, got ", a[i].numel(), " and ", b[i].numel());
    TORCH_CHECK(a[i].device() == b[i].device(), "fastmeta::", op, ": ", na, "[", i, "] and ", nb, "[", i,
                "] are on different devices");
    TORCH_CHECK(!same_dtype || a[i].scalar_type() == b[i].scalar_type(), "fastmeta::", op, ": ", na, "[", i,
                "] and ", nb, "[", i, "] must have the same dtype, got ", a[i].scalar_type(), " and ",
                b[i].scalar_type());
  }
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
// adam_pilot / sgd_pilot: one optimizer update and its Jacobian-vector product
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

// Pointers of one chunk (nullptr: absent input / unwanted output), already offset.
template <typename T>
struct AdamPilotPtrs {
  const T* theta; const T* grad; const T* m; const T* s; const T* smax; const T* v;
  T* theta_new; T* adj; T* m_new; T* s_new; T* s_hat;
};

// Which outputs a call wants (bits): the math of the others is dropped at compile time.
constexpr int kWantParams = 1, kWantAdj = 2, kWantState = 4;

template <typename T, int Want>
FASTMETA_ALWAYS_INLINE void adam_pilot_chunk(const AdamPilotPtrs<T>& p, int64_t n,
                                             const fastmeta_pilot::AdamConsts& consts) {
  using M = typename OpMath<T>::type;
  const fastmeta_pilot::AdamConstsM<M> c(consts);
  alignas(64) M th[kStrip], gr[kStrip], m[kStrip], s[kStrip], mx[kStrip], v[kStrip];
  alignas(64) M o_th[kStrip], o_adj[kStrip], o_m[kStrip], o_s[kStrip], o_mx[kStrip];
  for (int64_t b = 0; b < n; b += kStrip) {
    const int64_t len = std::min(kStrip, n - b);
    load_strip<T, M>(offset(p.theta, b), len, th);
    load_strip<T, M>(offset(p.grad, b), len, gr);
    load_strip<T, M>(offset(p.m, b), len, m);
    load_strip<T, M>(offset(p.s, b), len, s);
    load_strip<T, M>(offset(p.smax, b), len, mx);
    load_strip<T, M>(offset(p.v, b), len, v);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      M theta_new, adj, m_new, s_new, s_hat;
      fastmeta_pilot::adam_element<M>(c, th[i], gr[i], m[i], s[i], mx[i], v[i], theta_new, adj, m_new, s_new,
                                      s_hat);
      if (Want & kWantParams) o_th[i] = theta_new;
      if (Want & kWantAdj) o_adj[i] = adj;
      if (Want & kWantState) {
        o_m[i] = m_new;
        o_s[i] = s_new;
        o_mx[i] = s_hat;
      }
    }
    // (absent outputs have null pointers: the catch-all mode may hold unwanted ones)
    if (Want & kWantParams) store_strip<T, M>(offset(p.theta_new, b), len, o_th);
    if (Want & kWantAdj) store_strip<T, M>(offset(p.adj, b), len, o_adj);
    if (Want & kWantState) {
      store_strip<T, M>(offset(p.m_new, b), len, o_m);
      store_strip<T, M>(offset(p.s_new, b), len, o_s);
      store_strip<T, M>(offset(p.s_hat, b), len, o_mx);
    }
  }
}

template <typename T>
struct SgdPilotPtrs {
  const T* theta; const T* grad; const T* buf; const T* v;
  T* theta_new; T* adj; T* buf_new;
};

template <typename T>
FASTMETA_ALWAYS_INLINE void sgd_pilot_chunk(const SgdPilotPtrs<T>& p, int64_t n,
                                            const fastmeta_pilot::SgdHyper& hyper) {
  using M = typename OpMath<T>::type;
  const fastmeta_pilot::SgdConstsM<M> c(hyper);
  alignas(64) M th[kStrip], gr[kStrip], buf[kStrip], v[kStrip];
  alignas(64) M o_th[kStrip], o_adj[kStrip], o_buf[kStrip];
  for (int64_t b = 0; b < n; b += kStrip) {
    const int64_t len = std::min(kStrip, n - b);
    load_strip<T, M>(offset(p.theta, b), len, th);
    load_strip<T, M>(offset(p.grad, b), len, gr);
    load_strip<T, M>(offset(p.buf, b), len, buf);
    load_strip<T, M>(offset(p.v, b), len, v);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      fastmeta_pilot::sgd_element<M>(c, th[i], gr[i], buf[i], v[i], o_th[i], o_adj[i], o_buf[i]);
    }
    store_strip<T, M>(offset(p.theta_new, b), len, o_th);
    store_strip<T, M>(offset(p.adj, b), len, o_adj);
    store_strip<T, M>(offset(p.buf_new, b), len, o_buf);
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
FASTMETA_ALWAYS_INLINE void adam_pilot_dispatch(const AdamPilotPtrs<T>& p, int64_t n,
                                                const fastmeta_pilot::AdamConsts& c, int want) {
  switch (want) {  // every combination the ops ask for (state alone comes with θ')
    case kWantParams: adam_pilot_chunk<T, kWantParams>(p, n, c); break;
    case kWantAdj: adam_pilot_chunk<T, kWantAdj>(p, n, c); break;
    case kWantParams | kWantAdj: adam_pilot_chunk<T, kWantParams | kWantAdj>(p, n, c); break;
    case kWantParams | kWantState: adam_pilot_chunk<T, kWantParams | kWantState>(p, n, c); break;
    default: adam_pilot_chunk<T, kWantParams | kWantAdj | kWantState>(p, n, c); break;
  }
}

#define FASTMETA_PILOT_CHUNKS(T, ATTRIBUTES)                                                                \
  ATTRIBUTES void adam_pilot_chunk_any(const AdamPilotPtrs<T>& p, int64_t n,                               \
                                       const fastmeta_pilot::AdamConsts& c, int want) {                    \
    adam_pilot_dispatch<T>(p, n, c, want);                                                                  \
  }                                                                                                         \
  ATTRIBUTES void sgd_pilot_chunk_any(const SgdPilotPtrs<T>& p, int64_t n, const fastmeta_pilot::SgdHyper& h) { \
    sgd_pilot_chunk<T>(p, n, h);                                                                            \
  }
FASTMETA_PILOT_CHUNKS(float, FASTMETA_SIMD_CLONES)
FASTMETA_PILOT_CHUNKS(at::Half, FASTMETA_SIMD_CLONES)
FASTMETA_PILOT_CHUNKS(at::BFloat16, FASTMETA_SIMD_CLONES)
FASTMETA_PILOT_CHUNKS(double, )
#undef FASTMETA_PILOT_CHUNKS

// An optional list: empty = absent; otherwise aligned with params (checked).
void check_optional(const char* op, at::TensorList params, const char* name, at::TensorList list) {
  if (!list.empty()) check_lists(op, "params", params, name, list);
}

std::vector<at::Tensor> contiguous_list(at::TensorList a) {
  std::vector<at::Tensor> out;
  out.reserve(a.size());
  for (const auto& t : a) out.push_back(t.contiguous());
  return out;
}

std::vector<at::Tensor> outputs_like(at::TensorList params, bool wanted) {
  std::vector<at::Tensor> out;
  if (!wanted) return out;
  out.reserve(params.size());
  for (const auto& p : params) out.push_back(at::empty_like(p, at::MemoryFormat::Contiguous));
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

void check_adam_pilot_args(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList vectors,
                           double lr, double beta1, double beta2, double eps, int64_t step, bool amsgrad) {
  check_lists(op, "params", params, "grads", grads);
  check_optional(op, params, "exp_avgs", exp_avgs);
  check_optional(op, params, "exp_avg_sqs", exp_avg_sqs);
  check_optional(op, params, "max_exp_avg_sqs", max_exp_avg_sqs);
  check_optional(op, params, "vectors", vectors);
  TORCH_CHECK(amsgrad || max_exp_avg_sqs.empty(), "fastmeta::", op,
              ": max_exp_avg_sqs given but amsgrad is false");
  TORCH_CHECK(step >= 1, "fastmeta::", op, ": step (the step count of the step being taken) must be >= 1, got ",
              step);
  TORCH_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "fastmeta::", op,
              ": beta1 and beta2 must be in [0, 1), got ", beta1, " and ", beta2);
  TORCH_CHECK(std::isfinite(lr) && std::isfinite(eps) && eps >= 0, "fastmeta::", op,
              ": lr must be finite and eps finite and >= 0, got ", lr, " and ", eps);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
adam_pilot_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList vectors, double lr, double beta1, double beta2,
               double eps, double weight_decay, int64_t step, bool decoupled, bool amsgrad, bool maximize,
               bool exact_jacobian, double adj_scale, bool compute_params, bool compute_state) {
  const char* op = "adam_pilot";
  check_adam_pilot_args(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, vectors, lr, beta1, beta2, eps,
                        step, amsgrad);
  check_cpu_floating(op, "params", params);
  const fastmeta_pilot::AdamConsts consts = fastmeta_pilot::adam_consts(
      {lr, beta1, beta2, eps, weight_decay, adj_scale, step, decoupled, amsgrad, maximize, exact_jacobian});
  const bool want_adj = !vectors.empty();
  // θ is read for θ' and for L2 weight decay (g' = ±g + wd·θ) only
  const bool need_theta = compute_params || consts.l2 != 0.0;
  const bool need_m = compute_params || compute_state || (want_adj && exact_jacobian);
  const auto th = need_theta ? contiguous_list(params) : std::vector<at::Tensor>();
  const auto g = contiguous_list(grads);
  const auto m = need_m ? contiguous_list(exp_avgs) : std::vector<at::Tensor>();
  const auto s = contiguous_list(exp_avg_sqs);
  const auto mx = contiguous_list(max_exp_avg_sqs);
  const auto v = contiguous_list(vectors);
  auto o_th = outputs_like(params, compute_params);
  auto o_adj = outputs_like(params, want_adj);
  auto o_m = outputs_like(params, compute_state);
  auto o_s = outputs_like(params, compute_state);
  auto o_mx = outputs_like(params, compute_state && amsgrad);
  const int want = (compute_params ? kWantParams : 0) | (want_adj ? kWantAdj : 0) | (compute_state ? kWantState : 0);
  const auto items = make_items(params);
  if (want == 0) return {o_th, o_adj, o_m, o_s, o_mx};
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Item& it = items[k];
      const int64_t t = it.tensor, b = it.begin;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[t].scalar_type(), "fastmeta::adam_pilot", [&] {
        AdamPilotPtrs<scalar_t> p{ptr_or_null<scalar_t>(th, t, b), ptr_or_null<scalar_t>(g, t, b),
                                  ptr_or_null<scalar_t>(m, t, b), ptr_or_null<scalar_t>(s, t, b),
                                  ptr_or_null<scalar_t>(mx, t, b), ptr_or_null<scalar_t>(v, t, b),
                                  mut_ptr_or_null<scalar_t>(o_th, t, b), mut_ptr_or_null<scalar_t>(o_adj, t, b),
                                  mut_ptr_or_null<scalar_t>(o_m, t, b), mut_ptr_or_null<scalar_t>(o_s, t, b),
                                  mut_ptr_or_null<scalar_t>(o_mx, t, b)};
        adam_pilot_chunk_any(p, it.length, consts, want);
      });
    }
  });
  return {o_th, o_adj, o_m, o_s, o_mx};
}

void check_sgd_pilot_args(const char* op, at::TensorList params, at::TensorList grads,
                          at::TensorList momentum_buffers, at::TensorList vectors, double lr, double momentum) {
  check_lists(op, "params", params, "grads", grads);
  check_optional(op, params, "momentum_buffers", momentum_buffers);
  check_optional(op, params, "vectors", vectors);
  TORCH_CHECK(momentum != 0.0 || momentum_buffers.empty(), "fastmeta::", op,
              ": momentum_buffers given but momentum is 0");
  TORCH_CHECK(std::isfinite(lr) && std::isfinite(momentum), "fastmeta::", op,
              ": lr and momentum must be finite, got ", lr, " and ", momentum);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> sgd_pilot_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList vectors, double lr,
    double momentum, double dampening, double weight_decay, bool nesterov, bool maximize, double adj_scale,
    bool compute_params, bool compute_state) {
  const char* op = "sgd_pilot";
  check_sgd_pilot_args(op, params, grads, momentum_buffers, vectors, lr, momentum);
  check_cpu_floating(op, "params", params);
  const fastmeta_pilot::SgdHyper hyper{lr, momentum, dampening, weight_decay, adj_scale, nesterov, maximize,
                                       momentum_buffers.empty()};
  const bool want_adj = !vectors.empty();
  const bool has_momentum = momentum != 0.0;
  const bool want_state = compute_state && has_momentum;
  const bool need_update = compute_params || want_state;  // the adjoint does not depend on θ, g, buf
  const auto th = (compute_params || (need_update && weight_decay != 0.0)) ? contiguous_list(params)
                                                                          : std::vector<at::Tensor>();
  const auto g = need_update ? contiguous_list(grads) : std::vector<at::Tensor>();
  const auto buf = need_update ? contiguous_list(momentum_buffers) : std::vector<at::Tensor>();
  const auto v = contiguous_list(vectors);
  auto o_th = outputs_like(params, compute_params);
  auto o_adj = outputs_like(params, want_adj);
  auto o_buf = outputs_like(params, want_state);
  const auto items = make_items(params);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Item& it = items[k];
      const int64_t t = it.tensor, b = it.begin;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[t].scalar_type(), "fastmeta::sgd_pilot", [&] {
        SgdPilotPtrs<scalar_t> p{ptr_or_null<scalar_t>(th, t, b), ptr_or_null<scalar_t>(g, t, b),
                                 ptr_or_null<scalar_t>(buf, t, b), ptr_or_null<scalar_t>(v, t, b),
                                 mut_ptr_or_null<scalar_t>(o_th, t, b), mut_ptr_or_null<scalar_t>(o_adj, t, b),
                                 mut_ptr_or_null<scalar_t>(o_buf, t, b)};
        sgd_pilot_chunk_any(p, it.length, hyper);
      });
    }
  });
  return {o_th, o_adj, o_buf};
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

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
adam_pilot_meta(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList vectors, double lr, double beta1, double beta2,
                double eps, double /*weight_decay*/, int64_t step, bool /*decoupled*/, bool amsgrad,
                bool /*maximize*/, bool /*exact_jacobian*/, double /*adj_scale*/, bool compute_params,
                bool compute_state) {
  check_adam_pilot_args("adam_pilot", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, vectors, lr, beta1,
                        beta2, eps, step, amsgrad);
  return {outputs_like(params, compute_params), outputs_like(params, !vectors.empty()),
          outputs_like(params, compute_state), outputs_like(params, compute_state),
          outputs_like(params, compute_state && amsgrad)};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> sgd_pilot_meta(
    at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList vectors, double lr,
    double momentum, double /*dampening*/, double /*weight_decay*/, bool /*nesterov*/, bool /*maximize*/,
    double /*adj_scale*/, bool compute_params, bool compute_state) {
  check_sgd_pilot_args("sgd_pilot", params, grads, momentum_buffers, vectors, lr, momentum);
  return {outputs_like(params, compute_params), outputs_like(params, !vectors.empty()),
          outputs_like(params, compute_state && momentum != 0.0)};
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
      "Tensor[] max_exp_avg_sqs, Tensor[] vectors, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int step, bool decoupled, bool amsgrad, bool maximize, bool exact_jacobian, "
      "float adj_scale, bool compute_params, bool compute_state) -> (Tensor[] new_params, Tensor[] adj_grads, "
      "Tensor[] new_exp_avgs, Tensor[] new_exp_avg_sqs, Tensor[] new_max_exp_avg_sqs)");
  m.def(
      "sgd_pilot(Tensor[] params, Tensor[] grads, Tensor[] momentum_buffers, Tensor[] vectors, float lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, float adj_scale, "
      "bool compute_params, bool compute_state) -> (Tensor[] new_params, Tensor[] adj_grads, "
      "Tensor[] new_momentum_buffers)");
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
