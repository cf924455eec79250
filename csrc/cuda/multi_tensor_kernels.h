// Raw CUDA launchers for fastmeta's multi-tensor primitives.
//
// NO torch headers here or in multi_tensor_kernels.cu: the .cu compiles standalone
// with nvcc (`nvcc -c -std=c++17 csrc/cuda/multi_tensor_kernels.cu`).  The torch
// binding (csrc/cuda/fastmeta_cuda.cpp) passes raw device pointers, element counts,
// a dtype code and the current cudaStream_t.
//
// Every launcher works on a list of `n_tensors` tensors given as HOST arrays of
// DEVICE pointers (one entry per tensor) plus a host array of element counts, all
// tensors contiguous and of the same dtype.  Tensors are processed in
// multi_tensor_apply style: work is cut into chunks of kFastmetaChunk elements and
// each kernel launch handles up to kFastmetaMaxTensorsPerLaunch tensors /
// kFastmetaMaxBlocksPerLaunch chunks (the pointers travel in the kernel arguments).
// Math is fp32 for fp16/bf16/fp32 storage and fp64 for fp64 storage.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

#include "../pilot_math.h"  // torch-free elementwise math of the pilot ops (shared with the CPU kernels)

namespace fastmeta_cuda {

enum DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

constexpr int64_t kFastmetaChunk = 65536;           // elements per block (fixed: determinism)
constexpr int kFastmetaMaxTensorsPerLaunch = 36;
constexpr int kFastmetaMaxBlocksPerLaunch = 320;

// Number of chunks (= entries of the partial-sum workspace of dot / norm).
int64_t num_chunks(const int64_t* sizes, int n_tensors);

// tensors[i] += alpha * vectors[i]
cudaError_t add_scaled(void* const* tensors, const void* const* vectors, const int64_t* sizes, int n_tensors,
                       DType dtype, double alpha, cudaStream_t stream);

// out = sum_i <xs[i], ys[i]>, accumulated in float (acc_double = false) or double.
// `partials` is a device workspace of num_chunks(sizes, n) accumulators (float or
// double); `out` a device scalar of the accumulation type.  Deterministic: stage 1
// writes one partial per chunk (fixed in-block tree), stage 2 sums the partials in
// a fixed order with a single block.  ys == nullptr computes sqrt(sum ||xs[i]||^2)
// (the norm) instead.
cudaError_t dot(const void* const* xs, const void* const* ys, const int64_t* sizes, int n_tensors, DType dtype,
                bool acc_double, void* partials, void* out, cudaStream_t stream);

// out[i] = (g_plus[i] - g_minus[i]) * (1 / (2 eps)); out may alias g_plus (elementwise)
cudaError_t central_difference(const void* const* g_plus, const void* const* g_minus, void* const* out,
                               const int64_t* sizes, int n_tensors, DType dtype, double eps, cudaStream_t stream);

// s = exp_avg_sqs[i] (or beta2*s + (1-beta2)*grads[i]^2 when grads != nullptr)
// out[i] = (vectors[i] * scale) / (sqrt(s / bias_correction2) + eps)
cudaError_t adam_preconditioner(const void* const* vectors, const void* const* exp_avg_sqs,
                                const void* const* grads, void* const* out, const int64_t* sizes, int n_tensors,
                                DType dtype, double beta2, double bias_correction2, double eps, double scale,
                                cudaStream_t stream);

// ONE optimizer update, its new state and its exact adjoint (fastmeta::adam_pilot / sgd_pilot),
// elementwise as in csrc/pilot_math.h.  `inputs` / `outputs` are arrays of kAdamPilotInputs /
// kAdamPilotOutputs (kSgdPilot*) HOST arrays of n_tensors device pointers, in the op schema's
// order; an entry may be nullptr: an absent input (no state yet, no vectors, no incoming state
// adjoint: read as 0) or an output not asked for.  The hyper-parameters arrive as the
// host-computed constants (fastmeta_pilot::adam_consts) / the SGD hyper-parameters.
//   adam inputs:  params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, vectors, adj_exp_avgs,
//                 adj_exp_avg_sqs, adj_max_exp_avg_sqs
//   adam outputs: new_params, adj_grads, new_exp_avgs, new_exp_avg_sqs, new_max_exp_avg_sqs, adj_params,
//                 adj_exp_avgs, adj_exp_avg_sqs, adj_max_exp_avg_sqs
//   sgd inputs:   params, grads, momentum_buffers, vectors, adj_momentum_buffers
//   sgd outputs:  new_params, adj_grads, new_momentum_buffers, adj_params, adj_momentum_buffers
constexpr int kAdamPilotInputs = 9, kAdamPilotOutputs = 9;
constexpr int kSgdPilotInputs = 5, kSgdPilotOutputs = 5;

cudaError_t adam_pilot(const void* const* const* inputs, void* const* const* outputs, const int64_t* sizes,
                       int n_tensors, DType dtype, const fastmeta_pilot::AdamConsts& consts, cudaStream_t stream);

cudaError_t sgd_pilot(const void* const* const* inputs, void* const* const* outputs, const int64_t* sizes,
                      int n_tensors, DType dtype, const fastmeta_pilot::SgdHyper& hyper, cudaStream_t stream);

}  // namespace fastmeta_cuda
