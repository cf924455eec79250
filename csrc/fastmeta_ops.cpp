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
#include <utility>
#include <vector>

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
}

TORCH_LIBRARY_IMPL(fastmeta, CPU, m) {
  m.impl("add_scaled_", &add_scaled_cpu);
  m.impl("dot", &dot_cpu);
  m.impl("norm", &norm_cpu);
  m.impl("central_difference", &central_difference_cpu);
  m.impl("central_difference_", &central_difference_inplace_cpu);
  m.impl("adam_preconditioner", &adam_preconditioner_cpu);
}

TORCH_LIBRARY_IMPL(fastmeta, Meta, m) {
  m.impl("add_scaled_", &add_scaled_meta);
  m.impl("dot", &dot_meta);
  m.impl("norm", &norm_meta);
  m.impl("central_difference", &central_difference_meta);
  m.impl("central_difference_", &central_difference_inplace_meta);
  m.impl("adam_preconditioner", &adam_preconditioner_meta);
}

}  // namespace fastmeta
