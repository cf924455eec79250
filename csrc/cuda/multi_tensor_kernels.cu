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
// pilot kernels: one optimizer update, its state and its exact adjoint (pilot_math.h)
// ------------------------------------------------------------------------- //
// lists: inputs then outputs; a null address = absent input (read as 0) / unwanted output
constexpr int kAdamPilotDepth = kAdamPilotInputs + kAdamPilotOutputs;
constexpr int kSgdPilotDepth = kSgdPilotInputs + kSgdPilotOutputs;
constexpr int kAdamPilotMaxTensors = 12;
constexpr int kSgdPilotMaxTensors = 20;
static_assert(sizeof(TensorListMeta<kAdamPilotDepth, kAdamPilotMaxTensors>) + sizeof(fastmeta_pilot::AdamConsts) <=
                  4000,
              "kernel arguments too large");
static_assert(sizeof(TensorListMeta<kSgdPilotDepth, kSgdPilotMaxTensors>) + sizeof(fastmeta_pilot::SgdHyper) <= 4000,
              "kernel arguments too large");

template <typename T>
__device__ __forceinline__ typename MathOf<T>::type load_or_zero(const T* p, int64_t i) {
  return p != nullptr ? load(p, i) : typename MathOf<T>::type(0);
}

template <typename T>
__device__ __forceinline__ T* chunk_ptr(void* base, int64_t begin) {
  return base != nullptr ? static_cast<T*>(base) + begin : nullptr;
}

template <typename T, typename M>
__device__ __forceinline__ void store_if(T* p, int64_t i, M x) {
  if (p != nullptr) store(p, i, x);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    adam_pilot_kernel(TensorListMeta<kAdamPilotDepth, kAdamPilotMaxTensors> meta, fastmeta_pilot::AdamConsts consts) {
  using M = typename MathOf<T>::type;
  int tensor; int64_t begin, length;
  block_range(meta, tensor, begin, length);
  const fastmeta_pilot::AdamConstsM<M> c(consts);
  const T* x[kAdamPilotInputs];
  T* y[kAdamPilotOutputs];
#pragma unroll
  for (int k = 0; k < kAdamPilotInputs; ++k) x[k] = chunk_ptr<T>(meta.addresses[k][tensor], begin);
#pragma unroll
  for (int k = 0; k < kAdamPilotOutputs; ++k) y[k] = chunk_ptr<T>(meta.addresses[kAdamPilotInputs + k][tensor], begin);
  for (int64_t i = threadIdx.x; i < length; i += kThreads) {
    const fastmeta_pilot::AdamIn<M> in{load_or_zero(x[0], i), load_or_zero(x[1], i), load_or_zero(x[2], i),
                                       load_or_zero(x[3], i), load_or_zero(x[4], i), load_or_zero(x[5], i),
                                       load_or_zero(x[6], i), load_or_zero(x[7], i), load_or_zero(x[8], i)};
    fastmeta_pilot::AdamOut<M> o;
    fastmeta_pilot::adam_element<M>(c, in, o);
    store_if(y[0], i, o.theta_new);
    store_if(y[1], i, o.adj_grad);
    store_if(y[2], i, o.m_new);
    store_if(y[3], i, o.s_new);
    store_if(y[4], i, o.s_hat);
    store_if(y[5], i, o.adj_theta);
    store_if(y[6], i, o.adj_m);
    store_if(y[7], i, o.adj_s);
    store_if(y[8], i, o.adj_smax);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sgd_pilot_kernel(TensorListMeta<kSgdPilotDepth, kSgdPilotMaxTensors> meta, fastmeta_pilot::SgdHyper hyper) {
  using M = typename MathOf<T>::type;
  int tensor; int64_t begin, length;
  block_range(meta, tensor, begin, length);
  const fastmeta_pilot::SgdConstsM<M> c(hyper);
  const T* x[kSgdPilotInputs];
  T* y[kSgdPilotOutputs];
#pragma unroll
  for (int k = 0; k < kSgdPilotInputs; ++k) x[k] = chunk_ptr<T>(meta.addresses[k][tensor], begin);
#pragma unroll
  for (int k = 0; k < kSgdPilotOutputs; ++k) y[k] = chunk_ptr<T>(meta.addresses[kSgdPilotInputs + k][tensor], begin);
  for (int64_t i = threadIdx.x; i < length; i += kThreads) {
    const fastmeta_pilot::SgdIn<M> in{load_or_zero(x[0], i), load_or_zero(x[1], i), load_or_zero(x[2], i),
                                      load_or_zero(x[3], i), load_or_zero(x[4], i)};
    fastmeta_pilot::SgdOut<M> o;
    fastmeta_pilot::sgd_element<M>(c, in, o);
    store_if(y[0], i, o.theta_new);
    store_if(y[1], i, o.adj_grad);
    store_if(y[2], i, o.buf_new);
    store_if(y[3], i, o.adj_theta);
    store_if(y[4], i, o.adj_buf);
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

// The launchers' lists: the given host arrays, a host array of n_tensors null pointers for an absent one.
template <int N>
static void pilot_lists(const void* const* const* inputs, void* const* const* outputs, int n_in,
                        const std::vector<const void*>& nulls, const void* const* (&lists)[N]) {
  for (int k = 0; k < N; ++k) {
    const void* const* list = k < n_in ? inputs[k] : reinterpret_cast<const void* const*>(outputs[k - n_in]);
    lists[k] = list != nullptr ? list : nulls.data();
  }
}

cudaError_t adam_pilot(const void* const* const* inputs, void* const* const* outputs, const int64_t* sizes,
                       int n_tensors, DType dtype, const fastmeta_pilot::AdamConsts& consts, cudaStream_t stream) {
  if (n_tensors <= 0) return cudaSuccess;
  const std::vector<const void*> nulls(static_cast<size_t>(n_tensors), nullptr);
  const void* const* lists[kAdamPilotDepth];
  pilot_lists<kAdamPilotDepth>(inputs, outputs, kAdamPilotInputs, nulls, lists);
  FASTMETA_DISPATCH(dtype, {
    return multi_tensor_apply<kAdamPilotDepth, kAdamPilotMaxTensors>(
        lists, sizes, n_tensors,
        [&](const TensorListMeta<kAdamPilotDepth, kAdamPilotMaxTensors>& meta, int blocks) {
          adam_pilot_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(meta, consts);
        });
  });
  return cudaSuccess;
}

cudaError_t sgd_pilot(const void* const* const* inputs, void* const* const* outputs, const int64_t* sizes,
                      int n_tensors, DType dtype, const fastmeta_pilot::SgdHyper& hyper, cudaStream_t stream) {
  if (n_tensors <= 0) return cudaSuccess;
  const std::vector<const void*> nulls(static_cast<size_t>(n_tensors), nullptr);
  const void* const* lists[kSgdPilotDepth];
  pilot_lists<kSgdPilotDepth>(inputs, outputs, kSgdPilotInputs, nulls, lists);
  FASTMETA_DISPATCH(dtype, {
    return multi_tensor_apply<kSgdPilotDepth, kSgdPilotMaxTensors>(
        lists, sizes, n_tensors,
        [&](const TensorListMeta<kSgdPilotDepth, kSgdPilotMaxTensors>& meta, int blocks) {
          sgd_pilot_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(meta, hyper);
        });
  });
  return cudaSuccess;
}

}  // namespace fastmeta_cuda
