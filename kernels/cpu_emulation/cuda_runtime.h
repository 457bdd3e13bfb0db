// CPU stand-in for the CUDA runtime and device built-ins that kernels/csrc uses, so the kernels' indexing and
// arithmetic can be tested on machines without a GPU (kernels/emulate.py). Single OS thread: every CUDA thread of
// a block is a fiber; blocks run one after another; __syncthreads is a barrier over the block's fibers and
// __shfl_xor_sync exchanges through the block (our kernels shuffle only where every thread of the block does).
// Shared memory is filled with NaN before each block, so reading a value that was never written shows up.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include <ucontext.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace emu {
constexpr int kSmCount = 4;                    // few SMs, so reductions over tokens use several chunks
constexpr size_t kMaxShared = 227 * 1024;      // H100's opt-in shared memory per block
constexpr size_t kStackBytes = 64 * 1024;      // per emulated CUDA thread
inline cudaError_t last_error = cudaSuccess;

// The running block: one fiber (ucontext) per CUDA thread. A barrier switches back to the scheduler, which runs
// every fiber up to its next barrier before any goes past it, exactly __syncthreads' semantics.
struct Block {
  std::vector<float> shared, shuffle;
  std::vector<ucontext_t> fibers;
  std::vector<char> done;
  ucontext_t scheduler;
  std::function<void()> body;
  unsigned current = 0;
};
inline Block* block = nullptr;
inline float* shared_memory() { return block->shared.data(); }
inline void sync() { swapcontext(&block->fibers[block->current], &block->scheduler); }
inline void fiber_entry() {
  block->body();
  block->done[block->current] = 1;  // returning resumes the scheduler (uc_link)
}

template <typename Args>
void launch(void (*kernel)(Args), dim3 grid, dim3 threads, size_t shared_bytes, cudaStream_t, Args args) {
  if (threads.x == 0 || threads.x > 1024 || threads.y * threads.z != 1 || shared_bytes > kMaxShared ||
      grid.y > 65535 || grid.z > 65535) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  Block b;
  block = &b;
  b.body = [&] { kernel(args); };
  b.fibers.resize(threads.x);
  b.shuffle.assign(threads.x, NAN);
  std::vector<char> stacks(threads.x * kStackBytes);
  blockDim = threads;
  gridDim = grid;
  const size_t blocks = static_cast<size_t>(grid.x) * grid.y * grid.z;
  for (size_t i = 0; i < blocks; ++i) {
    blockIdx = dim3(i % grid.x, i / grid.x % grid.y, i / (static_cast<size_t>(grid.x) * grid.y));
    b.shared.assign(shared_bytes / sizeof(float) + 1, NAN);
    b.done.assign(threads.x, 0);
    for (unsigned t = 0; t < threads.x; ++t) {
      getcontext(&b.fibers[t]);
      b.fibers[t].uc_stack.ss_sp = stacks.data() + t * kStackBytes;
      b.fibers[t].uc_stack.ss_size = kStackBytes;
      b.fibers[t].uc_link = &b.scheduler;
      makecontext(&b.fibers[t], fiber_entry, 0);
    }
    for (bool running = true; running;) {  // one round: every live fiber up to its next barrier or its end
      running = false;
      for (unsigned t = 0; t < threads.x; ++t) {
        if (b.done[t]) continue;
        b.current = t;
        threadIdx = dim3(t);
        swapcontext(&b.scheduler, &b.fibers[t]);
        running = true;
      }
    }
  }
  block = nullptr;
}
}  // namespace emu

inline void __syncthreads() { emu::sync(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  emu::block->shuffle[threadIdx.x] = v;
  emu::sync();
  const float out = emu::block->shuffle[threadIdx.x ^ lane_mask];
  emu::sync();
  return out;
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
using std::max;
using std::min;

inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid configuration"; }
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? emu::kSmCount : static_cast<int>(emu::kMaxShared);
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
