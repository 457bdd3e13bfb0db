// Fused gated residual of an adaLN-Zero block:  out = x + gate[b] * y.
//
// Two storage types: T for x and out (and dout), U for gate and y (and dy); under bf16 autocast the residual stream
// x is float32 while gate and y come out of bf16 Linear layers, and eager PyTorch would add them in float32 too.
//
// Forward: one block per token row (and column tile), one read of x and y, one write of out.
// Backward: dx = dout needs no kernel; dy = dout * gate[b] is written while each thread sums dout * y over a chunk of
// tokens for its columns in registers, one partial sum per chunk (sum_chunks.cu finishes dgate = sum_N dout * y).
#include "common.cuh"

namespace miro {
namespace {

constexpr int kThreads = 256;

template <typename T, typename U, int VEC>
__global__ void __launch_bounds__(kThreads) gated_residual_fwd_kernel(GatedResidualFwd a) {
  const int64_t nvec = a.D / VEC, v = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (v >= nvec) return;
  const int64_t row = blockIdx.x, b = row / a.N, offset = row * a.D + v * VEC;
  float x[VEC], g[VEC], y[VEC], out[VEC];
  load<T, VEC>(static_cast<const T*>(a.x) + offset, x);
  load<U, VEC>(static_cast<const U*>(a.gate) + b * a.gate_stride + v * VEC, g);
  load<U, VEC>(static_cast<const U*>(a.y) + offset, y);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = x[i] + g[i] * y[i];
  store<T, VEC>(static_cast<T*>(a.out) + offset, out);
}

template <typename T, typename U, int VEC>
__global__ void __launch_bounds__(kThreads) gated_residual_bwd_kernel(GatedResidualBwd a) {
  const int64_t nvec = a.D / VEC, v = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (v >= nvec) return;
  const int64_t R = a.rows_per_chunk, chunks = (a.N + R - 1) / R;
  const int64_t b = blockIdx.x / chunks, c = blockIdx.x % chunks;
  const int64_t n0 = c * R, n1 = min(a.N, n0 + R);
  float g[VEC], acc[VEC];
  load<U, VEC>(static_cast<const U*>(a.gate) + b * a.gate_stride + v * VEC, g);
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t offset = (b * a.N + n) * a.D + v * VEC;
    float dout[VEC], y[VEC], dy[VEC];
    load<T, VEC>(static_cast<const T*>(a.dout) + offset, dout);
    load<U, VEC>(static_cast<const U*>(a.y) + offset, y);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      dy[i] = dout[i] * g[i];
      acc[i] += dout[i] * y[i];
    }
    store<U, VEC>(static_cast<U*>(a.dy) + offset, dy);
  }
  float* part = a.part_gate + (b * chunks + c) * a.D + v * VEC;
#pragma unroll
  for (int i = 0; i < VEC; ++i) part[i] = acc[i];
}

template <typename T, typename U, int VEC>
cudaError_t fwd_typed(const GatedResidualFwd& a, cudaStream_t stream) {
  const int threads = threads_for(a.D / VEC, kThreads);
  const dim3 grid(a.B * a.N, (a.D / VEC + threads - 1) / threads);
  gated_residual_fwd_kernel<T, U, VEC><<<grid, threads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, typename U, int VEC>
cudaError_t bwd_typed(const GatedResidualBwd& a, cudaStream_t stream) {
  const int threads = threads_for(a.D / VEC, kThreads);
  const dim3 grid(a.B * ((a.N + a.rows_per_chunk - 1) / a.rows_per_chunk), (a.D / VEC + threads - 1) / threads);
  gated_residual_bwd_kernel<T, U, VEC><<<grid, threads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T_, typename U_, int VEC_> struct Config2 {
  using T = T_;
  using U = U_;
  static constexpr int VEC = VEC_;
};

// Elements per vector for a pair of storage types: 16 bytes of the wider one (8 bf16 when both are bf16, else 4).
inline int64_t vector_width(DType a, DType b) {
  return a == DType::kBFloat16 && b == DType::kBFloat16 ? 8 : 4;
}

// Calls launch(Config2<T, U, VEC>{}) for two storage types (vector_width elements per vector, or scalars).
template <typename F>
cudaError_t dispatch2(DType a, DType b, bool vectorize, F&& launch) {
  using bf16 = __nv_bfloat16;
  if (a == DType::kBFloat16 && b == DType::kBFloat16)
    return vectorize ? launch(Config2<bf16, bf16, 8>{}) : launch(Config2<bf16, bf16, 1>{});
  if (a == DType::kBFloat16) return vectorize ? launch(Config2<bf16, float, 4>{}) : launch(Config2<bf16, float, 1>{});
  if (b == DType::kBFloat16) return vectorize ? launch(Config2<float, bf16, 4>{}) : launch(Config2<float, bf16, 1>{});
  return vectorize ? launch(Config2<float, float, 4>{}) : launch(Config2<float, float, 1>{});
}

// Whether both types move as vectors of vector_width elements: each pointer aligned to its type's vector size.
bool vectorizable(DType t, DType u, int64_t D, std::initializer_list<const void*> t_ptrs,
                  std::initializer_list<const void*> u_ptrs, int64_t gate_stride) {
  const int64_t vec = vector_width(t, u);
  const int t_bytes = vec * (t == DType::kBFloat16 ? 2 : 4), u_bytes = vec * (u == DType::kBFloat16 ? 2 : 4);
  if (D % vec || gate_stride % vec) return false;
  for (const void* p : t_ptrs)
    if (reinterpret_cast<uintptr_t>(p) % t_bytes) return false;
  for (const void* p : u_ptrs)
    if (reinterpret_cast<uintptr_t>(p) % u_bytes) return false;
  return true;
}

}  // namespace

cudaError_t launch_gated_residual_fwd(const GatedResidualFwd& a, cudaStream_t stream) {
  if (a.B * a.N == 0 || a.D == 0) return cudaSuccess;
  const bool vec = vectorizable(a.dtype, a.branch_dtype, a.D, {a.x, a.out}, {a.gate, a.y}, a.gate_stride);
  return dispatch2(a.dtype, a.branch_dtype, vec, [&](auto c) {
    using C = decltype(c);
    return fwd_typed<typename C::T, typename C::U, C::VEC>(a, stream);
  });
}

cudaError_t launch_gated_residual_bwd(const GatedResidualBwd& a, cudaStream_t stream) {
  if (a.B * a.N == 0 || a.D == 0) return cudaSuccess;
  const bool vec = vectorizable(a.dtype, a.branch_dtype, a.D, {a.dout}, {a.gate, a.y, a.dy}, a.gate_stride);
  return dispatch2(a.dtype, a.branch_dtype, vec, [&](auto c) {
    using C = decltype(c);
    return bwd_typed<typename C::T, typename C::U, C::VEC>(a, stream);
  });
}

}  // namespace miro
