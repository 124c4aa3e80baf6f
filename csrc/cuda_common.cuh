// Helpers shared by the CUDA kernels of zygote_torch (ops_cuda_rows.cu, ops_cuda_misc.cu).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>

#include "common.h"

namespace zt {
namespace {


template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T> constexpr int kVec = 16 / sizeof(T);

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
inline int num_sms() {
  int dev = 0, v = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
  return v;
}
inline int pow2ceil(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 20)) p <<= 1;
  return p;
}
inline int clampi(int v, int lo, int hi) { return std::max(lo, std::min(hi, v)); }

__device__ __forceinline__ float d_exp(float v) { return expf(v); }
__device__ __forceinline__ double d_exp(double v) { return exp(v); }
__device__ __forceinline__ float d_log(float v) { return logf(v); }
__device__ __forceinline__ double d_log(double v) { return log(v); }
__device__ __forceinline__ float d_rsqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double d_rsqrt(double v) { return rsqrt(v); }
__device__ __forceinline__ float d_erf(float v) { return erff(v); }
__device__ __forceinline__ double d_erf(double v) { return erf(v); }
__device__ __forceinline__ float d_tanh(float v) { return tanhf(v); }
__device__ __forceinline__ double d_tanh(double v) { return tanh(v); }

template <typename A> __device__ __forceinline__ A neg_inf() { return -std::numeric_limits<A>::infinity(); }

// Sum of K values over the blockDim.x threads of one row (threadIdx.y = row slot); every thread
// of the row gets the result. smem: blockDim.y * (blockDim.x / 32) * K values. Must be called by
// all threads of the block (it synchronises when a row spans several warps).
template <typename A, int K>
__device__ __forceinline__ void row_sum(A (&v)[K], A* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
  }
  const int nw = blockDim.x >> 5;
  if (nw <= 1) return;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  A* s = smem + threadIdx.y * nw * K;
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) s[w * K + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    A t = 0;
    for (int i = 0; i < nw; ++i) t += s[i * K + k];
    v[k] = t;
  }
}

}  // namespace
}  // namespace zt
