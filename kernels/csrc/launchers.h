// The interface between the torch bindings (ops.cpp) and the CUDA kernels (*.cu): raw pointers, sizes, a dtype
// tag and the stream. Every launcher returns cudaGetLastError() after its launches.
//
// Layout conventions (checked in ops.cpp): x, y, dy, dx are contiguous (B, N, D) rows; the per-sample vectors
// shift, scale, gate are (B, D) with unit column stride and any row stride (chunks of the adaLN output, or 0 for a
// broadcast vector); weight is a contiguous (D,). Computation is in float32 whatever the storage type.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace miro {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1 };

struct NormModulateFwd {
  const void* x; const void* shift; const void* scale; const void* weight;  // weight may be null
  void* y; float* mean; float* rstd;                                         // mean, rstd: (B * N,) float32
  int64_t B, N, D, shift_stride, scale_stride;
  bool rms; float eps; DType dtype;
};

struct NormModulateBwd {
  const void* dy; const void* x; const void* scale; const void* weight;     // weight may be null
  const float* mean; const float* rstd;
  void* dx;
  float* part_shift; float* part_scale;  // (B, chunks, D) float32: per-chunk sums of dy and dy * xhat over tokens
  int64_t B, N, D, scale_stride, rows_per_chunk;
  bool rms; DType dtype;
};

// The gated residual takes two storage types: `dtype` for x and out (the residual stream, float32 under bf16
// autocast) and `branch_dtype` for gate and y (and dy): the outputs of bf16 Linear layers under autocast.
struct GatedResidualFwd {
  const void* x; const void* gate; const void* y; void* out;
  int64_t B, N, D, gate_stride; DType dtype, branch_dtype;
};

struct GatedResidualBwd {
  const void* dout; const void* gate; const void* y;  // dout in dtype; gate, y in branch_dtype
  void* dy; float* part_gate;  // dy in branch_dtype; (B, chunks, D) float32: per-chunk sums of dout * y over tokens
  int64_t B, N, D, gate_stride, rows_per_chunk; DType dtype, branch_dtype;
};

struct SwiGLU {
  const void* h; const void* dout;  // h (rows, 2H) = [a | b]; dout (rows, H), backward only
  void* out;                        // forward: (rows, H) = silu(a) * b; backward: dh (rows, 2H)
  int64_t rows, H; DType dtype;
};

// out[b, d] = (sum over chunks c of part[b, c, d]) * (mul ? mul[d] : 1), stored in dtype (mul has dtype too).
struct SumChunks {
  const float* part; const void* mul; void* out;
  int64_t B, chunks, D; DType dtype;
};

cudaError_t launch_norm_modulate_fwd(const NormModulateFwd& a, cudaStream_t stream);
cudaError_t launch_norm_modulate_bwd(const NormModulateBwd& a, cudaStream_t stream);
int64_t norm_modulate_max_width();  // widest D the kernels take on the current device

cudaError_t launch_gated_residual_fwd(const GatedResidualFwd& a, cudaStream_t stream);
cudaError_t launch_gated_residual_bwd(const GatedResidualBwd& a, cudaStream_t stream);

cudaError_t launch_swiglu_fwd(const SwiGLU& a, cudaStream_t stream);
cudaError_t launch_swiglu_bwd(const SwiGLU& a, cudaStream_t stream);

cudaError_t launch_sum_chunks(const SumChunks& a, cudaStream_t stream);
// Tokens per chunk for the backward kernels that reduce over tokens (chunks = ceil(N / rows_per_chunk)).
int64_t rows_per_chunk(int64_t B, int64_t N);

}  // namespace miro
