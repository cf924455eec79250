// torch binding of fastmeta's CUDA multi-tensor primitives:
// TORCH_LIBRARY_IMPL(fastmeta, CUDA, m).  Built only where CUDA torch is installed
// (fastmeta/_extension.py); the schemas live in csrc/fastmeta_ops.cpp and the raw
// kernels/launchers in csrc/cuda/multi_tensor_kernels.cu (torch-free).
//
// Every op: checks the lists, makes inputs contiguous, runs on the current CUDA
// stream of the tensors' device, dispatches the dtype to the launcher's enum.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "list_checks.h"
#include "multi_tensor_kernels.h"

namespace fastmeta {
namespace {

using lists::check_lists;
using lists::check_optional;
using lists::outputs_like;

fastmeta_cuda::DType dtype_code(const char* op, at::ScalarType st) {
  switch (st) {
    case at::kHalf: return fastmeta_cuda::kFloat16;
    case at::kBFloat16: return fastmeta_cuda::kBFloat16;
    case at::kFloat: return fastmeta_cuda::kFloat32;
    case at::kDouble: return fastmeta_cuda::kFloat64;
    default: TORCH_CHECK(false, "fastmeta::", op, ": unsupported dtype ", st,
                         " (expected float16, bfloat16, float32 or float64)");
  }
  return fastmeta_cuda::kFloat32;  // unreachable
}

void check_cuda(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "fastmeta::", op, ": CUDA error: ", cudaGetErrorString(err));
}

// The launchers take one dtype per call: group tensor indices by dtype (in order).
std::vector<std::vector<size_t>> group_by_dtype(at::TensorList ref) {
  std::vector<std::vector<size_t>> groups;
  std::vector<at::ScalarType> keys;
  for (size_t i = 0; i < ref.size(); ++i) {
    size_t g = 0;
    while (g < keys.size() && keys[g] != ref[i].scalar_type()) ++g;
    if (g == keys.size()) {
      keys.push_back(ref[i].scalar_type());
      groups.emplace_back();
    }
    groups[g].push_back(i);
  }
  return groups;
}

void check_device(const char* op, const char* name, at::TensorList a) {
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].is_cuda(), "fastmeta::", op, ": ", name, "[", i, "] must be a CUDA tensor");
    TORCH_CHECK(a[i].device() == a[0].device(), "fastmeta::", op, ": ", name, "[", i,
                "] is on another device than ", name, "[0]");
  }
}

std::vector<at::Tensor> contiguous(at::TensorList a) {
  std::vector<at::Tensor> out;
  out.reserve(a.size());
  for (const auto& t : a) out.push_back(t.contiguous());
  return out;
}

void add_scaled_cuda(at::TensorList tensors, at::TensorList vectors, double alpha) {
  check_device("add_scaled_", "tensors", tensors);
  check_lists("add_scaled_", "tensors", tensors, "vectors", vectors);
  if (tensors.empty()) return;
  for (size_t i = 0; i < tensors.size(); ++i)
    TORCH_CHECK(tensors[i].is_contiguous(), "fastmeta::add_scaled_: tensors[", i, "] must be contiguous");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const auto vecs = contiguous(vectors);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (const auto& group : group_by_dtype(tensors)) {
    std::vector<void*> p;
    std::vector<const void*> v;
    std::vector<int64_t> sizes;
    for (size_t i : group) {
      p.push_back(tensors[i].data_ptr());
      v.push_back(vecs[i].data_ptr());
      sizes.push_back(tensors[i].numel());
    }
    check_cuda("add_scaled_", fastmeta_cuda::add_scaled(p.data(), v.data(), sizes.data(),
                                                        static_cast<int>(p.size()),
                                                        dtype_code("add_scaled_", tensors[group[0]].scalar_type()),
                                                        alpha, stream));
  }
}

// Shared body of dot and norm (ys empty -> norm)
at::Tensor reduce_cuda(const char* op, at::TensorList xs, at::TensorList ys, bool is_norm, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "fastmeta::", op,
              ": dtype must be float32 or float64, got ", dtype);
  check_device(op, "xs", xs);
  if (!is_norm) check_lists(op, "xs", xs, "ys", ys);
  TORCH_CHECK(!xs.empty(), "fastmeta::", op, ": xs must not be empty on CUDA (the Python layer returns 0)");
  const c10::cuda::CUDAGuard guard(xs[0].device());
  const auto options = at::TensorOptions().dtype(dtype).device(xs[0].device());
  const auto xc = contiguous(xs);
  const auto yc = is_norm ? std::vector<at::Tensor>() : contiguous(ys);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const bool acc_double = (dtype == at::kDouble);
  // one (dot) or one-per-dtype (then summed in a fixed order) sum of squares / products
  const auto groups = group_by_dtype(xs);
  std::vector<at::Tensor> per_group;
  for (const auto& group : groups) {
    std::vector<const void*> x, y;
    std::vector<int64_t> sizes;
    for (size_t i : group) {
      x.push_back(xc[i].data_ptr());
      if (!is_norm) y.push_back(yc[i].data_ptr());
      sizes.push_back(xc[i].numel());
    }
    const int64_t chunks = fastmeta_cuda::num_chunks(sizes.data(), static_cast<int>(sizes.size()));
    auto partials = at::empty({std::max<int64_t>(chunks, 1)}, options);
    auto out = at::empty({}, options);
    // with several dtype groups the square root is taken after summing the groups
    const bool single_norm = is_norm && groups.size() == 1;
    check_cuda(op, fastmeta_cuda::dot(x.data(), single_norm ? nullptr : (is_norm ? x.data() : y.data()),
                                      sizes.data(), static_cast<int>(sizes.size()),
                                      dtype_code(op, xs[group[0]].scalar_type()), acc_double,
                                      partials.data_ptr(), out.data_ptr(), stream));
    per_group.push_back(out);
  }
  if (per_group.size() == 1) return per_group[0];
  at::Tensor total = per_group[0];
  for (size_t g = 1; g < per_group.size(); ++g) total = total + per_group[g];
  return is_norm ? total.sqrt() : total;
}

at::Tensor dot_cuda(at::TensorList xs, at::TensorList ys, at::ScalarType dtype) {
  return reduce_cuda("dot", xs, ys, /*is_norm=*/false, dtype);
}

at::Tensor norm_cuda(at::TensorList xs, at::ScalarType dtype) {
  return reduce_cuda("norm", xs, at::TensorList(), /*is_norm=*/true, dtype);
}

std::vector<at::Tensor> central_difference_cuda(at::TensorList g_plus, at::TensorList g_minus, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "fastmeta::central_difference: eps must be finite and > 0, got ", eps);
  check_device("central_difference", "g_plus", g_plus);
  check_lists("central_difference", "g_plus", g_plus, "g_minus", g_minus);
  std::vector<at::Tensor> out;
  for (const auto& g : g_plus) out.push_back(at::empty_like(g, at::MemoryFormat::Contiguous));
  if (g_plus.empty()) return out;
  const c10::cuda::CUDAGuard guard(g_plus[0].device());
  const auto gp = contiguous(g_plus), gm = contiguous(g_minus);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (const auto& group : group_by_dtype(g_plus)) {
    std::vector<const void*> a, b;
    std::vector<void*> o;
    std::vector<int64_t> sizes;
    for (size_t i : group) {
      a.push_back(gp[i].data_ptr());
      b.push_back(gm[i].data_ptr());
      o.push_back(out[i].data_ptr());
      sizes.push_back(gp[i].numel());
    }
    check_cuda("central_difference",
               fastmeta_cuda::central_difference(a.data(), b.data(), o.data(), sizes.data(),
                                                 static_cast<int>(sizes.size()),
                                                 dtype_code("central_difference", g_plus[group[0]].scalar_type()),
                                                 eps, stream));
  }
  return out;
}

void central_difference_inplace_cuda(at::TensorList g_plus, at::TensorList g_minus, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "fastmeta::central_difference_: eps must be finite and > 0, got ", eps);
  check_device("central_difference_", "g_plus", g_plus);
  check_lists("central_difference_", "g_plus", g_plus, "g_minus", g_minus);
  if (g_plus.empty()) return;
  for (size_t i = 0; i < g_plus.size(); ++i)
    TORCH_CHECK(g_plus[i].is_contiguous(), "fastmeta::central_difference_: g_plus[", i, "] must be contiguous");
  const c10::cuda::CUDAGuard guard(g_plus[0].device());
  const auto gm = contiguous(g_minus);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (const auto& group : group_by_dtype(g_plus)) {
    std::vector<const void*> a, b;
    std::vector<void*> o;
    std::vector<int64_t> sizes;
    for (size_t i : group) {
      a.push_back(g_plus[i].data_ptr());
      b.push_back(gm[i].data_ptr());
      o.push_back(g_plus[i].data_ptr());  // elementwise: out aliasing g_plus is safe
      sizes.push_back(g_plus[i].numel());
    }
    check_cuda("central_difference_",
               fastmeta_cuda::central_difference(a.data(), b.data(), o.data(), sizes.data(),
                                                 static_cast<int>(sizes.size()),
                                                 dtype_code("central_difference_", g_plus[group[0]].scalar_type()),
                                                 eps, stream));
  }
}

std::vector<at::Tensor> adam_preconditioner_cuda(at::TensorList vectors, at::TensorList exp_avg_sqs,
                                                 at::TensorList grads, double beta2, double bias_correction2,
                                                 double eps, double scale) {
  TORCH_CHECK(bias_correction2 > 0, "fastmeta::adam_preconditioner: bias_correction2 must be > 0, got ",
              bias_correction2);
  check_device("adam_preconditioner", "vectors", vectors);
  check_lists("adam_preconditioner", "vectors", vectors, "exp_avg_sqs", exp_avg_sqs);
  const bool with_grads = !grads.empty();
  if (with_grads) check_lists("adam_preconditioner", "vectors", vectors, "grads", grads);
  std::vector<at::Tensor> out;
  for (const auto& v : vectors) out.push_back(at::empty_like(v, at::MemoryFormat::Contiguous));
  if (vectors.empty()) return out;
  const c10::cuda::CUDAGuard guard(vectors[0].device());
  const auto v = contiguous(vectors), s = contiguous(exp_avg_sqs);
  const auto g = with_grads ? contiguous(grads) : std::vector<at::Tensor>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (const auto& group : group_by_dtype(vectors)) {
    std::vector<const void*> vp, sp, gp;
    std::vector<void*> op;
    std::vector<int64_t> sizes;
    for (size_t i : group) {
      vp.push_back(v[i].data_ptr());
      sp.push_back(s[i].data_ptr());
      if (with_grads) gp.push_back(g[i].data_ptr());
      op.push_back(out[i].data_ptr());
      sizes.push_back(v[i].numel());
    }
    check_cuda("adam_preconditioner",
               fastmeta_cuda::adam_preconditioner(
                   vp.data(), sp.data(), with_grads ? gp.data() : nullptr, op.data(), sizes.data(),
                   static_cast<int>(sizes.size()),
                   dtype_code("adam_preconditioner", vectors[group[0]].scalar_type()), beta2, bias_correction2,
                   eps, scale, stream));
  }
  return out;
}

// ------------------------------------------------------------------------- //
// adam_pilot / sgd_pilot (the math: csrc/pilot_math.h)
// ------------------------------------------------------------------------- //
// The data pointers of list[i] for i in group (an empty vector for an absent list).
template <typename P>
std::vector<P> pointers(const std::vector<at::Tensor>& list, const std::vector<size_t>& group) {
  std::vector<P> out;
  if (list.empty()) return out;
  out.reserve(group.size());
  for (size_t i : group) out.push_back(list[i].data_ptr());
  return out;
}

template <typename P>
P* data_or_null(std::vector<P>& v) {
  return v.empty() ? nullptr : v.data();
}

using AdamPilotResult = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                   std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                   std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;
using SgdPilotResult = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                                  std::vector<at::Tensor>, std::vector<at::Tensor>>;

// Runs a pilot launcher once per dtype group: `in`/`out` hold the op's lists in schema order
// (an empty vector: absent / not asked for).
template <int NIn, int NOut, typename Launch>
void launch_pilot(const char* op, at::TensorList params, const std::vector<at::Tensor> (&in)[NIn],
                  std::vector<at::Tensor> (&out)[NOut], Launch launch) {
  for (const auto& group : group_by_dtype(params)) {
    std::vector<const void*> p_in[NIn];
    std::vector<void*> p_out[NOut];
    const void* const* in_ptrs[NIn];
    void* const* out_ptrs[NOut];
    for (int k = 0; k < NIn; ++k) {
      p_in[k] = pointers<const void*>(in[k], group);
      in_ptrs[k] = data_or_null(p_in[k]);
    }
    for (int k = 0; k < NOut; ++k) {
      p_out[k] = pointers<void*>(out[k], group);
      out_ptrs[k] = data_or_null(p_out[k]);
    }
    std::vector<int64_t> sizes;
    for (size_t i : group) sizes.push_back(params[i].numel());
    check_cuda(op, launch(in_ptrs, out_ptrs, sizes, dtype_code(op, params[group[0]].scalar_type())));
  }
}

AdamPilotResult adam_pilot_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList vectors,
                                at::TensorList adj_exp_avgs, at::TensorList adj_exp_avg_sqs,
                                at::TensorList adj_max_exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                                double weight_decay, int64_t step, bool decoupled, bool amsgrad, bool maximize,
                                bool exact_jacobian, double adj_scale, bool compute_params, bool compute_state,
                                bool compute_adj_params, bool compute_adj_state) {
  const char* op = "adam_pilot";
  check_device(op, "params", params);
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
  const bool want_adj = !vectors.empty();
  TORCH_CHECK(want_adj || (adj_exp_avgs.empty() && adj_exp_avg_sqs.empty() && adj_max_exp_avg_sqs.empty() &&
                           !compute_adj_params && !compute_adj_state),
              "fastmeta::", op, ": adjoints (incoming state adjoints, compute_adj_params, compute_adj_state) need "
              "vectors");
  TORCH_CHECK(step >= 1, "fastmeta::", op, ": step (the step count of the step being taken) must be >= 1, got ",
              step);
  TORCH_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "fastmeta::", op,
              ": beta1 and beta2 must be in [0, 1), got ", beta1, " and ", beta2);
  TORCH_CHECK(std::isfinite(lr) && std::isfinite(eps) && eps >= 0, "fastmeta::", op,
              ": lr must be finite and eps finite and >= 0, got ", lr, " and ", eps);
  // which outputs (as the CPU and Meta kernels: csrc/fastmeta_ops.cpp adam_wanted)
  const bool adj_state = want_adj && compute_adj_state;
  std::vector<at::Tensor> out[fastmeta_cuda::kAdamPilotOutputs] = {
      outputs_like(params, compute_params),
      outputs_like(params, want_adj),
      outputs_like(params, compute_state),
      outputs_like(params, compute_state),
      outputs_like(params, compute_state && amsgrad),
      outputs_like(params, want_adj && compute_adj_params),
      outputs_like(params, adj_state),
      outputs_like(params, adj_state && exact_jacobian),
      outputs_like(params, adj_state && exact_jacobian && amsgrad && !max_exp_avg_sqs.empty())};
  auto result = [&] { return AdamPilotResult{out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8]}; };
  if (params.empty() || !(compute_params || want_adj || compute_state)) return result();
  const c10::cuda::CUDAGuard guard(params[0].device());
  const fastmeta_pilot::AdamConsts consts = fastmeta_pilot::adam_consts(
      {lr, beta1, beta2, eps, weight_decay, adj_scale, step, decoupled, amsgrad, maximize, exact_jacobian});
  const std::vector<at::Tensor> in[fastmeta_cuda::kAdamPilotInputs] = {
      contiguous(params),       contiguous(grads),           contiguous(exp_avgs),
      contiguous(exp_avg_sqs),  contiguous(max_exp_avg_sqs), contiguous(vectors),
      contiguous(adj_exp_avgs), contiguous(adj_exp_avg_sqs), contiguous(adj_max_exp_avg_sqs)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  launch_pilot(op, params, in, out, [&](const void* const* const* x, void* const* const* y,
                                        const std::vector<int64_t>& sizes, fastmeta_cuda::DType dtype) {
    return fastmeta_cuda::adam_pilot(x, y, sizes.data(), static_cast<int>(sizes.size()), dtype, consts, stream);
  });
  return result();
}

SgdPilotResult sgd_pilot_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                              at::TensorList vectors, at::TensorList adj_momentum_buffers, double lr, double momentum,
                              double dampening, double weight_decay, bool nesterov, bool maximize, double adj_scale,
                              bool compute_params, bool compute_state, bool compute_adj_params,
                              bool compute_adj_state) {
  const char* op = "sgd_pilot";
  check_device(op, "params", params);
  check_lists(op, "params", params, "grads", grads);
  check_optional(op, params, "momentum_buffers", momentum_buffers);
  check_optional(op, params, "vectors", vectors);
  check_optional(op, params, "adj_momentum_buffers", adj_momentum_buffers);
  TORCH_CHECK(momentum != 0.0 || (momentum_buffers.empty() && adj_momentum_buffers.empty()), "fastmeta::", op,
              ": momentum_buffers / adj_momentum_buffers given but momentum is 0");
  const bool want_adj = !vectors.empty();
  TORCH_CHECK(want_adj || (adj_momentum_buffers.empty() && !compute_adj_params && !compute_adj_state),
              "fastmeta::", op, ": adjoints (adj_momentum_buffers, compute_adj_params, compute_adj_state) need vectors");
  TORCH_CHECK(std::isfinite(lr) && std::isfinite(momentum), "fastmeta::", op,
              ": lr and momentum must be finite, got ", lr, " and ", momentum);
  const bool has_momentum = momentum != 0.0;
  const bool first = momentum_buffers.empty();
  std::vector<at::Tensor> out[fastmeta_cuda::kSgdPilotOutputs] = {
      outputs_like(params, compute_params), outputs_like(params, want_adj),
      outputs_like(params, compute_state && has_momentum), outputs_like(params, want_adj && compute_adj_params),
      outputs_like(params, want_adj && compute_adj_state && has_momentum && !first)};
  auto result = [&] { return SgdPilotResult{out[0], out[1], out[2], out[3], out[4]}; };
  if (params.empty() || !(compute_params || want_adj || (compute_state && has_momentum))) return result();
  const c10::cuda::CUDAGuard guard(params[0].device());
  const fastmeta_pilot::SgdHyper hyper{lr, momentum, dampening, weight_decay, adj_scale, nesterov, maximize, first};
  const std::vector<at::Tensor> in[fastmeta_cuda::kSgdPilotInputs] = {
      contiguous(params), contiguous(grads), contiguous(momentum_buffers), contiguous(vectors),
      contiguous(adj_momentum_buffers)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  launch_pilot(op, params, in, out, [&](const void* const* const* x, void* const* const* y,
                                        const std::vector<int64_t>& sizes, fastmeta_cuda::DType dtype) {
    return fastmeta_cuda::sgd_pilot(x, y, sizes.data(), static_cast<int>(sizes.size()), dtype, hyper, stream);
  });
  return result();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmeta, CUDA, m) {
  m.impl("add_scaled_", &add_scaled_cuda);
  m.impl("dot", &dot_cuda);
  m.impl("norm", &norm_cuda);
  m.impl("central_difference", &central_difference_cuda);
  m.impl("central_difference_", &central_difference_inplace_cuda);
  m.impl("adam_preconditioner", &adam_preconditioner_cuda);
  m.impl("adam_pilot", &adam_pilot_cuda);
  m.impl("sgd_pilot", &sgd_pilot_cuda);
}

}  // namespace fastmeta
