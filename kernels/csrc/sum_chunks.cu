// The second stage of every reduction over tokens: per-chunk partial sums (B, chunks, D) -> (B, D) gradients.
#include "common.cuh"

namespace miro {
namespace {

template <typename T, bool HAS_MUL>
__global__ void sum_chunks_kernel(SumChunks a) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;  // (b, d) flattened
  if (i >= a.B * a.D) return;
  const int64_t b = i / a.D, d = i % a.D;
  const float* part = a.part + b * a.chunks * a.D + d;
  float sum = 0.f;
  for (int64_t c = 0; c < a.chunks; ++c) sum += part[c * a.D];  // fixed order: deterministic
  if (HAS_MUL) sum *= to_float(static_cast<const T*>(a.mul)[d]);
  static_cast<T*>(a.out)[i] = from_float<T>(sum);
}

template <typename T>
cudaError_t sum_chunks_typed(const SumChunks& a, cudaStream_t stream) {
  const int threads = 256;
  const int64_t blocks = (a.B * a.D + threads - 1) / threads;
  auto kernel = a.mul ? sum_chunks_kernel<T, true> : sum_chunks_kernel<T, false>;
  kernel<<<blocks, threads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sum_chunks(const SumChunks& a, cudaStream_t stream) {
  if (a.B * a.D == 0) return cudaSuccess;
  return dispatch(a.dtype, false, [&](auto c) {
    using C = decltype(c);
    return sum_chunks_typed<typename C::T>(a, stream);
  });
}

// About 8 blocks per SM in all: enough to fill the GPU, few enough that the partial sums (B x chunks x D floats,
// written once and read once) stay small next to the (B, N, D) activations.
int64_t rows_per_chunk(int64_t B, int64_t N) {
  if (B <= 0 || N <= 0) return 1;
  int64_t chunks = (8LL * sm_count() + B - 1) / B;
  chunks = chunks < 1 ? 1 : (chunks > N ? N : chunks);
  return (N + chunks - 1) / chunks;
}

}  // namespace miro
