// Fused norm + adaLN modulation:  y = norm(x) [* weight] * (1 + scale[b]) + shift[b],  norm = LayerNorm or RMSNorm
// over D without affine terms, statistics in float32.
//
// Forward: one block per token row. The row is read once into shared memory (each thread keeps its own columns
// there, so no barrier is needed to reuse them), the mean and variance come from two exact passes over it, and
// the modulated row is written once. mean and rstd (1 / sqrt(var + eps)) are saved for the backward.
// Backward: one block per chunk of rows of one sample. With xhat = (x - mean) * rstd and g = dy * (1 + scale) * w,
//   dx = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat))        (RMSNorm: without the mean_D(g) term)
// and the per-sample gradients are sums over tokens, accumulated per column in shared memory and written as one
// partial sum per chunk (sum_chunks.cu finishes them):
//   dshift = sum_N dy,   dscale = w * sum_N dy * xhat,   dweight = sum_B (1 + scale) * sum_N dy * xhat.
#include "common.cuh"

namespace miro {
namespace {

constexpr int kMaxThreads = 512;
// The backward's shared memory: 5 columns of D floats (acc_dy, acc_dyx, mod, gs, xh), then block_sum<2>'s scratch.
constexpr int64_t kBwdColumns = 5, kBwdScratch = 2 * 32;

template <typename T, int VEC, bool RMS, bool HAS_W>
__global__ void __launch_bounds__(kMaxThreads) norm_modulate_fwd_kernel(NormModulateFwd a) {
  extern __shared__ float smem[];  // [D] this thread's columns of the row (element i of vector v at i * nvec + v)
  float* xs = smem;
  float* red = smem + a.D;         // [32] block_sum scratch
  const int64_t D = a.D, nvec = D / VEC, row = blockIdx.x, b = row / a.N;
  const T* x = static_cast<const T*>(a.x) + row * D;

  float sum[1] = {0.f};
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    float f[VEC];
    load<T, VEC>(x + v * VEC, f);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      xs[i * nvec + v] = f[i];
      sum[0] += f[i];
    }
  }
  float mean = 0.f;
  if (!RMS) {
    block_sum(sum, red);
    mean = sum[0] / D;
  }
  float sq[1] = {0.f};
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x)
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float c = xs[i * nvec + v] - mean;
      sq[0] += c * c;
    }
  block_sum(sq, red);
  const float rstd = rsqrtf(sq[0] / D + a.eps);
  if (threadIdx.x == 0) {
    a.mean[row] = mean;
    a.rstd[row] = rstd;
  }

  const T* shift = static_cast<const T*>(a.shift) + b * a.shift_stride;
  const T* scale = static_cast<const T*>(a.scale) + b * a.scale_stride;
  T* y = static_cast<T*>(a.y) + row * D;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    float sh[VEC], sc[VEC], w[VEC], out[VEC];
    load<T, VEC>(shift + v * VEC, sh);
    load<T, VEC>(scale + v * VEC, sc);
    if (HAS_W) load<T, VEC>(static_cast<const T*>(a.weight) + v * VEC, w);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float n = (xs[i * nvec + v] - mean) * rstd;
      if (HAS_W) n *= w[i];
      out[i] = n * (1.f + sc[i]) + sh[i];
    }
    store<T, VEC>(y + v * VEC, out);
  }
}

template <typename T, int VEC, bool RMS, bool HAS_W>
__global__ void __launch_bounds__(kMaxThreads) norm_modulate_bwd_kernel(NormModulateBwd a) {
  // Thread-private columns in shared memory: running sums of dy and dy * xhat, the factor (1 + scale) * w, and
  // this row's g and xhat; then the block_sum scratch.
  extern __shared__ float smem[];
  const int64_t D = a.D, nvec = D / VEC, R = a.rows_per_chunk, chunks = (a.N + R - 1) / R;
  float *acc_dy = smem, *acc_dyx = smem + D, *mod = smem + 2 * D, *gs = smem + 3 * D, *xh = smem + 4 * D;
  float* red = smem + kBwdColumns * D;
  const int64_t b = blockIdx.x / chunks, c = blockIdx.x % chunks;
  const int64_t n0 = c * R, n1 = min(a.N, n0 + R);

  const T* scale = static_cast<const T*>(a.scale) + b * a.scale_stride;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    float sc[VEC], w[VEC];
    load<T, VEC>(scale + v * VEC, sc);
    if (HAS_W) load<T, VEC>(static_cast<const T*>(a.weight) + v * VEC, w);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      mod[i * nvec + v] = (1.f + sc[i]) * (HAS_W ? w[i] : 1.f);
      acc_dy[i * nvec + v] = 0.f;
      acc_dyx[i * nvec + v] = 0.f;
    }
  }

  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row = b * a.N + n;
    const float mean = a.mean[row], rstd = a.rstd[row];
    const T* dy = static_cast<const T*>(a.dy) + row * D;
    const T* x = static_cast<const T*>(a.x) + row * D;
    float s[2] = {0.f, 0.f};  // sum_D g, sum_D g * xhat
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      float fdy[VEC], fx[VEC];
      load<T, VEC>(dy + v * VEC, fdy);
      load<T, VEC>(x + v * VEC, fx);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const int64_t k = i * nvec + v;
        const float xhat = (fx[i] - mean) * rstd, g = fdy[i] * mod[k];
        acc_dy[k] += fdy[i];
        acc_dyx[k] += fdy[i] * xhat;
        gs[k] = g;
        xh[k] = xhat;
        s[0] += g;
        s[1] += g * xhat;
      }
    }
    block_sum(s, red);
    const float mean_g = RMS ? 0.f : s[0] / D, mean_gx = s[1] / D;
    T* dx = static_cast<T*>(a.dx) + row * D;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      float out[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const int64_t k = i * nvec + v;
        out[i] = rstd * (gs[k] - mean_g - xh[k] * mean_gx);
      }
      store<T, VEC>(dx + v * VEC, out);
    }
  }

  float* part_shift = a.part_shift + (b * chunks + c) * D;
  float* part_scale = a.part_scale + (b * chunks + c) * D;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x)
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      part_shift[v * VEC + i] = acc_dy[i * nvec + v];
      part_scale[v * VEC + i] = acc_dyx[i * nvec + v];
    }
}

inline size_t fwd_smem(int64_t D) { return (D + 32) * sizeof(float); }
inline size_t bwd_smem(int64_t D) { return (kBwdColumns * D + kBwdScratch) * sizeof(float); }

// Launches kernel<<<blocks, threads sized to D / VEC, smem>>>, opting in to more than 48 KiB of shared memory.
template <typename Args>
cudaError_t launch(void (*kernel)(Args), const Args& a, int64_t blocks, int64_t vectors, size_t smem,
                   cudaStream_t stream) {
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
  }
  kernel<<<blocks, threads_for(vectors, kMaxThreads), smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t fwd_typed(const NormModulateFwd& a, cudaStream_t stream) {
  auto kernel = a.rms ? (a.weight ? norm_modulate_fwd_kernel<T, VEC, true, true>
                                  : norm_modulate_fwd_kernel<T, VEC, true, false>)
                      : (a.weight ? norm_modulate_fwd_kernel<T, VEC, false, true>
                                  : norm_modulate_fwd_kernel<T, VEC, false, false>);
  return launch(kernel, a, a.B * a.N, a.D / VEC, fwd_smem(a.D), stream);
}

template <typename T, int VEC>
cudaError_t bwd_typed(const NormModulateBwd& a, cudaStream_t stream) {
  auto kernel = a.rms ? (a.weight ? norm_modulate_bwd_kernel<T, VEC, true, true>
                                  : norm_modulate_bwd_kernel<T, VEC, true, false>)
                      : (a.weight ? norm_modulate_bwd_kernel<T, VEC, false, true>
                                  : norm_modulate_bwd_kernel<T, VEC, false, false>);
  const int64_t chunks = (a.N + a.rows_per_chunk - 1) / a.rows_per_chunk;
  return launch(kernel, a, a.B * chunks, a.D / VEC, bwd_smem(a.D), stream);
}

}  // namespace

cudaError_t launch_norm_modulate_fwd(const NormModulateFwd& a, cudaStream_t stream) {
  if (a.B * a.N == 0 || a.D == 0) return cudaSuccess;
  const bool vec = vectorizable(a.dtype, a.D, {a.x, a.y, a.shift, a.scale, a.weight}, {a.shift_stride, a.scale_stride});
  return dispatch(a.dtype, vec, [&](auto c) {
    using C = decltype(c);
    return fwd_typed<typename C::T, C::VEC>(a, stream);
  });
}

cudaError_t launch_norm_modulate_bwd(const NormModulateBwd& a, cudaStream_t stream) {
  if (a.B * a.N == 0 || a.D == 0) return cudaSuccess;
  const bool vec = vectorizable(a.dtype, a.D, {a.dy, a.x, a.dx, a.scale, a.weight}, {a.scale_stride});
  return dispatch(a.dtype, vec, [&](auto c) {
    using C = decltype(c);
    return bwd_typed<typename C::T, C::VEC>(a, stream);
  });
}

int64_t norm_modulate_max_width() {
  const int64_t optin = device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>();
  return (optin / static_cast<int64_t>(sizeof(float)) - kBwdScratch) / kBwdColumns;  // the widest D bwd_smem fits
}

}  // namespace miro
