// Device helpers shared by the kernels: float <-> storage conversion, vectorised loads and stores, block sums.
// Pure CUDA (no torch headers), so each .cu compiles on its own: nvcc -arch=sm_90 -Xptxas -v -c file.cu
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <initializer_list>

#include "launchers.h"

namespace miro {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);  // round to nearest even
}

// VEC elements moved as one aligned transaction (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(pack.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

// Sums K values over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the totals.
// `red` is shared scratch of 32 * K floats. The leading barrier lets callers reuse `red` in a loop.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K], float* red) {
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) red[warp * K + k] = v[k];
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = 0.f;
    for (int w = 0; w < num_warps; ++w) v[k] += red[w * K + k];
  }
}

// ---- host side ----

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether rows of D elements can move as 16-byte vectors: D, every row stride (in elements) and every pointer
// (null ones skipped) must allow it.
inline bool vectorizable(DType dtype, int64_t D, std::initializer_list<const void*> ptrs,
                         std::initializer_list<int64_t> strides = {}) {
  const int64_t vec = dtype == DType::kBFloat16 ? 8 : 4;
  if (D % vec) return false;
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return false;
  for (int64_t s : strides)
    if (s % vec) return false;
  return true;
}

template <typename T_, int VEC_> struct Config {
  using T = T_;
  static constexpr int VEC = VEC_;
};

// Calls launch(Config<T, VEC>{}) for the storage type: 16-byte vectors (VEC = 16 / sizeof(T)) or scalars.
template <typename F>
cudaError_t dispatch(DType dtype, bool vectorize, F&& launch) {
  if (dtype == DType::kBFloat16)
    return vectorize ? launch(Config<__nv_bfloat16, 8>{}) : launch(Config<__nv_bfloat16, 1>{});
  return vectorize ? launch(Config<float, 4>{}) : launch(Config<float, 1>{});
}

inline int threads_for(int64_t vectors_per_row, int max_threads) {
  int64_t t = (vectors_per_row + 31) / 32 * 32;
  return static_cast<int>(t < 32 ? 32 : (t > max_threads ? max_threads : t));
}

// An attribute of the current device, queried once per device (a race only writes the same value twice).
template <cudaDeviceAttr ATTR>
int device_attribute() {
  static int cache[64] = {};
  int device = 0, value = 0;
  cudaGetDevice(&device);
  if (device < 64 && cache[device]) return cache[device];
  cudaDeviceGetAttribute(&value, ATTR, device);
  if (device < 64) cache[device] = value;
  return value;
}

inline int sm_count() {
  const int count = device_attribute<cudaDevAttrMultiProcessorCount>();
  return count > 0 ? count : 1;
}

}  // namespace miro
