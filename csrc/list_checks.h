// Tensor-list helpers shared by fastmeta's two torch bindings: the CPU one
// (csrc/fastmeta_ops.cpp: schemas, CPU and Meta kernels) and the CUDA one
// (csrc/cuda/fastmeta_cuda.cpp).  One home for the list checks and their messages.
// Needs ATen: include it from the bindings only, never from a .cu file or pilot_math.h.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fastmeta {
namespace lists {

// b must match a element by element: same length, numel, device and (unless same_dtype=false) dtype.
inline void check_lists(const char* op, const char* na, at::TensorList a, const char* nb, at::TensorList b,
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

// An optional list: empty = absent; otherwise aligned with params (checked).
inline void check_optional(const char* op, at::TensorList params, const char* name, at::TensorList list) {
  if (!list.empty()) check_lists(op, "params", params, name, list);
}

// One contiguous output like each of params, or none when the output is not wanted.
inline std::vector<at::Tensor> outputs_like(at::TensorList params, bool wanted) {
  std::vector<at::Tensor> out;
  if (!wanted) return out;
  out.reserve(params.size());
  for (const auto& p : params) out.push_back(at::empty_like(p, at::MemoryFormat::Contiguous));
  return out;
}

}  // namespace lists
}  // namespace fastmeta
