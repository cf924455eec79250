// CUDA kernels and raw launchers for fastmeta's multi-tensor primitives.
// No torch headers (see multi_tensor_kernels.h): compiles standalone with
//   nvcc -c -std=c++17 -o /tmp/x.o csrc/cuda/multi_tensor_kernels.cu
#include "multi_tensor_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace fastmeta_cuda {
namespace {

constexpr int kThreads = 512;        // threads per block (fixed: determinism of reductions)
constexpr int kFinalThreads = 512;   // threads of the single-block final reduction

// ------------------------------------------------------------------------- //
// storage <-> math conversions: fp32 math for fp16/bf16/fp32, fp64 for fp64
// ------------------------------------------------------------------------- //
template <typename T> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };

__device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double load(const double* p, int64_t i) { return p[i]; }

__device__ __forceinline__ void store(__half* p, int64_t i, float x) { p[i] = __float2half_rn(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float x) { p[i] = __float2bfloat16_rn(x); }
__device__ __forceinline__ void store(float* p, int64_t i, float x) { p[i] = x; }
__device__ __forceinline__ void store(double* p, int64_t i, double x) { p[i] = x; }

// ------------------------------------------------------------------------- //
// multi_tensor_apply: the tensor pointers and the block -> (tensor, chunk) map
// travel in the kernel arguments (< 4 KiB).
// ------------------------------------------------------------------------- //
template <int Depth, int MaxTensors = kFastmetaMaxTensorsPerLaunch>
struct TensorListMeta {
  void* addresses[Depth][MaxTensors];
  int64_t sizes[MaxTensors];
  unsigned char block_to_tensor[kFastmetaMaxBlocksPerLaunch];
  int block_to_chunk[kFastmetaMaxBlocksPerLaunch];
  int64_t first_global_chunk;  // global chunk index of this launch's block 0
};
static_assert(sizeof(TensorListMeta<4>) <= 4000, "kernel argument too large");

// Calls launch(meta, n_blocks) for consecutive groups of chunks, in global chunk order.
template <int Depth, int MaxTensors = kFastmetaMaxTensorsPerLaunch, typename Launch>
cudaError_t multi_tensor_apply(const void* const* const lists[Depth], const int64_t* sizes, int n_tensors,
                               Launch launch) {
  TensorListMeta<Depth, MaxTensors> meta;
  meta.first_global_chunk = 0;
  int n_in_launch = 0, n_blocks = 0;
  int64_t global_chunk = 0;
  for (int t = 0; t < n_tensors; ++t) {
    if (sizes[t] <= 0) continue;
    for (int d = 0; d < Depth; ++d) meta.addresses[d][n_in_launch] = const_cast<void*>(lists[d][t]);
    meta.sizes[n_in_launch] = sizes[t];
    ++n_in_launch;
    const int64_t chunks = (sizes[t] + kFastmetaChunk - 1) / kFastmetaChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[n_blocks] = static_cast<unsigned char>(n_in_launch - 1);
      meta.block_to_chunk[n_blocks] = static_cast<int>(c);
      ++n_blocks;
      ++global_chunk;
      const bool last_chunk = (c == chunks - 1);
      const bool tensors_full = (n_in_launch == MaxTensors) && last_chunk;
      const bool blocks_full = (n_blocks == kFastmetaMaxBlocksPerLaunch);
      if (tensors_full || blocks_full) {
        launch(meta, n_blocks);
        cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        n_blocks = 0;
        meta.first_global_chunk = global_chunk;
        if (last_chunk) {
          n_in_launch = 0;
        } else {  // the current tensor continues in the next launch, as entry 0
          for (int d = 0; d < Depth; ++d) meta.addresses[d][0] = meta.addresses[d][n_in_launch - 1];
          meta.sizes[0] = meta.sizes[n_in_launch - 1];
          n_in_launch = 1;
        }
      }
    }
  }
  if (n_blocks > 0) {
    launch(meta, n_blocks);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

template <int Depth, int MaxTensors>
__device__ __forceinline__ void block_range(const TensorListMeta<Depth, MaxTensors>& meta, int& tensor,
                                            int64_t& begin, int64_t& length) {
  tensor = meta.block_to_tensor[blockIdx.x];
  begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kFastmetaChunk;
  const int64_t rest = meta.sizes[tensor] - begin;
  length = rest < kFastmetaChunk ? rest : kFastmetaChunk;
}

// ------------------------------------------------------------------------- //
// kernels
// ------------------------------------------------------------------------- //
template <typename T>
__global__ void __launch_bounds__(kThreads) add_scaled_kernel(TensorListMeta<2> meta, double alpha_d) {
  using M = typename MathOf<T>::type;
  int tensor; int64_t begin, length;
  block_range(meta, tensor, begin, length);
  T* p = static_cast<T*>(meta.addresses[0][tensor]) + begin;
  const T* v = static_cast<const T*>(meta.addresses[1][tensor]) + begin;
  const M alpha = static_cast<M>(alpha_d);
  for (int64_t i = threadIdx.x; i < length; i += kThreads) store(p, i, load(p, i) + alpha * load(v, i));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) central_difference_kernel(TensorListMeta<3> meta, double inv_d) {
  using M = typename MathOf<T>::type;
  int tensor; int64_t begin, length;
  block_range(meta, tensor, begin, length);
  const T* gp = static_cast<const T*>(meta.addresses[0][tensor]) + begin;
  const T* gm = static_cast<const T*>(meta.addresses[1][tensor]) + begin;
  T* out = static_cast<T*>(meta.addresses[2][tensor]) + begin;
  const M inv = static_cast<M>(inv_d);
  for (int64_t i = threadIdx.x; i < length; i += kThreads) store(out, i, (load(gp, i) - load(gm, i)) * inv);
}

template <typename T, bool WithGrads>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(TensorListMeta<4> meta, double beta2_d, double bc2_d, double eps_d, double scale_d) {
  using M = typename MathOf<T>::type;
  int tensor; int64_t begin, length;
  block_range(meta, tensor, begin, length);
  const T* v = static_cast<const T*>(meta.addresses[0][tensor]) + begin;
  const T* s = static_cast<const T*>(meta.addresses[1][tensor]) + begin;
  const T* g = static_cast<const T*>(meta.addresses[2][tensor]) + begin;
  T* out = static_cast<T*>(meta.addresses[3][tensor]) + begin;
  const M beta2 = static_cast<M>(beta2_d), one_minus_beta2 = static_cast<M>(1.0 - beta2_d);
  const M bc2 = static_cast<M>(bc2_d), eps = static_cast<M>(eps_d), scale = static_cast<M>(scale_d);
  for (int64_t i = threadIdx.x; i < length; i += kThreads) {
    M si = load(s, i);
    if (WithGrads) {
      const M gi = load(g, i);
      si = si * beta2 + (gi * gi) * one_minus_beta2;
    }
    store(out, i, (load(v, i) * scale) / (sqrt(si / bc2) + eps));
  }
}

// ------------------------------------------------------------------------- //
// pilot kernels: one optimizer update + its Jacobian-vector product (pilot_math.h)
// ------------------------------------------------------------------------- //
// lists: inputs then outputs; a null address = absent input (read as 0) / unwanted output
constexpr int kAdamPilotDepth = 11;  // theta, grad, m, s, smax, v | theta', adj, m', s', s_hat
constexpr int kSgdPilotDepth = 7;    // theta, grad, buf, v | theta', adj, buf'
constexpr int kPilotMaxTensors = 20;
static_assert(sizeof(TensorListMeta<kAdamPilotDepth, kPilotMaxTensors>) + sizeof(fastmeta_pilot::AdamConsts) <= 4000,
              "kernel arguments too large");
static_assert(sizeof(TensorListMeta<kSgdPilotDepth, kPilotMaxTensors>) + sizeof(fastmeta_pilot::SgdHyper) <= 4000,
              "kernel arguments too large");

template <typename T>
__device__ __forceinline__ typename MathOf<T>::type load_or_zero(const T* p, int64_t i) {
  return p != nullptr ? load(p, i) : typename MathOf<T>::type(0);
}

template <typename T>
__device__ __forceinline__ T* chunk_ptr(void* base, int64_t begin) {
  return base != nullptr ? static_cast<T*>(base) + begin : nullptr;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    adam_pilot_kernel(TensorListMeta<kAdamPilotDepth, kPilotMaxTensors> meta, fastmeta_pilot::AdamConsts consts) {
  using M = typename MathOf<T>::type;
  int tensor; int64_t begin, length;
  block_range(meta, tensor, begin, length);
  const fastmeta_pilot::AdamConstsM<M> c(consts);
  const T* th = chunk_ptr<T>(meta.addresses[0][tensor], begin);
  const T* gr = chunk_ptr<T>(meta.addresses[1][tensor], begin);
  const T* m = chunk_ptr<T>(meta.addresses[2][tensor], begin);
  const T* s = chunk_ptr<T>(meta.addresses[3][tensor], begin);
  const T* mx = chunk_ptr<T>(meta.addresses[4][tensor], begin);
  const T* v = chunk_ptr<T>(meta.addresses[5][tensor], begin);
  T* o_th = chunk_ptr<T>(meta.addresses[6][tensor], begin);
  T* o_adj = chunk_ptr<T>(meta.addresses[7][tensor], begin);
  T* o_m = chunk_ptr<T>(meta.addresses[8][tensor], begin);
  T* o_s = chunk_ptr<T>(meta.addresses[9][tensor], begin);
  T* o_mx = chunk_ptr<T>(meta.addresses[10][tensor], begin);
  for (int64_t i = threadIdx.x; i < length; i += kThreads) {
    M theta_new, adj, m_new, s_new, s_hat;
    fastmeta_pilot::adam_element<M>(c, load_or_zero(th, i), load_or_zero(gr, i), load_or_zero(m, i),
                                    load_or_zero(s, i), load_or_zero(mx, i), load_or_zero(v, i), theta_new, adj,
                                    m_new, s_new, s_hat);
    if (o_th != nullptr) store(o_th, i, theta_new);
    if (o_adj != nullptr) store(o_adj, i, adj);
    if (o_m != nullptr) store(o_m, i, m_new);
    if (o_s != nullptr) store(o_s, i, s_new);
    if (o_mx != nullptr) store(o_mx, i, s_hat);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sgd_pilot_kernel(TensorListMeta<kSgdPilotDepth, kPilotMaxTensors> meta, fastmeta_pilot::SgdHyper hyper) {
  using M = typename MathOf<T>::type;
  int tensor; int64_t begin, length;
  block_range(meta, tensor, begin, length);
  const fastmeta_pilot::SgdConstsM<M> c(hyper);
  const T* th = chunk_ptr<T>(meta.addresses[0][tensor], begin);
  const T* gr = chunk_ptr<T>(meta.addresses[1][tensor], begin);
  const T* buf = chunk_ptr<T>(meta.addresses[2][tensor], begin);
  const T* v = chunk_ptr<T>(meta.addresses[3][tensor], begin);
  T* o_th = chunk_ptr<T>(meta.addresses[4][tensor], begin);
  T* o_adj = chunk_ptr<T>(meta.addresses[5][tensor], begin);
  T* o_buf = chunk_ptr<T>(meta.addresses[6][tensor], begin);
  for (int64_t i = threadIdx.x; i < length; i += kThreads) {
    M theta_new, adj, buf_new;
    fastmeta_pilot::sgd_element<M>(c, load_or_zero(th, i), load_or_zero(gr, i), load_or_zero(buf, i),
                                   load_or_zero(v, i), theta_new, adj, buf_new);
    if (o_th != nullptr) store(o_th, i, theta_new);
    if (o_adj != nullptr) store(o_adj, i, adj);
    if (o_buf != nullptr) store(o_buf, i, buf_new);
  }
}

// fixed-shape tree reduction of one value per thread (deterministic)
template <typename A, int Threads>
__device__ __forceinline__ A block_sum(A value, A* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
#pragma unroll
  for (int w = Threads / 2; w >= 1; w >>= 1) {
    if (threadIdx.x < w) shared[threadIdx.x] += shared[threadIdx.x + w];
    __syncthreads();
  }
  return shared[0];
}

// stage 1: one partial sum per chunk, written at its global chunk index
template <typename T, typename A, bool Square>
__global__ void __launch_bounds__(kThreads) dot_partial_kernel(TensorListMeta<2> meta, A* partials) {
  __shared__ A shared[kThreads];
  int tensor; int64_t begin, length;
  block_range(meta, tensor, begin, length);
  const T* x = static_cast<const T*>(meta.addresses[0][tensor]) + begin;
  const T* y = Square ? x : static_cast<const T*>(meta.addresses[1][tensor]) + begin;
  A acc = A(0);
  for (int64_t i = threadIdx.x; i < length; i += kThreads) {
    acc += static_cast<A>(load(x, i)) * static_cast<A>(load(y, i));
  }
  const A total = block_sum<A, kThreads>(acc, shared);
  if (threadIdx.x == 0) partials[meta.first_global_chunk + blockIdx.x] = total;
}

// stage 2: one block sums all partials in a fixed order
template <typename A, bool Sqrt>
__global__ void __launch_bounds__(kFinalThreads) final_sum_kernel(const A* partials, int64_t n, A* out) {
  __shared__ A shared[kFinalThreads];
  A acc = A(0);
  for (int64_t i = threadIdx.x; i < n; i += kFinalThreads) acc += partials[i];
  const A total = block_sum<A, kFinalThreads>(acc, shared);
  if (threadIdx.x == 0) *out = Sqrt ? sqrt(total) : total;
}

// ------------------------------------------------------------------------- //
// dtype dispatch
// ------------------------------------------------------------------------- //
#define FASTMETA_DISPATCH(dtype, ...)                                   \
  switch (dtype) {                                                      \
    case kFloat16: { using scalar_t = __half; __VA_ARGS__; break; }     \
    case kBFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; } \
    case kFloat32: { using scalar_t = float; __VA_ARGS__; break; }      \
    case kFloat64: { using scalar_t = double; __VA_ARGS__; break; }     \
    default: return cudaErrorInvalidValue;                              \
  }

template <typename T, typename A>
cudaError_t dot_typed(const void* const* xs, const void* const* ys, const int64_t* sizes, int n_tensors,
                      A* partials, A* out, cudaStream_t stream) {
  const int64_t chunks = num_chunks(sizes, n_tensors);
  const bool square = (ys == nullptr);
  const void* const* lists[2] = {xs, square ? xs : ys};
  cudaError_t err;
  if (square) {
    err = multi_tensor_apply<2>(lists, sizes, n_tensors, [&](const TensorListMeta<2>& meta, int blocks) {
      dot_partial_kernel<T, A, true><<<blocks, kThreads, 0, stream>>>(meta, partials);
    });
  } else {
    err = multi_tensor_apply<2>(lists, sizes, n_tensors, [&](const TensorListMeta<2>& meta, int blocks) {
      dot_partial_kernel<T, A, false><<<blocks, kThreads, 0, stream>>>(meta, partials);
    });
  }
  if (err != cudaSuccess) return err;
  if (square) {
    final_sum_kernel<A, true><<<1, kFinalThreads, 0, stream>>>(partials, chunks, out);
  } else {
    final_sum_kernel<A, false><<<1, kFinalThreads, 0, stream>>>(partials, chunks, out);
  }
  return cudaGetLastError();
}

}  // namespace

int64_t num_chunks(const int64_t* sizes, int n_tensors) {
  int64_t chunks = 0;
  for (int t = 0; t < n_tensors; ++t)
    if (sizes[t] > 0) chunks += (sizes[t] + kFastmetaChunk - 1) / kFastmetaChunk;
  return chunks;
}

cudaError_t add_scaled(void* const* tensors, const void* const* vectors, const int64_t* sizes, int n_tensors,
                       DType dtype, double alpha, cudaStream_t stream) {
  const void* const* lists[2] = {reinterpret_cast<const void* const*>(tensors), vectors};
  FASTMETA_DISPATCH(dtype, {
    return multi_tensor_apply<2>(lists, sizes, n_tensors, [&](const TensorListMeta<2>& meta, int blocks) {
      add_scaled_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(meta, alpha);
    });
  });
  return cudaSuccess;
}

cudaError_t dot(const void* const* xs, const void* const* ys, const int64_t* sizes, int n_tensors, DType dtype,
                bool acc_double, void* partials, void* out, cudaStream_t stream) {
  FASTMETA_DISPATCH(dtype, {
    if (acc_double) {
      return dot_typed<scalar_t, double>(xs, ys, sizes, n_tensors, static_cast<double*>(partials),
                                         static_cast<double*>(out), stream);
    }
    return dot_typed<scalar_t, float>(xs, ys, sizes, n_tensors, static_cast<float*>(partials),
                                      static_cast<float*>(out), stream);
  });
  return cudaSuccess;
}

cudaError_t central_difference(const void* const* g_plus, const void* const* g_minus, void* const* out,
                               const int64_t* sizes, int n_tensors, DType dtype, double eps, cudaStream_t stream) {
  const void* const* lists[3] = {g_plus, g_minus, reinterpret_cast<const void* const*>(out)};
  const double inv = 1.0 / (2.0 * eps);
  FASTMETA_DISPATCH(dtype, {
    return multi_tensor_apply<3>(lists, sizes, n_tensors, [&](const TensorListMeta<3>& meta, int blocks) {
      central_difference_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(meta, inv);
    });
  });
  return cudaSuccess;
}

cudaError_t adam_preconditioner(const void* const* vectors, const void* const* exp_avg_sqs,
                                const void* const* grads, void* const* out, const int64_t* sizes, int n_tensors,
                                DType dtype, double beta2, double bias_correction2, double eps, double scale,
                                cudaStream_t stream) {
  const bool with_grads = (grads != nullptr);
  // without gradients, slot 2 repeats exp_avg_sqs (never read)
  const void* const* lists[4] = {vectors, exp_avg_sqs, with_grads ? grads : exp_avg_sqs,
                                 reinterpret_cast<const void* const*>(out)};
  FASTMETA_DISPATCH(dtype, {
    return multi_tensor_apply<4>(lists, sizes, n_tensors, [&](const TensorListMeta<4>& meta, int blocks) {
      if (with_grads) {
        adam_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(meta, beta2, bias_correction2, eps, scale);
      } else {
        adam_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(meta, beta2, bias_correction2, eps, scale);
      }
    });
  });
  return cudaSuccess;
}

// A host array of n_tensors null pointers stands for an absent list.
static const void* const* or_nulls(const void* const* list, const std::vector<const void*>& nulls) {
  return list != nullptr ? list : nulls.data();
}

cudaError_t adam_pilot(const void* const* params, const void* const* grads, const void* const* exp_avgs,
                       const void* const* exp_avg_sqs, const void* const* max_exp_avg_sqs,
                       const void* const* vectors, void* const* new_params, void* const* adj_grads,
                       void* const* new_exp_avgs, void* const* new_exp_avg_sqs, void* const* new_max_exp_avg_sqs,
                       const int64_t* sizes, int n_tensors, DType dtype, const fastmeta_pilot::AdamConsts& consts,
                       cudaStream_t stream) {
  if (n_tensors <= 0) return cudaSuccess;
  const std::vector<const void*> nulls(static_cast<size_t>(n_tensors), nullptr);
  const void* const* lists[kAdamPilotDepth] = {
      or_nulls(params, nulls), or_nulls(grads, nulls), or_nulls(exp_avgs, nulls), or_nulls(exp_avg_sqs, nulls),
      or_nulls(max_exp_avg_sqs, nulls), or_nulls(vectors, nulls),
      or_nulls(reinterpret_cast<const void* const*>(new_params), nulls),
      or_nulls(reinterpret_cast<const void* const*>(adj_grads), nulls),
      or_nulls(reinterpret_cast<const void* const*>(new_exp_avgs), nulls),
      or_nulls(reinterpret_cast<const void* const*>(new_exp_avg_sqs), nulls),
      or_nulls(reinterpret_cast<const void* const*>(new_max_exp_avg_sqs), nulls)};
  FASTMETA_DISPATCH(dtype, {
    return multi_tensor_apply<kAdamPilotDepth, kPilotMaxTensors>(
        lists, sizes, n_tensors,
        [&](const TensorListMeta<kAdamPilotDepth, kPilotMaxTensors>& meta, int blocks) {
          adam_pilot_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(meta, consts);
        });
  });
  return cudaSuccess;
}

cudaError_t sgd_pilot(const void* const* params, const void* const* grads, const void* const* momentum_buffers,
                      const void* const* vectors, void* const* new_params, void* const* adj_grads,
                      void* const* new_momentum_buffers, const int64_t* sizes, int n_tensors, DType dtype,
                      const fastmeta_pilot::SgdHyper& hyper, cudaStream_t stream) {
  if (n_tensors <= 0) return cudaSuccess;
  const std::vector<const void*> nulls(static_cast<size_t>(n_tensors), nullptr);
  const void* const* lists[kSgdPilotDepth] = {
      or_nulls(params, nulls), or_nulls(grads, nulls), or_nulls(momentum_buffers, nulls), or_nulls(vectors, nulls),
      or_nulls(reinterpret_cast<const void* const*>(new_params), nulls),
      or_nulls(reinterpret_cast<const void* const*>(adj_grads), nulls),
      or_nulls(reinterpret_cast<const void* const*>(new_momentum_buffers), nulls)};
  FASTMETA_DISPATCH(dtype, {
    return multi_tensor_apply<kSgdPilotDepth, kPilotMaxTensors>(
        lists, sizes, n_tensors,
        [&](const TensorListMeta<kSgdPilotDepth, kPilotMaxTensors>& meta, int blocks) {
          sgd_pilot_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(meta, hyper);
        });
  });
  return cudaSuccess;
}

}  // namespace fastmeta_cuda
